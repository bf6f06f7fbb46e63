"""Time estimates from what really happens: each stage learned on its own, static from FLOPs before any history.

A task's time is the sum of stages, each learned apart from the others, so a one-off cost is never
charged to a stage that repeats:

- **load / switch** (per model): the first load in this process (from disk) and a reload (from the
  host-RAM cache), from result_data `model_loaded` / `load_seconds`;
- **compile** (per model): the first step's extra on a task whose speed brief (result_data
  `extra.speed.compile`) says it compiled code not there before; **new shape** (per model): the first
  step's extra at a token count this process had not run yet (dynamic-shape recompile, autotuning);
- **per step** (per kind of task: model, resolution, frames, memory profile, device): the *median* of the
  step times, per transformer forward (a CFG step is two), as a compiled step (an eager one is scaled by
  the compile saving), so CFG and no-CFG tasks of a shape share one row, and a compile in step 1 never
  counts;
- **encode, decode, write** (per kind), **LoRAs** (per model: loading, and the fuse in step 1).

A shape never seen on a known model is predicted from that model's nearest learned shape, scaled by
the ratio of their FLOP counts (worker.live.eta_static) or, without one, of their tokens; decode scales
with latent frames x pixels, write with frames x pixels. Before any history the static estimate stands in.

The estimator mirrors this process: which models it has loaded, which block layouts are compiled, which
shapes have run. So it knows whether the next task will load or switch a model, compile (its layout is
not compiled and, under the default policy, its forwards earn the compile back: wan_engine.compile_policy,
with the policy's own per-layout cost, cached only for a layout compiled here or that the policy costed so,
and the policy's own saving per forward once a brief of the layout told it) or pay a new shape.
`queue_etas` walks the queue in the order the worker claims it (priority, age, the resident model
preferred: worker.loop.scheduling.ModelAffinity), counting each task's loads and compiles; a travel
orchestrator counts its segments (planned from its params, as the orchestrator plans them) and
the stitch. While a task runs, its own steps (after step 1) are blended in.

Learned rows live in `eta_stats` (one table, no extra columns): a kind's row under its key, with
`step_s` per forward; a model's row under resolution "*", frames 0 (columns as in `MODEL_COLUMNS`); the
stitch's row under model "travel_stitch". The estimator does no I/O in `remaining` (called from the step
loop); rows are read when a task begins, completes, or on `refresh`. Every method is safe from several
threads (a finished task's write may run beside the next task's denoising).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from worker.loop.scheduling import ModelAffinity
from worker.task import Task, TaskStatus
from worker.tasks.params import model_key_for

log = logging.getLogger(__name__)

STAGES = ("loading_model", "encoding_prompt", "denoising", "decoding", "writing_video")
LEARNED_FIELDS = ("step_s", "first_step_extra_s", "encode_s", "decode_s", "write_s", "other_s", "load_s")
MIN_ALPHA = 0.5  # weight of a new sample once several are known: follows drift (warm-up, clocks) fast
LEARNED_PRIOR_STEPS = 8.0  # a learned step time counts as this many observed steps of the running task
STATIC_PRIOR_STEPS = 1.0  # a static one is a guess: the task's own steps take over at once
MODEL_ROW = ("*", 0)  # (resolution, frames) of a model's own row
# Rows are keyed by device name plus this format tag: rows an older wan-worker wrote (step time per step,
# not per forward, and no model rows) are then ignored and re-learned instead of skewing CFG tasks 2x.
ROW_FORMAT = "eta2"
ANY_PROFILE = "*"
STITCH_MODEL = "travel_stitch"
# A model's row in eta_stats: which column holds what (the table has no columns of its own for these).
MODEL_COLUMNS = {
    "load_s": "load_s",  # first load in a process (from disk)
    "reload_s": "other_s",  # a later load (from the host-RAM cache, after a switch away)
    "compile_s": "first_step_extra_s",  # first compile of the model's block layout in a process
    "new_shape_s": "step_s",  # first step's extra at a token count the process had not run
    "lora_load_s": "encode_s",  # loading one LoRA (before the prompt is encoded)
    "lora_step_s": "decode_s",  # a LoRA task's first-step extra (fusing the LoRAs into the weights)
}
TRAVEL_DEFAULT_MODEL = "vace_14B_cocktail_2_2"  # worker.tasks.travel.DEFAULT_TRAVEL_MODEL (a higher layer)
TRAVEL_DEFAULT_OVERLAP = 8  # frame_overlap's default (worker.tasks.travel.TravelOrchestratorParams)
# Guesses for what nothing measured yet (GPU; a CPU never compiles): docs/BENCHMARKS.md, H200. A compile
# is guessed as the compile policy expects it (wan_engine.compile_policy: cold per layout, or cached).
STATIC_NEW_SHAPE_S = 0.4  # a new token count with the dimension dynamic
STATIC_PROBE_S = 3.7  # the attention-kernel probe, once per process at the first load ("Why ours is faster")
STATIC_LORA_LOAD_S = 0.3  # per LoRA file
# A reload guessed as this share of a first load until one is measured: from the pinned host-RAM cache on a
# GPU machine (on by default there: ~45 GB/s against ~2 GB/s from disk), from disk again on a CPU one.
RELOAD_SHARE = {"gpu": 0.1, "cpu": 1.0}
# Parking the resident model before a load, as a share of its load: pinning new host memory (1.9 s for 1.3B,
# 10.5 s for 14B), then ~0.1 / 0.6 s into the pinned memory it left (docs/BENCHMARKS.md "Switching").
PARK_SHARE = 0.5
PARK_AGAIN_SHARE = 0.03
ORCHESTRATOR_S = 0.2  # an orchestrator's own runs (plan and insert its children; wake and complete)
ATTENTION_TOKENS = 20_000.0  # without FLOPs: work per forward ~ tokens x (1 + tokens / this)
MAX_RUNNING = 4  # tasks remembered as running (a lost lease sends no event: the oldest are dropped)


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
    loras: int = 0

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"

    def key(self, device: str) -> tuple[str, str, int, str, str]:
        return (self.model, self.resolution, self.frames, self.memory_profile, device)

    @property
    def forwards(self) -> int:
        """Transformer forwards per step (two with CFG)."""
        return 2 if self.cfg else 1

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // 4

    @property
    def tokens(self) -> int:
        """Transformer tokens (Wan 2.1: VAE 8x spatial, 4x temporal, 2x2 patches)."""
        return self.latent_frames * max(1, self.height // 16) * max(1, self.width // 16)


@dataclass(frozen=True)
class StageTimes:
    """Predicted seconds per stage of one task."""

    step_s: float
    first_step_extra_s: float = 0.0  # warm-up, new shape, LoRA fuse, a VACE guide's encode
    encode_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0
    other_s: float = 0.0  # the worker's own overhead around the generation (claim, inputs, completion)
    load_s: float | None = None
    samples: int = 0
    source: str = "static"  # "learned" or "static"
    compile_s: float = 0.0  # a compile predicted for this task (paid in its first step)
    prep_s: float = 0.0  # LoRA files loaded before the prompt is encoded
    scaled_from: str | None = None  # a learned shape of the same model this one was scaled from

    def stage_costs(self, steps: int, with_load: bool) -> list[tuple[str, float]]:
        """Seconds of each stage, in order (a load stage also covers the inputs and LoRAs after it)."""
        return [
            ("loading_model", (self.load_s or 0.0) + self.prep_s if with_load else 0.0),
            ("encoding_prompt", self.encode_s),
            ("denoising", self.compile_s + self.first_step_extra_s + steps * self.step_s),
            ("decoding", self.decode_s),
            ("writing_video", self.write_s),
        ]

    def duration(self, steps: int, with_load: bool = False) -> float:
        """Seconds from claim to completion."""
        before = 0.0 if with_load else self.prep_s  # without a load, the LoRAs load before the first report
        return self.other_s + before + sum(cost for _, cost in self.stage_costs(steps, with_load))


@dataclass(frozen=True)
class StitchShape:
    """A travel stitch: the stitched length and size (unknown for a stitch row made earlier)."""

    frames: int | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class TravelPlanShape:
    """A travel orchestrator's children as the orchestrator will create them (segments chained, then
    the stitch), for the queue walk; the stitch's shape by its id."""

    children: tuple[Task, ...]
    stitch_id: str
    stitch: StitchShape


# ---- learning -------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _compile_brief(result: dict[str, Any]) -> dict[str, Any] | None:
    """The task's compile decision (result_data extra.speed.compile), or None when nothing compiles."""
    speed = (result.get("extra") or {}).get("speed") or {}
    compile_ = speed.get("compile") if isinstance(speed, dict) else None
    return compile_ if isinstance(compile_, dict) else None


def _forwards(result: dict[str, Any]) -> int:
    calls = (result.get("extra") or {}).get("transformer_calls_per_step") or []
    if calls:
        return max(1, round(statistics.median(float(c) for c in calls)))
    return 2 if float(result.get("guidance_scale") or 0) > 1.0 else 1


def sample_from_result(result: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """One task's timings, split into what repeats and what was paid once.

    `step_s` is the median step per transformer forward as a compiled one; `first_step_extra_s` the first
    step beyond that median, which is a compile (`compile_s`) when the speed brief says the task compiled
    code that was not there, a LoRA fuse (`lora_step_s`) on a LoRA task, else warm-up. `cold`: the model was
    loaded for this task (`load_s`)."""
    from wan_engine.compile_policy import COMPILED_SAVING

    timings = result.get("timings") or {}
    steps = [float(s) for s in timings.get("step_times") or []]
    median = statistics.median(steps[1:]) if len(steps) > 1 else (steps[0] if steps else None)
    brief = _compile_brief(result)
    compiled_new = bool(brief and brief.get("compiled") and float(brief.get("expected_compile_s") or 0) > 0)
    eager_on_compiler = brief is not None and not brief.get("compiled")
    forwards = _forwards(result)
    per_forward = None if median is None else median / forwards
    if per_forward is not None and eager_on_compiler:
        per_forward *= 1.0 - COMPILED_SAVING  # learned as the compiled step it would have been
    extra = max(0.0, steps[0] - median) if steps and median is not None and len(steps) > 1 else None
    cold = bool(result.get("model_loaded")) and result.get("load_seconds") is not None
    load_s = float(result["load_seconds"]) if cold else None
    loras = len(result.get("loras") or [])
    other = float(timings.get("inputs") or 0.0)
    if wall_s is not None and timings.get("total") is not None:
        other += max(0.0, wall_s - float(timings["total"]) - (load_s or 0.0))
    lora_time = float(timings.get("loras") or 0.0)
    return {
        "step_s": per_forward,
        # Warm-up only from a task that paid nothing once (no load, compile or LoRA fuse in its first step).
        "first_step_extra_s": extra if not (cold or compiled_new or loras) else None,
        "encode_s": _float(timings.get("encode")),
        "decode_s": _float(timings.get("decode")),
        "write_s": _float(timings.get("write")),
        "other_s": other,
        "load_s": load_s,
        "steps": len(steps),
        "cold": cold,
        "compiled_new": compiled_new,
        "compile_s": extra if compiled_new else None,
        "lora_load_s": lora_time / loras if loras else None,
        "lora_step_s": extra if loras and not compiled_new else None,
        "first_extra": extra,
        "forwards": forwards,
        "eager": eager_on_compiler,
    }


def _average(previous: Any, value: Any, alpha: float) -> Any:
    if value is None:
        return previous
    return value if previous is None else previous + alpha * (value - previous)


def merge_sample(old: dict[str, Any] | None, sample: dict[str, Any]) -> dict[str, Any]:
    """Running average of a kind's row: the mean of the first samples, then an exponential average
    (weight MIN_ALPHA); a field the sample does not tell keeps its value. Loads and compiles are not
    here (they are the model's row: `merge_model_sample`).

    A `cold` sample (the first run of its kind in the process, or right after a load) pays one-time
    costs in every stage (allocator growth, kernel selection for new shapes): it stands in while the row
    has no warm sample and is replaced by the first warm one (`samples` counts warm runs only)."""
    old = old or {}
    samples = int(old.get("samples") or 0)
    fields = ("step_s", "first_step_extra_s", "encode_s", "decode_s", "write_s", "other_s")
    if sample.get("cold"):
        if samples:
            return {**{name: old.get(name) for name in LEARNED_FIELDS}, "samples": samples}
        stand_in = {name: _average(old.get(name), sample.get(name), 1.0) for name in fields}
        return {**stand_in, "load_s": old.get("load_s"), "samples": 0}
    alpha = max(1.0 / (samples + 1), MIN_ALPHA)
    merged = {name: _average(old.get(name), sample.get(name), alpha) for name in fields}
    return {**merged, "load_s": old.get("load_s"), "samples": samples + 1}


def merge_model_sample(old: dict[str, Any] | None, sample: dict[str, Any]) -> dict[str, Any]:
    """Running average of a model's row (columns as `MODEL_COLUMNS` maps them), per field: each field
    counts its own samples in the mean phase only through `samples`, then weighs MIN_ALPHA."""
    old = old or {}
    samples = int(old.get("samples") or 0)
    alpha = max(1.0 / (samples + 1), MIN_ALPHA)
    merged = {column: old.get(column) for column in LEARNED_FIELDS}
    for name, column in MODEL_COLUMNS.items():
        merged[column] = _average(old.get(column), sample.get(name), alpha)
    return {**merged, "samples": samples + 1}


def times_from_row(row: dict[str, Any]) -> StageTimes | None:
    """A kind's learned row as StageTimes per forward (None until a step time is known)."""
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


@dataclass(frozen=True)
class _Kind:
    """A learned kind: its shape and its times per forward."""

    shape: TaskShape
    times: StageTimes


@dataclass(frozen=True)
class _ModelTimes:
    load_s: float | None = None
    reload_s: float | None = None
    compile_s: float | None = None
    new_shape_s: float | None = None
    lora_load_s: float | None = None
    lora_step_s: float | None = None


@dataclass
class _Learned:
    kinds: dict[tuple[str, str, int, str, str], _Kind] = field(default_factory=dict)
    by_model: dict[tuple[str, str], list[_Kind]] = field(default_factory=dict)  # (model, device) -> kinds
    models: dict[tuple[str, str], _ModelTimes] = field(default_factory=dict)  # (model, device)
    legacy_loads: dict[tuple[str, str], float] = field(default_factory=dict)  # load_s found on kind rows
    stitch_rate: float | None = None  # seconds per stitched pixel-frame
    stitch_s: float | None = None  # a stitch's seconds (for a stitch of unknown size)
    compile_any: float | None = None  # any model's compile on this device (a guess for a new model)


def row_device(device: str) -> str:
    """The `device` column of the rows this estimator writes for `device` (see ROW_FORMAT)."""
    return f"{device} [{ROW_FORMAT}]"


def _parse_learned(rows: Sequence[dict[str, Any]], device: str) -> _Learned:
    learned = _Learned()
    compiles = []
    for row in sorted(rows, key=lambda r: str(r.get("updated_at") or "")):
        if row.get("device") != row_device(device):
            continue
        model = str(row["model"])
        if model == STITCH_MODEL:
            learned.stitch_rate, learned.stitch_s = _float(row.get("write_s")), _float(row.get("other_s"))
            continue
        if (row.get("resolution"), int(row.get("frames") or 0)) == MODEL_ROW:
            values = {name: _float(row.get(column)) for name, column in MODEL_COLUMNS.items()}
            learned.models[(model, device)] = _ModelTimes(**values)
            if values["compile_s"] is not None:
                compiles.append(values["compile_s"])
            continue
        times = times_from_row(row)
        if row.get("load_s") is not None:
            learned.legacy_loads[(model, device)] = float(row["load_s"])
        if times is None:
            continue
        try:
            width, height = (int(x) for x in str(row["resolution"]).split("x"))
        except ValueError:
            continue
        shape = TaskShape(model, width, height, int(row["frames"]), 1, str(row["memory_profile"]))
        kind = _Kind(shape, times)
        learned.kinds[shape.key(device)] = kind
        # The same kind under whichever profile it ran last (the engine picks the profile).
        learned.kinds[(*shape.key(device)[:3], ANY_PROFILE, device)] = kind
        learned.by_model.setdefault((model, device), []).append(kind)
    learned.compile_any = statistics.median(compiles) if compiles else None
    return learned


# ---- task shapes -------------------------------------------------------------------------------------


class PresetShapes:
    """Resolves a task's shape like the engine does: built-in defaults < preset < the task's params.

    Travel segments resolve like generations (their `frames` are the video length); an orchestrator
    resolves to its planned children (`travel_plan`), a stitch to no shape."""

    def __init__(self, presets: Any, default_profile: str) -> None:
        self.presets = presets
        self.default_profile = default_profile

    def __call__(self, task: Task) -> TaskShape | None:
        if task.task_type in ("travel_orchestrator", "travel_stitch"):
            return None
        try:
            params = json.loads(task.params_text)
            if task.task_type == "travel_segment":
                params = {**params, "video_length": params.get("frames")}
            return self._shape(str(model_key_for(task.task_type, task.params_text)), params)
        except Exception:  # unknown model, malformed params: no estimate
            return None

    def _shape(self, model: str, params: dict[str, Any]) -> TaskShape:
        from wan_engine.generation_params import BUILTIN_DEFAULTS

        preset = self.presets.get(model)
        given = {k: v for k, v in params.items() if v is not None}
        merged = {**BUILTIN_DEFAULTS, **preset.settings.as_params(), **given}
        width, height = (int(x) for x in str(merged["resolution"]).lower().split("x"))
        frames = int(merged["video_length"])
        frames = frames if frames == 1 else (frames + 2) // 4 * 4 + 1  # the engine aligns up to 4N+1
        loras = params.get("lora_names")
        return TaskShape(
            model=model,
            width=width,
            height=height,
            frames=frames,
            steps=int(merged["num_inference_steps"]),
            # Where it will run: the engine records the device it ran on (a requested profile is
            # passed through, not acted on), so that is the key history was learned under.
            memory_profile=self.default_profile,
            cfg=float(merged.get("guidance_scale") or 0) > 1.0,
            loras=len(loras) if isinstance(loras, list) else 0,
        )

    def travel_plan(self, task: Task) -> TravelPlanShape | None:
        """An orchestrator's children, planned from its params as the orchestrator plans them."""
        if task.task_type != "travel_orchestrator":
            return None
        try:
            import travel_between_images as travel

            params = json.loads(task.params_text)
            plan = travel.plan_travel(
                len(params["input_images"]),
                params.get("segment_frames", 81),
                params.get("frame_overlap", 8),
                params.get("base_prompts", ""),
                0,
                negative_prompts=params.get("negative_prompts"),
            )
            model = str(params.get("model") or TRAVEL_DEFAULT_MODEL)
            keys = ("resolution", "num_inference_steps", "guidance_scale")
            shared = {"model": model, **{k: params[k] for k in keys if params.get(k) is not None}}
            children, previous = [], None
            for segment in plan.segments:
                child_id = f"{task.id}-seg{segment.index:03d}"
                child_params = {**shared, "frames": segment.frames, "segment_index": segment.index}
                children.append(self._child(task, child_id, "travel_segment", child_params, previous))
                previous = child_id
            stitch_id = f"{task.id}-stitch"
            children.append(self._child(task, stitch_id, "travel_stitch", {}, previous))
            shape = self._shape(model, {**shared, "video_length": plan.segments[0].frames})
            return TravelPlanShape(
                tuple(children), stitch_id, StitchShape(plan.total_frames, shape.width, shape.height)
            )
        except Exception:  # malformed params (the orchestrator itself will say what): no estimate
            return None

    @staticmethod
    def _child(task: Task, child_id: str, task_type: str, params: dict[str, Any], after: str | None) -> Task:
        return Task(
            child_id,
            task_type,
            json.dumps(params),
            TaskStatus.QUEUED,
            priority=task.priority,
            dependant_on=after,
            parent_task_id=task.id,
        )


# ---- what this process has done (loads, compiles, shapes) ------------------------------------------------


@dataclass
class _Process:
    """What the worker process has loaded and compiled, as far as the estimator saw: it decides whether
    a task will load, reload, compile or pay a new shape. Copied to walk a queue ahead."""

    compiles: bool  # the speed path compiles here (a CPU never does; a result without a brief says so)
    resident: str | None = None
    loaded: set[str] = field(default_factory=set)  # models loaded at least once (a later load is a reload)
    parked: set[str] = field(default_factory=set)  # models switched away from at least once
    layouts: dict[str, str] = field(default_factory=dict)  # model -> block layout (from speed briefs)
    covered: set[str] = field(default_factory=set)  # layouts (or models) whose compiled code covers all shapes
    compiled_shapes: set[tuple[str, int]] = field(default_factory=set)  # (layout, tokens) for dynamic "off"
    shapes: set[tuple[str, int]] = field(default_factory=set)  # (model, tokens) run here
    # Compiles predicted for tasks still running (task id -> model, tokens): the next task must not expect
    # the same compile; its result replaces the guess.
    provisional: dict[str, tuple[str, int]] = field(default_factory=dict)
    dynamic: str = "mark"
    policy: str = "pays"
    # layout -> what the compile policy costed its compile at (cold, or cached when its record said so)
    compile_costs: dict[str, float] = field(default_factory=dict)
    # layout -> (tokens, the policy's expected saving per forward at that token count)
    savings: dict[str, tuple[int, float]] = field(default_factory=dict)

    def copy(self) -> _Process:
        return replace(
            self,
            loaded=set(self.loaded),
            parked=set(self.parked),
            layouts=dict(self.layouts),
            covered=set(self.covered),
            compiled_shapes=set(self.compiled_shapes),
            shapes=set(self.shapes),
            provisional=dict(self.provisional),
            compile_costs=dict(self.compile_costs),
            savings=dict(self.savings),
        )

    def layout(self, model: str) -> str:
        return self.layouts.get(model, model)

    def expected_compile(self, model: str) -> tuple[float, bool]:
        """(seconds, warm) the compile policy expects a compile of this model's layout to cost: the cached
        figure once the layout compiled in this process, else what the policy's brief said for it, else
        a cold compile (the policy's rule: warmth per layout, never per cache folder)."""
        from wan_engine.compile_policy import CACHED_COMPILE_S, cold_compile_estimate

        layout = self.layout(model)
        if layout in self.covered or any(lay == layout for lay, _t in self.compiled_shapes):
            return CACHED_COMPILE_S, True
        if layout in self.compile_costs:
            cost = self.compile_costs[layout]
            return cost, cost <= CACHED_COMPILE_S
        return cold_compile_estimate(), False

    def policy_saving(self, model: str, tokens: int, forwards: int) -> float | None:
        """The policy's expected saving for `forwards` forwards at `tokens`, scaled from its brief of this
        layout (work ~ tokens x (1 + tokens / ATTENTION_TOKENS)); None before a brief told it."""
        known = self.savings.get(self.layout(model))
        if known is None:
            return None
        seen, per_forward = known
        scale = (tokens * (1 + tokens / ATTENTION_TOKENS)) / max(seen * (1 + seen / ATTENTION_TOKENS), 1e-9)
        return forwards * per_forward * scale

    def is_covered(self, model: str, tokens: int) -> bool:
        layout = self.layout(model)
        if layout in self.covered or (layout, tokens) in self.compiled_shapes:
            return True
        guessed = self.provisional.values()
        return any(self.layout(m) == layout and (self.dynamic != "off" or t == tokens) for m, t in guessed)

    def ran(self, model: str, tokens: int, compiled: bool) -> None:
        """A task of this model and token count ran (compiled: its code now exists)."""
        self.shapes.add((model, tokens))
        if compiled:
            layout = self.layout(model)
            self.compiled_shapes.add((layout, tokens))
            seen = {t for lay, t in self.compiled_shapes if lay == layout}
            if self.dynamic == "mark" or (self.dynamic == "auto" and len(seen) >= 2):
                self.covered.add(layout)

    def observe(self, result: dict[str, Any], model: str, tokens: int) -> None:
        """Fold a completed task's speed brief in (what compiled, in which mode)."""
        extra = result.get("extra")
        brief = _compile_brief(result)
        if isinstance(extra, dict) and "speed" in extra:
            self.compiles = brief is not None  # no compile brief: the speed path compiles nothing here
        if brief is None:
            self.ran(model, tokens, False)
            return
        self.dynamic = str(brief.get("dynamic") or self.dynamic)
        if brief.get("layout"):
            self.layouts[model] = str(brief["layout"])
        if brief.get("reason") == "policy always":
            self.policy = "always"
        layout = self.layout(model)
        if float(brief.get("expected_compile_s") or 0) > 0:
            self.compile_costs[layout] = float(brief["expected_compile_s"])
        forwards, saving = int(brief.get("forwards") or 0), float(brief.get("expected_saving_s") or 0)
        if forwards > 0 and saving > 0 and int(brief.get("tokens") or 0) > 0:
            self.savings[layout] = (int(brief["tokens"]), saving / forwards)
        self.ran(model, tokens, bool(brief.get("compiled")))


# ---- the estimator --------------------------------------------------------------------------------------


@dataclass
class _Running:
    """What is known about a task that runs now."""

    shape: TaskShape | None
    times: StageTimes | None
    with_load: bool
    started: float
    basis: str | None = None
    loaded_before: bool = False  # its model had been loaded in this process before (a load is a reload)
    new_shape: bool = False  # its token count had not run in this process
    travel_tail_s: float | None = None  # a segment: the later segments and the stitch
    stage: str | None = None
    stage_started: float = 0.0
    step_mark: tuple[int, float] | None = None  # (step, time) of the first step >= 1 seen
    observed_step_s: float | None = None
    observed_steps: int = 0  # steady-state steps behind observed_step_s
    last_remaining: float | None = None
    stitch_s: float | None = None  # a stitch: its estimate (its remaining before a rate is seen)


@dataclass(frozen=True)
class QueueEta:
    """When a queued task should start and finish, in seconds from now (None: unknown)."""

    start_in: float | None
    finish_in: float | None


class EtaEstimator:
    """Predicts a task's duration and, while it runs, its remaining seconds; walks the queue ahead.

    `write_overlaps`: the worker writes a finished task's video while the next one runs (worker.loop.finisher,
    the default), so a task holds the worker for its duration less the write."""

    def __init__(
        self,
        store: EtaStore | None,
        shape_of: Callable[[Task], TaskShape | None],
        device: str = "cpu",
        static: StaticEstimator | None = None,
        clock: Callable[[], float] = time.monotonic,
        travel_of: Callable[[Task], TravelPlanShape | None] | None = None,
        write_overlaps: bool = True,
    ) -> None:
        self.store = store
        self.shape_of = shape_of
        self.travel_of = travel_of or getattr(shape_of, "travel_plan", None)
        self.device = device
        self.static = static
        self.clock = clock
        self.write_overlaps = write_overlaps
        self._learned = _Learned()
        self._process = _Process(compiles=device != "cpu")
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    # ---- learned rows ----

    def refresh(self) -> None:
        """Re-read the learned timings (I/O: never from the step loop)."""
        if self.store is None:
            return
        learned = _parse_learned(self.store.eta_stats(), self.device)
        with self._lock:
            self._learned = learned

    def times_for(self, shape: TaskShape) -> StageTimes | None:
        """Stage times of a task of this shape run next, in this process (no load counted)."""
        with self._lock:
            learned, process = self._learned, self._process.copy()
        predicted = self._predict(shape, process, learned)
        return predicted[0] if predicted else None

    def _static(self, shape: TaskShape) -> StageTimes | None:
        try:
            return self.static.times(shape) if self.static else None
        except Exception as exc:  # an estimate is never worth failing a task over
            log.debug("no static estimate for %s: %s", shape.model, exc)
            return None

    def _base(self, shape: TaskShape, learned: _Learned) -> tuple[StageTimes, str] | None:
        """Per-forward compiled stage times of this shape (learned, scaled from the model's nearest
        learned shape, or static) and the basis."""
        key = shape.key(self.device)
        kind = learned.kinds.get(key) or learned.kinds.get((*key[:3], ANY_PROFILE, key[4]))
        if kind is not None:
            samples = kind.times.samples
            if not samples:
                return kind.times, "learned (1 cold run)"
            return kind.times, f"learned ({samples} task{'s' if samples != 1 else ''})"
        known = learned.by_model.get((shape.model, self.device))
        if known:
            near = min(known, key=lambda k: abs(math.log(max(k.shape.tokens, 1) / max(shape.tokens, 1))))
            times = self._scaled(near, replace(shape, steps=1))
            return times, f"learned (scaled from {times.scaled_from})"
        static = self._static(shape)
        if static is None:
            return None
        return replace(static, step_s=static.step_s / shape.forwards, source="static"), "static"

    def _scaled(self, near: _Kind, shape: TaskShape) -> StageTimes:
        """A learned kind's times carried over to another shape of the same model.

        With a static estimate of both shapes, what the learned one takes beyond its static estimate is
        kept as a fixed cost (launches, Python: what dominates tiny shapes), and what it takes below it as
        a faster device (a ratio); without one, steps scale with tokens (plus attention), decode with latent
        frames x pixels, write with frames x pixels."""
        one = replace(shape, cfg=False)
        base = replace(near.shape, cfg=False, steps=1, memory_profile=shape.memory_profile)
        static_new, static_near = self._static(one), self._static(base)
        learned = near.times
        if static_new is not None and static_near is not None:
            step = _carry(learned.step_s, static_near.step_s, static_new.step_s)
            decode = _carry(learned.decode_s, static_near.decode_s, static_new.decode_s)
            write = _carry(learned.write_s, static_near.write_s, static_new.write_s)
        else:
            tokens_new, tokens_near = float(shape.tokens), float(max(near.shape.tokens, 1))
            step = (
                learned.step_s
                * (tokens_new * (1 + tokens_new / ATTENTION_TOKENS))
                / (tokens_near * (1 + tokens_near / ATTENTION_TOKENS))
            )
            px_new, px_near = shape.width * shape.height, near.shape.width * near.shape.height
            decode = learned.decode_s * shape.latent_frames * px_new / (near.shape.latent_frames * px_near)
            write = learned.write_s * shape.frames * px_new / (near.shape.frames * px_near)
        return replace(
            learned,
            step_s=step,
            decode_s=decode,
            write_s=write,
            samples=0,
            scaled_from=f"{near.shape.resolution}x{near.shape.frames}",
        )

    def _predict(self, shape: TaskShape, process: _Process, learned: _Learned) -> tuple[StageTimes, str, bool] | None:
        """Stage times of this shape run next in `process` (load, compile and new-shape costs as this
        process would pay them), its basis, and whether it runs compiled."""
        from wan_engine.compile_policy import AMORTIZE_TASKS, COMPILED_SAVING

        base = self._base(shape, learned)
        if base is None:
            return None
        times, basis = base
        model = learned.models.get((shape.model, self.device)) or _ModelTimes()
        per_forward = times.step_s
        compile_s, extra, compiled = 0.0, times.first_step_extra_s, False
        if process.compiles:
            if process.is_covered(shape.model, shape.tokens):
                compiled = True
            else:
                # Decided as the policy decides: its saving estimate once a brief of this layout told it.
                forwards = shape.steps * shape.forwards
                saving = process.policy_saving(shape.model, shape.tokens, forwards)
                if saving is None:
                    saving = forwards * COMPILED_SAVING * per_forward / (1.0 - COMPILED_SAVING)
                expected, warm = process.expected_compile(shape.model)
                compiled = process.policy == "always" or saving * AMORTIZE_TASKS >= expected
                if compiled:
                    # A cached compile is the policy's figure; a learned compile is a cold one.
                    compile_s = expected if warm else _first(model.compile_s, learned.compile_any, expected)
            if not compiled:
                per_forward /= 1.0 - COMPILED_SAVING
        new_shape = (shape.model, shape.tokens) not in process.shapes
        if new_shape and not compile_s:
            extra += _first(model.new_shape_s, STATIC_NEW_SHAPE_S if process.compiles else 0.0)
        if shape.loras:
            extra += _first(model.lora_step_s, 0.0)
        prep = shape.loras * _first(model.lora_load_s, STATIC_LORA_LOAD_S)
        static_load = None
        if model.load_s is None and learned.legacy_loads.get((shape.model, self.device)) is None:
            static = self._static(shape) if times.source != "static" else times
            static_load = static.load_s if static else None
            if static_load is not None and process.compiles and not process.loaded:
                static_load += STATIC_PROBE_S  # the first load of the process probes the attention kernels
        first_load = _first(model.load_s, learned.legacy_loads.get((shape.model, self.device)), static_load)
        if shape.model in process.loaded and model.reload_s is not None:
            load = model.reload_s  # measured as a switch: the resident model's parking included
        else:
            share = RELOAD_SHARE["cpu" if self.device == "cpu" else "gpu"]
            load = share * first_load if shape.model in process.loaded else first_load
            load += self._park_guess(process, learned)
        predicted = replace(
            times,
            step_s=per_forward * shape.forwards,
            first_step_extra_s=extra,
            compile_s=compile_s,
            prep_s=prep,
            load_s=load,
        )
        return predicted, basis, compiled

    def _park_guess(self, process: _Process, learned: _Learned) -> float:
        """Seconds to move the resident model into the host-RAM cache before a load (the first time copies
        it into newly pinned memory; later, into the pinned memory it left)."""
        resident = process.resident
        if resident is None or self.device == "cpu":  # no host-RAM cache by default without a GPU
            return 0.0
        model = learned.models.get((resident, self.device)) or _ModelTimes()
        static = None if model.load_s is not None else self._static(TaskShape(resident, 832, 480, 81, 1, "gpu"))
        load = _first(model.load_s, static.load_s if static else None)
        return (PARK_AGAIN_SHARE if resident in process.parked else PARK_SHARE) * load

    def _after(self, process: _Process, shape: TaskShape, compiled: bool) -> None:
        if process.resident is not None and process.resident != shape.model:
            process.parked.add(process.resident)
        process.resident = shape.model
        process.loaded.add(shape.model)
        process.ran(shape.model, shape.tokens, compiled)

    def estimate(self, task: Task, resident_model: str | None = None) -> float | None:
        """Seconds a task will take from claim to completion (a model load included when it needs one;
        an orchestrator: its segments and stitch, run one after the other)."""
        with self._lock:
            learned, process = self._learned, self._process.copy()
        process.resident = resident_model
        if self.travel_of is not None and task.task_type == "travel_orchestrator" and task.dependant_on is None:
            return self._walk(0.0, process, learned, [task]).get(task.id, QueueEta(None, None)).finish_in
        duration = self._duration(task, process, learned)
        return None if duration is None else duration[1]

    def _duration(
        self, task: Task, process: _Process, learned: _Learned, stitch: StitchShape | None = None
    ) -> tuple[float, float] | None:
        """(seconds it holds the worker, seconds to its completion) of one task run next in `process`
        (which it updates); they differ by the write when writes overlap the next task."""
        if task.task_type == "travel_orchestrator":
            return ORCHESTRATOR_S, ORCHESTRATOR_S
        if task.task_type == "travel_stitch":
            seconds = self._stitch_s(stitch or StitchShape(), learned)
            return seconds, seconds
        shape = self.shape_of(task)
        predicted = self._predict(shape, process, learned) if shape else None
        if shape is None or predicted is None:
            return None
        times, _basis, compiled = predicted
        duration = times.duration(shape.steps, shape.model != process.resident)
        self._after(process, shape, compiled)
        return duration - (times.write_s if self.write_overlaps else 0.0), duration

    def _stitch_s(self, stitch: StitchShape, learned: _Learned) -> float:
        from worker.live.eta_static import static_stitch_s

        if stitch.frames and stitch.width and stitch.height:
            if learned.stitch_rate is not None:
                return learned.stitch_rate * stitch.frames * stitch.width * stitch.height
            return static_stitch_s(stitch.frames, stitch.width, stitch.height)
        return _first(learned.stitch_s, static_stitch_s(81 * 3, 832, 480))

    # ---- a running task ----

    def begin(self, task: Task, resident_model: str | None) -> float | None:
        """A task was claimed: read the latest history, remember what to expect; returns its full estimate."""
        try:
            self.refresh()
        except Exception as exc:  # the database may be restarting: estimate from what is cached
            log.debug("could not refresh ETA statistics: %s", exc.__class__.__name__)
        shape = self.shape_of(task)
        with self._lock:
            learned, process = self._learned, self._process.copy()
        process.resident = resident_model
        predicted = self._predict(shape, process, learned) if shape else None
        times, basis = (predicted[0], predicted[1]) if predicted else (None, None)
        with_load = shape is not None and shape.model != resident_model
        estimate = times.duration(shape.steps, with_load) if shape and times else None
        tail = self._travel_tail(task, shape, process, learned) if shape and times else None
        if shape is None:
            if task.task_type == "travel_orchestrator":
                estimate = ORCHESTRATOR_S if task.dependant_on else self.estimate(task, resident_model)
                basis = "travel plan"
            elif task.task_type == "travel_stitch":
                estimate, basis = self._stitch_s(StitchShape(), learned), "stitch"
        run = _Running(shape, times, with_load, self.clock(), basis, travel_tail_s=tail)
        run.stitch_s = estimate if task.task_type == "travel_stitch" else None
        with self._lock:
            if shape is not None:
                run.loaded_before = shape.model in self._process.loaded
                run.new_shape = (shape.model, shape.tokens) not in self._process.shapes
                if with_load and self._process.resident not in (None, shape.model):
                    self._process.parked.add(str(self._process.resident))
                self._process.loaded.add(shape.model)
                self._process.resident = shape.model
                self._process.shapes.add((shape.model, shape.tokens))
                if predicted is not None and predicted[2]:
                    self._process.provisional[task.id] = (shape.model, shape.tokens)
            self._running[task.id] = run
            while len(self._running) > MAX_RUNNING:  # abandoned (lease lost, deferred): the oldest go
                self._running.pop(next(iter(self._running)))
        return estimate

    def _travel_tail(self, task: Task, shape: TaskShape, process: _Process, learned: _Learned) -> float | None:
        """A segment's later segments (like this one) and the stitch, after this one."""
        if task.task_type != "travel_segment":
            return None
        try:
            params = json.loads(task.params_text)
            count = int(params["num_segments"])
            later = count - int(params["segment_index"]) - 1
        except (ValueError, KeyError, TypeError):
            return None
        walk = process.copy()
        self._duration(task, walk, learned)  # this one
        # Later segments regenerate the overlap too (the first has none: the orchestrator's default, 8).
        overlap = int(params.get("overlap_in") or 0) or TRAVEL_DEFAULT_OVERLAP
        frames = shape.frames + (overlap if not params.get("overlap_in") else 0)
        later_task = replace(task, params_text=json.dumps({**params, "frames": frames}))
        # Each waits for the one before to be Complete (its write included): whole durations, one after another.
        tail = sum((self._duration(later_task, walk, learned) or (0.0, 0.0))[1] for _ in range(later))
        # The stitched length is about the segments' frames less the overlaps.
        stitched = shape.frames + later * (frames - overlap)
        return tail + self._stitch_s(StitchShape(stitched, shape.width, shape.height), learned)

    def remaining(self, task_id: str, progress: dict[str, Any]) -> float | None:
        """Seconds left for a running task at this progress report (no I/O)."""
        now = self.clock()
        with self._lock:
            run = self._running.get(task_id)
            if run is None:
                return None
            left = self._remaining(run, progress, now)
            if left is not None and self.write_overlaps and run.times is not None and run.stage != "writing_video":
                # One output is finished at a time: this task's write starts after the one in progress.
                before_write = left - run.times.write_s
                busy = max(
                    (self._write_left(other, now) for other in self._running.values() if other is not run), default=0.0
                )
                left += max(0.0, busy - before_write)
            run.last_remaining = left
            return left

    @staticmethod
    def _write_left(run: _Running, now: float) -> float:
        if run.stage != "writing_video" or run.times is None:
            return 0.0
        return max(0.0, run.times.write_s - (now - run.stage_started))

    def _remaining(self, run: _Running, progress: dict[str, Any], now: float) -> float | None:
        stage = progress.get("stage")
        step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
        if stage != run.stage:
            run.stage, run.stage_started = stage, now
        if stage == "denoising" and step >= 1:
            if run.step_mark is None:
                run.step_mark = (step, now)  # step 1's end: a compile in it is never observed as step time
            elif step > run.step_mark[0]:
                run.observed_steps = step - run.step_mark[0]
                run.observed_step_s = (now - run.step_mark[1]) / run.observed_steps
        if stage == "stitching" and run.stitch_s is not None and total:
            return _stitch_left(run, step, total, now)
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
            current = (steps - step) * times.step_s
            if step == 0:  # the first step's one-off costs, less what this stage has already spent
                current += max(0.0, times.compile_s + times.first_step_extra_s - (now - run.stage_started))
        else:
            current = max(0.0, costs[index][1] - (now - run.stage_started))
        return current + sum(cost for _, cost in costs[index + 1 :])

    def travel_remaining(self, task_id: str) -> float | None:
        """A running segment's orchestrator: this segment's remaining (its latest report), the later
        segments and the stitch (no I/O)."""
        with self._lock:
            run = self._running.get(task_id)
            if run is None or run.travel_tail_s is None or run.last_remaining is None:
                return None
            return run.last_remaining + run.travel_tail_s

    def basis(self, task_id: str) -> str | None:
        """What a running task's estimate rests on: "learned (N tasks)", "learned (scaled from ...)",
        "static", "travel plan", or None."""
        with self._lock:
            run = self._running.get(task_id)
        return None if run is None else run.basis

    def finish(self, task_id: str) -> float | None:
        """Forget a running task (failed, cancelled); returns the seconds since it began."""
        with self._lock:
            run = self._running.pop(task_id, None)
            self._process.provisional.pop(task_id, None)
        return None if run is None else self.clock() - run.started

    def record(self, task: Task, result: dict[str, Any]) -> None:
        """Fold a completed task's timings into its kind's and its model's history (I/O)."""
        with self._lock:
            run = self._running.pop(task.id, None)
        wall = None if run is None else self.clock() - run.started
        if task.task_type == "travel_stitch":
            self._record_stitch(result, wall)
            return
        if not (result.get("timings") or {}).get("step_times"):
            return
        try:
            width, height = (int(x) for x in str(result["resolution"]).split("x"))
            frames = int(result["frames"])
            model = str(result["model"])
            key = {
                "model": model,
                "resolution": f"{width}x{height}",
                "frames": frames,
                "memory_profile": str(result.get("memory_profile") or "gpu"),
                "device": row_device(self.device),
            }
        except (KeyError, ValueError, TypeError):
            return
        sample = sample_from_result(result, wall)
        tokens = TaskShape(model, width, height, frames, 1, key["memory_profile"]).tokens
        with self._lock:
            loaded_before = run.loaded_before if run else model in self._process.loaded
            new_shape = run.new_shape if run else (model, tokens) not in self._process.shapes
            self._process.loaded.add(model)
            self._process.provisional.pop(task.id, None)
            self._process.observe(result, model, tokens)
        model_sample = {
            name: sample.get(name)
            for name in ("compile_s", "lora_load_s", "lora_step_s")
            if sample.get(name) is not None
        }
        if sample["cold"]:
            model_sample["reload_s" if loaded_before else "load_s"] = sample["load_s"]
        if new_shape and sample["first_step_extra_s"] is not None:
            # The first step at a token count this process had not run: a new-shape cost, not warm-up.
            model_sample["new_shape_s"], sample = sample["first_step_extra_s"], {**sample, "first_step_extra_s": None}
        if new_shape:
            sample = {**sample, "cold": True}  # the kind's first run here: a stand-in until a warm one
        if self.store is None:
            return
        self.store.update_eta_stats(key, lambda old: merge_sample(old, sample))
        if model_sample:
            model_key = {**key, "resolution": MODEL_ROW[0], "frames": MODEL_ROW[1], "memory_profile": ANY_PROFILE}
            self.store.update_eta_stats(model_key, lambda old: merge_model_sample(old, model_sample))
        self.refresh()  # the next estimate (queue ETAs on the page too) uses this task already

    def _record_stitch(self, result: dict[str, Any], wall: float | None) -> None:
        try:
            seconds = float(result.get("stitch_seconds") or wall or 0.0)
            pixel_frames = int(result["frames"]) * int(result["width"]) * int(result["height"])
        except (KeyError, ValueError, TypeError):
            return
        if self.store is None or seconds <= 0 or pixel_frames <= 0:
            return
        sample = {"write_s": seconds / pixel_frames, "other_s": seconds}
        key = {
            "model": STITCH_MODEL,
            "resolution": MODEL_ROW[0],
            "frames": MODEL_ROW[1],
            "memory_profile": ANY_PROFILE,
            "device": row_device(self.device),
        }
        self.store.update_eta_stats(key, lambda old: merge_sample(old, sample))
        self.refresh()

    # ---- the queue ----

    def queue_etas(
        self, current_remaining: float | None, resident_model: str | None, queued: Sequence[Task]
    ) -> dict[str, QueueEta]:
        """Start / finish times of queued tasks, walking them in the order this worker will claim them.

        Counts every task ahead of each, with the model loads, switches and compiles each one pays; an
        orchestrator not started yet counts its planned segments and stitch (its finish is the stitch's).
        Assumes one worker serves the queue; with several, the real wait is shorter."""
        with self._lock:
            learned, process = self._learned, self._process.copy()
            hold = self._holds_worker(current_remaining)
        process.resident = resident_model
        return self._walk(hold, process, learned, list(queued))

    def _holds_worker(self, remaining: float | None) -> float | None:
        """How long the running task keeps the worker from claiming: its remaining, less its write when
        writes overlap the next task (the latest task begun is the one the loop runs). Under the lock."""
        run = next(reversed(self._running.values()), None) if self._running else None
        if remaining is None or not self.write_overlaps or run is None or run.times is None:
            return remaining
        if run.stage == "writing_video":
            return 0.0
        return max(0.0, remaining - run.times.write_s)

    def _walk(
        self, start: float | None, process: _Process, learned: _Learned, queued: list[Task]
    ) -> dict[str, QueueEta]:
        """Claim the queue in order as the worker would (ModelAffinity, dependencies complete first)."""
        etas: dict[str, QueueEta] = {}
        pending = list(queued)
        queued_ids = {task.id for task in queued}
        ids = set(queued_ids)
        completes: dict[str, float | None] = {}  # when each walked task is Complete (its write included)
        stitches: dict[str, StitchShape] = {}
        waits: dict[str, str] = {}  # stitch -> its orchestrator (which wakes and completes after it)
        started_at: dict[str, float | None] = {}
        clock = start  # None: the running task's end is unknown, so is every start after it
        walked = 0.0
        affinity = ModelAffinity(clock=lambda: walked)

        def is_ready(task: Task) -> bool:
            after = task.dependant_on
            if after is None or after not in ids:
                return True  # none, or outside the queue (complete, or the running task)
            if after not in completes:
                return False
            end = completes[after]
            return clock is None or end is None or end <= clock + 1e-9

        while pending:
            ready = [task for task in pending if is_ready(task)]
            if not ready:
                # Waiting for a dependency's write to finish (or for something outside the queue).
                ends = [completes.get(t.dependant_on or "") for t in pending if t.dependant_on in completes]
                known = [end for end in ends if end is not None]
                if clock is None or not known:
                    break
                clock = max(clock, min(known))
                continue
            task = affinity.choose(ready, process.resident, _claim_model)
            if task is None:
                break
            pending.remove(task)
            plan = None
            if task.task_type == "travel_orchestrator" and task.dependant_on is None and self.travel_of:
                plan = self.travel_of(task)
            duration = self._duration(task, process, learned, stitches.get(task.id))
            begin = clock
            complete = None if clock is None or duration is None else clock + duration[1]
            clock = None if clock is None or duration is None else clock + duration[0]
            walked = clock if clock is not None else walked
            completes[task.id] = complete
            if plan is not None:
                # Its children join the queue behind every task of its priority, as the rows would.
                stitches[plan.stitch_id] = plan.stitch
                at = max((i + 1 for i, t in enumerate(pending) if t.priority >= task.priority), default=0)
                pending[at:at] = list(plan.children)
                ids.update(child.id for child in plan.children)
                waits[plan.stitch_id] = task.id
                started_at[task.id] = begin
                continue
            if task.id in waits:  # the orchestrator wakes after its stitch and completes
                orchestrator = waits[task.id]
                clock = None if clock is None else clock + ORCHESTRATOR_S
                walked = clock if clock is not None else walked
                etas[orchestrator] = QueueEta(started_at[orchestrator], clock)
            if task.id in queued_ids:
                etas.setdefault(task.id, QueueEta(begin, complete))
        for task in queued:
            etas.setdefault(task.id, QueueEta(started_at.get(task.id), None))
        return etas


def _stitch_left(run: _Running, step: int, total: int, now: float) -> float:
    """A stitch's remaining: its estimate for the frames left until a rate is seen, then the rate measured
    from its first report (that report comes once a frame is out: the probe and startup are behind it)."""
    if run.step_mark is None or step <= run.step_mark[0]:
        if run.step_mark is None:
            run.step_mark = (step, now)
        return float(run.stitch_s or 0.0) * (total - step) / total
    rate = (now - run.step_mark[1]) / (step - run.step_mark[0])
    return rate * (total - step)


def _claim_model(task: Task) -> str | None:
    """The model a row needs, as the claim sees it (worker.tasks.claim_filter: none for bookkeeping rows)."""
    if task.task_type in ("travel_orchestrator", "travel_stitch"):
        return None
    return model_key_for(task.task_type, task.params_text)


def _carry(learned: float, static_from: float, static_to: float) -> float:
    """A learned time at one shape carried to another by the static estimates of both: the excess over
    the static one is a fixed cost (kept as is), a shortfall a faster device (kept as a ratio)."""
    if learned >= static_from or static_from <= 0:
        return static_to + (learned - static_from)
    return static_to * learned / static_from


def _first(*values: float | None) -> float:
    return next((float(v) for v in values if v is not None), 0.0)


def detect_device() -> str:
    """The name of this machine's GPU, or "cpu"."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"
