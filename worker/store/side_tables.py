"""The two small tables beside `tasks`: `workers` (who is running, on what) and `eta_stats` (learned timings).

Owns their reads and writes. The timing upsert is the one read-merge-write here: it locks its row
(Postgres `FOR UPDATE`; SQLite holds the write lock from BEGIN IMMEDIATE) and retries once when two workers
insert the same new key at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from worker.store.db import Db
from worker.store.schema import eta_stats, workers

EtaMerge = Callable[[dict[str, Any] | None], dict[str, Any]]


def all_eta_stats(db: Db) -> list[dict[str, Any]]:
    """Every learned-timing row (small: one per kind of task and device)."""
    with db.tx() as conn:
        return [dict(row) for row in conn.execute(sa.select(eta_stats)).mappings()]


def update_eta_stats(db: Db, key: dict[str, Any], merge: EtaMerge) -> None:
    """Read, merge and write one timing row atomically (Postgres: row lock; SQLite: BEGIN IMMEDIATE)."""
    where = sa.and_(*(eta_stats.c[name] == value for name, value in key.items()))
    for attempt in range(2):
        try:
            with db.tx() as conn:
                query = sa.select(eta_stats).where(where)
                row = conn.execute(query if db.sqlite else query.with_for_update()).mappings().first()
                values = {**merge(dict(row) if row else None), "updated_at": db.now()}
                if row is None:
                    conn.execute(eta_stats.insert().values(**key, **values))
                else:
                    conn.execute(eta_stats.update().where(where).values(**values))
            return
        except sa.exc.IntegrityError:
            if attempt:  # another worker inserted the same new key at once: merge into its row instead
                raise


def register_worker(db: Db, worker_id: str, gpu: str | None) -> None:
    """(Re)write this worker's row: host, pid, GPU, idle."""
    with db.tx() as conn:
        conn.execute(workers.delete().where(workers.c.id == worker_id))
        conn.execute(
            workers.insert().values(
                id=worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                gpu=gpu,
                status="idle",
                last_heartbeat=db.now(),
                started_at=db.now(),
            )
        )


def update_worker(db: Db, worker_id: str, status: str, current_model: str | None) -> None:
    """This worker's status and resident model, with a fresh heartbeat."""
    with db.tx() as conn:
        conn.execute(
            workers.update()
            .where(workers.c.id == worker_id)
            .values(status=status, current_model=current_model, last_heartbeat=db.now())
        )


def list_workers(db: Db) -> list[dict[str, Any]]:
    """Every worker row, by id."""
    with db.tx() as conn:
        return [dict(row) for row in conn.execute(sa.select(workers).order_by(workers.c.id)).mappings()]
