"""Database schema and engine creation (SQLite by default, any SQLAlchemy URL, Postgres through psycopg 3).

The schema here mirrors the Alembic migrations in `worker/store/migrations`; the migrations are what create and
upgrade real databases. All timestamps are naive UTC taken from the database clock, so that several
machines sharing one Postgres agree on lease expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///tasks.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("task_type", sa.Text, nullable=False),
    # Raw text on purpose: rows written by other programs may hold malformed JSON, which the worker
    # must report as a Failed task rather than have the database reject or the claim query crash on.
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("dependant_on", sa.Text, nullable=True),
    sa.Column("parent_task_id", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.Text, nullable=True),
    sa.Column("lease_expires_at", sa.DateTime, nullable=True),
    sa.Column("run_after", sa.DateTime, nullable=True),
    sa.Column("output_location", sa.Text, nullable=True),
    sa.Column("result_data", sa.JSON, nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("progress", sa.JSON, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("generation_started_at", sa.DateTime, nullable=True),
    sa.Column("generation_processed_at", sa.DateTime, nullable=True),
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
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=4, max_overflow=4, **kwargs)


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
