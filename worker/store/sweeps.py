"""Sweeps: the periodic repairs any worker may run over the whole `tasks` table.

Owns `requeue_stale` (expired leases: re-queue or fail), `fail_blocked` (dependants of a failed, cancelled
or missing prerequisite; children of a cancelled parent) and dependency cycles. `SqlTaskRepository`
exposes them as `repo.requeue_stale()` / `repo.fail_blocked()`; each runs in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # A NULL lease counts as expired: a client script or an import can set In Progress without one, and no
    # worker would ever renew or release such a row.
    stale = sa.and_(
        tasks.c.status == P, sa.or_(tasks.c.lease_expires_at.is_(None), tasks.c.lease_expires_at < db.now())
    )
    exhausted_message = (
        sa.literal("the worker running this task stopped responding (lease expired) on ")
        + sa.cast(tasks.c.attempts, sa.Text)
        + sa.literal(" of max_attempts ")
        + sa.cast(tasks.c.max_attempts, sa.Text)
        + sa.literal(" attempts; last worker: ")
        + sa.func.coalesce(tasks.c.worker_id, "unknown")
    )
    requeued_message = sa.case(
        (
            tasks.c.lease_expires_at.is_(None),
            sa.literal("re-queued: it was In Progress without a lease (worker ")
            + sa.func.coalesce(tasks.c.worker_id, "unknown")
            + sa.literal(")"),
        ),
        else_=sa.literal("re-queued: lease of worker ")
        + sa.func.coalesce(tasks.c.worker_id, "unknown")
        + sa.literal(" expired"),
    )
    with db.tx() as conn:
        # Failing first: the re-queue below then only sees rows with attempts left.
        failed_ids = (
            conn.execute(
                tasks.update()
                .where(stale, tasks.c.attempts >= tasks.c.max_attempts)
                .values(status=F, **db.failure(exhausted_message), lease_expires_at=None, updated_at=db.now())
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
                    # Cleared like worker_id: a worker of a version before migration 0003 claims without writing
                    # a token, and a stale token left here would let the stalled holder, if it shares that
                    # worker's id, write the row again.
                    claim_token=None,
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


ROOT_MESSAGE_CHARS = 500  # of the root's own error quoted in a dependant's message: bounded, never growing
_ENDED = (F, X)


def fail_blocked(db: Db) -> list[str]:
    """Queued tasks whose prerequisite ended Failed/Cancelled, or does not exist, end Failed; so does every
    task further down such a chain, in the same sweep; open children of a Cancelled parent are Cancelled.
    Returns the ids changed."""
    changed: list[str] = []
    with db.tx() as conn:
        changed.extend(conn.execute(_cancel_children(db)).scalars().all())
        changed.extend(_fail_chains(db, conn))
        changed.extend(_fail_cycles(db, conn))
    return changed


def _cancel_children(db: Db) -> sa.Update:
    """Open children of a Cancelled parent are Cancelled. First: a user's raw `UPDATE ... SET
    status='Cancelled'` on an orchestrator cancels its children (rather than failing them as dependants of a
    cancelled sibling)."""
    parent = tasks.alias("parent")
    parent_cancelled = (
        sa.select(parent.c.id).where(parent.c.id == tasks.c.parent_task_id, parent.c.status == X).exists()
    )
    return (
        tasks.update()
        .where(tasks.c.status.in_([Q, P]), tasks.c.parent_task_id.is_not(None), parent_cancelled)
        .values(
            status=X,
            error_message=sa.literal("parent task ") + tasks.c.parent_task_id + sa.literal(" was cancelled"),
            updated_at=db.now(),
        )
        .returning(tasks.c.id)
    )


@dataclass(frozen=True)
class _Root:
    """Where a chain of queued dependants ends: a task that cannot complete (None status: it does not exist)."""

    id: str
    status: str | None
    message: str | None


def _fail_chains(db: Db, conn: Connection) -> list[str]:
    """Fail every queued task whose dependency chain ends at a Failed, Cancelled or missing task, whole
    chains at once (one walk over the waiting rows, O(n)), each with a short message naming the root and
    its own direct prerequisite. Chains into a cycle are left to `_fail_cycles`, then the next sweep."""
    waiting = sa.select(tasks.c.id, tasks.c.dependant_on).where(tasks.c.status == Q, tasks.c.dependant_on.is_not(None))
    edges: dict[str, str] = {task_id: on for task_id, on in conn.execute(waiting)}
    if not edges:
        return []
    ends = {on for on in edges.values() if on not in edges}
    roots = _roots(conn, ends)
    root_of: dict[str, _Root | None] = {}
    for start in edges:
        path: list[str] = []
        on_path: set[str] = set()
        node = start
        while node in edges and node not in root_of and node not in on_path:
            on_path.add(node)
            path.append(node)
            node = edges[node]
        if node in root_of:
            found = root_of[node]
        elif node in on_path:
            found = None  # a cycle, or a chain leading into one
        else:
            found = roots.get(node)
        for visited in path:
            root_of[visited] = found
    failed: list[str] = []
    for task_id, root in root_of.items():
        if root is None:
            continue
        statement = (
            tasks.update()
            .where(tasks.c.id == task_id, tasks.c.status == Q)
            .values(status=F, **db.failure(_chain_message(edges[task_id], root)), updated_at=db.now())
            .returning(tasks.c.id)
        )
        failed.extend(conn.execute(statement).scalars().all())
    return failed


def _roots(conn: Connection, ends: set[str]) -> dict[str, _Root | None]:
    """For each id a chain ends at: a `_Root` when it cannot complete (ended, or missing), else None."""
    found: dict[str, tuple[str, str | None]] = {}
    ids = sorted(ends)
    for start in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[start : start + 500]
        query = sa.select(tasks.c.id, tasks.c.status, tasks.c.error_message).where(tasks.c.id.in_(chunk))
        found.update({task_id: (status, message) for task_id, status, message in conn.execute(query)})
    roots: dict[str, _Root | None] = {}
    for end in ids:
        if end not in found:
            roots[end] = _Root(end, None, None)
        else:
            status, message = found[end]
            roots[end] = _Root(end, status, message) if status in _ENDED else None
    return roots


def _chain_message(on: str, root: _Root) -> str:
    """A dependant's error: its direct prerequisite, and the root when that is further up the chain."""
    if root.status is None:
        if on == root.id:
            return f"prerequisite task {on} does not exist (dependant_on must name an existing task id)"
        return f"prerequisite task {on} cannot run: task {root.id}, at the root of its dependency chain, does not exist"
    quoted = root.message or "no message"
    if len(quoted) > ROOT_MESSAGE_CHARS:
        quoted = quoted[: ROOT_MESSAGE_CHARS - 3] + "..."
    if on == root.id:
        return f"prerequisite task {on} ended {root.status}, so this task cannot run ({quoted})"
    return (
        f"prerequisite task {on} cannot run: task {root.id}, at the root of its dependency chain, "
        f"ended {root.status} ({quoted})"
    )


def _fail_cycles(db: Db, conn: Connection) -> list[str]:
    """Queued tasks whose dependency chain leads back to themselves wait forever: Failed, naming the cycle."""
    waiting = sa.select(tasks.c.id, tasks.c.dependant_on).where(tasks.c.status == Q, tasks.c.dependant_on.is_not(None))
    failed: list[str] = []
    for cycle in find_dependency_cycles({task_id: on for task_id, on in conn.execute(waiting)}):
        statement = (
            tasks.update()
            .where(tasks.c.id.in_(cycle), tasks.c.status == Q)
            .values(status=F, **db.failure(_cycle_message(cycle)), updated_at=db.now())
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
