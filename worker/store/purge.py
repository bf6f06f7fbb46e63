"""Purging old rows (`wan-worker purge`): the selection and the deletion of rows that ended long ago.

A row is purgeable when it ended (Complete, Failed or Cancelled; never Queued or In Progress), its
updated_at is older than the cut-off (database clock) and no open row still needs it: an open row whose
`dependant_on` names it (the sweep would fail that row as "prerequisite missing") or whose
`parent_task_id` names it (a travel segment of a still-running orchestrator). The DELETE repeats every one
of these conditions, so a row that changed between the selection and the deletion (re-queued by
`wan-worker retry`, a new dependant inserted) is kept. Files are the CLI's business; this module only
reports each deleted row's `output_location`, and which of those locations other rows still reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from worker.store.db import C, Db, F, P, Q, X
from worker.store.schema import tasks

ENDED = (C, F, X)
DELETE_BATCH = 500  # ids per DELETE: short write transactions (SQLite holds its one write lock meanwhile)


@dataclass(frozen=True)
class PurgeRow:
    """One row selected or deleted by a purge."""

    id: str
    status: str
    output_location: str | None


def _purgeable(db: Db, older_than_s: float, statuses: Sequence[str]) -> sa.ColumnElement[bool]:
    """The WHERE clause of a purgeable row (see the module docstring)."""
    wanted = [status for status in statuses if status in ENDED]  # never an open status, whatever the caller says
    other = tasks.alias("other")
    needed = (
        sa.select(other.c.id)
        .where(
            sa.or_(other.c.dependant_on == tasks.c.id, other.c.parent_task_id == tasks.c.id),
            other.c.status.in_([Q, P]),
        )
        .exists()
    )
    return sa.and_(tasks.c.status.in_(wanted), tasks.c.updated_at < db.now(-older_than_s), ~needed)


def select_purgeable(db: Db, older_than_s: float, statuses: Sequence[str] = ENDED) -> list[PurgeRow]:
    """The rows a purge would delete now, oldest first (what `--dry-run` reports)."""
    query = (
        sa.select(tasks.c.id, tasks.c.status, tasks.c.output_location)
        .where(_purgeable(db, older_than_s, statuses))
        .order_by(tasks.c.updated_at, tasks.c.id)
    )
    with db.tx() as conn:
        return [PurgeRow(*row) for row in conn.execute(query).all()]


def count_kept_for_open_rows(db: Db, older_than_s: float, statuses: Sequence[str] = ENDED) -> int:
    """Rows old and ended enough to purge that are kept because an open row still depends on them."""
    wanted = [status for status in statuses if status in ENDED]
    old = sa.and_(tasks.c.status.in_(wanted), tasks.c.updated_at < db.now(-older_than_s))
    query = sa.select(sa.func.count()).select_from(tasks).where(old, ~_purgeable(db, older_than_s, statuses))
    with db.tx() as conn:
        return int(conn.execute(query).scalar() or 0)


def delete_purgeable(
    db: Db, older_than_s: float, statuses: Sequence[str] = ENDED, ids: Iterable[str] | None = None
) -> list[PurgeRow]:
    """Delete the purgeable rows (of `ids`, when given; default: all selected now); returns those deleted.

    Each batch is one DELETE ... RETURNING with the full condition, so only rows still purgeable at that
    instant go, and the returned rows are exactly the deleted ones.
    """
    chosen = [row.id for row in select_purgeable(db, older_than_s, statuses)] if ids is None else list(ids)
    deleted: list[PurgeRow] = []
    for start in range(0, len(chosen), DELETE_BATCH):
        batch = chosen[start : start + DELETE_BATCH]
        statement = (
            tasks.delete()
            .where(tasks.c.id.in_(batch), _purgeable(db, older_than_s, statuses))
            .returning(tasks.c.id, tasks.c.status, tasks.c.output_location)
        )
        with db.tx() as conn:
            deleted.extend(PurgeRow(*row) for row in conn.execute(statement).all())
    return deleted


def referenced_outputs(db: Db, locations: Iterable[str], excluding: Iterable[str] = ()) -> set[str]:
    """Which of these output locations a row in the table (other than the `excluding` ids: the rows a dry
    run would delete) still records: such a file must stay."""
    wanted = sorted(set(locations))
    skip = set(excluding)
    found: set[str] = set()
    for start in range(0, len(wanted), DELETE_BATCH):
        query = sa.select(tasks.c.id, tasks.c.output_location).where(
            tasks.c.output_location.in_(wanted[start : start + DELETE_BATCH])
        )
        with db.tx() as conn:
            found.update(str(location) for task_id, location in conn.execute(query).all() if task_id not in skip)
    return found


__all__ = [
    "DELETE_BATCH",
    "ENDED",
    "PurgeRow",
    "count_kept_for_open_rows",
    "delete_purgeable",
    "referenced_outputs",
    "select_purgeable",
]
