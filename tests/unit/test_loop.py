"""worker.loop.worker.Worker against an in-memory repository and fake runners: every way a task can end.

The fake repository keeps the same guarded-write semantics as the SQL one (a worker's writes only land
while the row is `In Progress` and held by that worker), so a user's `Cancelled` is never overwritten.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from tests.support.fakes import BaseFakeRunner
from worker.config import WorkerSettings
from worker.loop.retry import RetryPolicy
from worker.loop.worker import RunContext, Worker
from worker.store.repository import Acceptor, Chooser, StaleRecovery
from worker.task import Task, TaskOutcome, TaskStatus
from worker.tasks.claim_filter import ClaimFilter
from worker.tasks.params import InvalidTaskError

Q, P, C, F, X = (s for s in TaskStatus)


def db_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionError("server closed the connection unexpectedly"))


@dataclass
class Row:
    id: str
    task_type: str
    params_text: str
    seq: int
    priority: int = 0
    status: TaskStatus = TaskStatus.QUEUED
    attempts: int = 0
    max_attempts: int = 3
    dependant_on: str | None = None
    worker_id: str | None = None
    lease_expires_at: float | None = None
    run_after: float | None = None
    output_location: str | None = None
    result_data: dict[str, Any] | None = None
    error_message: str | None = None
    progress: dict[str, Any] | None = None

    def task(self) -> Task:
        return Task(
            id=self.id,
            task_type=self.task_type,
            params_text=self.params_text,
            status=self.status,
            priority=self.priority,
            dependant_on=self.dependant_on,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            worker_id=self.worker_id,
            output_location=self.output_location,
            result_data=self.result_data,
            error_message=self.error_message,
            progress=self.progress,
        )


@dataclass
class FakeRepository:
    """An in-memory TaskRepository with honest semantics (guarded writes, attempts, leases, run_after)."""

    rows: dict[str, Row] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    claim_errors: int = 0  # the next N claims raise OperationalError
    write_errors: int = 0  # the next N mark_complete calls raise OperationalError
    heartbeat_errors: int = 0
    claims: int = 0
    retry_delays: list[float] = field(default_factory=list)
    lost_noticed_at: float | None = None  # when a heartbeat first found the row no longer ours
    outage_until: float = 0.0  # every call raises OperationalError until this monotonic time
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _seq: itertools.count = field(default_factory=itertools.count)

    # ---- test helpers -----------------------------------------------------------------------

    def add(self, model: str = "M", priority: int = 0, max_attempts: int = 3, **fields: Any) -> str:
        with self._lock:
            seq = next(self._seq)
            task_id = fields.pop("id", f"task{seq:03d}")
            params = json.dumps({"model": model, "prompt": f"prompt {seq}"})
            self.rows[task_id] = Row(task_id, "t2v", params, seq, priority, max_attempts=max_attempts, **fields)
            return task_id

    def user_cancel(self, task_id: str) -> None:
        """What a user's raw `UPDATE tasks SET status='Cancelled'` does."""
        with self._lock:
            self.rows[task_id].status = TaskStatus.CANCELLED
            self.rows[task_id].error_message = "cancelled by user"

    def row(self, task_id: str) -> Row:
        with self._lock:
            return replace(self.rows[task_id])

    # ---- TaskRepository -------------------------------------------------------------------------

    def _reachable(self) -> None:
        """Every repository call goes through here: during an outage it fails like a dead database."""
        if time.monotonic() < self.outage_until:
            raise db_down()

    def claim_next(
        self, worker_id: str, lease_s: float, choose: Chooser, *, accept: Acceptor | None = None
    ) -> Task | None:
        with self._lock:
            self._reachable()
            self.claims += 1
            if self.claim_errors:
                self.claim_errors -= 1
                raise db_down()
            now = time.monotonic()
            ready = [
                row
                for row in self.rows.values()
                if row.status is Q
                and (row.run_after is None or row.run_after <= now)
                and (row.dependant_on is None or self.rows[row.dependant_on].status is C)
            ]
            ready.sort(key=lambda row: (-row.priority, row.seq))
            candidates = [row.task() for row in ready]
            chosen = choose([task for task in candidates if accept is None or accept(task)])
            if chosen is None:
                return None
            row = self.rows[chosen.id]
            assert row.status is Q
            row.status, row.worker_id, row.attempts = P, worker_id, row.attempts + 1
            row.lease_expires_at, row.run_after, row.progress = now + lease_s, None, None
            return row.task()

    def _held(self, task_id: str, worker_id: str) -> Row | None:
        row = self.rows.get(task_id)
        return row if row is not None and row.status is P and row.worker_id == worker_id else None

    def heartbeat(self, task_id: str, worker_id: str, lease_s: float, progress: dict[str, Any] | None) -> bool:
        with self._lock:
            self._reachable()
            if self.heartbeat_errors:
                self.heartbeat_errors -= 1
                raise db_down()
            row = self._held(task_id, worker_id)
            if row is None:
                if self.lost_noticed_at is None:
                    self.lost_noticed_at = time.monotonic()
                return False
            row.lease_expires_at = time.monotonic() + lease_s
            if progress is not None:
                row.progress = progress
            return True

    def has_queued_dependant(self, task_id: str) -> bool:
        with self._lock:
            self._reachable()
            return any(r.status is Q and r.dependant_on == task_id for r in self.rows.values())

    def get_status(self, task_id: str) -> TaskStatus | None:
        with self._lock:
            self._reachable()
            row = self.rows.get(task_id)
            return row.status if row else None

    def mark_complete(
        self,
        task_id: str,
        worker_id: str,
        output: str | None,
        result: dict[str, Any],
        publish: Callable[[], None] | None = None,
    ) -> bool:
        with self._lock:
            self._reachable()
            if self.write_errors:
                self.write_errors -= 1
                raise db_down()
            row = self._held(task_id, worker_id)
            if row is None:
                return False
            if publish is not None:  # as the SQL one: after the guard matched, before the write; raising aborts it
                publish()
            row.status, row.output_location, row.result_data = C, output, result
            row.error_message, row.lease_expires_at = None, None
            return True

    def mark_failed(self, task_id: str, worker_id: str, message: str, result: dict[str, Any] | None = None) -> bool:
        with self._lock:
            self._reachable()
            row = self._held(task_id, worker_id)
            if row is None:
                return False
            row.status, row.error_message, row.result_data, row.lease_expires_at = F, message, result, None
            return True

    def retry_later(self, task_id: str, worker_id: str, message: str, delay_s: float) -> bool:
        with self._lock:
            self._reachable()
            row = self._held(task_id, worker_id)
            if row is None:
                return False
            self.retry_delays.append(delay_s)
            row.status, row.worker_id, row.lease_expires_at = Q, None, None
            row.run_after, row.error_message = time.monotonic() + delay_s, message
            return True

    def release(self, task_id: str, worker_id: str) -> bool:
        with self._lock:
            self._reachable()
            row = self._held(task_id, worker_id)
            if row is None:
                return False
            row.status, row.worker_id, row.lease_expires_at, row.progress = Q, None, None, None
            row.attempts = max(0, row.attempts - 1)
            return True

    def requeue_stale(self) -> StaleRecovery:
        with self._lock:
            self._reachable()
            now, requeued, failed = time.monotonic(), [], []
            for row in self.rows.values():
                if row.status is P and row.lease_expires_at is not None and row.lease_expires_at < now:
                    if row.attempts >= row.max_attempts:
                        row.status, row.error_message = F, "lease expired on the last attempt"
                        failed.append(row.id)
                    else:
                        row.status, row.worker_id = Q, None
                        requeued.append(row.id)
                    row.lease_expires_at = None
            return StaleRecovery(requeued=requeued, failed=failed)

    def fail_blocked(self) -> list[str]:
        with self._lock:
            self._reachable()
            ended = []
            for row in self.rows.values():
                if row.status is Q and row.dependant_on is not None:
                    prerequisite = self.rows.get(row.dependant_on)
                    if prerequisite is None or prerequisite.status in (F, X):
                        row.status, row.error_message = F, f"prerequisite task {row.dependant_on} cannot complete"
                        ended.append(row.id)
            return ended

    def register_worker(self, worker_id: str, gpu: str | None) -> None:
        with self._lock:
            self._reachable()
            self.workers[worker_id] = {"gpu": gpu, "status": "idle", "current_model": None}

    def update_worker(self, worker_id: str, status: str, current_model: str | None) -> None:
        with self._lock:  # like SQL's UPDATE: no row, nothing happens
            self._reachable()
            if worker_id in self.workers:
                self.workers[worker_id].update(status=status, current_model=current_model)


Behaviour = Callable[[Task, RunContext], TaskOutcome]


class FakeRunner(BaseFakeRunner):
    """Runs `behaviour` for each task; loads (switches to) the task's model first, counting loads."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.resident: str | None = None
        self.loads: list[str] = []
        self.ran: list[str] = []

    def run(self, task: Task, context: RunContext) -> TaskOutcome:
        model = ClaimFilter.model_of(task)
        if model != self.resident:
            self.resident = model
            self.loads.append(model or "?")
        self.ran.append(task.id)
        return self.behaviour(task, context)


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "db_url": "sqlite://",
        "lease_s": 1.0,
        "heartbeat_interval_s": 0.05,
        "poll_interval_s": 0.01,
        "stale_sweep_interval_s": 60.0,
        "worker_id": "worker-a",
    }
    values.update(overrides)
    return WorkerSettings(**values)


def writes_output(outputs: Path, steps: int = 3) -> Behaviour:
    """A runner body that reports a few steps and writes a real output file."""

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        for step in range(1, steps + 1):
            context.report("denoise", step, steps)
        path = outputs / f"{task.id}.mp4"
        path.write_bytes(b"fake mp4 " + task.id.encode())
        return TaskOutcome(str(path), {"seed": 1234, "frames": 5, "task": task.id})

    return behaviour


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    directory = tmp_path / "outputs"
    directory.mkdir()
    return directory


@pytest.fixture(autouse=True)
def fast_db_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Database back-off capped at a few ms so the outage tests run fast (the logic is unchanged)."""
    monkeypatch.setattr("worker.loop.worker.DB_RETRY_MAX_S", 0.005)


# ---- success and failure ----------------------------------------------------------------------------


def test_success_persists_complete_with_output_result_and_last_progress(outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add()
    runner = FakeRunner(writes_output(outputs, steps=4))
    worker = Worker(repo, runner, settings())
    worker.run_forever(until_idle=True)

    row = repo.row(task_id)
    assert row.status is C
    assert row.output_location == str(outputs / f"{task_id}.mp4")
    assert Path(row.output_location).read_bytes() == b"fake mp4 " + task_id.encode()
    assert row.result_data == {"seed": 1234, "frames": 5, "task": task_id}
    assert row.attempts == 1
    assert row.error_message is None
    assert row.progress is not None and row.progress["step"] == 4 and row.progress["percent"] == 100.0
    assert worker.executed == 1
    assert repo.workers["worker-a"]["status"] == "stopped"


@pytest.mark.parametrize(
    "error",
    [
        InvalidTaskError("resolution '1x1' must be multiples of 16"),
        ValueError("resolution '1x1' must be multiples of 16"),
    ],
)
def test_permanent_error_fails_at_once_with_message(outputs: Path, error: Exception) -> None:
    repo = FakeRepository()
    task_id = repo.add(max_attempts=5)

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        raise error

    runner = FakeRunner(behaviour)
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    row = repo.row(task_id)
    assert row.status is F
    assert row.error_message == "resolution '1x1' must be multiples of 16"
    assert row.attempts == 1
    assert runner.ran == [task_id]
    assert repo.retry_delays == []


def test_transient_error_retried_with_back_off_then_failed_at_max_attempts() -> None:
    repo = FakeRepository()
    task_id = repo.add(max_attempts=3)

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        raise RuntimeError("NCCL timeout talking to the GPU")

    runner = FakeRunner(behaviour)
    worker = Worker(repo, runner, settings(), policy=RetryPolicy(base_delay_s=0.02, max_delay_s=1.0))
    deadline = time.monotonic() + 10
    retry_seen_queued = False
    while repo.row(task_id).status is not F:
        assert time.monotonic() < deadline, f"task never failed: {repo.row(task_id)}"
        worker.run_once()
        row = repo.row(task_id)
        if row.status is Q:
            retry_seen_queued = True
            assert row.run_after is not None
            assert "retrying" in (row.error_message or "")
        time.sleep(0.005)

    row = repo.row(task_id)
    assert retry_seen_queued
    assert runner.ran == [task_id] * 3
    assert row.attempts == 3
    assert repo.retry_delays == [0.02, 0.04]
    assert "3 attempt" in (row.error_message or "")
    assert "NCCL timeout talking to the GPU" in (row.error_message or "")


def test_retry_is_not_claimable_before_its_delay() -> None:
    repo = FakeRepository()
    task_id = repo.add()

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        raise RuntimeError("flaky")

    runner = FakeRunner(behaviour)
    worker = Worker(repo, runner, settings(), policy=RetryPolicy(base_delay_s=30.0))
    worker.run_forever(until_idle=True)
    assert runner.ran == [task_id]
    assert repo.row(task_id).status is Q
    assert repo.row(task_id).attempts == 1


# ---- cancellation --------------------------------------------------------------------------------


def test_cancel_mid_run_stops_within_a_step_or_two_and_deletes_nothing(tmp_path: Path, outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add()
    other_output = outputs / "someone-else.mp4"
    other_output.write_bytes(b"keep me")
    input_file = tmp_path / "guide.mp4"
    input_file.write_bytes(b"keep me too")

    step_times: list[float] = []
    cancelled_at: list[float] = []
    total_steps = 2000

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        for step in range(1, total_steps + 1):
            context.report("denoise", step, total_steps)
            step_times.append(time.monotonic())
            if step == 5:
                repo.user_cancel(task.id)
                cancelled_at.append(time.monotonic())
            time.sleep(0.01)
        path = outputs / f"{task.id}.mp4"
        path.write_bytes(b"should never be written")
        return TaskOutcome(str(path), {})

    runner = FakeRunner(behaviour)
    started = time.monotonic()
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    elapsed = time.monotonic() - started

    assert repo.lost_noticed_at is not None, "the lease keeper never noticed the cancel"
    steps_after_notice = sum(1 for t in step_times if t > repo.lost_noticed_at)
    assert steps_after_notice <= 2, f"{steps_after_notice} steps ran after the cancel was noticed"
    assert len(step_times) < 5 + 30, f"ran {len(step_times)} steps"
    assert repo.lost_noticed_at - cancelled_at[0] < 0.5
    assert elapsed < 3

    row = repo.row(task_id)
    assert row.status is X
    assert row.error_message == "cancelled by user"
    assert row.output_location is None
    assert row.attempts == 1
    assert other_output.read_bytes() == b"keep me"
    assert input_file.read_bytes() == b"keep me too"
    assert not (outputs / f"{task_id}.mp4").exists()


def test_cancel_after_runner_returned_deletes_the_output(outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add()
    other_output = outputs / "someone-else.mp4"
    other_output.write_bytes(b"keep me")

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        outcome = writes_output(outputs, steps=2)(task, context)
        assert Path(outcome.output_location or "").exists()
        repo.user_cancel(task.id)  # lands between the last step and the Complete write
        return outcome

    Worker(repo, FakeRunner(behaviour), settings()).run_forever(until_idle=True)
    row = repo.row(task_id)
    assert row.status is X
    assert row.output_location is None
    assert not (outputs / f"{task_id}.mp4").exists()
    assert other_output.read_bytes() == b"keep me"


def test_lease_taken_over_discards_result_and_leaves_row_to_new_owner(outputs: Path) -> None:
    repo = FakeRepository()
    task_id = repo.add()
    steps_done: list[int] = []

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        for step in range(1, 500):
            context.report("denoise", step, 500)
            steps_done.append(step)
            if step == 3:
                with repo._lock:  # lease expired, another worker's sweep re-queued it and it claimed it
                    repo.rows[task.id].worker_id = "worker-b"
            time.sleep(0.01)
        return TaskOutcome(None, {})

    Worker(repo, FakeRunner(behaviour), settings()).run_forever(until_idle=True)
    row = repo.row(task_id)
    assert len(steps_done) < 40
    assert row.status is P
    assert row.worker_id == "worker-b"
    assert row.output_location is None


# ---- shutdown --------------------------------------------------------------------------------------


def test_second_stop_request_aborts_and_releases_the_task(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    steps_done: list[int] = []
    worker: Worker | None = None

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        assert worker is not None
        for step in range(1, 100):
            context.report("denoise", step, 100)
            steps_done.append(step)
            if step == 3:
                worker.request_stop()
                worker.request_stop()
            time.sleep(0.005)
        return TaskOutcome(None, {})

    runner = FakeRunner(behaviour)
    worker = Worker(repo, runner, settings())
    worker.run_forever()  # not until_idle: only the stop requests end it
    assert steps_done == [1, 2, 3]
    assert runner.ran == [first]
    row = repo.row(first)
    assert row.status is Q
    assert row.attempts == 0, "an aborted attempt must not count against the task"
    assert row.worker_id is None
    assert repo.row(second).status is Q
    assert repo.row(second).attempts == 0


def test_single_stop_request_finishes_current_task_then_exits(outputs: Path) -> None:
    repo = FakeRepository()
    first, second = repo.add(), repo.add()
    worker: Worker | None = None

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        assert worker is not None
        worker.request_stop()
        return writes_output(outputs, steps=5)(task, context)

    runner = FakeRunner(behaviour)
    worker = Worker(repo, runner, settings())
    thread = threading.Thread(target=worker.run_forever)  # would serve forever without the stop
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert runner.ran == [first]
    assert repo.row(first).status is C
    assert repo.row(second).status is Q
    assert repo.row(second).attempts == 0


def test_stop_request_while_idle_exits_promptly() -> None:
    repo = FakeRepository()
    worker = Worker(repo, FakeRunner(lambda task, context: TaskOutcome(None, {})), settings(poll_interval_s=5.0))
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    worker.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0


# ---- draining, ordering, recovery -------------------------------------------------------------------


def test_until_idle_drains_the_queue_in_priority_order(outputs: Path) -> None:
    repo = FakeRepository()
    ids = [repo.add(priority=p) for p in (0, 5, 1, 5, 0)]
    runner = FakeRunner(writes_output(outputs, steps=1))
    worker = Worker(repo, runner, settings())
    worker.run_forever(until_idle=True)
    assert all(repo.row(task_id).status is C for task_id in ids)
    assert worker.executed == 5
    assert runner.ran == [ids[1], ids[3], ids[2], ids[0], ids[4]]


def test_loop_groups_models_to_avoid_switches(outputs: Path) -> None:
    repo = FakeRepository()
    ids = [repo.add(model=m) for m in ("M", "N", "M", "N")]
    runner = FakeRunner(writes_output(outputs, steps=1))
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    assert runner.loads == ["M", "N"]
    assert runner.ran == [ids[0], ids[2], ids[1], ids[3]]


def test_dependant_runs_after_its_prerequisite(outputs: Path) -> None:
    repo = FakeRepository()
    prerequisite = repo.add(priority=0)
    dependant = repo.add(priority=9, dependant_on=prerequisite)
    runner = FakeRunner(writes_output(outputs, steps=1))
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    assert runner.ran == [prerequisite, dependant]


def test_start_up_sweep_recovers_a_dead_workers_task_and_fails_blocked_ones(outputs: Path) -> None:
    repo = FakeRepository()
    orphan = repo.add(status=P, worker_id="dead-worker", attempts=1, lease_expires_at=time.monotonic() - 5)
    failed_prerequisite = repo.add(status=F)
    blocked = repo.add(dependant_on=failed_prerequisite)
    runner = FakeRunner(writes_output(outputs, steps=1))
    Worker(repo, runner, settings()).run_forever(until_idle=True)
    assert runner.ran == [orphan]
    assert repo.row(orphan).status is C
    assert repo.row(orphan).attempts == 2
    assert repo.row(blocked).status is F
    assert failed_prerequisite in (repo.row(blocked).error_message or "")


# ---- database outages ---------------------------------------------------------------------------------


def test_database_errors_on_claim_are_survived(outputs: Path) -> None:
    repo = FakeRepository(claim_errors=4)
    ids = [repo.add() for _ in range(3)]
    runner = FakeRunner(writes_output(outputs, steps=1))
    worker = Worker(repo, runner, settings())
    worker.run_forever(until_idle=True)
    assert [repo.row(task_id).status for task_id in ids] == [C, C, C]
    assert all(repo.row(task_id).attempts == 1 for task_id in ids)
    assert repo.claims >= 4 + 3 + 1


def test_database_errors_on_heartbeat_and_final_write_are_survived(outputs: Path) -> None:
    repo = FakeRepository(write_errors=2, heartbeat_errors=3)
    task_id = repo.add()

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        for step in range(1, 6):
            context.report("denoise", step, 5)
            time.sleep(0.03)
        return writes_output(outputs, steps=1)(task, context)

    Worker(repo, FakeRunner(behaviour), settings()).run_forever(until_idle=True)
    row = repo.row(task_id)
    assert row.status is C
    assert row.output_location is not None and Path(row.output_location).exists()
    assert repo.write_errors == 0 and repo.heartbeat_errors == 0


def test_database_outage_longer_than_a_lease_during_the_final_write_is_survived(outputs: Path) -> None:
    """The write is given up after one lease (the row gets re-queued by a sweep); the worker lives on."""
    repo = FakeRepository()
    task_id = repo.add()

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        outcome = writes_output(outputs, steps=1)(task, context)
        repo.outage_until = time.monotonic() + 1.6  # longer than lease_s = 1
        return outcome

    worker = Worker(repo, FakeRunner(behaviour), settings())
    worker.run_forever(until_idle=True)  # must not raise
    assert time.monotonic() >= repo.outage_until
    row = repo.row(task_id)
    assert row.status is P, "the Complete write was given up; the row waits for the stale sweep"
    assert (outputs / f"{task_id}.mp4").exists(), "status unknown: the output must not be deleted"
    assert repo.workers["worker-a"]["status"] == "stopped"


def test_activity_clock_ticks_with_loop_iterations_and_task_progress(outputs: Path) -> None:
    """`seconds_since_activity` (/healthz's stall check) restarts at every loop pass and every progress report,
    and keeps growing while a task makes none (a hung call)."""
    repo = FakeRepository()
    repo.add()
    seen: list[float] = []
    hang = threading.Event()
    worker: Worker | None = None

    def behaviour(task: Task, context: RunContext) -> TaskOutcome:
        assert worker is not None
        hang.wait(0.3)  # silent: no report
        seen.append(worker.seconds_since_activity())
        context.report("denoise", 1, 1)
        seen.append(worker.seconds_since_activity())
        return writes_output(outputs, steps=1)(task, context)

    worker = Worker(repo, FakeRunner(behaviour), settings())
    worker.run_forever(until_idle=True)
    assert seen[0] >= 0.3 and seen[1] < seen[0]
