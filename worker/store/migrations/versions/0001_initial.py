"""Initial schema: tasks and workers, with database-side defaults so a minimal raw INSERT works.

An existing Headless-Wan2GP `tasks` table (and its Supabase `workers`) is adopted instead: the columns it lacks
are added, nothing of it is dropped or rewritten (worker.store.hw_table).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("Queued", "In Progress", "Complete", "Failed", "Cancelled")


def _defaults() -> tuple[sa.TextClause, sa.TextClause]:
    """(random hex id, current UTC time) as SQL for this backend."""
    if op.get_bind().dialect.name == "postgresql":
        return sa.text("replace(gen_random_uuid()::text, '-', '')"), sa.text("timezone('utc', clock_timestamp())")
    # SQLite: microsecond-formatted text, the same format SQLAlchemy writes, so values sort as text.
    return sa.text("(lower(hex(randomblob(16))))"), sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")


def _task_columns(new_id: sa.TextClause, now: sa.TextClause) -> list[sa.Column[Any]]:
    return [
        sa.Column("id", sa.Text, primary_key=True, server_default=new_id),
        sa.Column("task_type", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="Queued"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dependant_on", sa.Text, nullable=True),
        sa.Column("parent_task_id", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
        sa.Column("worker_id", sa.Text, nullable=True),
        sa.Column("lease_expires_at", sa.DateTime, nullable=True),
        sa.Column("run_after", sa.DateTime, nullable=True),
        sa.Column("output_location", sa.Text, nullable=True),
        sa.Column("result_data", sa.JSON, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("progress", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=now),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=now),
        sa.Column("generation_started_at", sa.DateTime, nullable=True),
        sa.Column("generation_processed_at", sa.DateTime, nullable=True),
    ]


def _worker_columns(now: sa.TextClause) -> list[sa.Column[Any]]:
    return [
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("gpu", sa.Text, nullable=True),
        sa.Column("current_model", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default="starting"),
        sa.Column("last_heartbeat", sa.DateTime, nullable=False, server_default=now),
        sa.Column("started_at", sa.DateTime, nullable=False, server_default=now),
    ]


TASK_INDEXES = {
    "ix_tasks_claim": ["status", "priority", "created_at"],
    "ix_tasks_dependant_on": ["dependant_on"],
    "ix_tasks_parent_task_id": ["parent_task_id"],
}


def upgrade() -> None:
    new_id, now = _defaults()
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    if "tasks" in existing:
        # A Headless-Wan2GP table (migrate.check_schema let nothing else through): adopt it in place.
        _add_missing_columns(inspector, "tasks", _task_columns(new_id, now))
        _add_statuses_to_enum(inspector)
        present = {index["name"] for index in inspector.get_indexes("tasks")}
        for name, columns in TASK_INDEXES.items():
            if name not in present:
                op.create_index(name, "tasks", columns)
    else:
        status_list = ", ".join(f"'{s}'" for s in STATUSES)
        op.create_table(
            "tasks",
            *_task_columns(new_id, now),
            sa.CheckConstraint(f"status IN ({status_list})", name="ck_tasks_status"),
        )
        for name, columns in TASK_INDEXES.items():
            op.create_index(name, "tasks", columns)
    if "workers" in existing:  # HW's Supabase `workers` (id, instance_type, status, last_heartbeat, metadata, ...)
        _add_missing_columns(inspector, "workers", _worker_columns(now))
    else:
        op.create_table("workers", *_worker_columns(now))


def _add_missing_columns(inspector: Any, table: str, wanted: list[sa.Column[Any]]) -> None:
    """Add each wanted column the table lacks. A column is added nullable unless it has a constant default
    (SQLite cannot add a NOT NULL column without one, nor one whose default is an expression), so the rows
    already there are kept exactly as they are."""
    present = {column["name"] for column in inspector.get_columns(table)}
    for column in wanted:
        if column.name in present:
            continue
        default = column.server_default
        constant = default is not None and isinstance(getattr(default, "arg", None), str)
        op.add_column(
            table,
            sa.Column(
                column.name,
                column.type,
                nullable=not (constant and not column.nullable),
                server_default=default.arg if constant else None,  # type: ignore[union-attr]
            ),
        )


def _add_statuses_to_enum(inspector: Any) -> None:
    """HW's Supabase `status` may be a Postgres enum without our 'Cancelled': add the values it lacks."""
    if op.get_bind().dialect.name != "postgresql":
        return
    status = next(column for column in inspector.get_columns("tasks") if column["name"] == "status")
    enum_name = getattr(status["type"], "name", None)
    values = getattr(status["type"], "enums", None)
    if not enum_name or values is None:
        return
    for value in STATUSES:
        if value not in values:
            op.execute(f"ALTER TYPE \"{enum_name}\" ADD VALUE IF NOT EXISTS '{value}'")


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_tasks_parent_task_id", table_name="tasks")
    op.drop_index("ix_tasks_dependant_on", table_name="tasks")
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.drop_table("tasks")
