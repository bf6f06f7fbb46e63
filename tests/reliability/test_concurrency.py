"""Concurrency: 4 worker processes on one Postgres queue and 2 on one SQLite file, 400 short tasks each.

The processes are `python -m tests.integration.fast_worker`: the real `Worker` loop and `SqlTaskRepository`
(claim, lease keeper, guarded writes) with a runner that only appends the task id to its own log. They all
start claiming at one moment. Every task must run exactly once (logs) and end `Complete` after one attempt
(table), recording the worker that ran it; no lock or deadlock error may surface, neither as a failed or
retried task nor in a process's stderr. Figures: claims per second on the database clock (first claim to last
Complete), and the wall time including process start-up and exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.reliability.figures import Figures, sized
from tests.support.db import migrated_engine
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = sized(400, 2000)
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = sized(120, 600)
TROUBLE = ("database is locked", "deadlock", "Traceback", "OperationalError", "claim failed", "database write failed")


def run_fleet(db_url: str, processes: int, tmp_path: Path) -> dict[str, Any]:
    """Queue TASKS rows, run `processes` fast workers until idle, check exactly-once; return the figures."""
    engine = migrated_engine(db_url)
    repo = SqlTaskRepository(engine)
    expected = [
        repo.insert(NewTask(task_type="t2v", params={"prompt": f"task {n}"}, priority=n % 5)) for n in range(TASKS)
    ]
    go = tmp_path / "go"
    logs = [tmp_path / f"fleet-{n}.log" for n in range(processes)]
    readies = [tmp_path / f"fleet-{n}.ready" for n in range(processes)]
    stderrs = [tmp_path / f"fleet-{n}.stderr" for n in range(processes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    running: list[subprocess.Popen[bytes]] = []
    for n in range(processes):
        command = [
            sys.executable, "-m", "tests.integration.fast_worker", "--db", db_url, "--log", str(logs[n]),
            "--worker-id", f"fleet-{n}", "--ready", str(readies[n]), "--go", str(go),
        ]  # fmt: skip
        with stderrs[n].open("w") as stderr:
            running.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=stderr))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(ready.exists() for ready in readies):
            assert all(p.poll() is None for p in running), [s.read_text() for s in stderrs]
            assert time.monotonic() < deadline, "workers did not start in time"
            time.sleep(0.02)
        go.touch()
        started = time.monotonic()
        for process in running:
            process.wait(timeout=RUN_TIMEOUT_S)
        elapsed = time.monotonic() - started
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()

    errors = [stderr.read_text() for stderr in stderrs]
    for process, error in zip(running, errors, strict=True):
        assert process.returncode == 0, error
        for trouble in TROUBLE:
            assert trouble not in error, f"{trouble!r} surfaced in a worker's stderr:\n{error[-3000:]}"

    executed = {f"fleet-{n}": log.read_text().split() if log.exists() else [] for n, log in enumerate(logs)}
    counts = Counter(task_id for ids in executed.values() for task_id in ids)
    duplicated = {task_id: count for task_id, count in counts.items() if count > 1}
    assert not duplicated, f"executed more than once: {duplicated}"
    lost = set(expected) - set(counts)
    assert not lost, f"never executed: {sorted(lost)[:10]} ({len(lost)})"
    idle = [name for name, ids in executed.items() if not ids]
    assert not idle, f"these workers ran nothing, so the claims did not really compete: {idle}"

    with engine.begin() as conn:
        columns = "id, status, attempts, error_message, result_data, generation_started_at, generation_processed_at"
        rows = list(conn.execute(sa.text(f"SELECT {columns} FROM tasks")).mappings())
    engine.dispose()
    assert len(rows) == TASKS
    assert Counter(row["status"] for row in rows) == {"Complete": TASKS}
    assert all(row["attempts"] == 1 and row["error_message"] is None for row in rows), "a claim was retried"
    ran_by = {task_id: name for name, ids in executed.items() for task_id in ids}
    for row in rows:
        result = json.loads(row["result_data"]) if isinstance(row["result_data"], str) else row["result_data"]
        assert result == {"worker": ran_by[row["id"]]}, "the row records the worker that actually ran it"
    # Throughput on the database clock, from the first claim to the last Complete (process start-up and exit,
    # which the wall-clock figure includes, are left out).
    started_at = min(_timestamp(row["generation_started_at"]) for row in rows)
    finished_at = max(_timestamp(row["generation_processed_at"]) for row in rows)
    span = (finished_at - started_at).total_seconds()
    return {
        "processes": processes,
        "tasks": TASKS,
        "executed_twice": len(duplicated),
        "lost": len(lost),
        "failed": 0,
        "lock_errors": 0,
        "claims_per_s": round(TASKS / span, 1),
        "claims_span_s": round(span, 2),
        "wall_s_with_process_start_and_exit": round(elapsed, 2),
        "per_worker": {name: len(ids) for name, ids in executed.items()},
    }


def _timestamp(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


@pytest.mark.postgres
@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_four_processes_on_postgres_run_each_task_exactly_once(
    postgres_url: str, tmp_path: Path, figures: Figures
) -> None:
    figures.record("concurrency[postgres]", **run_fleet(postgres_url, 4, tmp_path))


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_two_processes_on_one_sqlite_file_run_each_task_exactly_once(
    sqlite_url: str, tmp_path: Path, figures: Figures
) -> None:
    figures.record("concurrency[sqlite]", **run_fleet(sqlite_url, 2, tmp_path))
