"""Shared fixtures: database URLs (a SQLite file and the real local Postgres), tiny models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ADMIN_URL = os.environ.get("WAN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


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


_PG_PROBLEM: str | bool | None = False  # False = not probed yet


def require_postgres() -> None:
    """Skip (with the reason) when Postgres is unreachable; in CI that is a failure instead."""
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _postgres_reachable()
    if isinstance(_PG_PROBLEM, str):
        if IN_CI:
            pytest.fail(f"CI=true requires Postgres: {_PG_PROBLEM}")
        pytest.skip(_PG_PROBLEM)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a fresh, private schema on the local Postgres (dropped afterwards)."""
    require_postgres()
    schema = f"wan_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    yield f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs once on a SQLite file and once on the real Postgres."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight Wan models (diffusers layout), built once per test session."""
    from wan_engine.tiny_models import build_tiny_models

    directory = tmp_path_factory.mktemp("models")
    build_tiny_models(directory)
    return directory
