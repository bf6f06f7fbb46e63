"""Database helpers: which Postgres the tests use, the CI rule for it, and engines migrated to head."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.store.migrate import upgrade_to_head
from worker.store.schema import create_db_engine

POSTGRES_ADMIN_URL = os.environ.get("WAN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"

_PG_PROBLEM: str | bool | None = False  # False = not probed yet


def _postgres_reachable() -> str | None:
    """None when reachable, else the reason."""
    try:
        engine = sa.create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
        return None
    except Exception as exc:
        return f"Postgres at {POSTGRES_ADMIN_URL} unreachable: {exc.__class__.__name__}: {str(exc)[:200]}"


def require_postgres() -> None:
    """Skip (with the reason) when Postgres is unreachable; in CI that is a failure instead."""
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _postgres_reachable()
    if isinstance(_PG_PROBLEM, str):
        if IN_CI:
            pytest.fail(f"CI=true requires Postgres: {_PG_PROBLEM}")
        pytest.skip(_PG_PROBLEM)


def migrated_engine(db_url: str) -> Engine:
    """An engine on `db_url` with the schema upgraded to the Alembic head (the caller disposes it)."""
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    return engine


@contextmanager
def open_engine(db_url: str) -> Iterator[Engine]:
    """`migrated_engine(db_url)`, disposed on exit: what the root `engine` fixture yields."""
    engine = migrated_engine(db_url)
    yield engine
    engine.dispose()
