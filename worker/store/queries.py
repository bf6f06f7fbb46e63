"""Read-only task queries: the CLI's listings and counts, and what the live hub and status page poll.

Nothing here writes; each function runs one short transaction. `SqlTaskRepository` exposes them under the
same names (`repo.changed_since(...)`, `repo.queued_in_order()`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import sqlalchemy as sa

from worker.store.db import Db, P, Q
from worker.store.schema import tasks
from worker.task import Task


def list_tasks(db: Db, status: str | None = None, limit: int = 100) -> list[Task]:
    """The newest rows (optionally of one status), newest first."""
    query = sa.select(tasks).order_by(db.created_time().desc(), db.tiebreak().desc()).limit(limit)
    if status is not None:
        query = query.where(tasks.c.status == status)
    return db.select_tasks(query)


LIST_SCAN_MAX = 10_000  # rows `list_tasks_matching` reads at most: a filter in Python stays a bounded read
LIST_PAGE = 500


def list_tasks_matching(
    db: Db, accept: Callable[[Task], bool], status: str | None = None, limit: int = 100, scan: int = LIST_SCAN_MAX
) -> list[Task]:
    """The newest rows (optionally of one status) that `accept` keeps, newest first: pages of `list_tasks`'
    order, filtered in Python (the params column is raw text, so a portable SQL filter on its JSON is not
    available), until `limit` rows matched or `scan` rows were read."""
    matched: list[Task] = []
    seen: set[str] = set()  # offsets shift when rows are inserted meanwhile: never list one row twice
    base = sa.select(tasks).order_by(db.created_time().desc(), db.tiebreak().desc())
    if status is not None:
        base = base.where(tasks.c.status == status)
    for offset in range(0, max(scan, 0), LIST_PAGE):
        window = db.select_tasks(base.limit(min(LIST_PAGE, scan - offset)).offset(offset))
        for task in window:
            if task.id not in seen and accept(task):
                matched.append(task)
            seen.add(task.id)
        if len(matched) >= limit or len(window) < LIST_PAGE:
            break
    return matched[: max(limit, 0)]


def counts_by_status(db: Db) -> dict[str, int]:
    """How many rows are in each status."""
    with db.tx() as conn:
        rows = conn.execute(sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)).all()
    return {status: count for status, count in rows}


def queued_by_priority(db: Db) -> dict[int, int]:
    """How many rows are queued at each priority, highest first."""
    query = (
        sa.select(tasks.c.priority, sa.func.count())
        .where(tasks.c.status == Q)
        .group_by(tasks.c.priority)
        .order_by(tasks.c.priority.desc())
    )
    with db.tx() as conn:
        return {priority: count for priority, count in conn.execute(query).all()}


def changed_since(db: Db, since: tuple[datetime, str] | None, limit: int = 500) -> list[Task]:
    """Rows changed after the (updated_at, id) cursor, in that order, so a poller can page through a
    burst of rows stamped alike (a bulk INSERT); None: the open rows, for a first look."""
    if since is None:
        changed = tasks.c.status.in_([Q, P])
    else:
        at, last_id = since
        changed = sa.or_(tasks.c.updated_at > at, sa.and_(tasks.c.updated_at == at, tasks.c.id > last_id))
    return db.select_tasks(sa.select(tasks).where(changed).order_by(tasks.c.updated_at, tasks.c.id).limit(limit))


def latest_update(db: Db) -> datetime | None:
    """The newest updated_at in the table (where a poller starts looking for changes)."""
    with db.tx() as conn:
        newest = conn.execute(sa.select(sa.func.max(tasks.c.updated_at))).scalar()
    # A client's undecodable updated_at (SQLite 'now') comes back as schema.Unreadable: no starting point.
    return newest if isinstance(newest, datetime) else None


def queued_in_order(db: Db, limit: int = 100) -> list[Task]:
    """Queued rows in the order workers claim them (priority, then age)."""
    return db.select_tasks(sa.select(tasks).where(tasks.c.status == Q).order_by(*db.claim_order()).limit(limit))


def recently_updated(db: Db, statuses: Sequence[str], limit: int = 20) -> list[Task]:
    """Rows in these statuses, most recently updated first (running tasks, recent results)."""
    query = (
        sa.select(tasks)
        .where(tasks.c.status.in_(list(statuses)))
        .order_by(tasks.c.updated_at.desc(), db.tiebreak().desc())
        .limit(limit)
    )
    return db.select_tasks(query)
