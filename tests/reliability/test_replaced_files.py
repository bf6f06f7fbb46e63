"""A SQLite database file replaced under a running worker (a backup restored with `mv`).

The worker's connections keep the inode they opened, so without a check it would serve the deleted file
while the new file's tasks wait forever. `wan-worker run` notices the change, says so in one log line
naming the path, and exits with `DATABASE_REPLACED_EXIT` (3), abandoning its current task; a restarted worker
(the `--gpus` supervisor restarts on any exit but 0 and 2) serves the new file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.harness import start_worker
from tests.support.db import migrated_engine
from tests.support.processes import Stack, insert_statement
from worker.processes.supervisor import Child, RestartPolicy, Supervisor
from worker.store.file_identity import DATABASE_REPLACED_EXIT, FileIdentity, sqlite_file

TINY = {"model": "tiny_t2v", "resolution": "32x32", "video_length": 5, "num_inference_steps": 2}
# A throw-away supervised child: exits with the next code of argv[1] (comma-separated), counting its starts in
# the file argv[2].
CHILD = """
import sys
from pathlib import Path
codes, counter = sys.argv[1].split(","), Path(sys.argv[2])
runs = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(runs + 1))
sys.exit(int(codes[min(runs, len(codes) - 1)]))
"""
FAST = RestartPolicy(base_delay_s=0.05, max_delay_s=0.2, max_per_minute=100)


def _fresh_database(path: Path, prompt: str) -> str:
    """A database migrated to head at `path` holding one queued tiny task; returns the task's id."""
    engine = migrated_engine(f"sqlite:///{path}")
    try:
        values = {"task_type": "t2v", "params": json.dumps({**TINY, "prompt": prompt})}
        with engine.begin() as conn:
            return str(conn.execute(insert_statement(values), values).scalar_one())
    finally:
        engine.dispose()  # the last connection closes: its WAL is checkpointed and removed


@pytest.mark.acceptance
def test_a_replaced_database_file_stops_the_worker_and_a_restart_serves_the_new_file(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    path = sqlite_file(stack.db_url)
    assert path is not None
    first = stack.insert("t2v", {**TINY, "prompt": "before the restore"})
    worker = start_worker(stack, "watched", lease_s=30)
    assert stack.wait_status(first, ("Complete", "Failed"))["status"] == "Complete"

    backup = stack.root / "backup.db"
    restored = _fresh_database(backup, "after the restore")
    stack.engine.dispose()  # the test's own connections would hold the old inode too
    os.replace(backup, path)  # what `mv backup.db tasks.db` does
    replaced_at = time.monotonic()
    assert worker.wait_exit(30) == DATABASE_REPLACED_EXIT, worker.log_text()[-3000:]
    assert time.monotonic() - replaced_at < 10, "noticed within a few seconds"
    lines = [line for line in worker.log_text().splitlines() if "the file was replaced" in line]
    assert len(lines) == 1 and str(path) in lines[0] and f"exits {DATABASE_REPLACED_EXIT}" in lines[0]

    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the old file's WAL would be replayed into the new file"
    stack.workers.remove(worker)  # its exit 3 is expected: wait_for fails on a worker's non-zero exit
    worker.stop()
    start_worker(stack, "restarted", lease_s=30)
    with stack.engine.begin() as conn:  # the pool reconnects: this is the new file
        assert conn.exec_driver_sql("SELECT id FROM tasks").scalars().all() == [restored]
    row = stack.wait_status(restored, ("Complete", "Failed"))
    assert row["status"] == "Complete", row["error_message"]
    assert row["worker_id"] == "restarted"


def test_the_supervisor_restarts_a_worker_that_exits_for_a_replaced_database(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    codes = f"{DATABASE_REPLACED_EXIT},0"
    child = Child(gpu=0, worker_id="w-gpu0", argv=[codes, str(counter)], env=dict(os.environ))
    supervisor = Supervisor([child], command=[sys.executable, "-c", CHILD], policy=FAST)
    assert supervisor.run() == 0
    assert counter.read_text() == "2", "restarted once after exit 3, then its clean exit ended it"


def test_file_identity_names_a_replacement_and_a_removal(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"old")
    identity = FileIdentity.record(path)
    assert identity.changed() is None
    path.write_bytes(b"written in place")  # same inode: SQLite's own writes
    assert identity.changed() is None
    (tmp_path / "new.db").write_bytes(b"new")
    os.replace(tmp_path / "new.db", path)
    assert "replaced" in (identity.changed() or "")
    path.unlink()
    assert "removed" in (identity.changed() or "")


def test_only_sqlite_files_are_watched(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path / 'a.db'}") == tmp_path / "a.db"
    assert sqlite_file("sqlite:///relative.db") == Path("relative.db").absolute()
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("postgresql+psycopg://u:p@host/db") is None
