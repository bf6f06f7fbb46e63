"""Sweeps: the periodic repairs any worker may run over the whole `tasks` table.

Owns `requeue_stale` (expired leases: re-queue or fail), `fail_blocked` (dependants of a failed, cancelled
or missing prerequisite; children of a cancelled parent) and dependency cycles. `SqlTaskRepository`
exposes them as `repo.requeue_stale()` / `repo.fail_blocked()`; each runs in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.store.db import Db, F, P, Q, X
from worker.store.schema import tasks

CYCLE_IDS_SHOWN = 10  # task ids named in a dependency-cycle message


@dataclass(frozen=True)
class StaleRecovery:
    """What `requeue_stale` did."""

    requeued: list[str]
    failed: list[str]


def requeue_stale(db: Db) -> StaleRecovery:
    """Rows In Progress whose lease expired: re-queue, or fail once attempts reach max_attempts."""
    stale = sa.and_(tasks.c.status == P, tasks.c.lease_expires_at < db.now())
    exhausted_message = (
        sa.literal("the worker running this task stopped responding (lease expired) on ")
        + sa.cast(tasks.c.attempts, sa.Text)
        + sa.literal(" of max_attempts ")
        + sa.cast(tasks.c.max_attempts, sa.Text)
        + sa.literal(" attempts; last worker: ")
        + sa.func.coalesce(tasks.c.worker_id, "unknown")
    )
    requeued_message = (
        sa.literal("re-queued: lease of worker ")
        + sa.func.coalesce(tasks.c.worker_id, "unknown")
        + sa.literal(" expired")
    )
    with db.tx() as conn:
        # Failing first: the re-queue below then only sees rows with attempts left.
        failed_ids = (
            conn.execute(
                tasks.update()
                .where(stale, tasks.c.attempts >= tasks.c.max_attempts)
                .values(status=F, error_message=exhausted_message, lease_expires_at=None, updated_at=db.now())
                .returning(tasks.c.id)
            )
            .scalars()
            .all()
        )
        requeued_ids = (
            conn.execute(
                tasks.update()
                .where(stale)
                .values(
                    status=Q,
                    worker_id=None,
                    lease_expires_at=None,
                    error_message=requeued_message,
                    updated_at=db.now(),
                )
                .returning(tasks.c.id)
            )
            .scalars()
            .all()
        )
    return StaleRecovery(requeued=list(requeued_ids), failed=list(failed_ids))


def fail_blocked(db: Db) -> list[str]:
    """Queued tasks whose prerequisite ended Failed/Cancelled, or does not exist, end Failed; open
    children of a Cancelled parent are Cancelled. Returns the ids changed."""
    changed: list[str] = []
    with db.tx() as conn:
        for condition, status, message in _blocked_rules():
            statement = (
                tasks.update()
                .where(condition)
                .values(status=status, error_message=message, updated_at=db.now())
                .returning(tasks.c.id)
            )
            changed.extend(conn.execute(statement).scalars().all())
        changed.extend(_fail_cycles(db, conn))
    return changed


_Rule = tuple[sa.ColumnElement[bool], str, sa.ColumnElement[Any]]


def _blocked_rules() -> list[_Rule]:
    """(which rows, new status, message) for each kind of blocked task, in the order they are applied."""
    prerequisite = tasks.alias("prerequisite")

    def prerequisite_column(column: str) -> sa.ScalarSelect[Any]:
        """A column of the row this task depends on."""
        return sa.select(prerequisite.c[column]).where(prerequisite.c.id == tasks.c.dependant_on).scalar_subquery()

    prerequisite_exists = sa.select(prerequisite.c.id).where(prerequisite.c.id == tasks.c.dependant_on).exists()
    parent = tasks.alias("parent")
    parent_cancelled = (
        sa.select(parent.c.id).where(parent.c.id == tasks.c.parent_task_id, parent.c.status == X).exists()
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
    return [
        # First: a user's raw `UPDATE ... SET status='Cancelled'` on an orchestrator cancels its children
        # (rather than failing them as dependants of a cancelled sibling).
        (
            sa.and_(tasks.c.status.in_([Q, P]), tasks.c.parent_task_id.is_not(None), parent_cancelled),
            X,
            sa.literal("parent task ") + tasks.c.parent_task_id + sa.literal(" was cancelled"),
        ),
        (sa.and_(tasks.c.status == Q, prerequisite_column("status").in_([F, X])), F, ended_message),
        (
            sa.and_(tasks.c.status == Q, tasks.c.dependant_on.is_not(None), ~prerequisite_exists),
            F,
            missing_message,
        ),
    ]


def _fail_cycles(db: Db, conn: Connection) -> list[str]:
    """Queued tasks whose dependency chain leads back to themselves wait forever: Failed, naming the cycle."""
    waiting = sa.select(tasks.c.id, tasks.c.dependant_on).where(tasks.c.status == Q, tasks.c.dependant_on.is_not(None))
    failed: list[str] = []
    for cycle in find_dependency_cycles({task_id: on for task_id, on in conn.execute(waiting)}):
        statement = (
            tasks.update()
            .where(tasks.c.id.in_(cycle), tasks.c.status == Q)
            .values(status=F, error_message=_cycle_message(cycle), updated_at=db.now())
            .returning(tasks.c.id)
        )
        failed.extend(conn.execute(statement).scalars().all())
    return failed


def _cycle_message(cycle: list[str]) -> str:
    """The error of each task on `cycle`, naming at most CYCLE_IDS_SHOWN of its ids."""
    shown = [*cycle, cycle[0]] if len(cycle) <= CYCLE_IDS_SHOWN else [*cycle[:CYCLE_IDS_SHOWN], "..."]
    return (
        f"dependency cycle of {len(cycle)} task(s): {' -> '.join(shown)}; tasks on a cycle wait for each "
        "other forever, so none of them can run (fix their dependant_on)"
    )


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
