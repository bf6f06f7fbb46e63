"""Claim ownership: only the process that still holds a claim writes its row or publishes its output.

- A worker stopped past its lease (SIGSTOP, a hung driver) that resumes after another worker completed the
  task must not rename its video over the other's output, nor write the row (defect 6).
- Two processes sharing a `worker_id` are told apart by their claim tokens (defect 7).
- No task id can name another task's output file (defect 8).

The first two run on the real repository, on SQLite and Postgres, with the real `Worker` loop pieces.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from tests.support.fakes import BaseFakeRunner
from wan_engine.video_io import StagedOutputs, partial_files_for, staged_outputs, write_video
from worker.config import WorkerSettings
from worker.loop.lease import LeaseKeeper
from worker.loop.worker import RunContext, Worker
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask, Task, TaskOutcome, TaskStatus
from worker.tasks.paths import output_stem

SHARED_ID = "gpu-box-1"  # both processes got the same WAN_WORKER_ID
LEASE_S = 0.6


def _frames(value: int) -> np.ndarray:
    """Nine 16x16 frames of one grey level: two attempts' videos differ in content."""
    return np.full((9, 16, 16, 3), value, dtype=np.uint8)


def _settings(outputs: Path) -> WorkerSettings:
    return WorkerSettings(
        outputs_dir=outputs,
        worker_id=SHARED_ID,
        lease_s=LEASE_S,
        heartbeat_interval_s=0.1,
        poll_interval_s=0.05,
        stale_sweep_interval_s=0.1,
    )


def _first(candidates: list[Task]) -> Task | None:
    return candidates[0] if candidates else None


class StoppableRepository(SqlTaskRepository):
    """A repository client of a process that can be frozen: while `frozen`, its lease keeper's heartbeats
    block (the whole process is stopped); after the thaw the database stays locked for them."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.thawed = threading.Event()
        self.thawed.set()
        self.locked_after_thaw = False

    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool:
        self.thawed.wait()
        if self.locked_after_thaw:
            raise OperationalError("UPDATE tasks ...", {}, Exception("database is locked"))
        return super().heartbeat(task_id, worker_id, lease_s, progress)


class VideoRunner(BaseFakeRunner):
    """Writes a real video for the task through the worker's staging, as GenerationRunner does."""

    def __init__(self, outputs: Path, grey: int, before_write: threading.Event | None = None) -> None:
        self.outputs = outputs
        self.grey = grey
        self.before_write = before_write
        self.started = threading.Event()

    def run(self, task: Task, context: RunContext) -> TaskOutcome:
        self.started.set()
        if self.before_write is not None:
            assert self.before_write.wait(30), "never resumed"
        staging = StagedOutputs()
        context.stage(staging)
        with staged_outputs(staging):
            path = write_video(_frames(self.grey), self.outputs / f"{output_stem(task.id)}.mp4", fps=8)
        return TaskOutcome(str(path), {"grey": self.grey})


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_resumed_worker_never_publishes_over_the_completed_output(engine: Engine, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    submitter = SqlTaskRepository(engine)
    task_id = submitter.insert(NewTask(task_type="t2v", params={}, id="shared-output"))
    final = outputs / "shared-output.mp4"

    # Worker A claims, then its process is stopped (runner and lease keeper alike) past its lease.
    repo_a = StoppableRepository(engine)
    resume_a = threading.Event()
    runner_a = VideoRunner(outputs, grey=40, before_write=resume_a)
    worker_a = Worker(repo_a, runner_a, _settings(outputs))
    thread_a = threading.Thread(target=worker_a.run_once, daemon=True)
    repo_a.thawed.clear()
    thread_a.start()
    assert runner_a.started.wait(10)
    time.sleep(LEASE_S + 0.3)

    # Worker B (same worker_id, another process) re-queues the stale row, claims it and completes it.
    repo_b = SqlTaskRepository(engine)
    worker_b = Worker(repo_b, VideoRunner(outputs, grey=200), _settings(outputs))
    _wait_for(lambda: worker_b.run_once() and submitter.get(task_id).status is TaskStatus.COMPLETE)  # type: ignore[union-attr]
    b_bytes = final.read_bytes()
    row_b = submitter.get(task_id)
    assert row_b is not None and row_b.result_data and row_b.result_data["grey"] == 200

    # A resumes while the database is locked for its heartbeats: it only learns at the guarded write.
    repo_a.locked_after_thaw = True
    repo_a.thawed.set()
    resume_a.set()
    thread_a.join(30)
    assert not thread_a.is_alive()

    assert final.read_bytes() == b_bytes, "A renamed its video over B's completed output"
    row = submitter.get(task_id)
    assert row is not None and row.status is TaskStatus.COMPLETE
    assert row.output_location == str(final) and row.result_data and row.result_data["grey"] == 200
    assert row.attempts == 2
    assert sorted(p.name for p in outputs.iterdir()) == ["shared-output.mp4"], "A left a staged/partial file"


def test_a_lost_claim_holder_deletes_only_its_staged_file(engine: Engine, tmp_path: Path) -> None:
    """The publish step itself: a guarded complete that no longer matches renames nothing."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    submitter = SqlTaskRepository(engine)
    task_id = submitter.insert(NewTask(task_type="t2v", params={}, id="t1"))
    final = outputs / "t1.mp4"
    repo_a, repo_b = SqlTaskRepository(engine), SqlTaskRepository(engine)
    assert repo_a.claim_next(SHARED_ID, 0.2, _first) is not None
    staging = StagedOutputs()
    with staged_outputs(staging):
        write_video(_frames(10), final, fps=8)
    assert not final.exists() and len(partial_files_for("t1", outputs)) == 1, "staged, not published"
    time.sleep(0.4)
    assert repo_b.requeue_stale().requeued == [task_id]
    assert repo_b.claim_next(SHARED_ID, 30, _first) is not None
    write_video(_frames(250), final, fps=8)
    assert repo_b.mark_complete(task_id, SHARED_ID, str(final), {"by": "B"})
    b_bytes = final.read_bytes()

    assert not repo_a.mark_complete(task_id, SHARED_ID, str(final), {"by": "A"}, publish=staging.publish)
    staging.discard()
    assert final.read_bytes() == b_bytes
    assert partial_files_for("t1", outputs) == []
    row = submitter.get(task_id)
    assert row is not None and row.result_data == {"by": "B"}


def test_same_worker_id_other_process_cannot_write_a_reclaimed_row(engine: Engine, tmp_path: Path) -> None:
    submitter = SqlTaskRepository(engine)
    task_id = submitter.insert(NewTask(task_type="t2v", params={}, id="twice"))
    repo_a, repo_b = SqlTaskRepository(engine), SqlTaskRepository(engine)
    assert repo_a.claim_token != repo_b.claim_token
    assert repo_a.claim_next(SHARED_ID, 0.2, _first) is not None
    time.sleep(0.4)
    assert repo_b.requeue_stale().requeued == [task_id]
    claimed = repo_b.claim_next(SHARED_ID, 30, _first)
    assert claimed is not None and claimed.worker_id == SHARED_ID

    # Every guarded write of A fails although the worker_id matches; B's succeed.
    assert not repo_a.heartbeat(task_id, SHARED_ID, 30, {"stage": "denoising"})
    assert not repo_a.mark_complete(task_id, SHARED_ID, "a.mp4", {})
    assert not repo_a.mark_failed(task_id, SHARED_ID, "boom")
    assert not repo_a.retry_later(task_id, SHARED_ID, "again", 0)
    assert not repo_a.defer(task_id, SHARED_ID, "other", None)
    assert not repo_a.release(task_id, SHARED_ID)
    keeper = LeaseKeeper(repo_a, task_id, SHARED_ID, 30, 10)
    keeper.flush()
    assert keeper.lost.is_set(), "A's lease keeper must see that the row is no longer its own"

    assert repo_b.heartbeat(task_id, SHARED_ID, 30, None)
    assert repo_b.mark_complete(task_id, SHARED_ID, "b.mp4", {"by": "B"})
    row = submitter.get(task_id)
    assert row is not None and row.status is TaskStatus.COMPLETE and row.output_location == "b.mp4"


@pytest.mark.parametrize("write", ["release", "retry_later", "defer"])
def test_a_row_given_back_is_not_writable_by_the_old_claim(engine: Engine, write: str) -> None:
    """Giving a row back clears the token: the next claim, even by the same process, writes a fresh one."""
    repo = SqlTaskRepository(engine)
    task_id = repo.insert(NewTask(task_type="t2v", params={}, id="given-back"))
    assert repo.claim_next(SHARED_ID, 30, _first) is not None
    args: dict[str, tuple[Any, ...]] = {"release": (), "retry_later": ("again", 0), "defer": ("missing", None)}
    assert getattr(repo, write)(task_id, SHARED_ID, *args[write])
    other = SqlTaskRepository(engine)
    if write == "defer":
        assert other.get(task_id) is not None
        return
    assert other.claim_next(SHARED_ID, 30, _first) is not None
    assert not repo.heartbeat(task_id, SHARED_ID, 30, None)


def test_output_stems_are_injective() -> None:
    unsafe = ["a/b", "../etc", "x y", "é", ".hidden", "a" * 101, "\udc80", "\udc81"]
    hashed = [output_stem(task_id) for task_id in unsafe]
    # Client-chosen ids equal to another task's hashed name (in any case) used to share its file.
    lookalikes = [*hashed, *(stem.upper() for stem in hashed), "task-" + "0" * 24]
    safe = ["abc", "task_1", "task-1", "a.b", "seg-000", "task-" + "0" * 23, "task-" + "g" * 24]
    ids = [*unsafe, *lookalikes, *safe]
    stems = [output_stem(task_id) for task_id in ids]
    assert len(set(stems)) == len(ids), "two task ids share an output file"
    assert all(output_stem(task_id) == task_id for task_id in safe), "safe ids keep <task id>.mp4"
    for task_id, stem in zip(lookalikes, stems[len(unsafe) : len(unsafe) + len(lookalikes)], strict=True):
        assert stem != task_id


def test_staged_names_are_found_by_the_partial_cleanup(tmp_path: Path) -> None:
    """A killed attempt's staged files (and a stitch's temp file of a staged name) are removed by the next."""
    staging = StagedOutputs()
    staged = staging.path_for(tmp_path / "t1.mp4")
    stitch_temp = tmp_path / f".{staged.stem}.4242.partial.mp4"
    other = StagedOutputs().path_for(tmp_path / "t1.5.mp4")
    for path in (staged, stitch_temp, other, tmp_path / "t1.mp4"):
        path.write_bytes(b"x")
    assert partial_files_for("t1", tmp_path) == sorted([staged, stitch_temp])
