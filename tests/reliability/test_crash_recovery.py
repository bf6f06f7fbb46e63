"""Crash recovery: the real worker is SIGKILLed at observed points of its work and restarted; nothing is lost.

Kill points are found by watching, never by hooks inside the worker:
- `loading_model`: the fresh worker's log shows a claim and no "loaded model" line yet (a fresh process loads
  the model for its first task);
- `denoising`: the row's progress column reports stage `denoising` (then a random delay of up to 0.2 s);
- `writing_video`: a `.partial` temporary output of this worker's pid appears in the outputs dir;
- `complete_write`: a task's final `<id>.mp4` appears; the kill lands between the rename and the `Complete`
  write, or just after that write (both are recorded).

While it watches, the harness keeps the queue stocked the way another program would, by inserting rows: two
open tasks at least, and for a denoising kill one task with enough steps to be seen denoising (doubling the
steps whenever the last one finished too fast for the 1 s progress writes). After the kills a last worker
drains the queue. Every task must end `Complete` exactly once, with `attempts` equal to 1 + the kills that
hit it while `In Progress` (and equal to the claims in the logs), exactly one playable output per task, and
no partial files or orphaned ffmpeg processes.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.figures import Figures, sized
from tests.reliability.harness import (
    all_files,
    claims_by_task,
    completions_by_task,
    insert_many,
    processes_writing_under,
    read_rows,
    start_worker,
    wait_all_final,
)
from tests.support.processes import Stack, WorkerProcess
from wan_engine.video_io import read_video_info

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

TASKS = sized(6, 16)  # topped up while the kills go on if the queue runs low
KILLS = sized(4, 8)
STAGES = ("loading_model", "denoising", "writing_video", "complete_write")
LEASE_S = 4.0
SEED = int(os.environ.get("WAN_RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)
# A fresh worker first takes the oldest ready task, which is the one the previous kill re-queued once its
# lease expired: the first task is the usual victim, so it denoises long enough (~1-5 s on a CPU) for the 1 s
# progress writes to show the stage; the others are quick.
LONG = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 17, "num_inference_steps": 30}
SHORT = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 9, "num_inference_steps": 4}
STAGE_TIMEOUT_S = 180.0
MAX_STEPS = 300  # the tiny presets' UniPC at flow_shift 3 has 333 distinct timesteps; more steps are refused


@dataclass
class Kill:
    """One SIGKILL: where it was aimed, where the evidence says it landed, and what it hit."""

    aimed: str
    landed: str
    task_id: str | None  # the task whose stage triggered the kill
    in_progress: bool  # that task was still In Progress (so the kill costs it an attempt)
    # Rows the killed worker held In Progress (they cost an attempt), and those of them whose claim it had not
    # logged yet (a claim committed in the few ms between the trigger and the kill).
    held: tuple[str, ...] = ()
    unlogged_claims: tuple[str, ...] = ()


def kill_plan(rng: random.Random) -> list[str]:
    """Every stage at least once per round of four, in a random order."""
    plan: list[str] = []
    while len(plan) < KILLS:
        round_ = list(STAGES)
        rng.shuffle(round_)
        plan.extend(round_)
    return plan[:KILLS]


def _fail_if_dead(worker: WorkerProcess, what: str) -> None:
    assert worker.process is not None
    if worker.process.poll() is not None:
        pytest.fail(f"{what}: worker exited with {worker.process.returncode}\n{worker.log_text()[-4000:]}")


def _last_claim_without_load(worker: WorkerProcess) -> str | None:
    """The task id of the log's last claim if no model load finished after it."""
    text = worker.log_text()
    index = text.rfind("INFO worker.loop.worker claimed ")
    if index < 0 or "loaded model in" in text[index:]:
        return None
    claimed = claims_by_task([text[index:].split("\n", 1)[0]])
    return next(iter(claimed), None)


class Queue:
    """The suite's tasks; topped up so that a kill point always lies ahead, whatever the machine's speed."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids: list[str] = []
        self.long_steps = LONG["num_inference_steps"]
        self._next_check = 0.0

    def add(self, params: dict[str, object]) -> None:
        n = len(self.ids)
        row = {"task_type": "t2v", "params": {**params, "prompt": f"crash {n}", "seed": n}, "max_attempts": KILLS + 1}
        self.ids.extend(insert_many(self.stack, [row]))

    def top_up(self, stage: str) -> None:
        """At most twice a second: keep two open tasks, and one long enough to be seen denoising."""
        if time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + 0.5
        open_rows = [r for r in read_rows(self.stack, self.ids).values() if r["status"] in ("Queued", "In Progress")]
        if len(open_rows) < 2:
            self.add(SHORT)
        steps = [json.loads(r["params"])["num_inference_steps"] for r in open_rows]
        if stage == "denoising" and max(steps, default=0) < self.long_steps:
            # The last long task denoised too fast for the 1 s progress writes: a longer one (a fast machine).
            self.long_steps = min(2 * self.long_steps, MAX_STEPS)
            self.add({**LONG, "num_inference_steps": self.long_steps})


def wait_and_kill(stack: Stack, queue: Queue, worker: WorkerProcess, stage: str, rng: random.Random) -> Kill:
    """Watch `worker` until it reaches `stage`, SIGKILL it, and report where it landed."""
    assert worker.process is not None
    pid, name = worker.process.pid, worker.args[worker.args.index("--worker-id") + 1]
    finals_before = {p.name for p in all_files(stack.outputs_dir) if not p.name.startswith(".")}
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    target: str | None = None
    while target is None:
        if time.monotonic() > deadline:
            pytest.fail(f"worker {name} never reached {stage} in {STAGE_TIMEOUT_S}s\n{worker.log_text()[-3000:]}")
        _fail_if_dead(worker, f"waiting for {stage}")
        queue.top_up(stage)
        if stage == "loading_model":
            target = _last_claim_without_load(worker)
            time.sleep(0.02)
        elif stage == "denoising":
            mine = [r for r in read_rows(stack).values() if r["status"] == "In Progress" and r["worker_id"] == name]
            # Killed within 50 ms of being seen: a longer random delay often let a short task reach writing_video.
            hits = [r["id"] for r in mine if (r["progress"] or {}).get("stage") == stage]
            target = hits[0] if hits else None
            time.sleep(rng.uniform(0.0, 0.05) if target else 0.02)
        elif stage == "writing_video":
            names = [e.name for e in os.scandir(stack.outputs_dir)] if stack.outputs_dir.exists() else []
            mine = [n for n in names if n.startswith(".") and f".{pid}.partial" in n]
            target = mine[0][1:].split(f".{pid}.partial")[0] if mine else None
            time.sleep(0.002)
        else:  # complete_write: a new final output file
            names = [e.name for e in os.scandir(stack.outputs_dir)] if stack.outputs_dir.exists() else []
            new = [n for n in names if not n.startswith(".") and n not in finals_before]
            target = Path(new[0]).stem if new else None
            time.sleep(0.002)
    worker.kill9()
    rows = read_rows(stack)
    row = rows.get(target)
    in_progress = bool(row and row["status"] == "In Progress" and row["worker_id"] == name)
    held = tuple(r["id"] for r in rows.values() if r["status"] == "In Progress" and r["worker_id"] == name)
    logged = claims_by_task([worker.log_text()])
    unlogged = tuple(task_id for task_id in held if logged[task_id] == 0)
    landed = stage
    if stage == "loading_model" and "loaded model in" in worker.log_text().rsplit("claimed", 1)[-1]:
        landed = "after_load"
    if stage == "complete_write":
        landed = "before_complete_write" if in_progress else "after_complete_write"
    if stage == "denoising" and row is not None:
        landed = str((row["progress"] or {}).get("stage"))  # the last stage the worker reported
    return Kill(stage, landed, target, in_progress, held, unlogged)


def test_sigkill_at_every_stage_loses_nothing(any_stack: Stack, figures: Figures) -> None:
    stack = any_stack
    rng = random.Random(SEED)
    queue = Queue(stack)
    # A re-queued task is the oldest, so the next worker takes it first: one task may absorb several kills.
    # Every row gets enough attempts that none fails for it (the poison suite covers max_attempts).
    for n in range(TASKS):
        queue.add(SHORT if n else LONG)
    started = time.monotonic()
    kills: list[Kill] = []
    for number, stage in enumerate(kill_plan(rng)):
        worker = start_worker(stack, f"crash-{number}", lease_s=LEASE_S)
        kills.append(wait_and_kill(stack, queue, worker, stage, rng))
    ids = queue.ids
    final = start_worker(stack, "crash-final", lease_s=LEASE_S)
    wait_all_final(stack, ids, timeout=120 + 20 * len(ids), what="the queue to drain after the kills")
    elapsed = time.monotonic() - started

    rows = read_rows(stack, ids)
    lost = [task_id for task_id, row in rows.items() if row["status"] != "Complete"]
    assert not lost, {task_id: (rows[task_id]["status"], rows[task_id]["error_message"]) for task_id in lost}

    logs = [worker.log_text() for worker in stack.workers]
    claims = claims_by_task(logs)
    hits = Counter(task_id for kill in kills for task_id in kill.held)
    unlogged = Counter(task_id for kill in kills for task_id in kill.unlogged_claims)
    for task_id, row in rows.items():
        expected = 1 + hits[task_id]
        assert row["attempts"] == expected, f"{task_id}: attempts {row['attempts']}, expected {expected}"
        logged = claims[task_id] + unlogged[task_id]
        assert logged == row["attempts"], f"{task_id}: {logged} claims, {row['attempts']} attempts"
    assert max(completions_by_task(logs).values()) == 1, "a task was recorded Complete twice"

    outputs = all_files(stack.outputs_dir)
    expected_outputs = sorted(Path(row["output_location"]) for row in rows.values())
    assert outputs == expected_outputs, "exactly one output per task, no partial or duplicate files"
    for row in rows.values():
        info = read_video_info(Path(row["output_location"]))
        frames = json.loads(row["params"])["video_length"]
        assert (info.frames, info.width, info.height) == (frames, 64, 48), f"{row['id']}: not a complete video"
    assert not processes_writing_under(stack.outputs_dir), "an ffmpeg (or other) process still writes outputs"
    assert final.process is not None and final.process.poll() is None

    landed = Counter(kill.landed for kill in kills)
    for stage in STAGES[:3]:
        assert landed[stage] >= 1, f"no kill landed in {stage}: {[k.landed for k in kills]}"
    assert landed["before_complete_write"] + landed["after_complete_write"] >= 1
    figures.record(
        f"crash_recovery[{stack.engine.dialect.name}]",
        tasks=len(ids),
        kills=len(kills),
        kills_landed=dict(landed),
        tasks_lost=len(lost),
        duplicate_outputs=len(outputs) - len(set(outputs)),
        partial_files_left=sum(".partial" in p.name for p in outputs),
        tasks_hit=len(hits),
        max_attempts_seen=max(row["attempts"] for row in rows.values()),
        seed=SEED,
        seconds=round(elapsed, 1),
    )
