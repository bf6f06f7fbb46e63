"""The task repository: the `TaskRepository` protocol and `SqlTaskRepository` over SQLite or Postgres.

All SQL of the project lives in worker.store; nothing else builds SQL. This module owns inserting and
reading single tasks, the claim and a worker's guarded writes; `SqlTaskRepository` also exposes, under
their historical names, the sweeps (worker.store.sweeps), the read-only queries of the CLI and live pages
(worker.store.queries) and the workers / ETA-timing tables (worker.store.side_tables).

Where the two backends must differ in claiming, the difference is isolated here: Postgres claims with
`FOR UPDATE SKIP LOCKED`; SQLite with `BEGIN IMMEDIATE` (see worker.store.schema) and a conditional update,
each in one transaction. Every status write by a worker is guarded by (status='In Progress', worker_id,
claim_token), so a user's `Cancelled` is never overwritten.

Claim ownership. `worker_id` is a human-readable name that two processes may share by mistake, so each
`SqlTaskRepository` (one per worker process, created at start) draws a random `claim_token`: the claim
writes it into the row and every guarded write also matches it. A process that stalled past its lease can
then no longer write a row its namesake re-claimed. `mark_complete` takes an optional `publish` callback
that renames the attempt's staged output into place inside the guarded transaction, after the guarded
UPDATE matched and before the commit: the row stays locked (SQLite's write lock, Postgres's row lock)
while the file is renamed, so no other worker can re-claim or complete the task between the check and
the rename, and a worker that lost its claim never touches the final file.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker.store import queries, side_tables, sweeps
from worker.store.db import C, Db, F, P, Q, X, read_task, to_task
from worker.store.hw_table import HW_DEFAULT_PROJECT_ID, HW_MARKER_COLUMN
from worker.store.schema import tasks
from worker.store.side_tables import EtaMerge
from worker.store.sweeps import CYCLE_IDS_SHOWN, StaleRecovery, find_dependency_cycles
from worker.task import FINAL_STATUSES, NewTask, Task, TaskStatus

log = logging.getLogger(__name__)

CLAIM_CANDIDATES = 50  # rows examined per claim, enough for the resident-model preference
CLAIM_PAGES = 20  # windows read past rows this worker may not take (tasks needing more GPUs) before giving up

Chooser = Callable[[list[Task]], Task | None]
Acceptor = Callable[[Task], bool]


class TaskRepository(Protocol):
    """The operations the worker loop needs; implemented over SQL here and in memory by unit tests."""

    def claim_next(
        self, worker_id: str, lease_s: float, choose: Chooser, *, accept: Acceptor | None = None
    ) -> Task | None: ...
    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool: ...
    def get_status(self, task_id: str) -> TaskStatus | None: ...
    def mark_complete(
        self,
        task_id: str,
        worker_id: str,
        output: str | None,
        result: dict[str, Any],
        publish: Callable[[], None] | None = None,
    ) -> bool: ...
    def mark_failed(self, task_id: str, worker_id: str, message: str, result: dict[str, Any] | None = None) -> bool: ...
    def retry_later(self, task_id: str, worker_id: str, message: str, delay_s: float) -> bool: ...
    def defer(self, task_id: str, worker_id: str, wait_for: str, progress: dict[str, Any] | None) -> bool: ...
    def has_queued_dependant(self, task_id: str) -> bool: ...
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

    def __init__(self, engine: Engine, claim_token: str | None = None) -> None:
        self.engine = engine
        self._db = Db(engine)
        # Unique per client (one per worker process): two processes sharing a worker_id never share it.
        self.claim_token = claim_token or secrets.token_hex(16)

    # ---- submitting and reading (queue API, CLI) ----------------------------------------------

    def insert(self, task: NewTask) -> str:
        """Queue a task; returns its id."""
        task_id = task.id or new_task_id()
        with self._db.tx() as conn:
            conn.execute(self._insert_statement(task, task_id, self._carried_values(conn, task.parent_task_id)))
        return task_id

    def _carried_values(self, conn: Connection, parent_id: str | None) -> dict[str, Any]:
        """Values for the table's own columns that a new row must carry (an adopted Headless-Wan2GP table's
        `project_id`): a child copies its parent's; a top-level row gets HW's own default project."""
        carried = self._db.layout.carried_columns
        if not carried:
            return {}
        values: dict[str, Any] = {}
        if parent_id is not None:
            columns = ", ".join(f'"{name}"' for name in carried)
            row = conn.execute(sa.text(f"SELECT {columns} FROM tasks WHERE id = :id"), {"id": parent_id}).first()
            if row is not None:
                values = dict(zip(carried, row, strict=True))
        if HW_MARKER_COLUMN in carried and values.get(HW_MARKER_COLUMN) is None:
            values[HW_MARKER_COLUMN] = HW_DEFAULT_PROJECT_ID
        return values

    def _insert_statement(self, task: NewTask, task_id: str, carried: dict[str, Any] | None = None) -> sa.Insert:
        """The INSERT of a new Queued row (attempts 0, stamped with the database clock)."""
        table: Any = tasks
        if carried:  # columns our schema does not declare: insert through a table that names them too
            types = self._db.layout.carried_types
            table = sa.table(
                "tasks",
                *(sa.column(column.name, column.type) for column in tasks.columns),
                *(sa.column(name, types[name]) for name in carried),
            )
        return table.insert().values(
            **(carried or {}),
            id=task_id,
            task_type=task.task_type,
            params=json.dumps(task.params),
            status=Q,
            priority=task.priority,
            dependant_on=task.dependant_on,
            parent_task_id=task.parent_task_id,
            attempts=0,
            max_attempts=task.max_attempts,
            created_at=self._db.now(),
            updated_at=self._db.now(),
        )

    def get(self, task_id: str) -> Task | None:
        """One task by id; None when there is no such row."""
        with self._db.tx() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).mappings().first()
        return read_task(row) if row else None

    def get_status(self, task_id: str) -> TaskStatus | None:
        """The current status of one task; None when there is no such row."""
        with self._db.tx() as conn:
            status = conn.execute(sa.select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        if not status:
            return None
        try:
            return TaskStatus(status)
        except ValueError:  # a status a client wrote that is not ours: the row is not one we can act on
            log.warning("task %s: unknown status %r; read as no such task", task_id, status)
            return None

    def has_queued_dependant(self, task_id: str) -> bool:
        """True when a Queued task waits for `task_id` (its `dependant_on`): a travel orchestrator waiting for
        its stitch, a user's chain. The worker finishes `task_id`'s output before claiming anything else."""
        query = sa.select(tasks.c.id).where(tasks.c.dependant_on == task_id, tasks.c.status == TaskStatus.QUEUED.value)
        with self._db.tx() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task and its open children (the worker notices at its next step)."""
        with self._db.tx() as conn:
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_([Q, P]))
                .values(status=X, updated_at=self._db.now(), error_message="cancelled by request")
            )
            conn.execute(
                tasks.update()
                .where(tasks.c.parent_task_id == task_id, tasks.c.status.in_([Q, P]))
                .values(status=X, updated_at=self._db.now(), error_message=f"parent task {task_id} was cancelled")
            )
        return result.rowcount == 1

    def insert_children(self, children: list[NewTask]) -> list[str]:
        """Insert an orchestrator's child rows; rows whose id already exists are kept as they are, so a
        re-run after a crash creates no duplicates and keeps children that already completed."""
        inserted = []
        with self._db.tx() as conn:
            for child in children:
                assert child.id is not None, "children need deterministic ids"
                exists = conn.execute(sa.select(tasks.c.id).where(tasks.c.id == child.id)).scalar()
                if exists is None:
                    carried = self._carried_values(conn, child.parent_task_id)
                    conn.execute(self._insert_statement(child, child.id, carried))
                    inserted.append(child.id)
        return inserted

    def children_of(self, parent_id: str) -> list[Task]:
        """An orchestrator's child rows, by id."""
        return self._db.select_tasks(sa.select(tasks).where(tasks.c.parent_task_id == parent_id).order_by(tasks.c.id))

    def set_progress(self, task_id: str, progress: dict[str, Any]) -> bool:
        """Progress of a task this worker does not hold (an orchestrator waiting on its children)."""
        return self._write(
            tasks.update()
            .where(tasks.c.id == task_id, tasks.c.status.in_([Q, P]))
            .values(progress=progress, updated_at=self._db.now())
        )

    # ---- claiming -----------------------------------------------------------------------------

    def _ready(self, page: int = 0) -> sa.Select[Any]:
        """One window of claimable rows (queued, due, prerequisite complete) in claim order."""
        prerequisite = tasks.alias("prerequisite")
        prerequisite_done = (
            sa.select(prerequisite.c.id)
            .where(prerequisite.c.id == tasks.c.dependant_on, prerequisite.c.status == C)
            .exists()
        )
        return (
            sa.select(tasks)
            .where(
                tasks.c.status == Q,
                sa.or_(tasks.c.run_after.is_(None), tasks.c.run_after <= self._db.now()),
                sa.or_(tasks.c.dependant_on.is_(None), prerequisite_done),
            )
            .order_by(*self._db.claim_order())
            .limit(CLAIM_CANDIDATES)
            .offset(page * CLAIM_CANDIDATES)
        )

    def _candidates(self, conn: Connection, accept: Acceptor | None) -> list[Task]:
        """The first window of ready rows holding any this worker accepts, filtered by `accept`."""
        for page in range(CLAIM_PAGES if accept is not None else 1):
            rows = list(conn.execute(self._ready(page)).mappings())
            # Every column is read leniently (worker.store.db), so no row content can stop the claim.
            window = [task for row in rows if (task := read_task(row)) is not None]
            accepted = window if accept is None else [task for task in window if accept(task)]
            if accepted or len(rows) < CLAIM_CANDIDATES:
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
        with self._db.tx() as conn:
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
        """Take one chosen row inside the claim's transaction; None when another worker got it first."""
        if not self._db.sqlite:  # SQLite already holds the write lock (BEGIN IMMEDIATE)
            lock = (
                sa.select(tasks.c.id)
                .where(tasks.c.id == task_id, tasks.c.status == Q)
                .with_for_update(skip_locked=True)
            )
            if conn.execute(lock).scalar() is None:
                return None
        row = (
            conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == Q)
                .values(
                    status=P,
                    worker_id=worker_id,
                    claim_token=self.claim_token,
                    attempts=tasks.c.attempts + 1,
                    lease_expires_at=self._db.now(lease_s),
                    run_after=None,
                    progress=None,
                    generation_started_at=self._db.now(),
                    updated_at=self._db.now(),
                )
                .returning(*tasks.c)
            )
            .mappings()
            .first()
        )
        return to_task(row) if row else None

    # ---- a worker's guarded writes --------------------------------------------------------------

    def _guarded(self, task_id: str, worker_id: str) -> sa.Update:
        """An UPDATE of this task only while this worker process still holds it In Progress."""
        return tasks.update().where(
            tasks.c.id == task_id,
            tasks.c.status == P,
            tasks.c.worker_id == worker_id,
            tasks.c.claim_token == self.claim_token,
        )

    def _write(self, statement: sa.Update) -> bool:
        """Run one guarded write in its own transaction; True when it changed the row."""
        with self._db.tx() as conn:
            return conn.execute(statement).rowcount == 1

    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool:
        """Renew the lease (and store progress); False when the task is no longer ours (cancelled...)."""
        values: dict[str, Any] = {"lease_expires_at": self._db.now(lease_s), "updated_at": self._db.now()}
        if progress is not None:
            values["progress"] = progress
        parent = tasks.alias("parent")
        parent_cancelled = (
            sa.select(parent.c.id).where(parent.c.id == tasks.c.parent_task_id, parent.c.status == X).exists()
        )
        with self._db.tx() as conn:
            # A cancelled orchestrator stops its running child within a beat, not at the next sweep.
            conn.execute(
                self._guarded(task_id, worker_id)
                .where(parent_cancelled)
                .values(
                    status=X,
                    error_message=sa.literal("parent task ") + tasks.c.parent_task_id + sa.literal(" was cancelled"),
                    updated_at=self._db.now(),
                )
            )
            return conn.execute(self._guarded(task_id, worker_id).values(**values)).rowcount == 1

    def mark_complete(
        self,
        task_id: str,
        worker_id: str,
        output: str | None,
        result: dict[str, Any],
        publish: Callable[[], None] | None = None,
    ) -> bool:
        """Finish a task this worker holds; False when it is no longer ours (then `publish` is not called).

        `publish` (rename the staged output into place) runs inside the transaction, after the guarded
        UPDATE matched and while it holds the row's lock; if it raises, nothing is written.
        """
        stored = self._db.stored_output(output)
        if stored != output:  # HW's relative form in output_location; the absolute path stays in result_data
            result = {**result, "output_file": output}
        statement = self._guarded(task_id, worker_id).values(
            status=C,
            output_location=stored,
            result_data=result,
            error_message=None,
            lease_expires_at=None,
            generation_processed_at=self._db.now(),
            updated_at=self._db.now(),
        )
        with self._db.tx() as conn:
            if publish is not None and not self._db.sqlite:
                # The lock must outlive a pause of this process between UPDATE and COMMIT (SIGSTOP, VM pause):
                # a server-side idle timeout would end the transaction and let another worker complete first.
                conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 0"))
            if conn.execute(statement).rowcount != 1:
                return False
            if publish is not None:
                publish()
            return True

    def mark_failed(self, task_id: str, worker_id: str, message: str, result: dict[str, Any] | None = None) -> bool:
        """Fail a task this worker holds with `message`; False when it is no longer ours."""
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=F,
                **self._db.failure(message),
                result_data=result,
                lease_expires_at=None,
                generation_processed_at=self._db.now(),
                updated_at=self._db.now(),
            )
        )

    def retry_later(self, task_id: str, worker_id: str, message: str, delay_s: float) -> bool:
        """Re-queue a task this worker holds, claimable again after `delay_s` (the attempt counts)."""
        return self._write(
            self._guarded(task_id, worker_id).values(
                status=Q,
                worker_id=None,
                claim_token=None,
                lease_expires_at=None,
                run_after=self._db.now(delay_s),
                error_message=message,
                updated_at=self._db.now(),
            )
        )

    def defer(self, task_id: str, worker_id: str, wait_for: str, progress: dict[str, Any] | None) -> bool:
        """Put a task back to wait for another one (an orchestrator waiting for its last child);
        waiting is not an attempt."""
        return self._write(
            self._guarded(task_id, worker_id).values(**self._given_back(), dependant_on=wait_for, progress=progress)
        )

    def release(self, task_id: str, worker_id: str) -> bool:
        """Give a task back untouched (shutdown abort): the attempt does not count against it."""
        return self._write(self._guarded(task_id, worker_id).values(**self._given_back(), progress=None))

    def _given_back(self) -> dict[str, Any]:
        """Back to Queued, unclaimed, without counting the attempt (defer and release)."""
        return {
            "status": Q,
            "worker_id": None,
            "claim_token": None,
            "lease_expires_at": None,
            "attempts": sa.case((tasks.c.attempts > 0, tasks.c.attempts - 1), else_=0),
            "updated_at": self._db.now(),
        }

    # ---- sweeps (worker.store.sweeps) -----------------------------------------------------------

    def requeue_stale(self) -> StaleRecovery:
        """Rows In Progress whose lease expired: re-queue, or fail once attempts reach max_attempts."""
        return sweeps.requeue_stale(self._db)

    def fail_blocked(self) -> list[str]:
        """Queued tasks whose prerequisite ended Failed/Cancelled, or does not exist, or that sit on a
        dependency cycle, end Failed; open children of a Cancelled parent are Cancelled."""
        return sweeps.fail_blocked(self._db)

    # ---- read-only queries: CLI, live hub, status page (worker.store.queries) ---------------------

    def list_tasks(self, status: str | None = None, limit: int = 100) -> list[Task]:
        """The newest rows (optionally of one status), newest first."""
        return queries.list_tasks(self._db, status, limit)

    def counts_by_status(self) -> dict[str, int]:
        """How many rows are in each status."""
        return queries.counts_by_status(self._db)

    def queued_by_priority(self) -> dict[int, int]:
        """How many rows are queued at each priority, highest first."""
        return queries.queued_by_priority(self._db)

    def changed_since(self, since: tuple[datetime, str] | None, limit: int = 500) -> list[Task]:
        """Rows changed after the (updated_at, id) cursor, in that order; None: the open rows."""
        return queries.changed_since(self._db, since, limit)

    def latest_update(self) -> datetime | None:
        """The newest updated_at in the table (where a poller starts looking for changes)."""
        return queries.latest_update(self._db)

    def queued_in_order(self, limit: int = 100) -> list[Task]:
        """Queued rows in the order workers claim them (priority, then age)."""
        return queries.queued_in_order(self._db, limit)

    def recently_updated(self, statuses: Sequence[str], limit: int = 20) -> list[Task]:
        """Rows in these statuses, most recently updated first (running tasks, recent results)."""
        return queries.recently_updated(self._db, statuses, limit)

    # ---- learned ETA timings and the workers table (worker.store.side_tables) ---------------------

    def eta_stats(self) -> list[dict[str, Any]]:
        """Every learned-timing row (small: one per kind of task and device)."""
        return side_tables.all_eta_stats(self._db)

    def update_eta_stats(self, key: dict[str, Any], merge: EtaMerge) -> None:
        """Read, merge and write one timing row atomically (Postgres: row lock; SQLite: BEGIN IMMEDIATE)."""
        side_tables.update_eta_stats(self._db, key, merge)

    def register_worker(self, worker_id: str, gpu: str | None) -> None:
        """(Re)write this worker's row in the workers table."""
        side_tables.register_worker(self._db, worker_id, gpu)

    def update_worker(self, worker_id: str, status: str, current_model: str | None) -> None:
        """This worker's status and resident model, with a fresh heartbeat."""
        side_tables.update_worker(self._db, worker_id, status, current_model)

    def list_workers(self) -> list[dict[str, Any]]:
        """Every worker row, by id."""
        return side_tables.list_workers(self._db)

    # ---- a user's retry (wan-worker retry) --------------------------------------------------------

    def retry(self, task_id: str) -> bool:
        """Put a Failed or Cancelled task back to Queued with fresh attempts; False for any other status
        (or no such row). `result_data.retried` records when, and the status, error and attempts before."""
        with self._db.tx() as conn:
            # Read and write in one transaction (SQLite: BEGIN IMMEDIATE; Postgres: the row lock), so the
            # record describes exactly the row the guarded UPDATE changes.
            query = sa.select(tasks, self._db.now().label("retried_at")).where(
                tasks.c.id == task_id, tasks.c.status.in_([F, X])
            )
            if not self._db.sqlite:
                query = query.with_for_update()
            row = conn.execute(query).mappings().first()
            if row is None:
                return False
            task = read_task(row)
            retried: dict[str, Any] = {
                "at": str(row["retried_at"]),
                "previous_status": row["status"],
                "previous_error": row["error_message"],
                "previous_attempts": row["attempts"],
            }
            if task is not None and task.result_data:
                retried["previous_result_data"] = task.result_data
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_([F, X]))
                .values(
                    status=Q,
                    attempts=0,
                    error_message=None,
                    run_after=None,
                    worker_id=None,
                    claim_token=None,
                    lease_expires_at=None,
                    output_location=None,
                    progress=None,
                    result_data={"retried": retried},
                    updated_at=self._db.now(),
                )
            )
            return result.rowcount == 1


__all__ = [
    "CLAIM_CANDIDATES",
    "CYCLE_IDS_SHOWN",
    "FINAL_STATUSES",
    "Acceptor",
    "Chooser",
    "SqlTaskRepository",
    "StaleRecovery",
    "TaskRepository",
    "find_dependency_cycles",
    "new_task_id",
]
