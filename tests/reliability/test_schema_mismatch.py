"""A database whose schema wan-worker did not make, or made by a newer wan-worker: one line, exit 2.

A `tasks` table created by another tool (other columns, nothing in `alembic_version`) and an
`alembic_version` naming a revision these migrations do not know used to end `init-db` and `run` with an
Alembic or SQL traceback. Now `worker.store.migrate.SchemaMismatch` names the problem and what to do, the
database is left as it was, and a `--gpus` supervisor does not restart the worker (exit 2).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.db import migrated_engine
from tests.support.processes import wan_worker_command
from worker.store.schema import create_db_engine

pytestmark = pytest.mark.acceptance

FOREIGN_DDL = (
    "CREATE TABLE tasks (id text primary key, task_type text, params text, status text, project_id text not null)"
)
FUTURE = "zzzz_future"


def _wan_worker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*wan_worker_command(), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)


def _command(name: str, db_url: str, tmp_path: Path) -> list[str]:
    if name == "init-db":
        return ["init-db", "--db", db_url]
    return ["run", "--db", db_url, "--models-dir", str(tmp_path / "models"), "--outputs-dir", str(tmp_path / "out")]


def _assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


@pytest.mark.parametrize("command", ["init-db", "run"])
def test_a_foreign_tasks_table_is_named_not_migrated(command: str, db_url: str, tmp_path: Path) -> None:
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(FOREIGN_DDL)
        result = _wan_worker(tmp_path, *_command(command, db_url, tmp_path))
        line = _assert_one_line(result, "'tasks' table", "not created by wan-worker", "priority", "attempts")
        assert "project_id" not in line, "only our missing columns are listed"
        assert _tables(engine) == {"tasks"}, "nothing was created beside the foreign table"
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", ["init-db", "run"])
def test_a_newer_schema_revision_asks_for_a_newer_worker(command: str, db_url: str, tmp_path: Path) -> None:
    engine = migrated_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE})
        result = _wan_worker(tmp_path, *_command(command, db_url, tmp_path))
        _assert_one_line(result, repr(FUTURE), "newer wan-worker")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [FUTURE]
    finally:
        engine.dispose()
