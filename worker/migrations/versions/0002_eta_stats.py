"""Learned timings for ETAs: step, encode, decode and write seconds per kind of task.

One row per (model, resolution, frames, memory profile, device): the key the estimator looks up before
a task runs. Values are running averages updated when a task completes (worker.eta).

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


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
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


def downgrade() -> None:
    op.drop_index("ix_tasks_updated_at", table_name="tasks")
    op.drop_table("eta_stats")
