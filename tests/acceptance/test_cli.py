"""Acceptance: the `wan-worker` commands other than `run`, as real processes, and `python -m worker`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.processes import wan_worker_command
from wan_engine.video_io import read_video_info

pytestmark = pytest.mark.acceptance


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*wan_worker_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_python_dash_m_worker_is_the_same_cli(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "init-db", "submit", "status", "list", "cancel", "models", "make-tiny-models", "demo"):
        assert command in result.stdout


def test_init_db_submit_status_list_cancel(db_url: str, tmp_path: Path) -> None:
    init = cli("init-db", "--db", db_url, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "password" not in init.stdout

    submitted = cli(
        "submit",
        "--db",
        db_url,
        "--model",
        "tiny_t2v",
        "--prompt",
        "a cat",
        "--priority",
        "3",
        "--params",
        '{"video_length": 5, "seed": 11}',
        cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()

    status = cli("status", "--db", db_url, task_id, cwd=tmp_path)
    row = json.loads(status.stdout)
    assert row["status"] == "Queued" and row["priority"] == 3 and row["task_type"] == "t2v"
    # params come back as an object, not as the stored JSON text
    assert row["params"] == {"model": "tiny_t2v", "prompt": "a cat", "video_length": 5, "seed": 11}

    listing = cli("list", "--db", db_url, "--status", "Queued", cwd=tmp_path)
    assert task_id in listing.stdout

    assert cli("cancel", "--db", db_url, task_id, cwd=tmp_path).returncode == 0
    again = cli("cancel", "--db", db_url, task_id, cwd=tmp_path)
    assert again.returncode == 1 and "already Cancelled" in again.stderr
    assert json.loads(cli("status", "--db", db_url, task_id, cwd=tmp_path).stdout)["status"] == "Cancelled"
    assert cli("status", "--db", db_url, "no-such-id", cwd=tmp_path).returncode == 1


def test_submit_rejects_bad_input_before_queueing(sqlite_url: str, tmp_path: Path) -> None:
    bad_key = cli(
        "submit",
        "--db",
        sqlite_url,
        "--model",
        "tiny_t2v",
        "--prompt",
        "x",
        "--params",
        '{"fps": "fast"}',
        cwd=tmp_path,
    )
    assert bad_key.returncode == 2 and "fps = 'fast'" in bad_key.stderr
    unknown = cli("submit", "--db", sqlite_url, "--model", "nope", "--prompt", "x", cwd=tmp_path)
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar() == 0
    engine.dispose()


def test_db_url_from_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = cli("init-db", cwd=tmp_path, env={"WAN_DB_URL": url})
    assert result.returncode == 0 and (tmp_path / "env.db").exists()


def test_models_reports_presence(tmp_path: Path, tiny_models_dir: Path) -> None:
    result = cli("models", "--models-dir", str(tiny_models_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    checks = {entry["key"]: entry for entry in json.loads(result.stdout)}
    assert checks["tiny_t2v"]["status"] == "present"
    assert checks["t2v_1.3B"]["status"] == "missing"


def test_demo_runs_tasks_of_several_priorities_and_models(tmp_path: Path) -> None:
    result = cli("demo", "--dir", str(tmp_path / "demo"), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith(tuple("123456789"))]
    rows = [line.split() for line in lines if "Complete" in line]
    assert len(rows) == 6
    priorities = [int(row[1]) for row in rows]
    assert priorities == sorted(priorities, reverse=True), "higher priority runs first"
    for row in rows:
        output = Path(row[-1])
        info = read_video_info(output)
        width, height = (int(v) for v in row[5].split("x"))
        assert (info.frames, info.width, info.height) == (int(row[4]), width, height)
    assert "model loads: 4, switches: 3" in result.stdout
