"""Resource hygiene: many consecutive tiny tasks in one worker process leak no memory, handles or files.

One `wan-worker run` process (its own TMPDIR) works through TASKS tiny tasks on two models, so the
resident-model scheduling also switches models along the way. The harness samples the process from outside
(psutil, /proc/<pid>/fd, /proc/<pid>/task) while it works. After a warm-up of WARMUP tasks (first model loads,
lazy imports, allocator pools) the resident memory may grow by at most RSS_GROWTH_BOUND_MB up to the last
task, the open file descriptors (the SQLite pool's own excepted: bounded separately) and threads must come back
to their warm-up counts, and no temporary or partial file may be left behind.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.reliability.figures import Figures, sized
from tests.reliability.harness import all_files, insert_many, read_rows, start_worker, status_counts, wait_all_final
from tests.support.processes import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

TASKS = sized(30, 200)
WARMUP = 10
RSS_GROWTH_BOUND_MB = 64.0
FD_SLACK = 1  # file descriptors other than the database's (videos, models, pipes to ffmpeg, sockets)
DB_FDS_BOUND = 3 * 10  # SQLite: db + wal + shm per pooled connection; the pool holds at most 5 + 5 overflow
THREAD_SLACK = 1  # the lease keeper of a task being claimed at that moment
PARAMS = {"prompt": "hygiene", "resolution": "32x32", "video_length": 5, "num_inference_steps": 2}


@dataclass
class Sample:
    done: int
    rss_mb: float
    fds: int  # open file descriptors, the database's own files excepted
    db_fds: int  # the SQLite pool's connections (tasks.db, -wal, -shm)
    threads: int


class Sampler(threading.Thread):
    """Samples the worker's RSS, open fds and threads, with the number of finished tasks, twice a second."""

    def __init__(self, stack: Stack, pid: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.stack, self.process = stack, psutil.Process(pid)
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def sample(self) -> Sample:
        done = sum(count for status, count in status_counts(self.stack).items() if status in ("Complete", "Failed"))
        targets = []
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            try:
                targets.append(str(fd.readlink()))
            except FileNotFoundError:  # closed while we looked
                continue
        db = str(self.stack.root / "tasks.db")
        db_fds = sum(target.startswith(db) for target in targets)
        return Sample(
            done, self.process.memory_info().rss / 2**20, len(targets) - db_fds, db_fds, self.process.num_threads()
        )

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append(self.sample())
            except (psutil.NoSuchProcess, FileNotFoundError):
                return


def _idle_sample(sampler: Sampler, stack: Stack) -> Sample:
    """A sample taken while the worker sits idle (no task in progress), the fairest point to compare."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if status_counts(stack)["In Progress"] == 0:
            time.sleep(1.5)  # past the last task's bookkeeping writes
            if status_counts(stack)["In Progress"] == 0:
                return sampler.sample()
        time.sleep(0.05)
    pytest.fail("the worker never went idle")


def test_many_tasks_in_one_process_leak_nothing(sqlite_stack: Stack, figures: Figures) -> None:
    stack = sqlite_stack
    tmpdir = stack.root / "worker-tmp"
    tmpdir.mkdir()
    both = ["tiny_t2v", "tiny_t2v_2_2"] * (WARMUP // 2)  # both models loaded (and cached) during the warm-up
    warmup_ids = insert_many(
        stack, [{"task_type": "t2v", "params": {**PARAMS, "model": m, "seed": n}} for n, m in enumerate(both)]
    )
    worker = start_worker(stack, "hygiene", lease_s=30, env={"TMPDIR": str(tmpdir)})
    wait_all_final(stack, warmup_ids, timeout=300, what="the warm-up tasks")
    assert worker.process is not None
    sampler = Sampler(stack, worker.process.pid)
    warm = _idle_sample(sampler, stack)
    tmp_after_warmup = set(all_files(tmpdir))

    models = ["tiny_t2v"] * 3 + ["tiny_t2v_2_2"]  # mostly one model, with switches
    started = time.monotonic()
    ids = insert_many(
        stack,
        [
            {"task_type": "t2v", "params": {**PARAMS, "model": models[n % len(models)], "seed": n}}
            for n in range(TASKS - WARMUP)
        ],
    )
    sampler.start()
    wait_all_final(stack, ids, timeout=60 + 15 * TASKS, what=f"{TASKS} tasks")
    elapsed = time.monotonic() - started
    end = _idle_sample(sampler, stack)
    sampler.stop.set()
    sampler.join(5)

    rows = read_rows(stack)
    assert all(row["status"] == "Complete" for row in rows.values()), [r["error_message"] for r in rows.values()]
    assert len(rows) == TASKS
    loads = sum(bool((row["result_data"] or {}).get("model_loaded")) for row in rows.values())
    peak_mb = max([warm.rss_mb, end.rss_mb, *(s.rss_mb for s in sampler.samples)])
    growth_mb = end.rss_mb - warm.rss_mb
    outputs = all_files(stack.outputs_dir)
    leftovers = sorted(set(all_files(tmpdir)) - tmp_after_warmup)
    figures.record(
        "resource_hygiene[sqlite]",
        tasks=TASKS,
        model_loads=loads,
        rss_after_warmup_mb=round(warm.rss_mb, 1),
        rss_end_mb=round(end.rss_mb, 1),
        rss_growth_mb=round(growth_mb, 1),
        rss_growth_bound_mb=RSS_GROWTH_BOUND_MB,
        rss_peak_mb=round(peak_mb, 1),
        fds_after_warmup=warm.fds,
        fds_end=end.fds,
        db_fds_end=end.db_fds,
        fds_max=max(s.fds for s in [warm, end, *sampler.samples]),
        threads_after_warmup=warm.threads,
        threads_end=end.threads,
        temp_files_left=len(leftovers),
        seconds=round(elapsed, 1),
        tasks_per_s=round((TASKS - WARMUP) / elapsed, 2),
    )
    assert growth_mb <= RSS_GROWTH_BOUND_MB, f"RSS grew {growth_mb:.1f} MB over {TASKS - WARMUP} tasks"
    assert end.fds <= warm.fds + FD_SLACK, f"file descriptors: {warm.fds} after warm-up, {end.fds} at the end"
    assert max(s.db_fds for s in [end, *sampler.samples]) <= DB_FDS_BOUND, "database connections pile up"
    assert end.threads <= warm.threads + THREAD_SLACK, f"threads: {warm.threads} after warm-up, {end.threads} at end"
    assert not leftovers, f"temporary files left in TMPDIR: {leftovers[:10]}"
    assert sorted(outputs) == sorted(Path(row["output_location"]) for row in rows.values()), "stray files in outputs"
    assert loads > 2, "the scheduler never switched models: the test did not exercise loading"
