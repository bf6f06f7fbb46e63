"""Learned timings for ETAs, and `updated_at` kept true when other programs change a status.

`eta_stats`: one row per (model, resolution, frames, memory profile, device), the key the estimator
looks up before a task runs; running averages updated when a task completes (worker.live.eta).

A trigger stamps `updated_at` when a statement changes `status` without setting it (a user's raw
`UPDATE tasks SET status = 'Cancelled' ...`), so the live server, which looks for rows changed since
its last poll, sees that change too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


PG_TOUCH_FUNCTION = """
CREATE OR REPLACE FUNCTION tasks_touch_on_status() RETURNS trigger AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := timezone('utc', clock_timestamp());
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""

# The WHEN clause stops the trigger's own UPDATE from firing it again.
SQLITE_TOUCH_TRIGGER = """
CREATE TRIGGER tasks_touch_on_status AFTER UPDATE OF status ON tasks
FOR EACH ROW WHEN NEW.status IS NOT OLD.status AND NEW.updated_at IS OLD.updated_at
BEGIN
    UPDATE tasks SET updated_at = strftime('%Y-%m-%d %H:%M:%f000', 'now') WHERE id = NEW.id;
END
"""


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgres():
        now = sa.text("timezone('utc', clock_timestamp())")
    else:
        now = sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    op.create_table(
        "eta_stats",
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("resolution", sa.Text, nullable=False),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("memory_profile", sa.Text, nullable=False),
        # The GPU name (or "cpu"): workers sharing one Postgres may run on different hardware.
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False, server_default="0"),
        sa.Column("step_s", sa.Float, nullable=True),
        sa.Column("first_step_extra_s", sa.Float, nullable=True),
        sa.Column("encode_s", sa.Float, nullable=True),
        sa.Column("decode_s", sa.Float, nullable=True),
        sa.Column("write_s", sa.Float, nullable=True),
        sa.Column("other_s", sa.Float, nullable=True),
        sa.Column("load_s", sa.Float, nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("model", "resolution", "frames", "memory_profile", "device", name="pk_eta_stats"),
    )
    # The live server polls for rows changed since its last look.
    op.create_index("ix_tasks_updated_at", "tasks", ["updated_at"])
    if _postgres():
        op.execute(PG_TOUCH_FUNCTION)
        op.execute(
            "CREATE TRIGGER tasks_touch_on_status BEFORE UPDATE ON tasks FOR EACH ROW "
            "EXECUTE FUNCTION tasks_touch_on_status()"
        )
    else:
        op.execute(SQLITE_TOUCH_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS tasks_touch_on_status" + (" ON tasks" if _postgres() else ""))
    if _postgres():
        op.execute("DROP FUNCTION IF EXISTS tasks_touch_on_status()")
    op.drop_index("ix_tasks_updated_at", table_name="tasks")
    op.drop_table("eta_stats")
