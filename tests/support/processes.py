"""The real `wan-worker` process harness: worker processes, a database with dirs (`Stack`), and its builders.

Acceptance, parallel and reliability tests start the installed console script on tiny real models and read
the `tasks` table back with raw SQL, the way other programs do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.db import migrated_engine

WORKER_START_TIMEOUT_S = 90.0
JSON_COLUMNS = ("result_data", "progress")


def wan_worker_command() -> list[str]:
    """The installed console script when present (what users run), else `python -m worker`."""
    script = Path(sys.executable).with_name("wan-worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


def insert_statement(names: Iterable[str]) -> sa.TextClause:
    """`INSERT INTO tasks (<names>) VALUES (:<names>) RETURNING id`: DB defaults for the other columns."""
    columns = list(names)
    return sa.text(
        f"INSERT INTO tasks ({', '.join(columns)}) VALUES ({', '.join(':' + n for n in columns)}) RETURNING id"
    )


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `tasks` row as a dict, its JSON columns decoded where the backend returns text."""
    data = dict(row)
    for key in JSON_COLUMNS:
        if isinstance(data.get(key), str):  # absent before a worker adopted a foreign table
            data[key] = json.loads(data[key])
    return data


@dataclass
class WorkerProcess:
    """One `wan-worker run` process with its log file."""

    args: list[str]
    log_path: Path
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    killed: bool = False  # killed on purpose: its exit is not a failure

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*wan_worker_command(), *self.args],
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill9(self) -> None:
        assert self.process is not None
        self.killed = True
        self.process.kill()
        self.process.wait(30)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@dataclass
class Stack:
    """A database, dirs and helpers to start workers and read the table back."""

    db_url: str
    root: Path
    models_dir: Path
    outputs_dir: Path
    presets_dir: Path
    engine: sa.Engine
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(
        self,
        *extra: str,
        name: str = "worker",
        lease_s: float = 30.0,
        env: Mapping[str, str] | None = None,
        db_url: str | None = None,
        global_args: Iterable[str] = (),
    ) -> WorkerProcess:
        """Start `wan-worker [global_args] run ... [extra]` on the stack's database (or `db_url`), logging to
        `<name>.log` in the stack's root."""
        args = [
            *global_args,
            "run",
            "--db",
            db_url or self.db_url,
            "--models-dir",
            str(self.models_dir),
            "--outputs-dir",
            str(self.outputs_dir),
            "--presets-dir",
            str(self.presets_dir),
            "--lease-seconds",
            str(lease_s),
            "--worker-id",
            name,
            *extra,
        ]
        worker = WorkerProcess(args, self.root / f"{name}.log", self.root, env=dict(env or {})).start()
        self.workers.append(worker)
        return worker

    def insert(self, task_type: str, params: dict[str, Any] | str, **columns: Any) -> str:
        """Insert a row the way another program would (raw SQL, DB defaults for the rest)."""
        params_text = params if isinstance(params, str) else json.dumps(params)
        values = {"task_type": task_type, "params": params_text, **columns}
        with self.engine.begin() as conn:
            return str(conn.execute(insert_statement(values), values).scalar_one())

    def row(self, task_id: str) -> dict[str, Any]:
        with self.engine.begin() as conn:
            row = conn.execute(sa.text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}).mappings().one()
        return decode_row(row)

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for worker in self.workers:
                if not worker.killed and worker.process is not None and worker.process.poll() not in (None, 0):
                    pytest.fail(f"{what}: worker exited with {worker.process.returncode}\n{worker.log_text()[-4000:]}")
            time.sleep(0.1)
        logs = "\n".join(w.log_text()[-3000:] for w in self.workers)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")

    def wait_status(self, task_id: str, statuses: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
        self.wait_for(lambda: self.row(task_id)["status"] in statuses, timeout, f"task {task_id} in {statuses}")
        return self.row(task_id)

    def close(self) -> None:
        """Stop every worker started on this stack, then dispose of its engine."""
        for worker in self.workers:
            worker.stop()
        self.engine.dispose()


def build_stack(db_url: str, root: Path, models_dir: Path) -> Stack:
    """A stack on `db_url` (migrated to head) with its presets dir under `root`; the caller closes it."""
    engine = migrated_engine(db_url)
    presets_dir = root / "presets"
    presets_dir.mkdir()
    return Stack(db_url, root, models_dir, root / "outputs", presets_dir, engine)


@contextmanager
def running_stack(db_url: str, root: Path, models_dir: Path) -> Iterator[Stack]:
    """`build_stack(...)`, closed (workers stopped, engine disposed) on exit: what the stack fixtures yield."""
    built = build_stack(db_url, root, models_dir)
    try:
        yield built
    finally:
        built.close()


def output_files(directory: Path) -> list[Path]:
    """Every file in the outputs dir, hidden partial files included."""
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []
