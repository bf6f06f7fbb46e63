"""The claim token: which worker process holds a claimed row, beside the human-readable `worker_id`.

Two processes may share a `worker_id` (a copied env file, `WAN_WORKER_ID` set fleet-wide). Each process
draws a random token at start; the claim writes it and every guarded write by a worker (heartbeat,
progress, complete, failed, retry, defer, release) matches it as well as `worker_id`, so a row re-queued
from a stalled process and claimed by its namesake is no longer writable by the stalled one.

Only a nullable column is added: workers of an older version neither read nor write it and keep working.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("claim_token", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "claim_token")  # SQLite 3.35+ drops columns natively
