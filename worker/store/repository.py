"""All SQL of the project: the task repository over SQLite or Postgres.

The worker loop, the queue API and the CLI call these named operations; nothing else builds SQL.
Where the two backends must differ (claiming, the database clock) the difference is isolated here:
Postgres claims with `FOR UPDATE SKIP LOCKED`; SQLite with `BEGIN IMMEDIATE` (see worker.store.schema) and a
conditional update. Every status write by a worker is guarded by (status='In Progress', worker_id),
so a user's `Cancelled` is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker.store.schema import eta_stats, is_sqlite, tasks, workers
from worker.task import FINAL_STATUSES, NewTask, Task, TaskStatus

log = logging.getLogger(__name__)

CLAIM_CANDIDATES = 50  # rows examined per claim, enough for the resident-model preference
CLAIM_PAGES = 20  # windows read past rows this worker may not take (tasks needing more GPUs) before giving up
CYCLE_IDS_SHOWN = 10  # task ids named in a dependency-cycle message

Chooser = Callable[[list[Task]], Task | None]
Acceptor = Callable[[Task], bool]

_Q = TaskStatus.QUEUED.value
_P = TaskStatus.IN_PROGRESS.value
_C = TaskStatus.COMPLETE.value
_F = TaskStatus.FAILED.value
_X = TaskStatus.CANCELLED.value


@dataclass(frozen=True)
class StaleRecovery:
    """What `requeue_stale` did."""

    requeued: list[str]
    failed: list[str]


class TaskRepository(Protocol):
    """The operations the worker loop needs; implemented over SQL here and in memory by unit tests."""

    def claim_next(
        self, worker_id: str, lease_s: float, choose: Chooser, *, accept: Acceptor | None = None
    ) -> Task | None: ...
    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool: ...
    def get_status(self, task_id: str) -> TaskStatus | None: ...
    def mark_complete(self, task_id: str, worker_id: str, output: str | None, result: dict[str, Any]) -> bool: ...
    def mark_failed(self, task_id: str, worker_id: str, message: str, result: dict[str, Any] | None = None) -> bool: ...
    def retry_later(self, task_id: str, worker_id: str, message: str, delay_s: float) -> bool: ...
    def defer(self, task_id: str, worker_id: str, wait_for: str, progress: dict[str, Any] | None) -> bool: ...
    def set_progress(self, task_id: str, progress: dict[str, Any]) -> bool: ...
    def release(self, task_id: str, worker_id: str) -> bool: ...
    def requeue_stale(self) -> StaleRecovery: ...
    def fail_blocked(self) -> list[str]: ...
    def register_worker(self, worker_id: str, gpu: str | None) -> None: ...
    def update_worker(self, worker_id: str, status: str, current_model: str | None) -> None: ...


def new_task_id() -> str:
    """Random hex, the same shape as the database default."""
    return uuid.uuid4().hex


class SqlTaskRepository:
    """TaskRepository over a SQLAlchemy engine (SQLite file or Postgres)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)

    # ---- the database clock -------------------------------------------------------------------

    def _now(self, plus_s: float = 0.0) -> sa.ColumnElement[Any]:
        """Current UTC time (+ seconds) from the database, so all machines share one clock."""
        if self._sqlite:
            return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{plus_s:+.3f} seconds")
        now = sa.func.timezone("utc", sa.func.clock_timestamp())
        return now + sa.func.make_interval(0, 0, 0, 0, 0, 0, plus_s) if plus_s else now

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    # ---- submitting and reading (queue API, CLI) ----------------------------------------------

    def insert(self, task: NewTask) -> str:
        """Queue a task; returns its id."""
        task_id = task.id or new_task_id()
        with self._tx() as conn:
            conn.execute(self._insert_statement(task, task_id))
        return task_id

    def _insert_statement(self, task: NewTask, task_id: str) -> sa.Insert:
        return tasks.insert().values(
            id=task_id,
            task_type=task.task_type,
            params=json.dumps(task.params),
            status=_Q,
            priority=task.priority,
            dependant_on=task.dependant_on,
            parent_task_id=task.parent_task_id,
            attempts=0,
            max_attempts=task.max_attempts,
            created_at=self._now(),
            updated_at=self._now(),
        )

    def get(self, task_id: str) -> Task | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
        return _to_task(row) if row else None

    def get_status(self, task_id: str) -> TaskStatus | None:
        with self._tx() as conn:
            status = conn.execute(sa.select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        return TaskStatus(status) if status else None

    def list_tasks(self, status: str | None = None, limit: int = 100) -> list[Task]:
        query = sa.select(tasks).order_by(tasks.c.created_at.desc(), self._tiebreak().desc()).limit(limit)
        if status is not None:
            query = query.where(tasks.c.status == status)
        with self._tx() as conn:
            return [_to_task(row) for row in conn.execute(query).mappings()]

    def counts_by_status(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)).all()
        return {status: count for status, count in rows}

    def queued_by_priority(self) -> dict[int, int]:
        query = (
            sa.select(tasks.c.priority, sa.func.count())
            .where(tasks.c.status == _Q)
            .group_by(tasks.c.priority)
            .order_by(tasks.c.priority.desc())
        )
        with self._tx() as conn:
            return {priority: count for priority, count in conn.execute(query).all()}

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task and its open children (the worker notices at its next step)."""
        with self._tx() as conn:
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_([_Q, _P]))
                .values(status=_X, updated_at=self._now(), error_message="cancelled by request")
            )
            conn.execute(
                tasks.update()
                .where(tasks.c.parent_task_id == task_id, tasks.c.status.in_([_Q, _P]))
                .values(status=_X, updated_at=self._now(), error_message=f"parent task {task_id} was cancelled")
            )
        return result.rowcount == 1

    def insert_children(self, children: list[NewTask]) -> list[str]:
        """Insert an orchestrator's child rows; rows whose id already exists are kept as they are, so a
        re-run after a crash creates no duplicates and keeps children that already completed."""
        inserted = []
        with self._tx() as conn:
            for child in children:
                assert child.id is not None, "children need deterministic ids"
                exists = conn.execute(sa.select(tasks.c.id).where(tasks.c.id == child.id)).scalar()
                if exists is None:
                    conn.execute(self._insert_statement(child, child.id))
                    inserted.append(child.id)
        return inserted

    def children_of(self, parent_id: str) -> list[Task]:
        query = sa.select(tasks).where(tasks.c.parent_task_id == parent_id).order_by(tasks.c.id)
        with self._tx() as conn:
            return [_to_task(row) for row in conn.execute(query).mappings()]

    def set_progress(self, task_id: str, progress: dict[str, Any]) -> bool:
        """Progress of a task this worker does not hold (an orchestrator waiting on its children)."""
        return self._write(
            tasks.update()
            .where(tasks.c.id == task_id, tasks.c.status.in_([_Q, _P]))
            .values(progress=progress, updated_at=self._now())
        )

    # ---- claiming -----------------------------------------------------------------------------

    def _tiebreak(self) -> sa.ColumnElement[Any]:
        # SQLite timestamps have millisecond resolution: insertion order (rowid) breaks ties.
        return sa.literal_column("tasks.rowid") if self._sqlite else tasks.c.id

    def _ready(self, page: int = 0) -> sa.Select[Any]:
        prerequisite = tasks.alias("prerequisite")
        prerequisite_done = (
            sa.select(prerequisite.c.id)
            .where(prerequisite.c.id == tasks.c.dependant_on, prerequisite.c.status == _C)
            .exists()
        )
        order = [tasks.c.priority.desc(), tasks.c.created_at, self._tiebreak()]
        return (
            sa.select(tasks)
            .where(
                tasks.c.status == _Q,
                sa.or_(tasks.c.run_after.is_(None), tasks.c.run_after <= self._now()),
                sa.or_(tasks.c.dependant_on.is_(None), prerequisite_done),
            )
            .order_by(*order)
            .limit(CLAIM_CANDIDATES)
            .offset(page * CLAIM_CANDIDATES)
        )

    def _candidates(self, conn: Connection, accept: Acceptor | None) -> list[Task]:
        """The first window of ready rows holding any this worker accepts, filtered by `accept`."""
        for page in range(CLAIM_PAGES if accept is not None else 1):
            window = [_to_task(row) for row in conn.execute(self._ready(page)).mappings()]
            accepted = window if accept is None else [task for task in window if accept(task)]
            if accepted or len(window) < CLAIM_CANDIDATES:
                return accepted
        return []

    def claim_next(
        self, worker_id: str, lease_s: float, choose: Chooser, *, accept: Acceptor | None = None
    ) -> Task | None:
        """Atomically move one ready task to In Progress for this worker (attempts + 1).

        Candidates are read without locks; only the chosen row is locked (Postgres: `FOR UPDATE SKIP
        LOCKED`, so concurrent workers pass over each other's picks instead of waiting or skipping the
        whole candidate window). If another worker got there first, the next choice is tried. `accept`
        filters the candidates in Python (a single-GPU worker never takes a task asking for 2 GPUs);
        when a whole window is refused, the next window is read, so such tasks cannot hide the rest.
        """
        with self._tx() as conn:
            candidates = self._candidates(conn, accept)
            while candidates:
                chosen = choose(candidates)
                if chosen is None:
                    return None
                claimed = self._claim_row(conn, chosen.id, worker_id, lease_s)
                if claimed is not None:
                    return claimed
                candidates = [task for task in candidates if task.id != chosen.id]
        return None

    def _claim_row(self, conn: Connection, task_id: str, worker_id: str, lease_s: float) -> Task | None:
        if not self._sqlite:  # SQLite already holds the write lock (BEGIN IMMEDIATE)
            lock = (
                sa.select(tasks.c.id)
                .where(tasks.c.id == task_id, tasks.c.status == _Q)
                .with_for_update(skip_locked=True)
            )
            if conn.execute(lock).scalar() is None:
                return None
        row = (
            conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == _Q)
                .values(
                    status=_P,
                    worker_id=worker_id,
                    attempts=tasks.c.attempts + 1,
                    lease_expires_at=self._now(lease_s),
                    run_after=None,
                    progress=None,
                    generation_started_at=self._now(),
                    updated_at=self._now(),
                )
                .returning(*tasks.c)
            )
            .mappings()
            .first()
        )
        return _to_task(row) if row else None

    # ---- a worker's guarded writes --------------------------------------------------------------

    def _guarded(self, task_id: str, worker_id: str) -> sa.Update:
        return tasks.update().where(tasks.c.id == task_id, tasks.c.status == _P, tasks.c.worker_id == worker_id)

    def _write(self, statement: sa.Update) -> bool:
        with self._tx() as conn:
            return conn.execute(statement).rowcount == 1

    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool:
        """Renew the lease (and store progress); False when the task is no longer ours (cancelled...)."""
        values: dict[str, Any] = {"lease_expires_at": self._now(lease_s), "updated_at": self._now()}
        if progress is not None:
            values["progress"] = progress
        parent = tasks.alias("parent")
        parent_cancelled = (
            sa.select(parent.c.id).where(parent.c.id == tasks.c.parent_task_id, parent.c.status == _X).exists()
        )
        with self._tx() as conn:
            # A cancelled orchestrator stops its running child within a beat, not at the next sweep.
            conn.execute(
                self._guarded(task_id, worker_id)
                .where(parent_cancelled)
                .values(
                    status=_X,
                    error_message=sa.literal("parent task ") + tasks.c.parent_task_id + sa.literal(" was cancelled"),
                    updated_at=self._now(),
                )
            )
            return conn.execute(self._guarded(task_id, worker_id).values(**values)).rowcount == 1

    def mark_complete(self, task_id: str, worker_id: str, output: str | None, result: dict[str, Any]) -> bool:
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=_C,
                output_location=output,
                result_data=result,
                error_message=None,
                lease_expires_at=None,
                generation_processed_at=self._now(),
                updated_at=self._now(),
            )
        )

    def mark_failed(self, task_id: str, worker_id: str, message: str, result: dict[str, Any] | None = None) -> bool:
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=_F,
                error_message=message,
                result_data=result,
                lease_expires_at=None,
                generation_processed_at=self._now(),
                updated_at=self._now(),
            )
        )

    def retry_later(self, task_id: str, worker_id: str, message: str, delay_s: float) -> bool:
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=_Q,
                worker_id=None,
                lease_expires_at=None,
                run_after=self._now(delay_s),
                error_message=message,
                updated_at=self._now(),
            )
        )

    def defer(self, task_id: str, worker_id: str, wait_for: str, progress: dict[str, Any] | None) -> bool:
        """Put a task back to wait for another one (an orchestrator waiting for its last child);
        waiting is not an attempt."""
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=_Q,
                worker_id=None,
                lease_expires_at=None,
                dependant_on=wait_for,
                attempts=sa.case((tasks.c.attempts > 0, tasks.c.attempts - 1), else_=0),
                progress=progress,
                updated_at=self._now(),
            )
        )

    def release(self, task_id: str, worker_id: str) -> bool:
        """Give a task back untouched (shutdown abort): the attempt does not count against it."""
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=_Q,
                worker_id=None,
                lease_expires_at=None,
                attempts=sa.case((tasks.c.attempts > 0, tasks.c.attempts - 1), else_=0),
                progress=None,
                updated_at=self._now(),
            )
        )

    # ---- sweeps ---------------------------------------------------------------------------------

    def requeue_stale(self) -> StaleRecovery:
        """Rows In Progress whose lease expired: re-queue, or fail once attempts reach max_attempts."""
        stale = sa.and_(tasks.c.status == _P, tasks.c.lease_expires_at < self._now())
        with self._tx() as conn:
            failed = (
                conn.execute(
                    tasks.update()
                    .where(stale, tasks.c.attempts >= tasks.c.max_attempts)
                    .values(
                        status=_F,
                        error_message=sa.literal("the worker running this task stopped responding (lease expired) on ")
                        + sa.cast(tasks.c.attempts, sa.Text)
                        + sa.literal(" of max_attempts ")
                        + sa.cast(tasks.c.max_attempts, sa.Text)
                        + sa.literal(" attempts; last worker: ")
                        + sa.func.coalesce(tasks.c.worker_id, "unknown"),
                        lease_expires_at=None,
                        updated_at=self._now(),
                    )
                    .returning(tasks.c.id)
                )
                .scalars()
                .all()
            )
            requeued = (
                conn.execute(
                    tasks.update()
                    .where(stale)
                    .values(
                        status=_Q,
                        worker_id=None,
                        lease_expires_at=None,
                        error_message=sa.literal("re-queued: lease of worker ")
                        + sa.func.coalesce(tasks.c.worker_id, "unknown")
                        + sa.literal(" expired"),
                        updated_at=self._now(),
                    )
                    .returning(tasks.c.id)
                )
                .scalars()
                .all()
            )
        return StaleRecovery(requeued=list(requeued), failed=list(failed))

    def fail_blocked(self) -> list[str]:
        """Queued tasks whose prerequisite ended Failed/Cancelled, or does not exist, end Failed; open
        children of a Cancelled parent are Cancelled."""
        prerequisite = tasks.alias("prerequisite")

        def prerequisite_column(column: str) -> sa.ScalarSelect[Any]:
            return sa.select(prerequisite.c[column]).where(prerequisite.c.id == tasks.c.dependant_on).scalar_subquery()

        prerequisite_exists = sa.select(prerequisite.c.id).where(prerequisite.c.id == tasks.c.dependant_on).exists()
        parent = tasks.alias("parent")
        parent_cancelled = (
            sa.select(parent.c.id).where(parent.c.id == tasks.c.parent_task_id, parent.c.status == _X).exists()
        )
        # The prerequisite's own message is quoted, so a chain of dependants names the root cause.
        ended_message = (
            sa.literal("prerequisite task ")
            + tasks.c.dependant_on
            + sa.literal(" ended ")
            + prerequisite_column("status")
            + sa.literal(", so this task cannot run (")
            + sa.func.coalesce(prerequisite_column("error_message"), "no message")
            + sa.literal(")")
        )
        missing_message = (
            sa.literal("prerequisite task ")
            + tasks.c.dependant_on
            + sa.literal(" does not exist (dependant_on must name an existing task id)")
        )
        sweeps = [
            # First: a user's raw `UPDATE ... SET status='Cancelled'` on an orchestrator cancels its children
            # (rather than failing them as dependants of a cancelled sibling).
            (
                sa.and_(tasks.c.status.in_([_Q, _P]), tasks.c.parent_task_id.is_not(None), parent_cancelled),
                _X,
                sa.literal("parent task ") + tasks.c.parent_task_id + sa.literal(" was cancelled"),
            ),
            (sa.and_(tasks.c.status == _Q, prerequisite_column("status").in_([_F, _X])), _F, ended_message),
            (
                sa.and_(tasks.c.status == _Q, tasks.c.dependant_on.is_not(None), ~prerequisite_exists),
                _F,
                missing_message,
            ),
        ]
        changed: list[str] = []
        with self._tx() as conn:
            for condition, status, message in sweeps:
                statement = (
                    tasks.update()
                    .where(condition)
                    .values(status=status, error_message=message, updated_at=self._now())
                    .returning(tasks.c.id)
                )
                changed.extend(conn.execute(statement).scalars().all())
            changed.extend(self._fail_cycles(conn))
        return changed

    def _fail_cycles(self, conn: Connection) -> list[str]:
        """Queued tasks whose dependency chain leads back to themselves wait forever: Failed, naming the cycle."""
        waiting = sa.select(tasks.c.id, tasks.c.dependant_on).where(
            tasks.c.status == _Q, tasks.c.dependant_on.is_not(None)
        )
        failed: list[str] = []
        for cycle in find_dependency_cycles({task_id: on for task_id, on in conn.execute(waiting)}):
            shown = [*cycle, cycle[0]] if len(cycle) <= CYCLE_IDS_SHOWN else [*cycle[:CYCLE_IDS_SHOWN], "..."]
            message = (
                f"dependency cycle of {len(cycle)} task(s): {' -> '.join(shown)}; tasks on a cycle wait for each "
                "other forever, so none of them can run (fix their dependant_on)"
            )
            statement = (
                tasks.update()
                .where(tasks.c.id.in_(cycle), tasks.c.status == _Q)
                .values(status=_F, error_message=message, updated_at=self._now())
                .returning(tasks.c.id)
            )
            failed.extend(conn.execute(statement).scalars().all())
        return failed

    # ---- live progress: learned ETA timings and the status server's reads ------------------------

    def eta_stats(self) -> list[dict[str, Any]]:
        """Every learned-timing row (small: one per kind of task and device)."""
        with self._tx() as conn:
            return [dict(row) for row in conn.execute(sa.select(eta_stats)).mappings()]

    def update_eta_stats(self, key: dict[str, Any], merge: Callable[[dict[str, Any] | None], dict[str, Any]]) -> None:
        """Read, merge and write one timing row atomically (Postgres: row lock; SQLite: BEGIN IMMEDIATE)."""
        where = sa.and_(*(eta_stats.c[name] == value for name, value in key.items()))
        for attempt in range(2):
            try:
                with self._tx() as conn:
                    query = sa.select(eta_stats).where(where)
                    row = conn.execute(query if self._sqlite else query.with_for_update()).mappings().first()
                    values = {**merge(dict(row) if row else None), "updated_at": self._now()}
                    if row is None:
                        conn.execute(eta_stats.insert().values(**key, **values))
                    else:
                        conn.execute(eta_stats.update().where(where).values(**values))
                return
            except sa.exc.IntegrityError:
                if attempt:  # another worker inserted the same new key at once: merge into its row instead
                    raise

    def changed_since(self, since: tuple[datetime, str] | None, limit: int = 500) -> list[Task]:
        """Rows changed after the (updated_at, id) cursor, in that order, so a poller can page through a
        burst of rows stamped alike (a bulk INSERT); None: the open rows, for a first look."""
        if since is None:
            changed = tasks.c.status.in_([_Q, _P])
        else:
            at, last_id = since
            changed = sa.or_(tasks.c.updated_at > at, sa.and_(tasks.c.updated_at == at, tasks.c.id > last_id))
        query = sa.select(tasks).where(changed).order_by(tasks.c.updated_at, tasks.c.id).limit(limit)
        with self._tx() as conn:
            return [_to_task(row) for row in conn.execute(query).mappings()]

    def latest_update(self) -> datetime | None:
        """The newest updated_at in the table (where a poller starts looking for changes)."""
        with self._tx() as conn:
            return conn.execute(sa.select(sa.func.max(tasks.c.updated_at))).scalar()

    def queued_in_order(self, limit: int = 100) -> list[Task]:
        """Queued rows in the order workers claim them (priority, then age)."""
        order = [tasks.c.priority.desc(), tasks.c.created_at, self._tiebreak()]
        query = sa.select(tasks).where(tasks.c.status == _Q).order_by(*order).limit(limit)
        with self._tx() as conn:
            return [_to_task(row) for row in conn.execute(query).mappings()]

    def recently_updated(self, statuses: Sequence[str], limit: int = 20) -> list[Task]:
        """Rows in these statuses, most recently updated first (running tasks, recent results)."""
        query = (
            sa.select(tasks)
            .where(tasks.c.status.in_(list(statuses)))
            .order_by(tasks.c.updated_at.desc(), self._tiebreak().desc())
            .limit(limit)
        )
        with self._tx() as conn:
            return [_to_task(row) for row in conn.execute(query).mappings()]

    # ---- workers table ----------------------------------------------------------------------------

    def register_worker(self, worker_id: str, gpu: str | None) -> None:
        with self._tx() as conn:
            conn.execute(workers.delete().where(workers.c.id == worker_id))
            conn.execute(
                workers.insert().values(
                    id=worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    gpu=gpu,
                    status="idle",
                    last_heartbeat=self._now(),
                    started_at=self._now(),
                )
            )

    def update_worker(self, worker_id: str, status: str, current_model: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                workers.update()
                .where(workers.c.id == worker_id)
                .values(status=status, current_model=current_model, last_heartbeat=self._now())
            )

    def list_workers(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return [dict(row) for row in conn.execute(sa.select(workers).order_by(workers.c.id)).mappings()]


def find_dependency_cycles(edges: dict[str, str]) -> list[list[str]]:
    """The cycles of a task -> prerequisite map (each task has at most one), each in dependency order.

    One bounded walk per task: every task is visited once, so a long chain or a huge queue costs O(n).
    """
    on_walk, done = 1, 2
    state: dict[str, int] = {}
    cycles: list[list[str]] = []
    for start in edges:
        path: list[str] = []
        node = start
        while node in edges and node not in state:
            state[node] = on_walk
            path.append(node)
            node = edges[node]
        if state.get(node) == on_walk:  # the walk came back to itself
            cycles.append(path[path.index(node) :])
        for visited in path:
            state[visited] = done
    return cycles


def _to_task(row: Any) -> Task:
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


__all__ = [
    "FINAL_STATUSES",
    "SqlTaskRepository",
    "StaleRecovery",
    "TaskRepository",
    "find_dependency_cycles",
    "new_task_id",
]
