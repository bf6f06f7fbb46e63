"""Exactly-once claiming under real concurrency: two worker processes on one queue, per backend.

Each process is `python -m tests.integration.fast_worker` (the real Worker and SqlTaskRepository with
a runner that logs task ids). Both start claiming at the same moment; every one of 200 tasks must run
exactly once, end Complete after one attempt, and no process may hit a lock or database error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.db import migrated_engine
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask, TaskStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = 200
WORKERS = 2
START_TIMEOUT_S = 30
RUN_TIMEOUT_S = 60
TROUBLE = ("database is locked", "OperationalError", "Traceback", "claim failed", "database write failed")


def run_workers(db_url: str, tmp_path: Path) -> None:
    engine = migrated_engine(db_url)
    repo = SqlTaskRepository(engine)
    expected = [
        repo.insert(NewTask(task_type="t2v", params={"prompt": f"task {n}"}, priority=n % 3)) for n in range(TASKS)
    ]

    go = tmp_path / "go"
    logs = [tmp_path / f"worker-{n}.log" for n in range(WORKERS)]
    readies = [tmp_path / f"worker-{n}.ready" for n in range(WORKERS)]
    stderrs = [tmp_path / f"worker-{n}.stderr" for n in range(WORKERS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    processes = []
    for n in range(WORKERS):
        command = [
            sys.executable, "-m", "tests.integration.fast_worker", "--db", db_url, "--log", str(logs[n]),
            "--worker-id", f"fast-{n}", "--ready", str(readies[n]), "--go", str(go),
        ]  # fmt: skip
        with stderrs[n].open("w") as stderr:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=stderr))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(ready.exists() for ready in readies):
            dead = [p.args for p in processes if p.poll() is not None]
            assert not dead, f"a worker exited before starting: {[s.read_text() for s in stderrs]}"
            assert time.monotonic() < deadline, "workers did not start in time"
            time.sleep(0.02)
        go.touch()
        for process in processes:
            process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    errors = [stderr.read_text() for stderr in stderrs]
    for process, error in zip(processes, errors, strict=True):
        assert process.returncode == 0, error
        for trouble in TROUBLE:
            assert trouble not in error, error

    executed = {n: log.read_text().split() if log.exists() else [] for n, log in enumerate(logs)}
    counts = Counter(task_id for ids in executed.values() for task_id in ids)
    duplicated = {task_id: count for task_id, count in counts.items() if count > 1}
    assert not duplicated, f"executed more than once: {duplicated}"
    assert set(counts) == set(expected), f"lost: {set(expected) - set(counts)}, unknown: {set(counts) - set(expected)}"
    assert all(executed.values()), f"one worker ran nothing, so nothing ran concurrently: {executed}"

    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT id, status, attempts, result_data FROM tasks")).mappings().all()
    assert len(rows) == TASKS
    assert Counter(row["status"] for row in rows) == {TaskStatus.COMPLETE.value: TASKS}
    assert all(row["attempts"] == 1 for row in rows)
    ran_by = {task_id: f"fast-{n}" for n, ids in executed.items() for task_id in ids}
    for row in rows:
        result = row["result_data"]
        if isinstance(result, str):  # a JSON column read through raw SQL text on SQLite
            result = json.loads(result)
        assert result == {"worker": ran_by[row["id"]]}, "the row records the worker that actually ran it"
    engine.dispose()


@pytest.mark.timeout(120)
def test_two_processes_on_one_sqlite_file_run_each_task_exactly_once(sqlite_url: str, tmp_path: Path) -> None:
    run_workers(sqlite_url, tmp_path)


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_two_processes_on_one_postgres_schema_run_each_task_exactly_once(postgres_url: str, tmp_path: Path) -> None:
    run_workers(postgres_url, tmp_path)
