"""Database schema and engine creation (SQLite by default, any SQLAlchemy URL, Postgres through psycopg 3).

The schema here mirrors the Alembic migrations in `worker/store/migrations`; the migrations are what create and
upgrade real databases. All timestamps are naive UTC taken from the database clock, so that several
machines sharing one Postgres agree on lease expiry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///tasks.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000

metadata = sa.MetaData()


@dataclass(frozen=True)
class Unreadable:
    """A stored value its column type could not decode (SQLite `'now'` in a DATETIME, `''` in a JSON column).

    Returned by the lenient column types below instead of raising inside a result fetch, which would stop
    the claim's candidate read (and the worker) on one row. `worker.store.db.to_task` reads it as None and
    logs it once with the task id; `raw` is the stored value, `reason` the decode error's class.
    """

    raw: Any
    reason: str


def _lenient(inner: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """Wrap a result processor so that a value it cannot decode becomes `Unreadable` instead of an error."""
    if inner is None:
        return None

    def process(value: Any) -> Any:
        try:
            return inner(value)
        except Exception as exc:  # ValueError, TypeError, RecursionError...: whatever the row holds
            return Unreadable(value, exc.__class__.__name__)

    return process


class LenientDateTime(sa.types.TypeDecorator[Any]):
    """DateTime whose reads never raise: a client-written value SQLite accepts but SQLAlchemy cannot parse
    (`'now'`, `unixepoch()`, any text) reads as `Unreadable`. Writes are plain DateTime."""

    impl = sa.DateTime
    cache_ok = True

    def result_processor(self, dialect: sa.Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        inner = super().result_processor(dialect, coltype)
        return _lenient(lambda value: _naive_utc(inner(value) if inner is not None else value))


def _naive_utc(value: Any) -> Any:
    """Aware datetimes (ISO text with `Z` written by Headless-Wan2GP clients, Postgres timestamptz) as naive
    UTC, the form every time of ours has, so that values of both kinds compare and sort together."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


class UncastText(sa.types.UserDefinedType[Any]):
    """Text bound without SQLAlchemy's `::VARCHAR` cast, for the columns an adopted Headless-Wan2GP Postgres
    table types its own way (`uuid` ids, a `task_status` enum, `jsonb` params): psycopg sends the value
    untyped and Postgres reads it as the column's type. Everywhere else it is plain TEXT."""

    cache_ok = True
    comparator_factory = sa.types.Concatenable.Comparator  # `+` is `||`, as for Text

    def get_col_spec(self, **_kw: Any) -> str:
        return "TEXT"


class TaskId(sa.types.TypeDecorator[Any]):
    """Task ids (`UncastText`). An adopted HW Postgres table keeps `uuid` ids, which the driver returns as
    `uuid.UUID`: read as their text form, so every id in the worker is a str."""

    impl = UncastText
    cache_ok = True

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else str(value)


class LenientJSON(sa.types.TypeDecorator[Any]):
    """JSON whose reads never raise: text that is not JSON (`'50%'`, `''`) or nests past Python's recursion
    limit reads as `Unreadable`. On Postgres the driver decodes JSON, through `lenient_json_loads`."""

    impl = sa.JSON
    cache_ok = True

    def result_processor(self, dialect: sa.Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        return _lenient(super().result_processor(dialect, coltype))


def lenient_json_loads(text: str | bytes) -> Any:
    """The engines' JSON deserializer (SQLite's JSON type and psycopg's loader both call it): never raises."""
    try:
        return json.loads(text)
    except Exception as exc:  # RecursionError included: a deep result_data must not stop a fetch
        return Unreadable(text, exc.__class__.__name__)


tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", TaskId, primary_key=True),
    sa.Column("task_type", sa.Text, nullable=False),
    # Raw text on purpose: rows written by other programs may hold malformed JSON, which the worker
    # must report as a Failed task rather than have the database reject or the claim query crash on.
    sa.Column("params", UncastText, nullable=False),
    sa.Column("status", UncastText, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("dependant_on", TaskId, nullable=True),
    sa.Column("parent_task_id", TaskId, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.Text, nullable=True),
    # Migration 0003: the claiming process's random token; every guarded write matches it with worker_id.
    sa.Column("claim_token", sa.Text, nullable=True),
    sa.Column("lease_expires_at", LenientDateTime, nullable=True),
    sa.Column("run_after", LenientDateTime, nullable=True),
    sa.Column("output_location", sa.Text, nullable=True),
    # Lenient types: clients write these columns too, and one undecodable value must not stop a read.
    sa.Column("result_data", LenientJSON, nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("progress", LenientJSON, nullable=True),
    sa.Column("created_at", LenientDateTime, nullable=False),
    sa.Column("updated_at", LenientDateTime, nullable=False),
    sa.Column("generation_started_at", LenientDateTime, nullable=True),
    sa.Column("generation_processed_at", LenientDateTime, nullable=True),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("gpu", sa.Text, nullable=True),
    sa.Column("current_model", sa.Text, nullable=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("last_heartbeat", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
)


# Learned timings per kind of task (migration 0002; read and written by worker.live.eta through the repository).
eta_stats = sa.Table(
    "eta_stats",
    metadata,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("resolution", sa.Text, primary_key=True),
    sa.Column("frames", sa.Integer, primary_key=True),
    sa.Column("memory_profile", sa.Text, primary_key=True),
    sa.Column("device", sa.Text, primary_key=True),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("step_s", sa.Float, nullable=True),
    sa.Column("first_step_extra_s", sa.Float, nullable=True),
    sa.Column("encode_s", sa.Float, nullable=True),
    sa.Column("decode_s", sa.Float, nullable=True),
    sa.Column("write_s", sa.Float, nullable=True),
    sa.Column("other_s", sa.Float, nullable=True),
    sa.Column("load_s", sa.Float, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


def is_sqlite(engine: Engine) -> bool:
    """True for SQLite engines, whose locking and SQL differ from Postgres."""
    return engine.dialect.name == "sqlite"


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine tuned for a long-lived worker.

    SQLite: WAL, a busy timeout, and every transaction opened with `BEGIN IMMEDIATE` so that two
    processes never deadlock on a read-to-write lock upgrade (the write lock is taken up front and
    waiters queue on the busy timeout). Postgres: pre-ping so a restarted server is survived.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **{"json_deserializer": lenient_json_loads, **kwargs},
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        parsed = _utc_sessions(parsed)
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        **{"json_deserializer": lenient_json_loads, **kwargs},
    )


def _utc_sessions(url: sa.URL) -> sa.URL:
    """The URL with the session time zone set to UTC (added to any `options` the URL has), so that our naive
    UTC times stay right in `timestamptz` columns (an adopted Headless-Wan2GP table has them)."""
    options = url.query.get("options", "")
    if not isinstance(options, str) or "timezone" in options.lower():
        return url
    return url.update_query_dict({"options": f"{options} -c timezone=UTC".strip()})


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below own transaction boundaries (pysqlite's own BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def check_db_url(url: str) -> None:
    """Raise ValueError (one line, for `error: ...`) unless `url` is a SQLAlchemy URL of a known backend.

    A bare file name (`--db tasks.db`) is the common mistake: SQLAlchemy's own error is a traceback.
    """
    try:
        make_url(url).get_dialect()
    except sa.exc.NoSuchModuleError:
        raise ValueError(
            f"--db {redact_url(url)!r}: unknown database backend; use sqlite:///PATH or postgresql://USER@HOST/DB"
        ) from None
    except sa.exc.ArgumentError:
        raise ValueError(
            f"--db {url!r} is not a database URL; use a URL such as sqlite:///tasks.db (or postgresql://USER@HOST/DB)"
        ) from None


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (relative to the working directory); None for other backends, an
    in-memory database or a `file:` URI (whose path SQLite itself interprets)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("uri") or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


class DatabaseUnreachable(RuntimeError):
    """The database did not answer within the start-up wait; the message names it and the last error."""


def wait_for_database(url: str, timeout_s: float, stop: threading.Event, *, max_delay_s: float = 10.0) -> bool:
    """Block until the database at `url` answers (True) or `stop` is set (False).

    A worker started with its database server (a reboot, a restarting Postgres) waits for it with
    back-off instead of exiting; past `timeout_s` it raises `DatabaseUnreachable` naming the database
    and the last error, so a wrong URL still fails clearly. SQLite is local: one try, no wait.
    """
    engine = create_db_engine(url)
    deadline = time.monotonic() + max(0.0, timeout_s)
    delay = 0.5
    try:
        while True:
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.OperationalError as exc:
                reason = str(exc.orig or exc).strip().splitlines()[0][:200]
                left = deadline - time.monotonic()
                if is_sqlite(engine) or left <= 0:
                    raise DatabaseUnreachable(
                        f"database {redact_url(url)} unreachable (waited {timeout_s:.0f}s): {reason}"
                    ) from exc
                pause = min(delay, left)
                log.warning("database %s unreachable (%s); retrying in %.1fs", redact_url(url), reason, pause)
                if stop.wait(pause):
                    return False
                delay = min(delay * 2, max_delay_s)
    finally:
        engine.dispose()
