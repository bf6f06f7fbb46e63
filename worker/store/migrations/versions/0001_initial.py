"""Initial schema: tasks and workers, with database-side defaults so a minimal raw INSERT works.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

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


def upgrade() -> None:
    new_id, now = _defaults()
    status_list = ", ".join(f"'{s}'" for s in STATUSES)
    op.create_table(
        "tasks",
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
        sa.CheckConstraint(f"status IN ({status_list})", name="ck_tasks_status"),
    )
    op.create_index("ix_tasks_claim", "tasks", ["status", "priority", "created_at"])
    op.create_index("ix_tasks_dependant_on", "tasks", ["dependant_on"])
    op.create_index("ix_tasks_parent_task_id", "tasks", ["parent_task_id"])
    op.create_table(
        "workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("gpu", sa.Text, nullable=True),
        sa.Column("current_model", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default="starting"),
        sa.Column("last_heartbeat", sa.DateTime, nullable=False, server_default=now),
        sa.Column("started_at", sa.DateTime, nullable=False, server_default=now),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_tasks_parent_task_id", table_name="tasks")
    op.drop_index("ix_tasks_dependant_on", table_name="tasks")
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.drop_table("tasks")
