"""Create or upgrade a database to the latest schema with Alembic (used by `init-db` and `run`)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 724_310_001
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration; safe to call on an up-to-date database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several workers may start together against one fresh database: migrate one at a time.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database schema is at head", extra={"event": "db_migrated"})
