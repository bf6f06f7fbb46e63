"""Fixtures several test folders use: database URLs (a SQLite file and the real local Postgres), an engine
migrated to head, tiny models, and worker stacks (tests.support.processes). Helpers live in tests/support/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.support.db import POSTGRES_ADMIN_URL, open_engine, require_postgres
from tests.support.processes import Stack, running_stack


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


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on `db_url` (both backends), migrated to head, disposed afterwards."""
    with open_engine(db_url) as built:
        yield built


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight Wan models (diffusers layout), built once per test session."""
    from wan_engine.tiny_models import build_tiny_models

    directory = tmp_path_factory.mktemp("models")
    build_tiny_models(directory)
    return directory


@pytest.fixture
def stack(db_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """A worker stack on SQLite and on Postgres (parametrized through db_url)."""
    with running_stack(db_url, tmp_path, tiny_models_dir) as built:
        yield built


@pytest.fixture
def sqlite_stack(sqlite_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """A worker stack on a SQLite file only (for tests whose point is not the backend)."""
    with running_stack(sqlite_url, tmp_path, tiny_models_dir) as built:
        yield built
