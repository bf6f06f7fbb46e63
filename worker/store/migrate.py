"""Create or upgrade a database to the latest schema with Alembic (used by `init-db` and `run`).

Before migrating, the database is checked to be one this code can own: a `tasks` (or `workers`,
`eta_stats`) table that no wan-worker migration recorded in `alembic_version` was made by another tool,
and a revision in `alembic_version` that these migrations do not know was written by a newer wan-worker.
Both raise `SchemaMismatch` (a ValueError: the CLI prints one line and exits 2) instead of an Alembic or
SQL traceback half-way through a migration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from worker.store.hw_table import HW_MARKER_COLUMN, HW_REQUIRED_COLUMNS, forget_layout, is_hw_tasks_table
from worker.store.schema import metadata

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 724_310_001
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaMismatch(ValueError):
    """The database holds a schema wan-worker did not create, or one newer than this code knows."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def check_schema(connection: Connection, config: Config | None = None) -> None:
    """Raise `SchemaMismatch` unless the database is empty or at a revision of these migrations."""
    where = f"database {connection.engine.url.render_as_string(hide_password=True)}"
    script = ScriptDirectory.from_config(config or _config())
    known = {revision.revision for revision in script.walk_revisions()}
    current = MigrationContext.configure(connection).get_current_heads()
    unknown = sorted(set(current) - known)
    if unknown:
        raise SchemaMismatch(
            f"{where}: its schema is at revision {', '.join(repr(r) for r in unknown)}, which this wan-worker "
            f"does not know (it knows {', '.join(sorted(known))}): the database was migrated by a newer "
            "wan-worker; run that version (or a newer one) against it"
        )
    if current:
        return
    # No revision recorded: any table of ours that already exists was made by someone else, and migration
    # 0001 would fail on it with "table already exists" (or, worse, the worker would misread its rows).
    # The one exception is Headless-Wan2GP's `tasks` (with its Supabase `workers`): 0001 adopts those.
    inspector = sa.inspect(connection)
    existing = set(inspector.get_table_names())
    adopting = "tasks" in existing and is_hw_tasks_table({c["name"] for c in inspector.get_columns("tasks")})
    if adopting:
        log.warning(
            "adopting the Headless-Wan2GP tasks table in %s: adding wan-worker's columns, keeping every row",
            where,
            extra={"event": "hw_table_adopted"},
        )
    for table in sorted(metadata.tables.values(), key=lambda t: t.name != "tasks"):  # the users' table first
        if table.name not in existing or (adopting and table.name in ("tasks", "workers")):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column.name for column in table.columns if column.name not in present]
        lacking = f"it lacks the columns {', '.join(missing)}" if missing else "it has the expected columns"
        hw_missing = sorted(HW_REQUIRED_COLUMNS - present)
        hint = (
            f" (it looks like a Headless-Wan2GP table, which would be adopted, but lacks HW's {', '.join(hw_missing)})"
            if table.name == "tasks" and HW_MARKER_COLUMN in present
            else ""
        )
        raise SchemaMismatch(
            f"{where}: a {table.name!r} table exists that was not created by wan-worker ({lacking}, and "
            f"alembic_version records no wan-worker revision){hint}: point --db at another database, or rename "
            "or drop that table"
        )


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration; safe to call on an up-to-date database.

    Raises `SchemaMismatch` for a foreign or newer schema (nothing is changed then)."""
    config = _config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several workers may start together against one fresh database: migrate one at a time.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        check_schema(connection, config)  # under the lock: a concurrent first migration is already recorded
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    forget_layout(engine)  # the table may have gained columns
    log.info("database schema is at head", extra={"event": "db_migrated"})
