"""Headless-Wan2GP's own `tasks` table, adopted in place (issue 13).

Headless-Wan2GP ("HW", github.com/peteromallet/Headless-Wan2GP) creates `tasks` itself: on SQLite with
`id TEXT PRIMARY KEY, task_type, params TEXT, status, dependant_on, output_location, created_at TEXT NOT NULL,
updated_at, project_id TEXT NOT NULL`, on Supabase/Postgres with uuid ids, jsonb params, timestamptz times and
a `project_id` that names a project. Migration 0001 adopts such a table instead of creating one: it adds our
columns (nullable or with a constant default), never drops, rewrites or reorders a row, and records the
revision, so later migrations and a restart treat it as ours.

This module answers, once per engine, what the live table looks like (`table_layout`): whether it is an HW
table (HW readers then look for answers in HW's places), whether ids are uuids (travel children get uuid5
ids), and which extra columns a new row must carry (`project_id` is copied from the parent row).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# The columns an HW `tasks` table always has (HW's SQLite DDL since June 2025, and its Supabase table).
HW_REQUIRED_COLUMNS = frozenset({"id", "task_type", "params", "status", "created_at"})
# The column only HW's table has: every HW insert writes it (`add_task_to_db`, the create-task function).
HW_MARKER_COLUMN = "project_id"
# HW's own default when a payload names no project (`add_task_to_db`: task_payload.get("project_id", ...)).
HW_DEFAULT_PROJECT_ID = "default_project_id"


def is_hw_tasks_table(columns: set[str]) -> bool:
    """True when a `tasks` table with these columns is Headless-Wan2GP's."""
    return columns >= HW_REQUIRED_COLUMNS and HW_MARKER_COLUMN in columns


@dataclass(frozen=True)
class TableLayout:
    """What the live `tasks` table is, beyond the columns our schema declares."""

    exists: bool = False  # False: no `tasks` yet (not cached: a migration is about to create it)
    hw: bool = False  # an adopted Headless-Wan2GP table
    uuid_ids: bool = False  # Postgres `id uuid`: ids we make must be uuids
    # Columns not in our schema that a new row must fill (NOT NULL without a default, plus project_id): type.
    carried_types: dict[str, Any] = field(default_factory=dict)

    @property
    def carried_columns(self) -> tuple[str, ...]:
        return tuple(self.carried_types)


_layouts: weakref.WeakKeyDictionary[Engine, TableLayout] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def table_layout(engine: Engine) -> TableLayout:
    """The layout of `tasks` behind `engine` (inspected once per engine; a plain layout when absent)."""
    with _lock:
        layout = _layouts.get(engine)
    if layout is not None:
        return layout
    with engine.connect() as connection:
        layout = inspect_layout(connection)
    if layout.exists:
        with _lock:
            _layouts[engine] = layout
    return layout


def forget_layout(engine: Engine) -> None:
    """Drop the cached layout (after a migration changed the table)."""
    with _lock:
        _layouts.pop(engine, None)


def inspect_layout(connection: Connection) -> TableLayout:
    from worker.store.schema import tasks  # the schema imports nothing from here; keep it that way

    inspector = sa.inspect(connection)
    if "tasks" not in inspector.get_table_names():
        return TableLayout()
    columns = {column["name"]: column for column in inspector.get_columns("tasks")}
    ours = set(tasks.c.keys())
    carried = [
        name
        for name, column in columns.items()
        if name not in ours
        and (name == HW_MARKER_COLUMN or (not column.get("nullable", True) and column.get("default") is None))
    ]
    id_type = columns.get("id", {}).get("type")
    return TableLayout(
        exists=True,
        hw=is_hw_tasks_table(set(columns)),
        uuid_ids=isinstance(id_type, sa.Uuid) or type(id_type).__name__.upper() == "UUID",
        carried_types={name: columns[name]["type"] for name in sorted(carried)},
    )
