"""The steps of one generation, called in order by `headless_wgp.WanOrchestrator._run`.

The numbers are those of the `headless_wgp` module docstring: 1. inputs (read by the generate_*
methods; `start_clock` counts their time in the total), 2. experts (`wan_engine.experts.plan_experts`),
3. `lora_requests` + `prepare_loras`, 4. `encode_prompt`, 5. `denoise`, 6. `decode` (5 and 6 run as one
attempt under `memory_ladder`), 7. `write`; `build_result` then records what ran. With `deferred_write`
(the worker's output finisher, issue 15) step 7 is `defer_write`: a `PendingWrite` whose `finish` writes
the video later, on another thread, and completes the result; when the decode overlaps too
(wan_engine.decode_overlap), step 6 moves into that `finish` as well. Each step emits its
progress event as it begins; the orchestrator marks the clock as each one ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from wan_engine import latent_preview
from wan_engine.decode_overlap import OverlappedDecode
from wan_engine.errors import InvalidRequestError
from wan_engine.experts import ExpertPlan, ExpertRecorder, expert_boundary, phased_transformer
from wan_engine.fp8 import FP8_ENV
from wan_engine.generation_params import ResolvedParams
from wan_engine.generation_types import GenerationResult, ProgressCallback, ProgressEvent
from wan_engine.lora_downloads import is_lora_url, preset_lora_path
from wan_engine.loras import (
    LoraRequest,
    LoraState,
    apply_loras,
    describe_loras,
    parse_lora_multipliers,
    resolve_lora_path,
)
from wan_engine.memory_profiles import apply_profile, next_profile, tile_vae
from wan_engine.pipeline_runtime import LoadedModel, decode_latents, encode_prompts, scheduled, vae_dtype_name
from wan_engine.single_file import checkpoint_reports
from wan_engine.solvers import solver_scheduler
from wan_engine.speed import task_compile
from wan_engine.video_io import StagedOutputs, active_staging, mp4_encoding, write_video

logger = logging.getLogger("headless_wgp")  # the orchestrator's logger: its log lines keep their source name

MAX_SEQUENCE_LENGTH = 512  # Wan's text length; the pipelines' __call__ default
T = TypeVar("T")


def emit(progress: ProgressCallback | None, stage: str, step: int = 0, total: int = 1) -> None:
    """Report a stage (or a finished denoising step) to `progress`, if any."""
    # Exceptions from the callback (cancel / shutdown) propagate on purpose.
    if progress is not None:
        progress(ProgressEvent(stage=stage, step=step, total_steps=total))  # type: ignore[arg-type]


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process so far (Linux/macOS getrusage; current RSS elsewhere)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes vs KiB
    except (ImportError, OSError):
        import psutil

        return psutil.Process().memory_info().rss / 1024**3


# ----- what a run carries from step to step ------------------------------------------------------------


@dataclass
class RunClock:
    """When the run started (its inputs included) and a perf_counter mark as each step ends."""

    started: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        """Note that `step` ends now (a retried step's later mark replaces the earlier one)."""
        self.marks[step] = time.perf_counter()

    def timings(self, inputs_seconds: float, step_times: list[float]) -> dict[str, Any]:
        """Seconds per step, the total and the per-step denoising times, as result.timings records them.

        Before a deferred write ran (`PendingWrite`), `write` is None and `total` ends with the decode (with
        an overlapped decode still to run, `decode` is None too and `total` ends with the denoising);
        `PendingWrite.finish` fills them in when they really ran."""
        m = self.marks
        steps = len(step_times)
        end = m.get("write", m.get("decode", m["denoise"]))
        return {
            "inputs": inputs_seconds,
            "loras": m["loras"] - m["prepared"],
            "encode": m["encode"] - m["loras"],
            "denoise": m["denoise"] - m["encode"],
            "decode": m["decode"] - m["denoise"] if "decode" in m else None,
            "write": m["write"] - m["decode"] if "write" in m else None,
            "total": end - self.started,
            "step_times": step_times,
            "mean_step": sum(step_times) / steps if steps else None,
        }


@dataclass
class DenoiseState:
    """What the denoising loop observes step by step; cleared when the memory ladder retries."""

    recorder: ExpertRecorder = field(default_factory=ExpertRecorder)
    step_times: list[float] = field(default_factory=list)
    timesteps: list[Any] = field(default_factory=list)  # device tensors: float() per step would sync the GPU
    last_mark: float = field(default_factory=time.perf_counter)

    def step_ended(self, index: int, timestep: Any) -> None:
        """Record step `index`: its time since the last mark and its timestep."""
        self.step_times.append(time.perf_counter() - self.last_mark)
        self.timesteps.append(timestep)
        self.recorder.step = index + 1  # transformer calls from here on belong to the next step

    def reset(self) -> None:
        """Forget a failed attempt's steps (the retry starts from step 0)."""
        self.step_times.clear()
        self.timesteps.clear()
        self.recorder.reset()


@dataclass(frozen=True)
class AppliedLoras:
    """The LoRAs a call asked for and what is loaded on the pipeline for them."""

    requests: list[LoraRequest]
    state: LoraState


def start_clock(loaded: LoadedModel, inputs_seconds: float) -> RunClock:
    """1. Inputs are read: start the clock (backdated by their time) and the peak-VRAM count."""
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    return RunClock(started=time.perf_counter() - inputs_seconds)


# ----- 3. LoRAs ------------------------------------------------------------------------------------------


def lora_requests(
    loaded: LoadedModel,
    p: ResolvedParams,
    loras_dirs: Path | Sequence[Path],
    plan: ExpertPlan | None = None,
    *,
    allow_download: bool = False,
) -> list[LoraRequest]:
    """Resolve names and parse multipliers before any work (errors name the bad entry).

    Names are looked up in each LoRA folder in order (the model's group and Wan2GP subfolders first);
    a preset's LoRA given as a URL (Wan2GP `model.loras`) is its file name there, fetched into the
    first folder with `allow_download`. On a phased plan (3-phase guidance) `a;b;c` multipliers
    follow the guidance phases.
    """
    if not p.lora_names:
        return []
    if loaded.fp8 is not None:
        raise InvalidRequestError(
            f"loras {list(p.lora_names)}: this worker runs {loaded.preset.key!r} with fp8 weights ({FP8_ENV}=on), "
            "and LoRAs cannot be applied to fp8 layers; send the task to a worker without fp8"
        )
    phased = plan is not None and plan.phased
    multipliers = parse_lora_multipliers(
        p.lora_multipliers,
        len(p.lora_names),
        dual=loaded.is_dual_expert or phased,
        guidance_phases=p.guidance_phases,
        model_switch_phase=p.model_switch_phase,
    )
    if phased and plan is not None and plan.phases is not None:
        multipliers = tuple(m.for_phases(plan.phases) for m in multipliers)
    model = loaded.preset.model
    requests = []
    for name, multiplier in zip(p.lora_names, multipliers, strict=True):
        if p.loras_from_preset and is_lora_url(name):
            path = preset_lora_path(name, loras_dirs, model.lora_subdirs, allow_download=allow_download)
        else:
            path = resolve_lora_path(name, loras_dirs, model.group, subdirs=model.lora_subdirs)
        requests.append(LoraRequest(name, path, multiplier))
    return requests


def prepare_loras(loaded: LoadedModel, requests: list[LoraRequest], plan: ExpertPlan) -> AppliedLoras:
    """Load (or reuse, or unload) so the pipeline holds exactly `requests`, weighted for step 0."""
    state = apply_loras(loaded.pipe, loaded.loras, requests, plan.experts)
    plan.set_lora_weights(loaded.pipe, state, requests, 0)
    return AppliedLoras(requests=requests, state=state)


# ----- 4. encode, 5. denoise, 6. decode, 7. write --------------------------------------------------------


def encode_prompt(
    loaded: LoadedModel, p: ResolvedParams, progress: ProgressCallback | None, plan: ExpertPlan | None = None
) -> tuple[Any, Any]:
    """Embeddings of the prompt and (with CFG) the negative prompt, computed once per call."""
    emit(progress, "encoding_prompt")
    return encode_prompts(
        loaded.pipe,
        p.prompt,
        p.negative_prompt,
        # diffusers' rule: CFG for both experts hangs on guidance_scale; a phased run's phases decide
        do_cfg=plan.needs_negative(p) if plan is not None else p.guidance_scale > 1.0,
        device=loaded.device,
        max_length=MAX_SEQUENCE_LENGTH,
    )


def _step_callback(
    loaded: LoadedModel,
    total: int,
    *,
    plan: ExpertPlan,
    loras: AppliedLoras,
    state: DenoiseState,
    progress: ProgressCallback | None,
) -> Callable[..., dict[str, Any]]:
    """diffusers' callback_on_step_end: step timing, the next step's LoRA weights, progress (and cancel)."""

    def on_step_end(_pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        state.step_ended(index, timestep)
        plan.set_lora_weights(loaded.pipe, loras.state, loras.requests, index + 1)
        emit(progress, "denoising", index + 1, total)
        latent_preview.on_step(index + 1, total, callback_kwargs)  # live preview (issue 16): no-op unless subscribed
        state.last_mark = time.perf_counter()
        return callback_kwargs

    return on_step_end


def denoise(
    loaded: LoadedModel,
    p: ResolvedParams,
    *,
    call: dict[str, Any],
    embeds: tuple[Any, Any],
    plan: ExpertPlan,
    loras: AppliedLoras,
    state: DenoiseState,
    progress: ProgressCallback | None,
    pipe: Any = None,
) -> torch.Tensor:
    """Run the pipeline's denoising loop on `pipe` (default: the loaded one) and return the latents."""
    emit(progress, "denoising", 0, p.num_inference_steps)
    prompt_embeds, negative_embeds = embeds
    kwargs: dict[str, Any] = {
        **call,
        "prompt_embeds": prompt_embeds,
        # A phased run's guidance is PhasedTransformer's (it holds the negative embeddings), not the pipeline's.
        "negative_prompt_embeds": None if plan.phased else negative_embeds,
        "height": p.height,
        "width": p.width,
        "num_frames": p.video_length,
        "num_inference_steps": p.num_inference_steps,
        "generator": torch.Generator(device="cpu").manual_seed(p.seed),  # fresh per attempt: a retry is identical
        "output_type": "latent",  # decode ourselves, to time the VAE on its own
        "callback_on_step_end": _step_callback(
            loaded, p.num_inference_steps, plan=plan, loras=loras, state=state, progress=progress
        ),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        **plan.pipeline_guidance(p),  # guidance_scale (+ guidance_scale_2 on two experts)
    }
    state.last_mark = time.perf_counter()
    with (
        scheduled(loaded, p.flow_shift, pipe) as run_pipe,
        expert_boundary(loaded, run_pipe, plan.boundary),
        state.recorder.attached(run_pipe),  # on the real experts, before a phased run's stand-in takes the slot
        # issue 15: compiled or eager as it pays; constant-multiplier LoRAs fused so they run compiled
        task_compile(
            loaded.speed,
            run_pipe,  # before a phased run's stand-in takes the transformer slot
            width=p.width,
            height=p.height,
            frames=p.video_length,
            steps=p.num_inference_steps,
            cfg=negative_embeds is not None,
            lora_state=loras.state,
            lora_requests=loras.requests,
            experts_per_step=plan.experts,
        ),
        phased_transformer(run_pipe, plan, negative_embeds),
    ):
        if p.sample_solver is not None:  # Wan2GP's sample_solver (restored with the base scheduler after)
            run_pipe.scheduler = solver_scheduler(loaded.base_scheduler, p.sample_solver, p.flow_shift)
        return run_pipe(**kwargs).frames


def decode(
    loaded: LoadedModel, latents: torch.Tensor, num_reference_images: int, progress: ProgressCallback | None
) -> np.ndarray:
    """Decode with the VAE (VACE reference frames are dropped first)."""
    emit(progress, "decoding")
    return decode_latents(loaded.pipe, latents, num_reference_images)


def memory_ladder(
    loaded: LoadedModel, profile: str, attempt: Callable[[], T], *, on_retry: Callable[[], None]
) -> tuple[T, str, list[dict[str, Any]]]:
    """Run `attempt`; on out-of-memory step one memory profile down (tiled VAE) and run it again.

    Returns its value, the profile it finally ran under and the profiles that ran out of memory.
    The retry is part of the same generation: same seed, same inputs.
    """
    ladder: list[dict[str, Any]] = []
    while True:
        try:
            return attempt(), profile, ladder
        except torch.OutOfMemoryError as exc:
            lower = next_profile(profile)
            if lower is None:
                raise
            ladder.append({"profile": profile, "error": str(exc).splitlines()[0][:200]})
            logger.warning("out of memory; retrying", extra={"model": loaded.preset.key, "profile": lower})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with loaded.vae_gate:  # an overlapped decode of the previous task may be using the VAE
                apply_profile(loaded.pipe, lower, loaded.device, current=loaded.profile)
                loaded.profile = profile = lower
                tile_vae(loaded.pipe)
            on_retry()


def write(frames: np.ndarray, output_path: Path, fps: int, progress: ProgressCallback | None) -> Path:
    """Write the video atomically (temp name + rename); a single frame becomes a PNG."""
    emit(progress, "writing_video")
    return write_video(frames, output_path, fps)


# Test hook of the kill -9 suite (tests/reliability/test_crash_output_stage.py): a deferred write sends half its
# frames, creates `<dir>/<stem>.paused` and waits for `<dir>/<stem>.resume`, so a test can SIGKILL the worker
# while an output is half-encoded on the finisher thread. Unset (always, outside that suite): no effect.
PAUSE_IN_WRITE_ENV = "WAN_TEST_PAUSE_IN_WRITE"


def _paused_midway(frames: np.ndarray, stem: str, check: Callable[[], None] | None) -> Iterator[np.ndarray]:
    """`frames` one by one, `check` before each (a cancel raises out of the encode); the test pause midway."""
    pause_dir = os.environ.get(PAUSE_IN_WRITE_ENV)
    for index, frame in enumerate(frames):
        if check is not None:
            check()
        if pause_dir and index == max(1, len(frames) // 2):
            _wait_for_resume(Path(pause_dir), stem, check)
        yield frame


def _wait_for_resume(directory: Path, stem: str, check: Callable[[], None] | None) -> None:
    (directory / f"{stem}.paused").touch()
    logger.warning("test hook %s: write of %s paused", PAUSE_IN_WRITE_ENV, stem)
    while not (directory / f"{stem}.resume").exists():
        if check is not None:
            check()
        time.sleep(0.05)


@dataclass
class PendingWrite:
    """A generation whose frames are not yet written (`deferred_write=True`, issue 15).

    Steps 1-6 ran on the caller's thread, or 1-5 when the decode overlaps the next task (`decode` set:
    wan_engine.decode_overlap); `finish` runs the rest (the decode on its own CUDA stream, the CPU-bound MP4
    encode and write) on any thread, without the orchestrator's lock, and returns the full `GenerationResult`.
    `result` was built when the GPU work on the caller's thread ended, so what was measured there (peak VRAM of
    the denoising, the compile decision) is this generation's, whatever runs on the GPU meanwhile.
    """

    frames: np.ndarray | None  # (F, H, W, 3) as decoded: float in [0, 1] (or uint8); None until `decode` ran
    output_path: Path
    fps: int
    result: GenerationResult  # timings' write None (and decode None with `decode`), total up to what ran
    clock: RunClock
    staging: StagedOutputs | None  # the runner's staged_outputs() block, captured on its thread
    decode: OverlappedDecode | None = None  # the decode still to run, overlapping the next task

    def finish(
        self, progress: ProgressCallback | None = None, check: Callable[[], None] | None = None
    ) -> GenerationResult:
        """Write the video (staged when the generation ran in a staging block) and return the result.

        `check` runs before the decode and before each frame is encoded: whatever it raises (a cancel) stops
        the work and removes the partial file. `decode` (when it ran here), `write` and `total` in the timings
        are measured here, when they really ran."""
        if self.decode is not None:
            self.result = self._decode(self.result, progress, check)
        result = self.result
        emit(progress, "writing_video")
        started = time.perf_counter()
        assert self.frames is not None  # decoded on the caller's thread or just above
        frames = _paused_midway(self.frames, self.output_path.stem, check)
        written = write_video(frames, self.output_path, self.fps, staging=self.staging)
        self.clock.mark("write")
        ended = self.clock.marks["write"]
        timings = {**result.timings, "write": ended - started, "total": ended - self.clock.started}
        extra = {
            **result.extra,
            "write_overlapped": True,  # encoded on the worker's finisher thread while the next task ran
            "write_queued_s": round(started - self.clock.marks["decode"], 4),  # decode end -> write start
        }
        result = replace(result, output_path=written, timings=timings, extra=extra)
        _log_finished(result)
        return result

    def _decode(
        self, result: GenerationResult, progress: ProgressCallback | None, check: Callable[[], None] | None
    ) -> GenerationResult:
        """The overlapped decode (step 6): frames, the result's real frame size and the decode's timings."""
        assert self.decode is not None
        try:
            if check is not None:
                check()
        except BaseException:
            self.decode.discard()  # cancelled before its decode: nothing left to run
            raise
        emit(progress, "decoding")
        queued = time.perf_counter() - self.clock.marks["denoise"]
        self.frames = self.decode.run()
        self.clock.mark("decode")
        frames = self.frames
        timings = {**result.timings, "decode": self.decode.seconds}
        extra = {
            **result.extra,
            # issue 15: decoded on the finisher's CUDA stream while the next task ran; the wait is the time from
            # the denoising's end to the decode's start (the previous output, a VAE user on the loop)
            "decode_overlap": {**self.decode.report(), "queued_s": round(queued, 4)},
            "video_encoding": mp4_encoding() if frames.shape[0] > 1 else None,
        }
        self.decode = None  # done: a second finish (a retried write) writes these frames again
        return replace(
            result,
            frames=int(frames.shape[0]),
            width=int(frames.shape[2]),
            height=int(frames.shape[1]),
            timings=timings,
            extra=extra,
        )


# ----- the result ----------------------------------------------------------------------------------------


def build_result(
    loaded: LoadedModel,
    p: ResolvedParams,
    *,
    frame_shape: tuple[int, ...],
    written_path: Path,
    clock: RunClock,
    state: DenoiseState,
    plan: ExpertPlan,
    loras: AppliedLoras,
    profile: str,
    ladder: list[dict[str, Any]],
    profile_requested: str,
    mode: str,
    notes: dict[str, Any] | None,
    inputs_seconds: float,
) -> GenerationResult:
    """What ran, as the caller's result_data records it (and a log line saying it finished).

    `frame_shape`: the decoded frames' shape (F, H, W, ...), or the expected one while the decode still has to
    run (`PendingWrite.finish` then sets the real one)."""
    steps = len(state.step_times)
    on_cuda = loaded.device.type == "cuda"
    result = GenerationResult(
        output_path=written_path,
        model=loaded.preset.key,
        seed=p.seed,
        seed_was_random=p.seed_was_random,
        frames=int(frame_shape[0]),
        width=int(frame_shape[2]),
        height=int(frame_shape[1]),
        fps=p.fps,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        flow_shift=p.flow_shift,
        **plan.reported(p),  # guidance2_scale, switch_threshold
        timesteps=tuple(float(t) for t in state.timesteps),
        experts_used=plan.observed(state.recorder, steps),
        timings=clock.timings(inputs_seconds, state.step_times),
        memory_profile=profile,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        peak_vram_gb=torch.cuda.max_memory_allocated(loaded.device) / 1024**3 if on_cuda else None,
        peak_rss_gb=peak_rss_gb(),
        video_length_adjusted_from=p.video_length_adjusted_from,
        extra={
            "transformer_calls_per_step": list(state.recorder.calls_per_step(steps)),
            "memory_profile_requested": profile_requested,
            "memory_profile_ladder": ladder,  # profiles that ran out of memory before this one
            "negative_prompt": p.negative_prompt,
            "speed": loaded.speed.brief() if loaded.speed else None,  # with this task's compile decision
            "video_encoding": mp4_encoding() if frame_shape[0] > 1 else None,  # issue 15: H.264 settings (PNG: none)
            "fp8": loaded.fp8,
            "vae_dtype": vae_dtype_name(loaded.pipe),  # WAN_VAE_PRECISION: float32 (default), float16, bfloat16
            "guidance_phases": plan.phase_report(p),  # None unless phased (3-phase guidance)
            "sample_solver": p.sample_solver,
            "checkpoint": checkpoint_reports(loaded.pipe),  # transformers read from checkpoint files (issue 14)
        },
        mode=mode,
        inputs=notes or {},
        loras=[
            {**record, "from_preset": p.loras_from_preset}
            for record in describe_loras(loras.state, loras.requests, plan.experts, plan.dual)
        ],
    )
    if "write" in clock.marks:
        _log_finished(result)
    return result


def _log_finished(result: GenerationResult) -> None:
    seconds = round(result.timings["total"], 3)
    logger.info(
        "generation finished",
        extra={"model": result.model, "mode": result.mode, "seed": result.seed, "seconds": seconds},
    )


def defer_write(
    decoded: np.ndarray | OverlappedDecode, output_path: Path, fps: int, result: GenerationResult, clock: RunClock
) -> PendingWrite:
    """7. deferred: the decoded frames (or the decode still to run) and `result` (built now) as a `PendingWrite`;
    the write (and that decode) runs later."""
    staging = active_staging()  # a ContextVar: the finisher thread would not see the runner's block
    # Kept as decoded (float): the uint8 conversion runs frame by frame in the writer, off the critical path
    # (a whole-array conversion took 0.9 s for 81 frames of 832x480 on a 2-core host). At most one write is
    # pending per worker, so this is one video's frames held a little longer.
    if isinstance(decoded, OverlappedDecode):
        return PendingWrite(None, Path(output_path), fps, result, clock, staging, decode=decoded)
    return PendingWrite(decoded, Path(output_path), fps, result, clock, staging)
