"""Time estimates from what really happens: each stage learned on its own, static from FLOPs before any history.

A task's time is the sum of stages, each learned apart from the others, so a one-off cost is never
charged to a stage that repeats:

- **load / switch** (per model): the first load in this process (from disk) and a reload (from the
  host-RAM cache), from result_data `model_loaded` / `load_seconds`, less the parks of the model it replaced
  (result_data `model_transfers`), which are learned as that model's **park**;
- **compile** (per model): the first step's extra on a task whose speed brief (result_data
  `extra.speed.compile`) says it compiled code not there before; **new shape** (per model): the first
  step's extra at a token count this process had not run yet (dynamic-shape recompile, autotuning);
- **per step** (per kind of task: model, resolution, frames, memory profile, device): the *median* of the
  step times, per transformer forward (a CFG step is two), as a compiled step (an eager one is scaled by
  the compile saving), so CFG and no-CFG tasks of a shape share one row, and a compile in step 1 never
  counts;
- **encode, decode, write** (per kind), **LoRAs** (per model: loading, and the fuse in step 1). A decode that
  ran on the finisher beside the next task's steps is learned as it runs alone (see below).

A shape never seen on a known model is predicted from that model's nearest learned shape, scaled by
the ratio of their FLOP counts (worker.live.eta_static) or, without one, of their tokens; decode scales
with latent frames x pixels, write with frames x pixels. Before any history the static estimate stands in.

The estimator mirrors this process: which models it has loaded, which block layouts are compiled, which
shapes have run. So it knows whether the next task will load or switch a model, compile (its layout is
not compiled and, under the default policy, its forwards earn the compile back: wan_engine.compile_policy,
with the policy's own per-layout cost, cached only for a layout compiled here, that the policy costed so, or
whose model has a learned (cold) compile on this device: an earlier process compiled it into the on-disk
compile cache, which the policy's record finds; and the policy's own saving per forward once a brief of the
layout told it) or pay a new shape (the first step's extra beyond what its kind's first step always takes).
`queue_etas` walks the queue in the order the worker claims it (priority, age, the resident model
preferred: worker.loop.scheduling.ModelAffinity), counting each task's loads and compiles; a travel
orchestrator counts its segments (planned from its params, as the orchestrator plans them) and
the stitch (a running stitch's length: the frames of the segments this process ran, less the overlaps).
While a task runs, its own steps (after step 1) are blended in.

The worker's two threads are mirrored too (worker.loop.finisher): with `write_overlaps` a task holds the
loop until its hand-off and the finisher writes its video (a stitch runs there whole) while the loop claims
the next; one output is finished at a time, and the hand-off waits for the one before. With
`decode_overlaps` (wan_engine.decode_overlap, WAN_OVERLAP_DECODE) the VAE decode moves to the finisher too,
before the write (unless the kind's last run found no VRAM for it beside the next task's steps); then a task
whose pipeline call uses the VAE (every mode but text-to-video on a T2V model), or that switches models,
waits for a pending decode first, and any other task's steps share the GPU with it (`share_gpu`: the decode at
DECODE_SHARE of its speed, the steps at the rest, so the decode ends later and the steps take about the
decode's own time longer); with nothing beside it a decode takes its own time. Travel segments write on the
loop (the next segment's guide is their output) and a task with a queued dependant is finished before the
next claim (worker.loop.worker: `_finish_awaited_output`).

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
from typing import Any, NamedTuple, Protocol

from worker.loop.scheduling import ModelAffinity
from worker.task import Task, TaskStatus
from worker.tasks.params import TASK_TYPE_MODES, model_key_for, params_or_none

log = logging.getLogger(__name__)

STAGES = ("loading_model", "encoding_prompt", "denoising", "decoding", "writing_video")
LEARNED_FIELDS = ("step_s", "first_step_extra_s", "encode_s", "decode_s", "write_s", "other_s", "load_s")
MIN_ALPHA = 0.5  # weight of a new sample once several are known: follows drift (warm-up, clocks) fast
LEARNED_PRIOR_STEPS = 8.0  # a learned step time counts as this many observed steps of the running task
STATIC_PRIOR_STEPS = 1.0  # a static one is a guess: the task's own steps take over at once
MODEL_ROW = ("*", 0)  # (resolution, frames) of a model's own row
# Rows are keyed by device name plus this format tag: rows an older wan-worker wrote (step time per step,
# not per forward, and no model rows) are then ignored and re-learned instead of skewing CFG tasks 2x.
# eta3: a load is learned without the parks in it (`park_s`), a decode as it runs alone (not beside the next
# task's steps): an eta2 row's figures would be counted twice.
ROW_FORMAT = "eta3"
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
    "park_s": "write_s",  # moving it into the host-RAM cache when another model is loaded (model_transfers)
}
TRAVEL_DEFAULT_MODEL = "vace_14B_cocktail_2_2"  # worker.tasks.travel.DEFAULT_TRAVEL_MODEL (a higher layer)
TRAVEL_DEFAULT_OVERLAP = 8  # frame_overlap's default (worker.tasks.travel.TravelOrchestratorParams)
# Guesses for what nothing measured yet (GPU; a CPU never compiles): docs/BENCHMARKS.md, H200. A compile
# is guessed as the compile policy expects it (wan_engine.compile_policy: cold per layout, or cached).
STATIC_NEW_SHAPE_S = 0.4  # a new token count with the dimension dynamic
STATIC_PROBE_S = 3.7  # the attention-kernel probe, once per process at the first load ("Why ours is faster")
STATIC_LORA_LOAD_S = 0.3  # per LoRA file
# A reload guessed as this share of a first load until one is measured: from the pinned host-RAM cache on a
# GPU machine (on by default there: ~45 GB/s against ~2.4 GB/s from disk), from disk again on a CPU one. A
# first load can also hold a process's one-time costs (imports, the compiler stack: t2v_1.3B's 10-12 s first
# loads in bench/results/h200_worker_queue_run3.json read 1.3 s of weights; its restore took 0.09 s).
RELOAD_SHARE = {"gpu": 0.05, "cpu": 1.0}
# Parking the resident model before a load, as a share of its first load until a park of it is measured
# (result_data `model_transfers`). The engine reserves the pinned host slab in the background after each load
# (wan_engine.model_cache `reserve`), so a park is a copy into pinned memory: 0.11 / 0.13-0.14 s for the 1.3B
# models' 3.9 / 5.3 GB on the H200 (queue runs 3 and 4) against first loads of 1.5-2.4 s from disk.
PARK_SHARE = 0.03
# A decode on the finisher beside the next task's denoising shares the GPU, the total work about conserved:
# the decode runs at this share of its own speed, the steps at the rest. H200 (VAE float16): an 81-frame decode
# takes 2.15-2.54 s alone and 5.9-6.25 s beside a 49-frame task's steps (0.37; queue runs 3 and 4), whose steps
# take ~0.74 s instead of 0.50 meanwhile (0.67); bench/results/h200_vae_overlap_run1.json, two streams: decode
# 2.78 s alone, 6.28 s beside 5 steps (0.44), the steps 6.07 s alone, 8.71 s beside it (0.58 while shared).
DECODE_SHARE = 0.4
ORCHESTRATOR_S = 0.2  # an orchestrator's own runs (plan and insert its children; wake and complete)
ATTENTION_TOKENS = 20_000.0  # without FLOPs: work per forward ~ tokens x (1 + tokens / this)
MAX_RUNNING = 4  # tasks remembered as running (a lost lease sends no event: the oldest are dropped)
MAX_SEGMENTS = 64  # travel segments remembered for their stitch's length and size


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


class _Cost(NamedTuple):
    """One task run next, as the queue walk needs it (seconds from its claim)."""

    hold: float  # until its hand-off: the loop is busy with it (the whole task when nothing overlaps)
    total: float  # until Complete when nothing waits: its full duration
    finish: float = 0.0  # after the hand-off, on the finisher: its write (and decode when that overlaps)
    decode: float = 0.0  # the first part of `finish`: the VAE decode, when it overlaps
    needs_vae_at: float | None = None  # into its hold, where it needs the VAE (waits for a pending decode)
    handed_off: bool = False  # `finish` runs on the finisher (the hand-off waits for the output in hand)
    denoise_at: float = 0.0  # into its hold, where its steps start (its load, LoRAs, encode and compile done)
    denoise: float = 0.0  # its steps' seconds alone on the GPU (a pending decode beside them shares it)


class _Start(NamedTuple):
    """Where a queue walk starts, in seconds from now (None: unknown)."""

    hold: float | None  # the loop is free of the running task (its hand-off)
    decode_end: float  # the VAE is free of a decode on the finisher
    finish_end: float  # the finisher is free (the output in hand is Complete)
    task_id: str | None = None  # the running task's (a queued dependant has the loop wait for its output)


def pipeline_needs_vae(task: Task, architecture_of: Callable[[str], str | None] | None = None) -> bool:
    """Whether a task's pipeline call uses the VAE, so it waits for an overlapped decode first
    (wan_engine.decode_overlap: only text-to-video leaves it alone). Text-to-video is the t2v task types,
    and ti2v without a start image; on a VACE model (`architecture_of`) even that encodes a blank guide."""
    if task.task_type in ("travel_orchestrator", "travel_stitch"):
        return False  # no pipeline at all
    mode = TASK_TYPE_MODES.get(task.task_type)
    params = params_or_none(task.params_text) or {}
    text_only = mode == "t2v" or (mode == "ti2v" and not params.get("image_start"))
    if text_only and architecture_of is not None:
        model = model_key_for(task.task_type, task.params_text)
        text_only = model is None or architecture_of(model) != "vace"
    return not text_only


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
    loaded for this task (`load_s`: its own load, less the parks of other models in it, which are `parks`:
    (model, seconds) from result_data `model_transfers`)."""
    from wan_engine.compile_policy import CACHED_COMPILE_S, COMPILED_SAVING

    timings = result.get("timings") or {}
    steps = [float(s) for s in timings.get("step_times") or []]
    median = statistics.median(steps[1:]) if len(steps) > 1 else (steps[0] if steps else None)
    brief = _compile_brief(result)
    compiled_new = bool(brief and brief.get("compiled") and float(brief.get("expected_compile_s") or 0) > 0)
    # A compile from the on-disk caches (the policy costed it as cached) is not the cold compile `compile_s` is.
    cold_compile = compiled_new and float((brief or {}).get("expected_compile_s") or 0) > CACHED_COMPILE_S
    eager_on_compiler = brief is not None and not brief.get("compiled")
    forwards = _forwards(result)
    per_forward = None if median is None else median / forwards
    if per_forward is not None and eager_on_compiler:
        per_forward *= 1.0 - COMPILED_SAVING  # learned as the compiled step it would have been
    extra = max(0.0, steps[0] - median) if steps and median is not None and len(steps) > 1 else None
    cold = bool(result.get("model_loaded")) and result.get("load_seconds") is not None
    load_s = float(result["load_seconds"]) if cold else None
    parks = _parks(result) if cold else []
    loras = len(result.get("loras") or [])
    other = float(timings.get("inputs") or 0.0)
    if wall_s is not None and timings.get("total") is not None:
        other += max(0.0, wall_s - float(timings["total"]) - (load_s or 0.0))
    if load_s is not None:
        load_s = max(0.0, load_s - sum(seconds for _model, seconds in parks))
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
        "compile_s": extra if cold_compile else None,
        "lora_load_s": lora_time / loras if loras else None,
        "lora_step_s": extra if loras and not compiled_new else None,
        "first_extra": extra,
        "forwards": forwards,
        "eager": eager_on_compiler,
        "parks": parks,
    }


def _decode_overlapped(result: dict[str, Any]) -> bool:
    """Whether the task's decode ran on the output finisher (result_data extra.decode_overlap)."""
    extra = result.get("extra")
    overlap = extra.get("decode_overlap") if isinstance(extra, dict) else None
    return isinstance(overlap, dict) and bool(overlap.get("overlapped"))


def _parks(result: dict[str, Any]) -> list[tuple[str, float]]:
    """The models this task's load parked in the host-RAM cache, with the seconds each took (its slab
    allocation included): result_data `model_transfers` (wan_engine.model_cache.Transfer)."""
    parks = []
    for transfer in result.get("model_transfers") or []:
        if isinstance(transfer, dict) and transfer.get("direction") == "park" and transfer.get("key"):
            try:
                parks.append((str(transfer["key"]), float(transfer.get("seconds") or 0.0)))
            except (TypeError, ValueError):
                continue
    return parks


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
    park_s: float | None = None


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

    def needs_vae(self, task: Task) -> bool:
        """`pipeline_needs_vae` with the presets' architectures (an unknown model: as its task type says)."""

        def architecture(model: str) -> str | None:
            try:
                return str(self.presets.get(model).model.architecture)
            except Exception:  # an unknown model fails its own task; the estimate goes by the task type
                return None

        return pipeline_needs_vae(task, architecture)

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
    # (model, tokens) whose decode last ran before the next task: no VRAM beside its steps (decode_overlap)
    decode_on_loop: set[tuple[str, int]] = field(default_factory=set)

    def copy(self) -> _Process:
        return replace(
            self,
            loaded=set(self.loaded),
            layouts=dict(self.layouts),
            covered=set(self.covered),
            compiled_shapes=set(self.compiled_shapes),
            shapes=set(self.shapes),
            provisional=dict(self.provisional),
            compile_costs=dict(self.compile_costs),
            savings=dict(self.savings),
            decode_on_loop=set(self.decode_on_loop),
        )

    def layout(self, model: str) -> str:
        return self.layouts.get(model, model)

    def expected_compile(self, model: str, compiled_before: bool = False) -> tuple[float, bool]:
        """(seconds, warm) the compile policy expects a compile of this model's layout to cost: the cached
        figure once the layout compiled in this process, else what the policy's brief said for it, else
        the cached figure when an earlier process on this device compiled it (`compiled_before`: a learned
        compile; the policy's record of layouts in the on-disk compile cache, on by default, says so to the
        policy), else a cold compile (the policy's rule: warmth per layout, never per cache folder)."""
        from wan_engine.compile_policy import CACHED_COMPILE_S, cold_compile_estimate

        layout = self.layout(model)
        if layout in self.covered or any(lay == layout for lay, _t in self.compiled_shapes):
            return CACHED_COMPILE_S, True
        if layout in self.compile_costs:
            cost = self.compile_costs[layout]
            return cost, cost <= CACHED_COMPILE_S
        if compiled_before:
            return CACHED_COMPILE_S, True
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
        """Fold a completed task's speed brief in (what compiled, in which mode), and where its decode ran."""
        extra = result.get("extra")
        overlap = extra.get("decode_overlap") if isinstance(extra, dict) else None
        if isinstance(overlap, dict) and "overlapped" in overlap:
            # wan_engine.decode_overlap.no_room_for_overlap: the same kind meets the same VRAM budget next time.
            if overlap["overlapped"]:
                self.decode_on_loop.discard((model, tokens))
            else:
                self.decode_on_loop.add((model, tokens))
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
    usual_extra: float = 0.0  # the first-step extra its kind pays every time (a VACE guide's encode, warm-up)
    travel_tail_s: float | None = None  # a segment: the later segments and the stitch
    stage: str | None = None
    stage_started: float = 0.0
    steps_started: float | None = None  # when its first "denoising" report came
    steps_ended: float | None = None  # when its first report after denoising came
    decode_started: float | None = None  # when its "decoding" report came
    step_mark: tuple[int, float] | None = None  # (step, time) of the first step >= 1 seen
    observed_step_s: float | None = None
    observed_steps: int = 0  # steady-state steps behind observed_step_s
    last_remaining: float | None = None
    last_at: float = 0.0  # when last_remaining was computed
    stitch_s: float | None = None  # a stitch: its estimate (its remaining before a rate is seen)
    stitch: StitchShape | None = None  # a stitch: its length and size, when its segments were seen here
    defers: bool = True  # its output is finished on the finisher (not a travel segment's)
    decode_overlaps: bool = False  # its decode too (EtaEstimator.decode_overlaps, VRAM permitting)
    needs_vae: bool = True  # its pipeline call uses the VAE (pipeline_needs_vae)


@dataclass(frozen=True)
class QueueEta:
    """When a queued task should start and finish, in seconds from now (None: unknown)."""

    start_in: float | None
    finish_in: float | None


class EtaEstimator:
    """Predicts a task's duration and, while it runs, its remaining seconds; walks the queue ahead.

    `write_overlaps`: the worker writes a finished task's video while the next one runs (worker.loop.finisher,
    the default), so a task holds the worker for its duration less the write. `decode_overlaps`: its VAE
    decode runs there too (wan_engine.decode_overlap.decode_overlaps of this device and memory profile; only
    with `write_overlaps`), so it holds the worker for its duration less its decode and write, and the next
    task, when it needs the VAE or switches models, waits for that decode to end. `needs_vae` tells which
    tasks do (default: the shape resolver's `needs_vae`, else `pipeline_needs_vae` by task type)."""

    def __init__(
        self,
        store: EtaStore | None,
        shape_of: Callable[[Task], TaskShape | None],
        device: str = "cpu",
        static: StaticEstimator | None = None,
        clock: Callable[[], float] = time.monotonic,
        travel_of: Callable[[Task], TravelPlanShape | None] | None = None,
        write_overlaps: bool = True,
        decode_overlaps: bool = False,
        needs_vae: Callable[[Task], bool] | None = None,
    ) -> None:
        self.store = store
        self.shape_of = shape_of
        self.travel_of = travel_of or getattr(shape_of, "travel_plan", None)
        self.needs_vae: Callable[[Task], bool] = needs_vae or getattr(shape_of, "needs_vae", pipeline_needs_vae)
        self.device = device
        self.static = static
        self.clock = clock
        self.write_overlaps = write_overlaps
        self.decode_overlaps = decode_overlaps and write_overlaps  # the decode moves only with a deferred write
        self._segments: dict[str, StitchShape] = {}  # travel segments begun here: the stitch's length and size
        self._learned = _Learned()
        self._read = False  # the rows were read at least once (a queue walk before any claim reads them)
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
            self._learned, self._read = learned, True

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

    def _usual_extra(self, shape: TaskShape, learned: _Learned) -> float:
        """The first-step extra a task of this shape pays every time (a VACE guide's encode, warm-up): its kind's
        (learned, or static before any history), else its model's nearest kind that has one, carried over."""
        base = self._base(shape, learned)
        if base is not None and base[0].first_step_extra_s > 0:
            return base[0].first_step_extra_s
        known = [k for k in learned.by_model.get((shape.model, self.device), []) if k.times.first_step_extra_s > 0]
        if not known:
            return 0.0
        near = min(known, key=lambda k: abs(math.log(max(k.shape.tokens, 1) / max(shape.tokens, 1))))
        return self._scaled(near, replace(shape, steps=1)).first_step_extra_s

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
                expected, warm = process.expected_compile(shape.model, model.compile_s is not None)
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
            load = model.reload_s
        else:
            share = RELOAD_SHARE["cpu" if self.device == "cpu" else "gpu"]
            load = share * first_load if shape.model in process.loaded else first_load
        load += self._park_guess(process, learned)  # loads are learned without the parks in them
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
        """Seconds to move the resident model into the host-RAM cache before a load: its parks as measured
        (result_data `model_transfers`), else a share of its first load (a copy into the pinned slab the engine
        reserved after that load)."""
        resident = process.resident
        if resident is None or self.device == "cpu":  # no host-RAM cache by default without a GPU
            return 0.0
        model = learned.models.get((resident, self.device)) or _ModelTimes()
        if model.park_s is not None:
            return model.park_s
        static = None if model.load_s is not None else self._static(TaskShape(resident, 832, 480, 81, 1, "gpu"))
        return PARK_SHARE * _first(model.load_s, static.load_s if static else None)

    def _after(self, process: _Process, shape: TaskShape, compiled: bool) -> None:
        process.resident = shape.model
        process.loaded.add(shape.model)
        process.ran(shape.model, shape.tokens, compiled)

    def estimate(self, task: Task, resident_model: str | None = None) -> float | None:
        """Seconds a task will take from claim to completion (a model load included when it needs one;
        an orchestrator: its segments and stitch, run one after the other)."""
        return self._estimate(task, resident_model, _Start(0.0, 0.0, 0.0))

    def _estimate(self, task: Task, resident_model: str | None, pending: _Start) -> float | None:
        """`estimate`, claimed while a decode or an output is still on the finisher (`pending`)."""
        with self._lock:
            learned, process = self._learned, self._process.copy()
        process.resident = resident_model
        if self.travel_of is not None and task.task_type == "travel_orchestrator" and task.dependant_on is None:
            etas = self._walk(pending, process, learned, [task])
            return etas.get(task.id, QueueEta(None, None)).finish_in
        cost = self._duration(task, process, learned, self._stitch_shape(task))
        return None if cost is None else _schedule(cost, 0.0, pending.decode_end, pending.finish_end)[1]

    def _duration(
        self, task: Task, process: _Process, learned: _Learned, stitch: StitchShape | None = None
    ) -> _Cost | None:
        """One task run next in `process` (which it updates): how long it holds the worker (`hold`, the
        first value), its full duration (`total`, the second) and what runs on the finisher after it."""
        if task.task_type == "travel_orchestrator":
            return _Cost(ORCHESTRATOR_S, ORCHESTRATOR_S)
        if task.task_type == "travel_stitch":
            seconds = self._stitch_s(stitch or StitchShape(), learned)
            # The runner hands a stitch to the finisher whole (worker.tasks.runner._run_stitch).
            return _Cost(0.0, seconds, seconds, handed_off=True) if self.write_overlaps else _Cost(seconds, seconds)
        shape = self.shape_of(task)
        predicted = self._predict(shape, process, learned) if shape else None
        if shape is None or predicted is None:
            return None
        times, _basis, compiled = predicted
        switches = shape.model != process.resident
        duration = times.duration(shape.steps, switches)
        self._after(process, shape, compiled)
        needs_vae_at = None  # when a decode of the task before may still be running (on the finisher)
        if self.decode_overlaps and switches:
            needs_vae_at = 0.0  # parking or unloading the resident model waits for its decode
        elif self.decode_overlaps and self.needs_vae(task):
            # The VAE is taken around the pipeline call: LoRA files and the prompt's encode come before it.
            needs_vae_at = times.prep_s + times.encode_s
        if not self.write_overlaps or task.task_type == "travel_segment":  # a segment writes on the loop
            return _Cost(duration, duration, needs_vae_at=needs_vae_at)
        decode = times.decode_s if self._decode_moves(process, shape) else 0.0
        finish = times.write_s + decode
        # Its steps start after its load, LoRA files, encode and compile (the GPU idles through a compile).
        load = (times.load_s or 0.0) if switches else 0.0
        denoise_at = load + times.prep_s + times.encode_s + times.compile_s
        denoise = times.first_step_extra_s + shape.steps * times.step_s
        return _Cost(duration - finish, duration, finish, decode, needs_vae_at, True, denoise_at, denoise)

    def _decode_moves(self, process: _Process, shape: TaskShape) -> bool:
        """Whether this task's decode runs on the finisher (the kind's last run found the VRAM for it)."""
        return self.decode_overlaps and (shape.model, shape.tokens) not in process.decode_on_loop

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
            pending = self._pending(self.clock())
        process.resident = resident_model
        predicted = self._predict(shape, process, learned) if shape else None
        times, basis = (predicted[0], predicted[1]) if predicted else (None, None)
        with_load = shape is not None and shape.model != resident_model
        estimate = times.duration(shape.steps, with_load) if shape and times else None
        tail = self._travel_tail(task, shape, process, learned) if shape and times else None
        stitch = self._stitch_shape(task) if task.task_type == "travel_stitch" else None
        if shape is None:
            if task.task_type == "travel_orchestrator":
                estimate = ORCHESTRATOR_S if task.dependant_on else self._estimate(task, resident_model, pending)
                basis = "travel plan"
            elif stitch is not None:
                estimate, basis = self._stitch_s(stitch, learned), "stitch"
        waits = pending.decode_end or pending.finish_end
        if estimate is not None and waits and task.task_type != "travel_orchestrator":
            # Claimed beside a decode or an output still on the finisher: what it waits for is its time too.
            estimate = self._estimate(task, resident_model, pending)
        run = _Running(shape, times, with_load, self.clock(), basis, travel_tail_s=tail)
        run.defers = self.write_overlaps and task.task_type != "travel_segment"
        run.decode_overlaps = run.defers and shape is not None and self._decode_moves(process, shape)
        run.needs_vae = self.needs_vae(task)
        if stitch is not None:
            run.stitch_s, run.stitch = estimate, stitch if stitch.frames else None
        with self._lock:
            if shape is not None and task.task_type == "travel_segment":
                self._segments[task.id] = StitchShape(shape.frames, shape.width, shape.height)
                while len(self._segments) > MAX_SEGMENTS:
                    self._segments.pop(next(iter(self._segments)))
            if shape is not None:
                run.loaded_before = shape.model in self._process.loaded
                run.new_shape = (shape.model, shape.tokens) not in self._process.shapes
                run.usual_extra = self._usual_extra(shape, learned) if run.new_shape else 0.0
                self._process.loaded.add(shape.model)
                self._process.resident = shape.model
                self._process.shapes.add((shape.model, shape.tokens))
                if predicted is not None and predicted[2]:
                    self._process.provisional[task.id] = (shape.model, shape.tokens)
            self._running[task.id] = run
            while len(self._running) > MAX_RUNNING:  # abandoned (lease lost, deferred): the oldest go
                self._running.pop(next(iter(self._running)))
        return estimate

    def _pending(self, now: float) -> _Start:
        """What the tasks begun so far leave on the finisher for a task claimed now (they have all handed
        off): the decode, the output in hand. Under the lock."""
        runs = list(self._running.values())
        decode = max((self._decode_left(run, now) for run in runs), default=0.0)
        finish = max((self._finish_left(run, now) for run in runs), default=0.0)
        return _Start(0.0, decode, finish)

    def _stitch_shape(self, task: Task) -> StitchShape:
        """A stitch's length and size from its segments, when this process began them: their frames less
        the overlaps (the stitch's row lists both), at their size."""
        params = params_or_none(task.params_text) or {}
        ids, overlaps = params.get("segments"), params.get("overlaps") or []
        with self._lock:
            seen = [self._segments.get(str(i)) for i in ids] if isinstance(ids, list) else []
        segments = [segment for segment in seen if segment is not None and segment.frames]
        if not segments or len(segments) < len(seen):
            return StitchShape()
        try:
            frames = sum(int(segment.frames or 0) for segment in segments) - sum(int(o) for o in overlaps)
        except (TypeError, ValueError):
            return StitchShape()
        return StitchShape(frames, segments[0].width, segments[0].height) if frames > 0 else StitchShape()

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
            if left is not None and run.times is not None and run.shape is not None:
                left = self._behind_others(run, left, now)
            run.last_remaining, run.last_at = left, now
            return left

    def _behind_others(self, run: _Running, left: float, now: float) -> float:
        """A running task's remaining behind the outputs still being finished (every task begun before it
        has handed off: what it has left is finisher work): a decode it waits for (the VAE, or a switch's
        park), its steps beside a decode it does not wait for (both slower: `share_gpu`), and, when it hands off
        too, the output in hand. Under the lock."""
        assert run.times is not None and run.shape is not None
        times, others = run.times, [other for other in self._running.values() if other is not run]
        if not others:
            return left
        later = 0.0  # how much later the output in hand is done, its decode slowed by this task's steps
        waits = run.needs_vae or (run.with_load and run.stage == "loading_model")
        if self.decode_overlaps and not waits and run.stage in ("loading_model", "encoding_prompt", "denoising"):
            after = times.decode_s + times.write_s  # its own stages after the steps
            if run.stage == "denoising":
                before, steps = 0.0, max(0.0, left - after)
            else:
                steps = times.first_step_extra_s + run.shape.steps * times.step_s
                before = max(0.0, left - steps - after)  # its encode, LoRA files, then a compile (GPU idle)
            pending = max(self._decode_left(other, now) for other in others) - before
            if pending > 0:
                decode_s, longer = share_gpu(pending, steps)
                left += longer
                later = decode_s - pending
        if self.decode_overlaps and run.stage in ("loading_model", "encoding_prompt"):
            # A switch's park, or a pipeline call that uses the VAE, waits for a decode still on the finisher.
            before = None  # seconds left before that point
            if run.stage == "loading_model" and run.with_load:
                before = 0.0
            elif run.needs_vae:
                pipeline = times.compile_s + times.first_step_extra_s + run.shape.steps * times.step_s
                before = max(0.0, left - pipeline - times.decode_s - times.write_s)
            if before is not None:
                left += max(0.0, max(self._decode_left(other, now) for other in others) - before)
        finishing = ("decoding", "writing_video") if run.decode_overlaps else ("writing_video",)
        if run.defers and run.stage not in finishing:
            # One output is finished at a time: this task's (decode and) write start after the one in hand.
            own = times.write_s + (times.decode_s if run.decode_overlaps else 0.0)
            busy = max(self._finish_left(other, now) for other in others) + later
            left += max(0.0, busy - (left - own))
        return left

    @staticmethod
    def _finish_left(run: _Running, now: float) -> float:
        """What a handed-off task has left, from its latest report."""
        if run.last_remaining is None:
            return 0.0
        return max(0.0, run.last_remaining - (now - run.last_at))

    def _decode_left(self, run: _Running, now: float) -> float:
        """A handed-off task's decode still to run on the finisher (its remaining less its write)."""
        if not run.decode_overlaps or run.times is None or run.stage == "writing_video":
            return 0.0
        return max(0.0, self._finish_left(run, now) - run.times.write_s)

    def _remaining(self, run: _Running, progress: dict[str, Any], now: float) -> float | None:
        stage = progress.get("stage")
        step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
        if stage != run.stage:
            if run.stage == "denoising" and run.steps_ended is None:
                run.steps_ended = now
            run.stage, run.stage_started = stage, now
            if stage == "denoising" and run.steps_started is None:
                run.steps_started = now
            elif stage == "decoding" and run.decode_started is None:
                run.decode_started = now
        if stage == "denoising" and step >= 1:
            if run.step_mark is None:
                run.step_mark = (step, now)  # step 1's end: a compile in it is never observed as step time
            elif step > run.step_mark[0]:
                run.observed_steps = step - run.step_mark[0]
                run.observed_step_s = (now - run.step_mark[1]) / run.observed_steps
        if stage == "stitching" and run.stitch_s is not None and total:
            if run.step_mark is None and run.stitch is not None and run.stitch.width and run.stitch.height:
                from worker.live.eta_static import STITCH_START_S

                # Its first report: `total` is the stitched length, and the startup is behind it.
                whole = self._stitch_s(StitchShape(total, run.stitch.width, run.stitch.height), self._learned)
                run.stitch_s = max(0.0, whole - STITCH_START_S)
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
        if run is not None and sample["decode_s"] is not None and _decode_overlapped(result):
            sample = {**sample, "decode_s": self._alone_decode(run, sample["decode_s"])}
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
            # The first step at a token count this process had not run: a new-shape cost beyond what the kind's
            # first step always takes (a VACE task encodes its guide in it), not warm-up.
            usual, extra = (run.usual_extra if run else 0.0), sample["first_step_extra_s"]
            model_sample["new_shape_s"] = max(0.0, extra - usual)
            sample = {**sample, "first_step_extra_s": min(extra, usual) if usual > 0 else None}
        if new_shape:
            sample = {**sample, "cold": True}  # the kind's first run here: a stand-in until a warm one
        if self.store is None:
            return
        self.store.update_eta_stats(key, lambda old: merge_sample(old, sample))
        model_key = {**key, "resolution": MODEL_ROW[0], "frames": MODEL_ROW[1], "memory_profile": ANY_PROFILE}
        if model_sample:
            self.store.update_eta_stats(model_key, lambda old: merge_model_sample(old, model_sample))
        for parked, seconds in sample["parks"]:  # the parked model's own row
            park = {"park_s": seconds}
            self.store.update_eta_stats({**model_key, "model": parked}, lambda old, p=park: merge_model_sample(old, p))
        self.refresh()  # the next estimate (queue ETAs on the page too) uses this task already

    def _alone_decode(self, run: _Running, seconds: float) -> float:
        """A decode that ran on the finisher, as it would have run alone: while another task's steps ran beside
        it (their reports seen here), it ran at DECODE_SHARE of its speed."""
        if run.decode_started is None:
            return seconds
        start, end = run.decode_started, run.decode_started + seconds
        now = self.clock()
        with self._lock:
            windows = [
                (other.steps_started, other.steps_ended if other.steps_ended is not None else now)
                for other in self._running.values()
                if other is not run and other.steps_started is not None
            ]
        shared = min(seconds, sum(max(0.0, min(end, stop) - max(start, begun)) for begun, stop in windows))
        return seconds - (1.0 - DECODE_SHARE) * shared

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
        Assumes one worker serves the queue; with several, the real wait is shorter. Reads the learned rows
        the first time when no task has begun yet (a restarted worker's queue page before its first claim)."""
        if not self._read and self.store is not None:
            try:
                self.refresh()
            except Exception as exc:  # the database may be restarting: walk with what is known
                log.debug("could not read ETA statistics: %s", exc.__class__.__name__)
        with self._lock:
            learned, process = self._learned, self._process.copy()
            start = self._walk_start(current_remaining)
        process.resident = resident_model
        return self._walk(start, process, learned, list(queued))

    def _walk_start(self, remaining: float | None) -> _Start:
        """How long the running task keeps the worker from claiming (its remaining, less what the finisher
        does after its hand-off: its write, and its decode when that overlaps too), when its decode ends and
        when its output is Complete. The latest task begun is the one the loop runs. Under the lock."""
        task_id = next(reversed(self._running), None) if self._running else None
        run = self._running[task_id] if task_id is not None else None
        if remaining is None:
            return _Start(None, 0.0, 0.0)
        if run is None or not self.write_overlaps:
            return _Start(remaining, 0.0, remaining, task_id)
        now = self.clock()
        older = max((self._finish_left(o, now) for o in self._running.values() if o is not run), default=0.0)
        if run.stitch_s is not None:  # a stitch runs on the finisher whole
            return _Start(0.0, 0.0, remaining, task_id)
        if run.times is None or not run.defers:  # no estimate to split; a travel segment writes on the loop
            return _Start(remaining, 0.0, max(older, remaining if run.times is None else 0.0), task_id)
        if run.stage == "writing_video":
            return _Start(0.0, 0.0, remaining, task_id)
        # At "decoding" with the decode overlapped, what is left is all the finisher's: the loop is free.
        write, decode = run.times.write_s, run.times.decode_s if run.decode_overlaps else 0.0
        decode_end = max(0.0, remaining - write) if decode else 0.0
        return _Start(max(0.0, remaining - write - decode), decode_end, remaining, task_id)

    def _walk(self, start: _Start, process: _Process, learned: _Learned, queued: list[Task]) -> dict[str, QueueEta]:
        """Claim the queue in order as the worker would (ModelAffinity, dependencies complete first), the
        loop and the finisher each one task at a time (see the module docstring)."""
        etas: dict[str, QueueEta] = {}
        pending = list(queued)
        queued_ids = {task.id for task in queued}
        ids = set(queued_ids)
        completes: dict[str, float | None] = {}  # when each walked task is Complete (its write included)
        stitches: dict[str, StitchShape] = {}
        waits: dict[str, str] = {}  # stitch -> its orchestrator (which wakes and completes after it)
        started_at: dict[str, float | None] = {}
        clock = start.hold  # None: the running task's end is unknown, so is every start after it
        decode_end, finisher_free = start.decode_end, start.finish_end  # the VAE, the finisher free
        if clock is not None and start.task_id and any(t.dependant_on == start.task_id for t in pending):
            clock = max(clock, finisher_free)  # a queued task waits for the running task's output: it is finished first
        walked = 0.0
        affinity = ModelAffinity(clock=lambda: walked)
        in_hand: str | None = None  # the walked task whose output the finisher holds

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
            cost = self._duration(task, process, learned, stitches.get(task.id))
            begin, complete = clock, None
            if clock is None or cost is None:
                clock = None
            else:
                clock, complete, decode_end, finisher_free, later = _schedule(cost, clock, decode_end, finisher_free)
                if later and in_hand is not None and completes.get(in_hand) is not None:
                    completes[in_hand] = float(completes[in_hand] or 0.0) + later  # its decode beside these steps
                    if in_hand in etas:
                        etas[in_hand] = QueueEta(etas[in_hand].start_in, completes[in_hand])
                in_hand = task.id if cost.handed_off else in_hand
                if cost.handed_off and any(t.dependant_on == task.id for t in pending):
                    clock = complete  # a task waits for this output: the loop finishes it first
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
            if task.id in waits:  # the orchestrator wakes after its stitch (served first) and completes
                orchestrator = waits[task.id]
                clock = None if clock is None or complete is None else max(clock, complete) + ORCHESTRATOR_S
                walked = clock if clock is not None else walked
                etas[orchestrator] = QueueEta(started_at[orchestrator], clock)
            if task.id in queued_ids:
                etas.setdefault(task.id, QueueEta(begin, complete))
        for task in queued:
            etas.setdefault(task.id, QueueEta(started_at.get(task.id), None))
        return etas


def share_gpu(decode_left: float, denoise: float) -> tuple[float, float]:
    """A decode with `decode_left` seconds of its own work left (alone) beside steps of `denoise` seconds (alone)
    that start now: (the decode's seconds until it ends, how much longer the steps take). Both run at their
    share of the GPU (DECODE_SHARE) while both run, then the one left alone at full speed."""
    if decode_left <= 0 or denoise <= 0:
        return max(0.0, decode_left), 0.0
    shared = min(decode_left / DECODE_SHARE, denoise / (1.0 - DECODE_SHARE))
    return decode_left + (1.0 - DECODE_SHARE) * shared, DECODE_SHARE * shared


class _Scheduled(NamedTuple):
    hand_off: float
    complete: float
    decode_end: float  # the VAE free
    finisher_free: float
    later: float = 0.0  # how much later the output in hand is Complete (its decode slowed by this task's steps)


def _schedule(cost: _Cost, begin: float, decode_end: float, finisher_free: float) -> _Scheduled:
    """A task claimed at `begin` while the VAE is busy until `decode_end` and the finisher until `finisher_free`
    (a decode alone): its hand-off, its Complete, then when the VAE and the finisher are free. A task that does
    not wait for the VAE denoises beside the pending decode: both take longer (`share_gpu`)."""
    wait = 0.0 if cost.needs_vae_at is None else max(0.0, decode_end - begin - cost.needs_vae_at)
    hold, later = cost.hold, 0.0
    steps_at = begin + cost.denoise_at
    if cost.needs_vae_at is None and decode_end > steps_at:
        decode_s, longer = share_gpu(decode_end - steps_at, cost.denoise)
        hold += longer
        later = steps_at + decode_s - decode_end
        finisher_free += later
        decode_end = steps_at + decode_s
    hand_off = begin + wait + hold
    if not cost.handed_off:
        return _Scheduled(hand_off, hand_off, decode_end, finisher_free, later)
    hand_off = max(hand_off, finisher_free)  # the hand-off waits for the output in hand
    complete = hand_off + cost.finish
    return _Scheduled(hand_off, complete, hand_off + cost.decode if cost.decode else decode_end, complete, later)


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


def decode_overlaps_here(device: str, profile: str) -> bool:
    """Whether this worker's generations leave their VAE decode to the output finisher: WAN_OVERLAP_DECODE
    for `device` (a GPU name, or "cpu") and a resident model under `profile` (wan_engine.decode_overlap).
    A setting the engine refuses (it fails each generation, saying why) counts as off here."""
    from wan_engine.decode_overlap import decode_overlaps
    from wan_engine.errors import InvalidRequestError

    try:
        return decode_overlaps("cpu" if device == "cpu" else "cuda", profile)
    except InvalidRequestError as exc:
        log.warning("ETA: %s", exc)
        return False
