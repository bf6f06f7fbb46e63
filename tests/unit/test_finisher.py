"""The output finisher (issue 15): a task's output is written on the finisher thread while the loop runs the next.

The loop runs against the in-memory repository of test_loop (guarded writes, `publish` inside the guarded
`Complete` write) and a runner that splits each task like `GenerationRunner` with a deferred write: `run` (the
GPU part) returns a `PendingFinish`, whose `finish` writes the file frame by frame under its staged name
(checking for a cancel before each frame, as the engine's `PendingWrite` does). Overlap and ordering are shown
with events, never with timing. The last test runs the real engine's `PendingWrite` on a tiny model.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import BaseFakeRunner
from tests.unit.test_loop import C, F, FakeRepository, P, Q, X, settings
from wan_engine.video_io import StagedOutputs, read_video_info
from worker.loop.events import NullSink
from worker.loop.finisher import OutputFinisher, PendingFinish
from worker.loop.retry import RetryPolicy
from worker.loop.worker import RunContext, Worker
from worker.task import Task, TaskOutcome

FrameHook = Callable[[Task, RunContext, int], None]
WAIT_S = 10.0  # how long a test waits for an event that must come (a failure, not a timing assertion)


class DeferringRunner(BaseFakeRunner):
    """`run` returns a PendingFinish; its `finish` writes `frames` chunks to the staged file, then stages it."""

    def __init__(self, outputs: Path, frames: int = 4) -> None:
        self.outputs = outputs
        self.frames = frames
        self.frames_for: dict[str, int] = {}  # per task, overriding `frames`
        self.ran: list[str] = []
        self.can_defer: list[bool] = []
        self.run_started: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.run_returned: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.on_run: dict[str, Callable[[Task, RunContext], None]] = {}
        self.on_frame: dict[str, FrameHook] = {}
        self.staged: dict[str, Path] = {}

    def run(self, task: Task, context: RunContext) -> PendingFinish:
        self.ran.append(task.id)
        self.can_defer.append(context.can_defer)
        self.run_started[task.id].set()
        context.report("denoising", 1, 1)
        if task.id in self.on_run:
            self.on_run[task.id](task, context)
        staging = StagedOutputs()
        context.stage(staging)
        final = self.outputs / f"{task.id}.mp4"

        def finish() -> TaskOutcome:
            staged = staging.path_for(final)
            self.staged[task.id] = staged
            try:
                with staged.open("wb") as file:
                    for frame in range(self.frames_for.get(task.id, self.frames)):
                        context.check()  # what PendingWrite.finish does before each frame
                        if task.id in self.on_frame:
                            self.on_frame[task.id](task, context, frame)
                        file.write(b"frame %d;" % frame)
            except BaseException:
                staged.unlink(missing_ok=True)  # as write_video: a failed write leaves no partial file
                raise
            staging.add(staged, final)
            return TaskOutcome(str(final), {"task": task.id})

        self.run_returned[task.id].set()
        return PendingFinish(finish)


class RecordingSink(NullSink):
    """Records the loop's events in order, from either thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _add(self, name: str, task: Task) -> None:
        with self._lock:
            self.events.append((name, task.id))

    def started(self, task: Task, resident_model: str | None) -> None:
        self._add("started", task)

    def completed(self, task: Task, output: str | None, result: dict[str, Any]) -> None:
        self._add("completed", task)

    def failed(self, task: Task, error: BaseException, message: str, retrying: bool) -> None:
        self._add("failed", task)

    def cancelled(self, task: Task) -> None:
        self._add("cancelled", task)


class PublishWatchingRepository(FakeRepository):
    """Records, inside the guarded Complete write, whether the final file existed before and after `publish`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bool]] = []

    def mark_complete(
        self,
        task_id: str,
        worker_id: str,
        output: str | None,
        result: dict[str, Any],
        publish: Callable[[], None] | None = None,
    ) -> bool:
        assert publish is not None, "a staged output must be renamed inside the guarded Complete write"

        def watched() -> None:
            self.seen.append((task_id, "before", Path(output or "").exists()))
            publish()
            self.seen.append((task_id, "after", Path(output or "").exists()))

        return super().mark_complete(task_id, worker_id, output, result, watched)


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    directory = tmp_path / "outputs"
    directory.mkdir()
    return directory


def _in_thread(worker: Worker, until_idle: bool = False) -> threading.Thread:
    thread = threading.Thread(target=worker.run_forever, kwargs={"until_idle": until_idle}, daemon=True)
    thread.start()
    return thread


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.005)


def _names(outputs: Path) -> list[str]:
    return sorted(p.name for p in outputs.iterdir())


# ---- the overlap --------------------------------------------------------------------------------------


def test_next_task_runs_while_the_previous_output_is_written(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    runner = DeferringRunner(outputs)
    overlapped: list[bool] = []

    def first_frame(task: Task, context: RunContext, frame: int) -> None:
        if frame == 0:  # the first task's write waits for the second task's run: only an overlap lets it go on
            overlapped.append(runner.run_started[second].wait(WAIT_S))

    runner.on_frame[first] = first_frame
    sink = RecordingSink()
    worker = Worker(repo, runner, settings(), events=sink)
    worker.run_forever(until_idle=True)

    assert overlapped == [True], "the second task's run did not start while the first output was written"
    assert runner.can_defer == [True, True]
    assert [repo.row(t).status for t in (first, second)] == [C, C]
    assert sink.events.index(("started", second)) < sink.events.index(("completed", first))
    assert _names(outputs) == [f"{first}.mp4", f"{second}.mp4"], "exactly the final files, no staged one"
    assert (outputs / f"{first}.mp4").read_bytes() == b"frame 0;frame 1;frame 2;frame 3;"
    assert repo.row(first).output_location == str(outputs / f"{first}.mp4")
    assert worker.finishing_task is None
    assert repo.workers["worker-a"]["status"] == "stopped"


def test_complete_is_written_only_with_the_rename_of_the_finished_file(outputs: Path) -> None:
    repo = PublishWatchingRepository()
    task_id = repo.add()
    runner = DeferringRunner(outputs)
    during: list[tuple[Any, bool, bool]] = []

    def last_frame(task: Task, context: RunContext, frame: int) -> None:
        if frame == runner.frames - 1:
            staged = runner.staged[task.id]
            during.append((repo.row(task.id).status, (outputs / f"{task.id}.mp4").exists(), staged.exists()))

    runner.on_frame[task_id] = last_frame
    Worker(repo, runner, settings()).run_forever(until_idle=True)

    assert during == [(P, False, True)], "while written: In Progress, only the staged name exists"
    assert repo.seen == [(task_id, "before", False), (task_id, "after", True)]
    assert repo.row(task_id).status is C
    assert _names(outputs) == [f"{task_id}.mp4"]


def test_at_most_one_output_is_pending(outputs: Path) -> None:
    repo = FakeRepository()
    first, second, third = repo.add(), repo.add(), repo.add()
    runner = DeferringRunner(outputs)
    go = threading.Event()
    runner.on_frame[first] = lambda task, context, frame: go.wait(WAIT_S) if frame == 0 else None
    worker = Worker(repo, runner, settings())
    thread = _in_thread(worker, until_idle=True)

    assert runner.run_returned[second].wait(WAIT_S)
    # The second hand-off waits for the first output: the third task is not claimed meanwhile.
    time.sleep(0.2)
    assert runner.ran == [first, second]
    assert worker.finishing_task is not None and worker.finishing_task.id == first
    assert repo.row(third).status is Q
    go.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert runner.ran == [first, second, third]
    assert [repo.row(t).status for t in (first, second, third)] == [C, C, C]


def test_until_idle_runs_a_dependant_of_the_pending_task(outputs: Path) -> None:
    repo = FakeRepository()
    prerequisite = repo.add()
    dependant = repo.add(dependant_on=prerequisite)
    runner = DeferringRunner(outputs)
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    assert runner.ran == [prerequisite, dependant]
    assert repo.row(dependant).status is C


def test_a_task_waiting_for_the_pending_output_is_claimed_before_others(outputs: Path) -> None:
    """A queued task waiting for the pending output (an orchestrator for its stitch, a user's chain) comes
    next: the loop finishes that output first instead of starting another model's task meanwhile."""
    repo = FakeRepository()
    prerequisite = repo.add(model="M", priority=5)
    dependant = repo.add(model="M", priority=5, dependant_on=prerequisite)
    other = repo.add(model="N", priority=1)
    runner = DeferringRunner(outputs)
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    assert runner.ran == [prerequisite, dependant, other]
    assert [repo.row(t).status for t in (prerequisite, dependant, other)] == [C, C, C]


# ---- endings while the output is written ------------------------------------------------------------


def test_cancel_while_the_output_is_written_discards_it(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    runner = DeferringRunner(outputs, frames=100_000)
    frames_after_cancel: list[int] = []

    def cancel_at_frame_two(task: Task, context: RunContext, frame: int) -> None:
        if frame == 2:
            repo.user_cancel(task.id)
        if frame > 2:
            frames_after_cancel.append(frame)
        time.sleep(0.002)

    runner.on_frame[first] = cancel_at_frame_two
    runner.frames_for[second] = 3
    sink = RecordingSink()
    Worker(repo, runner, settings(), events=sink).run_forever(until_idle=True)

    row = repo.row(first)
    assert row.status is X and row.output_location is None
    assert ("cancelled", first) in sink.events and ("completed", first) not in sink.events
    assert len(frames_after_cancel) < 100_000 - 3, "the write was not stopped"
    assert repo.row(second).status is C
    assert _names(outputs) == [f"{second}.mp4"], "no final and no staged file of the cancelled task"


def test_encode_failure_fails_the_task_with_its_message(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(max_attempts=3), repo.add()
    runner = DeferringRunner(outputs)

    def broken_encoder(task: Task, context: RunContext, frame: int) -> None:
        if frame == 1:
            raise ValueError("MP4 output needs an even width and height, got 63x48")

    runner.on_frame[first] = broken_encoder
    sink = RecordingSink()
    Worker(repo, runner, settings(), events=sink).run_forever(until_idle=True)

    row = repo.row(first)
    assert row.status is F
    assert row.error_message == "MP4 output needs an even width and height, got 63x48"
    assert row.attempts == 1
    assert ("failed", first) in sink.events
    assert repo.row(second).status is C
    assert _names(outputs) == [f"{second}.mp4"]


def test_transient_encode_error_is_retried_through_the_retry_policy(outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add(max_attempts=3)
    runner = DeferringRunner(outputs)
    failures = iter([True, False])

    def flaky(task: Task, context: RunContext, frame: int) -> None:
        if frame == 0 and next(failures):
            raise RuntimeError("ffmpeg failed writing the video (exit code 1)")

    runner.on_frame[task_id] = flaky
    worker = Worker(repo, runner, settings(), policy=RetryPolicy(base_delay_s=0.0))
    worker.run_forever(until_idle=True)
    if repo.row(task_id).status is Q:  # the retry's run_after had not passed at the idle check
        worker.run_forever(until_idle=True)
    row = repo.row(task_id)
    assert row.status is C and row.attempts == 2
    assert runner.ran == [task_id, task_id]


def test_lost_lease_while_the_output_is_written_publishes_nothing(outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add()
    runner = DeferringRunner(outputs, frames=100_000)

    def taken_over(task: Task, context: RunContext, frame: int) -> None:
        if frame == 1:
            with repo._lock:  # the lease expired, another worker re-claimed it
                repo.rows[task.id].worker_id = "worker-b"
        time.sleep(0.002)

    runner.on_frame[task_id] = taken_over
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    row = repo.row(task_id)
    assert row.status is P and row.worker_id == "worker-b"
    assert _names(outputs) == []


# ---- stopping -----------------------------------------------------------------------------------------


def test_first_stop_waits_for_the_pending_output_which_keeps_its_lease(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    runner = DeferringRunner(outputs)
    go = threading.Event()
    worker = Worker(repo, runner, settings())
    runner.on_run[first] = lambda task, context: worker.request_stop()
    runner.on_frame[first] = lambda task, context, frame: go.wait(WAIT_S) if frame == 0 else None
    thread = _in_thread(worker)  # not until_idle: only the stop ends it

    _wait(lambda: worker.finishing_task is not None, "the first output to be pending")
    assert worker.current_task is None
    assert thread.is_alive(), "the worker exited with an output still being written"
    assert repo.workers["worker-a"]["status"] == "busy", "a worker writing an output is busy"
    lease = repo.row(first).lease_expires_at
    _wait(lambda: repo.row(first).lease_expires_at != lease, "the pending task's lease to be renewed")
    assert repo.row(first).status is P
    go.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert repo.row(first).status is C
    assert (outputs / f"{first}.mp4").exists()
    assert repo.row(second).status is Q and repo.row(second).attempts == 0
    assert repo.workers["worker-a"]["status"] == "stopped"


def test_second_stop_releases_the_pending_task_and_discards_its_file(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    runner = DeferringRunner(outputs, frames=100_000)
    writing = threading.Event()

    def slow(task: Task, context: RunContext, frame: int) -> None:
        writing.set()
        time.sleep(0.002)

    runner.on_frame[first] = slow
    worker = Worker(repo, runner, settings())
    thread = _in_thread(worker)
    assert writing.wait(WAIT_S)
    worker.request_stop()
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()

    for task_id in (first, second):
        row = repo.row(task_id)
        assert row.status is Q and row.attempts == 0 and row.worker_id is None, (task_id, row)
    assert _names(outputs) == [], "an abandoned output leaves no final and no staged file"


def test_finisher_submit_waits_for_the_job_in_hand() -> None:
    finisher = OutputFinisher()
    release = threading.Event()
    order: list[str] = []
    first = Task(id="a", task_type="t2v", params_text="{}", status=P)
    second = Task(id="b", task_type="t2v", params_text="{}", status=P)
    finisher.submit(first, lambda: (release.wait(WAIT_S), order.append("a")))
    submitted = threading.Event()

    def submit_second() -> None:
        finisher.submit(second, lambda: order.append("b"))
        submitted.set()

    threading.Thread(target=submit_second, daemon=True).start()
    assert not submitted.wait(0.2), "a second job was accepted while the first was in hand"
    assert finisher.pending is first
    release.set()
    assert submitted.wait(WAIT_S)
    assert finisher.wait_idle(WAIT_S)
    assert order == ["a", "b"] and finisher.pending is None
    assert finisher.close(WAIT_S)


def test_finisher_survives_a_job_that_raises() -> None:
    finisher = OutputFinisher()
    task = Task(id="a", task_type="t2v", params_text="{}", status=P)
    done = threading.Event()

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    finisher.submit(task, broken)
    finisher.submit(task, done.set)
    assert done.wait(WAIT_S)
    assert finisher.close(WAIT_S)


# ---- the engine's PendingWrite ------------------------------------------------------------------------


def test_engine_deferred_write_writes_on_another_thread_with_full_timings(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    from headless_wgp import PendingWrite, WanOrchestrator
    from wan_engine.video_io import staged_outputs

    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_t2v")
    params = {"resolution": "64x48", "video_length": 9, "num_inference_steps": 2, "seed": 5}
    path = tmp_path / "deferred.mp4"
    stages: list[str] = []
    with staged_outputs() as staging:
        pending = orchestrator.generate_t2v(
            "a cat", output_path=path, progress=lambda e: stages.append(e.stage), deferred_write=True, **params
        )
    assert isinstance(pending, PendingWrite)
    assert "writing_video" not in stages and not list(tmp_path.iterdir()), "nothing written before finish"
    assert pending.result.timings["write"] is None

    results: list[Any] = []
    checks: list[int] = []
    # The orchestrator's lock is free while the write runs: another call would not wait for it.
    assert orchestrator._lock.acquire(blocking=False)
    orchestrator._lock.release()
    thread = threading.Thread(
        target=lambda: results.append(pending.finish(lambda e: stages.append(e.stage), lambda: checks.append(1)))
    )
    thread.start()
    thread.join(120)
    (result,) = results
    assert stages[-1] == "writing_video" and len(checks) == 9
    assert result.output_path == path and not path.exists(), "written staged: published by the loop only"
    ((_staged, final),) = staging.files
    assert final == path
    staging.publish()
    assert read_video_info(path).frames == 9
    timings = result.timings
    assert timings["write"] > 0 and timings["total"] >= timings["write"] + timings["denoise"]
    assert result.extra["write_overlapped"] is True
    sync = orchestrator.generate_t2v("a cat", output_path=tmp_path / "sync.mp4", **params)
    assert "write_overlapped" not in sync.extra and sync.timings["write"] > 0
    assert sync.seed == result.seed and sync.frames == result.frames
    orchestrator.unload_model()


def test_without_the_finisher_a_pending_finish_is_finished_in_the_run(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    runner = DeferringRunner(outputs)
    during_first_write: list[list[str]] = []
    runner.on_frame[first] = lambda task, context, frame: during_first_write.append(list(runner.ran))
    worker = Worker(repo, runner, settings(), overlap_outputs=False)
    worker.run_forever(until_idle=True)
    assert runner.can_defer == [False, False]
    assert all(ran == [first] for ran in during_first_write), "the next task ran before the first was written"
    assert [repo.row(t).status for t in (first, second)] == [C, C]
    assert worker.finisher is None and worker.finishing_task is None


# ---- a travel stitch on the finisher (the real GenerationRunner, TravelCoordinator and SQLite store) ------


class StitchRunner(BaseFakeRunner):
    """Travel rows through the real `GenerationRunner` (its `_run_stitch`); any other row is a plain task."""

    def __init__(self, repository: Any, outputs: Path) -> None:
        from types import SimpleNamespace

        from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
        from worker.tasks.runner import GenerationRunner

        orchestrator = SimpleNamespace(presets=load_presets(BUILTIN_PRESETS_DIR), current_model=None)
        self.real = GenerationRunner(orchestrator, outputs, store=repository)  # type: ignore[arg-type]
        self.run_started: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.returned: list[tuple[str, str]] = []

    def run(self, task: Task, context: RunContext) -> Any:
        self.run_started[task.id].set()
        if task.task_type.startswith("travel_"):
            result = self.real.run(task, context)
            self.returned.append((task.id, type(result).__name__))
            return result
        return TaskOutcome(None, {"task": task.id})


class ProgressSink(RecordingSink):
    """RecordingSink that also calls `on_progress(task, progress)` (from whichever thread reports)."""

    def __init__(self, on_progress: Callable[[Task, dict[str, Any]], None]) -> None:
        super().__init__()
        self.on_progress = on_progress

    def progress(self, task: Task, progress: dict[str, Any]) -> None:
        self.on_progress(task, progress)


def _travel_ready_to_stitch(repository: Any, tmp_path: Path, outputs: Path) -> str:
    """A travel orchestrator waiting on its stitch, its two segments Complete with real 64x48 MP4s (9 frames each,
    2 overlapping): the stitch row is the next ready task."""
    import numpy as np
    from PIL import Image

    from wan_engine.video_io import write_video
    from worker.task import NewTask

    for index in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 * index, np.uint8)).save(outputs / f"k{index}.png")
    params = {"input_images": [f"k{i}.png" for i in range(3)], "base_prompts": "p", "segment_frames": 9}
    params |= {"frame_overlap": 2, "model": "vace_1.3B", "resolution": "64x48", "seed_base": 1}
    parent = repository.insert(NewTask("travel_orchestrator", params, priority=5))
    runner = StitchRunner(repository, outputs)

    def claim(task_id: str) -> Task:
        task = repository.claim_next("setup", 30, lambda c: next((t for t in c if t.id == task_id), None))
        assert task is not None
        return task

    deferral = runner.real.travel.run_orchestrator(claim(parent))
    assert repository.defer(parent, "setup", deferral.wait_for, deferral.progress)
    for index, child in enumerate(c for c in repository.children_of(parent) if c.task_type == "travel_segment"):
        frames = np.full((9, 48, 64, 3), 40 + 80 * index, np.uint8)
        video = write_video(frames, outputs / f"{child.id}.mp4", 16)
        assert repository.mark_complete(claim(child.id).id, "setup", str(video), {"frames": 9})
    return parent


@pytest.fixture
def sql_repository(tmp_path: Path) -> Any:
    from tests.support.db import open_engine
    from worker.store.repository import SqlTaskRepository

    with open_engine(f"sqlite:///{tmp_path / 'tasks.db'}") as engine:
        yield SqlTaskRepository(engine)


def test_a_travel_stitch_is_finished_on_the_finisher_and_its_orchestrator_completes_next(
    sql_repository: Any, tmp_path: Path, outputs: Path
) -> None:
    """The stitch is encoded on the finisher thread; its orchestrator waits for it, so the loop finishes the
    stitch before claiming again and completes the orchestrator before the next task starts (it would
    otherwise wait a whole task for its 0.01 s Complete)."""
    from wan_engine.video_io import partial_files_for
    from worker.task import NewTask, TaskStatus

    repo = sql_repository
    parent = _travel_ready_to_stitch(repo, tmp_path, outputs)
    stitch = f"{parent}-stitch"
    following = repo.insert(NewTask("t2v", {"model": "t2v_1.3B", "prompt": "next"}, priority=1))
    runner = StitchRunner(repo, outputs)
    sink = RecordingSink()
    Worker(repo, runner, settings(), events=sink).run_forever(until_idle=True)

    assert (stitch, "PendingFinish") in runner.returned
    stitch_row, parent_row = repo.get(stitch), repo.get(parent)
    assert stitch_row.status is TaskStatus.COMPLETE and parent_row.status is TaskStatus.COMPLETE
    assert stitch_row.result_data["write_overlapped"] is True and stitch_row.result_data["frames"] == 16
    completed_stitch, completed_parent = (sink.events.index(("completed", t)) for t in (stitch, parent))
    assert completed_stitch < completed_parent < sink.events.index(("started", following))
    final = outputs / f"{parent}.mp4"
    assert parent_row.output_location == stitch_row.output_location == str(final)
    assert read_video_info(final).frames == 9 + 9 - 2
    assert partial_files_for(parent, outputs) == [], "no staged file left"


def test_cancel_during_a_deferred_stitch_stops_it_and_leaves_no_file(
    sql_repository: Any, tmp_path: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks.travel as travel_tasks
    from wan_engine.video_io import partial_files_for
    from worker.task import TaskStatus

    monkeypatch.setattr(travel_tasks, "PROGRESS_EVERY_S", 0.0)  # every frame reports (and checks for a cancel)
    repo = sql_repository
    parent = _travel_ready_to_stitch(repo, tmp_path, outputs)
    stitch = f"{parent}-stitch"
    runner = StitchRunner(repo, outputs)
    reports: list[int] = []
    threads: list[str] = []
    noticed = threading.Event()
    real_heartbeat = repo.heartbeat

    def heartbeat(task_id: str, *args: Any) -> bool:
        ours = real_heartbeat(task_id, *args)
        if task_id == stitch and not ours:
            noticed.set()
        return ours

    repo.heartbeat = heartbeat

    def on_progress(task: Task, progress: dict[str, Any]) -> None:
        if task.id != stitch or progress["stage"] != "stitching":
            return
        reports.append(progress["step"])
        if len(reports) == 1:
            assert repo.cancel(stitch)  # a user's cancel while the finisher stitches
            assert noticed.wait(WAIT_S), "the stitch's lease keeper never noticed the cancel"
            threads.append(threading.current_thread().name)

    sink = ProgressSink(on_progress)
    Worker(repo, runner, settings(), events=sink).run_forever(until_idle=True)

    assert (stitch, "PendingFinish") in runner.returned
    assert threads == ["finisher-worker-a"], "the stitch ran on the finisher thread"
    assert repo.get(stitch).status is TaskStatus.CANCELLED
    assert ("cancelled", stitch) in sink.events and ("completed", stitch) not in sink.events
    assert len(reports) < 16, f"the stitch was not stopped: {len(reports)} frames reported"
    assert not (outputs / f"{parent}.mp4").exists()
    assert partial_files_for(parent, outputs) == [], "no staged or temporary file of the cancelled stitch"
    assert repo.get(parent).status is not TaskStatus.COMPLETE
