"""The handle every SQL module of the store shares: the database clock, a transaction, row -> Task.

Owns the backend differences that are not about claiming: SQLite and Postgres tell the time differently
and break created_at ties differently. The status short names (`Q`, `P`, ...) keep the statements short.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker.store.schema import is_sqlite, tasks
from worker.task import Task, TaskStatus

Q = TaskStatus.QUEUED.value
P = TaskStatus.IN_PROGRESS.value
C = TaskStatus.COMPLETE.value
F = TaskStatus.FAILED.value
X = TaskStatus.CANCELLED.value


class Db:
    """An engine plus what its backend needs: the database clock and the created_at tiebreak."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)

    def now(self, plus_s: float = 0.0) -> sa.ColumnElement[Any]:
        """Current UTC time (+ seconds) from the database, so all machines share one clock."""
        if self.sqlite:
            return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{plus_s:+.3f} seconds")
        now = sa.func.timezone("utc", sa.func.clock_timestamp())
        return now + sa.func.make_interval(0, 0, 0, 0, 0, 0, plus_s) if plus_s else now

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction (SQLite: BEGIN IMMEDIATE, see worker.store.schema)."""
        with self.engine.begin() as connection:
            yield connection

    def tiebreak(self) -> sa.ColumnElement[Any]:
        """The column that orders rows created in the same instant."""
        # SQLite timestamps have millisecond resolution: insertion order (rowid) breaks ties.
        return sa.literal_column("tasks.rowid") if self.sqlite else tasks.c.id

    def claim_order(self) -> list[sa.ColumnElement[Any]]:
        """The order workers claim queued rows in: priority, then age."""
        return [tasks.c.priority.desc(), tasks.c.created_at, self.tiebreak()]

    def select_tasks(self, query: sa.Select[Any]) -> list[Task]:
        """Run a `select(tasks)` query in its own transaction."""
        with self.tx() as conn:
            return [to_task(row) for row in conn.execute(query).mappings()]


def to_task(row: Any) -> Task:
    """A `tasks` row (mapping) as a Task."""
    return Task(
        id=row["id"],
        task_type=row["task_type"],
        params_text=row["params"],
        status=TaskStatus(row["status"]),
        priority=row["priority"],
        dependant_on=row["dependant_on"],
        parent_task_id=row["parent_task_id"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        worker_id=row["worker_id"],
        output_location=row["output_location"],
        result_data=row["result_data"],
        error_message=row["error_message"],
        progress=row["progress"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        generation_started_at=row["generation_started_at"],
        generation_processed_at=row["generation_processed_at"],
        lease_expires_at=row["lease_expires_at"],
        run_after=row["run_after"],
    )
