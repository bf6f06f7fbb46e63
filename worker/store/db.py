"""The handle every SQL module of the store shares: the database clock, a transaction, row -> Task.

Owns the backend differences that are not about claiming: SQLite and Postgres tell the time differently
and break created_at ties differently. The status short names (`Q`, `P`, ...) keep the statements short.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker.store.hw_table import TableLayout, table_layout
from worker.store.schema import Unreadable, is_sqlite, tasks
from worker.task import Task, TaskStatus

log = logging.getLogger(__name__)

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
        self.layout  # noqa: B018 (inspected outside the transaction, see `layout`)
        with self.engine.begin() as connection:
            yield connection

    @property
    def layout(self) -> TableLayout:
        """What the live `tasks` table is (an adopted Headless-Wan2GP table?); inspected once per engine.

        `tx` reads it before opening its transaction: inspecting on a second connection inside a SQLite
        write transaction would wait on that transaction's own lock."""
        return table_layout(self.engine)

    def failure(self, message: Any) -> dict[str, Any]:
        """The column values that record a failure's text: `error_message`, and on a Headless-Wan2GP table
        also `output_location`, where HW's readers take it from (HW's own `update_task_status` writes it there)."""
        values = {"error_message": message}
        if self.layout.hw:
            values["output_location"] = message
        return values

    def stored_output(self, output: str | None) -> str | None:
        """The `output_location` to write for an output file.

        On a Headless-Wan2GP SQLite table, a file under `<database folder>/public/` is written as the path
        relative to `public/` (`files/<name>`), the form HW's readers resolve (HW's `get_abs_path_from_db_path`);
        anything else, and every other table, keeps the absolute path."""
        if output is None or not (self.sqlite and self.layout.hw):
            return output
        database = self.engine.url.database
        if not database or database == ":memory:":
            return output
        public = (Path(database).resolve().parent / "public").resolve()
        try:
            return Path(output).resolve().relative_to(public).as_posix()
        except ValueError:
            return output

    def tiebreak(self) -> sa.ColumnElement[Any]:
        """The column that orders rows created in the same instant."""
        # SQLite timestamps have millisecond resolution: insertion order (rowid) breaks ties.
        return sa.literal_column("tasks.rowid") if self.sqlite else tasks.c.id

    def created_time(self) -> sa.ColumnElement[Any]:
        """`created_at` as a value that orders by time.

        SQLite stores times as text, and clients write several forms (ours `2026-12-01 09:27:06.691000`,
        Headless-Wan2GP's `2026-12-01 09:27:06` and `2026-12-01T09:27:05.589931Z`), which sort wrongly as
        text; `julianday` reads them all. Text it cannot read sorts last."""
        if self.sqlite:
            return sa.func.coalesce(sa.func.julianday(tasks.c.created_at), 1e9)
        return tasks.c.created_at

    def claim_order(self) -> list[sa.ColumnElement[Any]]:
        """The order workers claim queued rows in: priority, then age."""
        return [tasks.c.priority.desc(), self.created_time(), self.tiebreak()]

    def select_tasks(self, query: sa.Select[Any]) -> list[Task]:
        """Run a `select(tasks)` query in its own transaction."""
        with self.tx() as conn:
            rows = list(conn.execute(query).mappings())
        return [task for row in rows if (task := read_task(row)) is not None]


JSON_COLUMNS = ("result_data", "progress")
DATETIME_COLUMNS = (
    "created_at",
    "updated_at",
    "generation_started_at",
    "generation_processed_at",
    "lease_expires_at",
    "run_after",
)
_WARNED_MAX = 10_000  # (task id, column) pairs remembered for warn-once; cleared when full
_warned: set[tuple[str, str]] = set()


class UnreadableRow(ValueError):
    """A row a worker cannot represent as a Task (a status no program of ours writes)."""


def _warn_once(task_id: Any, column: str, value: Any, why: str) -> None:
    """Log one warning per (task, column): a bad value is re-read at every poll."""
    key = (str(task_id), column)
    if key in _warned:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(key)
    shown = repr(value)
    log.warning(
        "task %s: ignoring unreadable %s %s (%s); read as None",
        task_id,
        column,
        shown if len(shown) <= 80 else shown[:77] + "...",
        why,
    )


def _params_text(value: Any) -> str:
    """The params column as text. A BLOB is decoded as UTF-8; one that is not valid UTF-8 keeps its bad bytes
    as lone surrogates, which `worker.tasks.params.parse_params_text` fails at once as bad input."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, dict | list):  # a Postgres json/jsonb column (Headless-Wan2GP's Supabase table)
        return json.dumps(value)
    return str(value)  # a number a client stored unquoted: fails as "params must be a JSON object"


def _lenient_value(row: Any, column: str) -> Any:
    """A client-writable column's value, or None (warned once) when it could not be decoded or has the wrong
    shape (a JSON column must hold an object)."""
    value = row[column]
    if isinstance(value, Unreadable):
        _warn_once(row["id"], column, value.raw, f"cannot be decoded: {value.reason}")
        return None
    if column in JSON_COLUMNS and value is not None and not isinstance(value, dict):
        _warn_once(row["id"], column, value, f"must be a JSON object, got {type(value).__name__}")
        return None
    return value


def to_task(row: Any) -> Task:
    """A `tasks` row (mapping) as a Task; bad client-written values are read as None (see `_lenient_value`).

    Raises `UnreadableRow` only for a status that is not one of ours; non-claim reads use `read_task`.
    """
    try:
        status = TaskStatus(row["status"])
    except ValueError:
        raise UnreadableRow(f"task {row['id']}: unknown status {row['status']!r}") from None
    return Task(
        id=row["id"],
        task_type=row["task_type"],
        params_text=_params_text(row["params"]),
        status=status,
        priority=row["priority"],
        dependant_on=row["dependant_on"],
        parent_task_id=row["parent_task_id"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        worker_id=row["worker_id"],
        output_location=row["output_location"],
        result_data=_lenient_value(row, "result_data"),
        error_message=row["error_message"],
        progress=_lenient_value(row, "progress"),
        created_at=_lenient_value(row, "created_at"),
        updated_at=_lenient_value(row, "updated_at"),
        generation_started_at=_lenient_value(row, "generation_started_at"),
        generation_processed_at=_lenient_value(row, "generation_processed_at"),
        lease_expires_at=_lenient_value(row, "lease_expires_at"),
        run_after=_lenient_value(row, "run_after"),
    )


def read_task(row: Any) -> Task | None:
    """`to_task` for listings and lookups: a row with an unknown status is skipped (warned once), so one
    row a client marked `'Paused'` hides only itself."""
    try:
        return to_task(row)
    except UnreadableRow:
        _warn_once(row["id"], "status", row["status"], "not a status of this worker; row skipped")
        return None
