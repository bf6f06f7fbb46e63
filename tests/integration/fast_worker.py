"""A real worker process with a trivial runner, for the concurrency tests.

    python -m tests.integration.fast_worker --db URL --log FILE [--worker-id ID] [--ready FILE --go FILE]

It builds the real `worker.loop.worker.Worker` over the real `SqlTaskRepository`; the runner only appends the
task id to its log file. With --ready/--go it signals that it has started and waits for the go file,
so that several processes begin claiming at the same moment.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from tests.support.fakes import BaseFakeRunner
from worker.config import WorkerSettings
from worker.loop.worker import RunContext, Worker
from worker.store.repository import SqlTaskRepository
from worker.store.schema import create_db_engine
from worker.task import Task, TaskOutcome


class FastRunner(BaseFakeRunner):
    """Executes a task by logging its id (one line per execution, flushed at once)."""

    def __init__(self, log_path: Path, worker_id: str) -> None:
        self.log_path = log_path
        self.worker_id = worker_id

    def run(self, task: Task, context: RunContext) -> TaskOutcome:
        context.report("run", 1, 1)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(task.id + "\n")
        return TaskOutcome(None, {"worker": self.worker_id})


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--worker-id", default=f"fast-{os.getpid()}")
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    # The worker records its GPU name at start-up: import torch now, not after the go signal.
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    engine = create_db_engine(args.db)
    settings = WorkerSettings(
        db_url=args.db,
        lease_s=30.0,
        heartbeat_interval_s=5.0,
        poll_interval_s=0.01,
        stale_sweep_interval_s=60.0,
        worker_id=args.worker_id,
    )
    worker = Worker(SqlTaskRepository(engine), FastRunner(args.log, args.worker_id), settings)
    if args.ready:
        args.ready.touch()
    if args.go:
        _wait_for(args.go, timeout_s=60)
    worker.run_forever(until_idle=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
