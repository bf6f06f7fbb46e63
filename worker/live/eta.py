"""Time estimates: learned per kind of task, static from the FLOP count before any history.

A kind of task is (model, resolution, frames, memory profile) on one device. When a task completes its
timings (result_data["timings"]: encode, step_times, decode, write) are folded into a running average
kept in the `eta_stats` table; the next task of that kind is predicted from it. Before any history a
static estimate (worker.live.eta_static: the transformer's FLOPs per step over the GPU's effective throughput,
or a throughput measured on this CPU) stands in. While a task runs, its own step times are blended in.

The estimator never does I/O in `remaining` (called from the step loop): the learned rows are read
when a task begins (`begin`) or when asked (`refresh`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from worker.task import Task
from worker.tasks.params import model_key_for

log = logging.getLogger(__name__)

STAGES = ("loading_model", "encoding_prompt", "denoising", "decoding", "writing_video")
LEARNED_FIELDS = ("step_s", "first_step_extra_s", "encode_s", "decode_s", "write_s", "other_s", "load_s")
MIN_ALPHA = 0.5  # weight of a new sample once several are known: follows drift (warm-up, clocks) fast
LEARNED_PRIOR_STEPS = 8.0  # a learned step time counts as this many observed steps of the running task
STATIC_PRIOR_STEPS = 1.0  # a static one is a guess: the task's own steps take over at once


class StaticEstimator(Protocol):
    """Stage times before any history (worker.live.eta_static.StaticCostModel)."""

    def times(self, shape: TaskShape) -> StageTimes | None: ...


Merge = Callable[[dict[str, Any] | None], dict[str, Any]]


class EtaStore(Protocol):
    """Where learned timings live (worker.store.repository.SqlTaskRepository)."""

    def eta_stats(self) -> list[dict[str, Any]]: ...
    def update_eta_stats(self, key: dict[str, Any], merge: Merge) -> None: ...


@dataclass(frozen=True)
class TaskShape:
    """What a task's cost depends on, resolved from its params and its model's preset."""

    model: str
    width: int
    height: int
    frames: int
    steps: int
    memory_profile: str  # "gpu" or "cpu"
    cfg: bool = True

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"

    def key(self, device: str) -> tuple[str, str, int, str, str]:
        return (self.model, self.resolution, self.frames, self.memory_profile, device)


@dataclass(frozen=True)
class StageTimes:
    """Predicted seconds per stage of one task of a kind."""

    step_s: float
    first_step_extra_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0
    other_s: float = 0.0  # inputs, LoRAs, and the worker's own overhead around the generation
    load_s: float | None = None
    samples: int = 0
    source: str = "static"  # "learned" or "static"

    def stage_costs(self, steps: int, with_load: bool) -> list[tuple[str, float]]:
        """Seconds of each stage, in order."""
        return [
            ("loading_model", (self.load_s or 0.0) if with_load else 0.0),
            ("encoding_prompt", self.encode_s),
            ("denoising", self.first_step_extra_s + steps * self.step_s),
            ("decoding", self.decode_s),
            ("writing_video", self.write_s),
        ]

    def duration(self, steps: int, with_load: bool = False) -> float:
        """Seconds from claim to completion."""
        return self.other_s + sum(cost for _, cost in self.stage_costs(steps, with_load))


# ---- learning -------------------------------------------------------------------------------------


def sample_from_result(result: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """One task's timings in the learned fields (None where the result does not tell), plus `steps` and
    `cold` (the model was loaded for this task)."""
    timings = result.get("timings") or {}
    steps = [float(s) for s in timings.get("step_times") or []]
    # The first step carries warm-up (allocations, autotuning): learn it apart from the steady state.
    steady = steps[1:] or steps
    step_s = sum(steady) / len(steady) if steady else None
    cold = bool(result.get("model_loaded")) and result.get("load_seconds") is not None
    load_s = float(result["load_seconds"]) if cold else None
    other = float(timings.get("inputs") or 0.0) + float(timings.get("loras") or 0.0)
    if wall_s is not None and timings.get("total") is not None:
        other += max(0.0, wall_s - float(timings["total"]) - (load_s or 0.0))
    return {
        "step_s": step_s,
        "first_step_extra_s": max(0.0, steps[0] - step_s) if steps and step_s is not None else None,
        "encode_s": _float(timings.get("encode")),
        "decode_s": _float(timings.get("decode")),
        "write_s": _float(timings.get("write")),
        "other_s": other,
        "load_s": load_s,
        "steps": len(steps),
        "cold": cold,
    }


def _stages_total(values: dict[str, Any], steps: int) -> float:
    fixed = ("first_step_extra_s", "encode_s", "decode_s", "write_s", "other_s")
    return sum(float(values.get(name) or 0.0) for name in fixed) + steps * float(values.get("step_s") or 0.0)


def _average(previous: Any, value: Any, alpha: float) -> Any:
    if value is None:
        return previous
    return value if previous is None else previous + alpha * (value - previous)


def merge_sample(old: dict[str, Any] | None, sample: dict[str, Any]) -> dict[str, Any]:
    """Running average: the mean of the first samples, then an exponential average (weight MIN_ALPHA).

    The first run after a model load pays one-time costs (first kernels, allocator growth, caches)
    that later runs do not. With warm history, that extra is charged to the load time (a task that
    needs a load pays it); without, the cold run stands in until the first warm run replaces it
    (`samples` counts warm runs only)."""
    old = old or {}
    samples = int(old.get("samples") or 0)
    if sample.get("cold"):
        load = sample.get("load_s")
        if samples and load is not None:
            steps = int(sample.get("steps") or 0)
            load += max(0.0, _stages_total(sample, steps) - _stages_total(old, steps))
        merged = {name: old.get(name) for name in LEARNED_FIELDS}
        if not samples:
            merged.update({name: sample[name] for name in LEARNED_FIELDS if sample.get(name) is not None})
        return {**merged, "samples": samples, "load_s": _average(old.get("load_s"), load, 0.5)}
    alpha = max(1.0 / (samples + 1), MIN_ALPHA)
    merged = {name: _average(old.get(name), sample.get(name), alpha) for name in LEARNED_FIELDS}
    return {**merged, "samples": samples + 1}


def times_from_row(row: dict[str, Any]) -> StageTimes | None:
    """A learned row as StageTimes (None until a step time is known)."""
    if row.get("step_s") is None:
        return None
    return StageTimes(
        step_s=float(row["step_s"]),
        first_step_extra_s=float(row.get("first_step_extra_s") or 0.0),
        encode_s=float(row.get("encode_s") or 0.0),
        decode_s=float(row.get("decode_s") or 0.0),
        write_s=float(row.get("write_s") or 0.0),
        other_s=float(row.get("other_s") or 0.0),
        load_s=_float(row.get("load_s")),
        samples=int(row.get("samples") or 0),
        source="learned",
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ---- task shapes -------------------------------------------------------------------------------------


class PresetShapes:
    """Resolves a task's shape like the engine does: built-in defaults < preset < the task's params."""

    def __init__(self, presets: Any, default_profile: str) -> None:
        self.presets = presets
        self.default_profile = default_profile

    def __call__(self, task: Task) -> TaskShape | None:
        from wan_engine.generation_params import BUILTIN_DEFAULTS

        model = model_key_for(task.task_type, task.params_text)
        try:
            params = json.loads(task.params_text)
            preset = self.presets.get(model)
            given = {k: v for k, v in params.items() if v is not None}
            merged = {**BUILTIN_DEFAULTS, **preset.settings.as_params(), **given}
            width, height = (int(x) for x in str(merged["resolution"]).lower().split("x"))
            frames = int(merged["video_length"])
            frames = frames if frames == 1 else (frames + 2) // 4 * 4 + 1  # the engine aligns up to 4N+1
            return TaskShape(
                model=str(model),
                width=width,
                height=height,
                frames=frames,
                steps=int(merged["num_inference_steps"]),
                # Where it will run: the engine records the device it ran on (a requested profile is
                # passed through, not acted on), so that is the key history was learned under.
                memory_profile=self.default_profile,
                cfg=float(merged.get("guidance_scale") or 0) > 1.0,
            )
        except Exception:  # unknown model, malformed params, a travel task: no estimate
            return None


# ---- the estimator --------------------------------------------------------------------------------------


@dataclass
class _Running:
    """What is known about the task that runs now."""

    shape: TaskShape | None
    times: StageTimes | None
    with_load: bool
    started: float
    stage: str | None = None
    stage_started: float = 0.0
    step_mark: tuple[int, float] | None = None  # (step, time) of the first step >= 1 seen
    observed_step_s: float | None = None
    observed_steps: int = 0  # steady-state steps behind observed_step_s


@dataclass(frozen=True)
class QueueEta:
    """When a queued task should start and finish, in seconds from now (None: unknown)."""

    start_in: float | None
    finish_in: float | None


class EtaEstimator:
    """Predicts a task's duration and, while it runs, its remaining seconds."""

    def __init__(
        self,
        store: EtaStore | None,
        shape_of: Callable[[Task], TaskShape | None],
        device: str = "cpu",
        static: StaticEstimator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.shape_of = shape_of
        self.device = device
        self.static = static
        self.clock = clock
        self._learned: dict[tuple[str, str, int, str, str], StageTimes] = {}
        self._loads: dict[tuple[str, str], float] = {}  # (model, device) -> seconds to load
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    # ---- learned rows ----

    def refresh(self) -> None:
        """Re-read the learned timings (I/O: never from the step loop)."""
        if self.store is None:
            return
        rows = self.store.eta_stats()
        learned, loads = {}, {}
        for row in sorted(rows, key=lambda r: str(r.get("updated_at") or "")):
            key = (row["model"], row["resolution"], int(row["frames"]), row["memory_profile"], row["device"])
            times = times_from_row(row)
            if times is not None:
                learned[key] = times
                # The same kind under whichever profile it ran last (the engine picks the profile).
                learned[(*key[:3], "*", key[4])] = times
            if row.get("load_s") is not None:
                loads[(row["model"], row["device"])] = float(row["load_s"])
        with self._lock:
            self._learned, self._loads = learned, loads

    def times_for(self, shape: TaskShape) -> StageTimes | None:
        """Learned times for this kind of task, else the static estimate (None: neither)."""
        with self._lock:
            key = shape.key(self.device)
            learned = self._learned.get(key) or self._learned.get((*key[:3], "*", key[4]))
            load = self._loads.get((shape.model, self.device))
        if learned is not None:
            return learned if learned.load_s is not None or load is None else replace(learned, load_s=load)
        static = self.static.times(shape) if self.static else None
        if static is not None and load is not None:
            static = replace(static, load_s=load)
        return static

    def estimate(self, task: Task, resident_model: str | None = None) -> float | None:
        """Seconds a task will take from claim to completion (a model load included when it needs one)."""
        shape = self.shape_of(task)
        times = self.times_for(shape) if shape else None
        if shape is None or times is None:
            return None
        return times.duration(shape.steps, with_load=shape.model != resident_model)

    # ---- a running task ----

    def begin(self, task: Task, resident_model: str | None) -> float | None:
        """A task was claimed: read the latest history, remember what to expect; returns its full estimate."""
        try:
            self.refresh()
        except Exception as exc:  # the database may be restarting: estimate from what is cached
            log.debug("could not refresh ETA statistics: %s", exc.__class__.__name__)
        shape = self.shape_of(task)
        times = self.times_for(shape) if shape else None
        with_load = shape is not None and shape.model != resident_model
        with self._lock:  # one task at a time: anything left over was abandoned (lease lost, abort)
            self._running = {task.id: _Running(shape, times, with_load, self.clock())}
        return times.duration(shape.steps, with_load) if shape and times else None

    def remaining(self, task_id: str, progress: dict[str, Any]) -> float | None:
        """Seconds left for a running task at this progress report (no I/O)."""
        now = self.clock()
        with self._lock:
            run = self._running.get(task_id)
        if run is None:
            return None
        stage = progress.get("stage")
        step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
        if stage != run.stage:
            run.stage, run.stage_started = stage, now
        if stage == "denoising" and step >= 1:
            if run.step_mark is None:
                run.step_mark = (step, now)
            elif step > run.step_mark[0]:
                run.observed_steps = step - run.step_mark[0]
                run.observed_step_s = (now - run.step_mark[1]) / run.observed_steps
        if stage not in STAGES or run.times is None or run.shape is None:
            elapsed = now - run.stage_started
            return elapsed * (total - step) / step if total and step else None
        steps = total if stage == "denoising" and total else run.shape.steps
        times = run.times
        if run.observed_step_s is not None:
            # Blend history with this task's own steps, weighted by how many were observed.
            weight = LEARNED_PRIOR_STEPS if times.source == "learned" else STATIC_PRIOR_STEPS
            seen = run.observed_steps
            blended = (weight * times.step_s + seen * run.observed_step_s) / (weight + seen)
            times = replace(times, step_s=blended)
        costs = times.stage_costs(steps, run.with_load)
        index = STAGES.index(stage)
        if stage == "denoising":
            current = (steps - step) * times.step_s + (times.first_step_extra_s if step == 0 else 0.0)
        else:
            current = max(0.0, costs[index][1] - (now - run.stage_started))
        return current + sum(cost for _, cost in costs[index + 1 :])

    def basis(self, task_id: str) -> str | None:
        """What a running task's estimate rests on: "learned (N tasks)", "static", or None."""
        with self._lock:
            run = self._running.get(task_id)
        if run is None or run.times is None:
            return None
        if run.times.source != "learned":
            return "static"
        return f"learned ({run.times.samples} tasks)" if run.times.samples else "learned (1 cold run)"

    def finish(self, task_id: str) -> float | None:
        """Forget a running task; returns the seconds since it began."""
        with self._lock:
            run = self._running.pop(task_id, None)
        return None if run is None else self.clock() - run.started

    def record(self, task: Task, result: dict[str, Any]) -> None:
        """Fold a completed task's timings into its kind's history (I/O)."""
        wall = self.finish(task.id)
        if self.store is None or not (result.get("timings") or {}).get("step_times"):
            return
        try:
            width, height = (int(x) for x in str(result["resolution"]).split("x"))
            key = {
                "model": str(result["model"]),
                "resolution": f"{width}x{height}",
                "frames": int(result["frames"]),
                "memory_profile": str(result.get("memory_profile") or "gpu"),
                "device": self.device,
            }
        except (KeyError, ValueError, TypeError):
            return
        sample = sample_from_result(result, wall)
        self.store.update_eta_stats(key, lambda old: merge_sample(old, sample))
        self.refresh()  # the next estimate (queue ETAs on the page too) uses this task already

    # ---- the queue ----

    def queue_etas(self, current_remaining: float | None, resident_model: str | None, queued: Sequence[Task]) -> dict:
        """Start / finish times of queued tasks (in claim order), counting every task ahead of each.

        Assumes one worker serves the queue; with several, the real wait is shorter."""
        etas: dict[str, QueueEta] = {}
        clock = current_remaining  # None: the running task's end is unknown, so is every start after it
        model = resident_model
        for task in queued:
            shape = self.shape_of(task)
            times = self.times_for(shape) if shape else None
            duration = times.duration(shape.steps, with_load=shape.model != model) if shape and times else None
            start = clock
            clock = None if clock is None or duration is None else clock + duration
            etas[task.id] = QueueEta(start, clock)
            model = shape.model if shape else model
        return etas


def detect_device() -> str:
    """The name of this machine's GPU, or "cpu"."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"
