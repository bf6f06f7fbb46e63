"""WanOrchestrator: model presets -> resident diffusers pipelines -> generated videos.

The orchestrator keeps at most one model resident, loads another only when asked, and runs
generations on it: text-to-video, VACE (control video + mask + reference images) and image-to-video
(start image, optionally an end image). A generation reads like the diffusers pipelines it drives
(`WanOrchestrator._run`; the steps live in `wan_engine.generation_run`):
1. inputs: resolve + validate params and read the conditioning files,
2. experts: plan which transformer runs each step (Wan 2.2 boundary; `wan_engine.experts`),
3. LoRAs: resolve them, load exactly this call's set and weight it for step 0,
4. encode the prompt once,
5. denoise (progress/cancel per step, LoRA schedules; on out-of-memory 5-6 retry one memory profile lower),
6. decode with the VAE,
7. write the video atomically (or, with `deferred_write`, hand the decoded frames back as a `PendingWrite`
   whose `finish` writes them later on another thread: the worker overlaps it with its next task).
Nothing here knows about the task queue.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_engine import generation_run as gen
from wan_engine import single_file
from wan_engine.decode_overlap import (
    OverlappedDecode,
    decode_overlaps,
    denoise_uses_vae,
    no_room_for_overlap,
    overlap_setting,
)
from wan_engine.errors import InvalidRequestError, ModelUnavailableError
from wan_engine.experts import plan_experts
from wan_engine.fp8 import check_fp8_device, fp8_from_env
from wan_engine.generation_inputs import prepare_i2v_image, prepare_vace_inputs
from wan_engine.generation_params import ResolvedParams, resolve_params
from wan_engine.generation_run import PendingWrite
from wan_engine.generation_types import GenerationResult, ProgressCallback, ProgressEvent
from wan_engine.limits import (
    DEFAULT_CONTROL_SCALE,
    MAX_CONTROL_SCALE,
    MAX_IMAGE_REFS,
    MIN_CONTROL_SCALE,
    MODE_ARCHITECTURES,
)
from wan_engine.memory_profiles import (
    DEFAULT_VRAM_FRACTION,
    PROFILE_CHOICES,
    apply_profile,
    apply_vram_limit,
    choose_profile,
    device_budget_bytes,
    profile_for_device,
    tile_vae,
    vram_limit_from_env,
)
from wan_engine.model_cache import ModelCache
from wan_engine.model_sources import check_model, resolve_model
from wan_engine.pipeline_runtime import (
    LoadedModel,
    check_image_conditioning,
    detach_weights,
    expected_frame_shape,
    load_pipeline,
)
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets, split_dirs
from wan_engine.process_warmup import WarmupReport, speed_path_compiles, warm_process
from wan_engine.vae_precision import vae_dtype_from_env
from wan_engine.video_io import OpenedInput
from wan_engine.vram import estimate_vram

__all__ = ["GenerationResult", "PendingWrite", "ProgressCallback", "ProgressEvent", "WanOrchestrator"]

logger = logging.getLogger(__name__)

T2V_ARCHITECTURES = (*MODE_ARCHITECTURES["t2v"], "vace")  # a VACE model without a guide video is plain T2V
I2V_ARCHITECTURES = MODE_ARCHITECTURES["i2v"]
# The checkout's loras/, or in a wheel install the packaged README-only wan_engine/_loras (one resolver for both).
from wan_engine.presets import BUILTIN_LORAS_DIR  # noqa: E402


class WanOrchestrator:
    """Loads Wan models from presets and generates videos with them, one resident model at a time.

    `presets` defaults to the built-in `defaults/` presets with `presets_dir` (user files; several
    directories allowed, later ones on top) layered on top. LoRAs are looked up by name in `loras_dir`
    (one folder or several, in order; default: the repository's `loras/`).
    `device` defaults to CUDA when available, else CPU; `dtype` to bfloat16 on CUDA and float32 on
    CPU. Methods are serialised by a lock: one load or generation at a time (a `PendingWrite.finish`
    runs outside it). `supports_deferred_write` tells the worker's runner it may pass `deferred_write=True`.
    `warm_up`: import the engine's lazy modules and warm CUDA and the compiler stack now, so the first load
    does not pay for them (wan_engine.process_warmup; `warmup` reports it).
    """

    supports_deferred_write = True

    def __init__(
        self,
        models_dir: Path,
        presets: PresetRegistry | None = None,
        *,
        presets_dir: Path | Sequence[Path] | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        allow_download: bool = False,
        loras_dir: Path | Sequence[Path] | None = None,
        memory_profile: str = "auto",
        vram_fraction: float = DEFAULT_VRAM_FRACTION,
        fp8: bool | None = None,
        vram_limit_gb: float | None = None,
        warm_up: bool = True,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.loras_dirs = split_dirs(loras_dir) or (BUILTIN_LORAS_DIR,)  # looked in in order
        self.allow_download = allow_download  # fetch missing Hub weights on load (off: never touch the network)
        self.presets = presets if presets is not None else load_presets(BUILTIN_PRESETS_DIR, presets_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if memory_profile not in PROFILE_CHOICES:
            raise InvalidRequestError(f"memory_profile {memory_profile!r}: allowed {', '.join(PROFILE_CHOICES)}")
        self.memory_profile = memory_profile  # default for tasks that name none
        self.vram_fraction = vram_fraction
        self.fp8 = fp8_from_env() if fp8 is None else fp8  # lossy, off by default (WAN_FP8)
        self.vae_dtype = vae_dtype_from_env(self.device)  # WAN_VAE_PRECISION (a bad value raises here, not at a load)
        overlap_setting()  # WAN_OVERLAP_DECODE, likewise
        if self.fp8:
            check_fp8_device(self.device)
        limit = vram_limit_from_env() if vram_limit_gb is None else vram_limit_gb
        self.vram_limit_fraction = apply_vram_limit(self.device, limit)  # WAN_VRAM_LIMIT_GB: share or emulate a GPU
        self._loaded: LoadedModel | None = None
        self._lock = threading.RLock()
        self.model_cache = ModelCache.from_env(self.device)  # recently used models in pinned RAM (WAN_PINNED_CACHE_GB)
        # Imports, CUDA handles and the compiler stack of the first load, paid here: in a worker, at start-up.
        self.warmup: WarmupReport | None = (
            warm_process(self.device, compiler=speed_path_compiles()) if warm_up else None
        )

    @property
    def loras_dir(self) -> Path:
        """The first LoRA folder (preset LoRAs given by URL are downloaded there)."""
        return self.loras_dirs[0]

    # ----- model residency -------------------------------------------------------------------------

    @property
    def current_model(self) -> str | None:
        """Preset key of the resident model, or None."""
        return self._loaded.preset.key if self._loaded is not None else None

    @property
    def model_reloaded_because(self) -> str | None:
        """Why the resident model was last loaded again from disk (its weight files changed); None otherwise."""
        return self._loaded.reloaded_because if self._loaded is not None else None

    def needs_reload(self, model_key: str) -> str | None:
        """When `model_key` is resident but a weight file it was loaded from changed: what changed (stat only).

        None when it is not resident (a plain load is needed, not a reload) or its files are as loaded.
        """
        with self._lock:
            if self._loaded is None or self._loaded.preset.key != model_key:
                return None
            return self._loaded.weight_files.changed()

    def load_model(self, model_key: str, *, progress: ProgressCallback | None = None) -> float:
        """Make `model_key` the resident model; return the seconds spent (0.0 if already resident).

        The weights are located before the previous model is dropped, so a missing model
        (`ModelUnavailableError`) or an unknown key (`UnknownModelError`) leaves the resident one.
        A resident (or parked) model whose weight files changed since its load is dropped and loaded
        again (`model_reloaded_because`); if the changed files no longer load, nothing stays resident.
        """
        with self._lock:
            preset = self.presets.get(model_key)
            reason = self._drop_if_changed(model_key)
            if reason is None and self.current_model == model_key:
                return 0.0
            parked = model_key in self.model_cache  # switching back: a copy from pinned RAM, no disk read
            check = None if parked else resolve_model(preset, self.models_dir, allow_download=self.allow_download)
            if check is not None and check.modules and not hasattr(single_file, "load_transformer_with_modules"):
                raise ModelUnavailableError(
                    f"Model {model_key!r}: merging Wan2GP module files onto the base transformer is not supported "
                    f"yet ({', '.join(str(m) for m in check.modules)}); use a definition whose URLs name a "
                    "transformer that already holds the VACE blocks (e.g. a diffusers VACE folder)"
                )
            gen.emit(progress, "loading_model")
            started = time.perf_counter()
            # Free the device before the new weights arrive: park the old model in pinned RAM if it fits
            # (only a resident one: an offloaded model's weights already live in host RAM).
            old = self._loaded
            # An overlapped decode of the old model's last task must end before its VAE moves or goes.
            with old.vae_gate if old is not None else nullcontext():
                if old is None or not old.resident or not self.model_cache.park(old.preset.key, old, keep=model_key):
                    self.unload_model()
            self._loaded = None
            restored = self.model_cache.take(model_key) if parked else None
            if restored is not None:
                detach_weights(restored.pipe)  # no-op unless it still aliased a file (it was detached at load)
            loaded = restored or load_pipeline(
                preset,
                check,  # type: ignore[arg-type]
                self.device,
                self.dtype,
                fp8=self.fp8,
                vae_dtype=self.vae_dtype,
                resident=self._load_resident(preset, check),  # type: ignore[arg-type]
                models_dir=self.models_dir,
            )
            loaded.reloaded_because = reason
            self._loaded = loaded
            self.model_cache.reserve(model_key, loaded)  # pin the slab its next park needs, in the background
            seconds = time.perf_counter() - started
            logger.info("model loaded", extra={"model": model_key, "seconds": round(seconds, 3)})
            return seconds

    def _drop_if_changed(self, model_key: str) -> str | None:
        """Drop `model_key` (resident, or parked in the pinned cache) when a weight file of it changed.

        Returns what changed (None: nothing, or `model_key` is neither resident nor parked). Stat only.
        """
        resident = self._loaded if self._loaded is not None and self._loaded.preset.key == model_key else None
        held = resident or self.model_cache.peek(model_key)
        reason = held.weight_files.changed() if held is not None else None
        if reason is None:
            return None
        logger.warning("reloading model %s: %s", model_key, reason, extra={"model": model_key, "reload_reason": reason})
        if resident is not None:
            self.unload_model()  # discards its pinned copy too
        else:
            self.model_cache.discard(model_key)
        return reason

    def _load_resident(self, preset: Any, check: Any) -> bool:
        """Whether a fresh load goes straight onto the device: always off CUDA and with profile `gpu`;
        never with an offload profile; with `auto`, when the all-resident estimate at the preset's default
        size fits the VRAM budget (otherwise the first task's profile places the weights from host RAM, so
        they never have to fit whole)."""
        if self.device.type != "cuda" or self.memory_profile == "gpu":
            return True
        if self.memory_profile != "auto":
            return False
        estimate = estimate_vram(preset, check, fp8=self.fp8)
        if estimate is None:
            return True  # nothing says how big it is: try, the OOM ladder catches it
        return estimate.profiles["gpu"] <= device_budget_bytes(self.device) * self.vram_fraction

    def unload_model(self) -> None:
        """Drop the resident model and return its memory (host and GPU)."""
        with self._lock:
            if self._loaded is None:
                return
            key = self._loaded.preset.key
            # An overlapped decode still using this model's VAE ends first, so its memory really is returned.
            with self._loaded.vae_gate:
                self._loaded = None
                self.model_cache.discard(key)  # its pinned copy too, if it had one
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            logger.info("model unloaded", extra={"model": key})

    def is_vace(self) -> bool:
        """True when the resident model is a VACE model (control video + mask + references)."""
        return self._loaded is not None and self._loaded.preset.model.architecture == "vace"

    @property
    def pipeline(self) -> Any:
        """The resident diffusers pipeline, or None (context parallelism splits its transformers)."""
        return self._loaded.pipe if self._loaded is not None else None

    # ----- generation ------------------------------------------------------------------------------

    def generate_t2v(
        self,
        prompt: str,
        *,
        output_path: Path,
        progress: ProgressCallback | None = None,
        deferred_write: bool = False,
        **params: Any,
    ) -> GenerationResult | PendingWrite:
        """Generate a video from text with the resident model and write it to `output_path`.

        `params` are the common task parameters (negative_prompt, resolution, video_length,
        num_inference_steps, guidance_scale, guidance2_scale, flow_shift, switch_threshold, seed,
        fps, lora_names, lora_multipliers); they override the preset's settings, which override the
        built-in defaults. A single frame is written as `<output_path stem>.png`. If `progress`
        raises, the exception propagates unchanged and no output file is left behind.

        With `deferred_write=True` (every generate_* method) nothing is written yet: the call returns a
        `PendingWrite` holding the decoded frames, whose `finish()` writes the video and returns the full
        result, on any thread and without this orchestrator's lock (the worker's output finisher, issue 15).
        """
        with self._lock:
            loaded = self._require(T2V_ARCHITECTURES, "text-to-video")
            resolved = self._resolve(loaded, prompt, params)
            return self._run(
                loaded, resolved, Path(output_path), progress, mode="t2v", call={}, deferred=deferred_write
            )

    def generate_vace(
        self,
        prompt: str,
        *,
        video_guide: Path | OpenedInput | np.ndarray | None,
        video_mask: Path | OpenedInput | np.ndarray | None = None,
        image_refs: list[Path | OpenedInput] | None = None,
        control_scale: float = 1.0,
        output_path: Path,
        progress: ProgressCallback | None = None,
        deferred_write: bool = False,
        **params: Any,
    ) -> GenerationResult | PendingWrite:
        """VACE generation: follow a control video (`video_guide`), keep what `video_mask` marks black.

        Guide and mask may also be in-memory (F, H, W, 3) uint8 frames (travel segments build them).

        Guide and mask are MP4 (or other ffmpeg) videos or single PNG/JPEG images, fitted to the
        target resolution (cover + center-crop) and aligned to `video_length` (a short guide is padded
        with neutral grey frames, a long one trimmed); `image_refs` are reference images;
        `control_scale` weighs the control signal. result_data records what was done to each input.
        Other params as `generate_t2v`.
        """
        with self._lock:
            loaded = self._require(("vace",), "VACE")
            if video_guide is None:
                raise InvalidRequestError(
                    f"Model {loaded.preset.key!r} is a VACE model: a vace generation needs video_guide "
                    "(a control video or image)."
                )
            scale = _control_scale(control_scale)
            refs = _image_refs(image_refs)
            resolved = self._resolve(loaded, prompt, params)
            started = time.perf_counter()
            inputs = prepare_vace_inputs(
                video_guide if isinstance(video_guide, np.ndarray) else _input_file(video_guide),
                video_mask if video_mask is None or isinstance(video_mask, np.ndarray) else _input_file(video_mask),
                refs,
                width=resolved.width,
                height=resolved.height,
                num_frames=resolved.video_length,
            )
            call = {
                "video": inputs.video,
                "mask": inputs.mask,
                "reference_images": inputs.reference_images or None,
                "conditioning_scale": float(scale),
            }
            notes = {**inputs.notes, "control_scale": float(scale)}
            return self._run(
                loaded,
                resolved,
                Path(output_path),
                progress,
                mode="vace",
                call=call,
                notes=notes,
                inputs_seconds=time.perf_counter() - started,
                num_reference_images=len(inputs.reference_images),
                deferred=deferred_write,
            )

    def generate_i2v(
        self,
        prompt: str,
        *,
        image_start: Path | OpenedInput | None,
        image_end: Path | OpenedInput | None = None,
        output_path: Path,
        progress: ProgressCallback | None = None,
        deferred_write: bool = False,
        **params: Any,
    ) -> GenerationResult | PendingWrite:
        """Image-to-video from `image_start`; with `image_end`, first-last-frame interpolation.

        Runs Wan 2.1 I2V / FLF2V (CLIP image encoder), Wan 2.2 I2V A14B (two experts; an end image
        works too) and Wan 2.2 TI2V-5B (start image only). Images are fitted to the target
        resolution (cover + center-crop), recorded in result_data. Other params as `generate_t2v`.
        """
        with self._lock:
            loaded = self._require(I2V_ARCHITECTURES, "image-to-video")
            if image_start is None:
                raise InvalidRequestError(f"Image-to-video with {loaded.preset.key!r} needs image_start.")
            check_image_conditioning(loaded, has_end=image_end is not None)
            resolved = self._resolve(loaded, prompt, params)
            started = time.perf_counter()
            size = {"width": resolved.width, "height": resolved.height}
            start_image, start_note = prepare_i2v_image(_input_file(image_start), key="image_start", **size)
            call: dict[str, Any] = {"image": start_image}
            notes: dict[str, Any] = {"image_start": start_note}
            if image_end is not None:
                end = _input_file(image_end)
                call["last_image"], notes["image_end"] = prepare_i2v_image(end, key="image_end", **size)
            return self._run(
                loaded,
                resolved,
                Path(output_path),
                progress,
                mode="flf2v" if image_end is not None else "i2v",
                call=call,
                notes=notes,
                inputs_seconds=time.perf_counter() - started,
                pipe=loaded.image_pipeline(),
                deferred=deferred_write,
            )

    # ----- checks ----------------------------------------------------------------------------------

    def _require(self, architectures: tuple[str, ...], what: str) -> LoadedModel:
        self._reload_if_changed()
        loaded = self._loaded
        if loaded is None:
            raise InvalidRequestError("No model is loaded: call load_model(<model key>) first.")
        architecture = loaded.preset.model.architecture
        if architecture not in architectures:
            raise InvalidRequestError(
                f"Model {loaded.preset.key!r} has architecture {architecture!r}; {what} needs one of "
                f"{', '.join(architectures)}."
            )
        return loaded

    def _reload_if_changed(self) -> None:
        """Before a generation: load the resident model again if its weight files changed (stat only).

        The runner's `ensure_model` normally did this already; this covers callers without it and files
        changed in between. A context-parallel model (transformers split over a group of ranks) must be
        reloaded by the whole group, not by one rank: that is refused with a sentence instead.
        """
        loaded = self._loaded
        reason = loaded.weight_files.changed() if loaded is not None else None
        if loaded is None or reason is None:
            return
        split = any(
            getattr(m, "_parallel_config", None) is not None
            for m in (loaded.pipe.transformer, getattr(loaded.pipe, "transformer_2", None))
            if m is not None
        )
        if split:
            raise ModelUnavailableError(
                f"Model {loaded.preset.key!r}: {reason}; a context-parallel group must load it again on every "
                "rank: restart the worker group."
            )
        self.load_model(loaded.preset.key)

    def _resolve(self, loaded: LoadedModel, prompt: Any, params: dict[str, Any]) -> ResolvedParams:
        resolved = resolve_params(loaded.preset, prompt, params)
        multiple = loaded.side_multiple
        if resolved.width % multiple or resolved.height % multiple:
            raise InvalidRequestError(
                f"Invalid resolution: '{resolved.width}x{resolved.height}'; model {loaded.preset.key!r} needs "
                f"width and height in multiples of {multiple}."
            )
        return resolved

    # ----- the shared generation path ----------------------------------------------------------------

    def _place(self, loaded: LoadedModel, p: ResolvedParams) -> str:
        """Apply the task's memory profile (or the orchestrator's default; `auto` decides from the
        VRAM estimate at this task's size and the free VRAM); returns the profile that will run."""
        requested = p.memory_profile_requested or self.memory_profile
        if requested not in PROFILE_CHOICES:
            raise InvalidRequestError(f"memory_profile {requested!r}: allowed {', '.join(PROFILE_CHOICES)}")
        if requested == "auto":
            if loaded.profile is not None:
                return loaded.profile  # chosen (or stepped down to) by an earlier task: keep it
            requested = self._auto_profile(loaded, p)
        requested = profile_for_device(requested, loaded.device)
        current = loaded.profile or ("gpu" if loaded.device.type == "cuda" and loaded.loaded_on_device else "cpu")
        if requested != current:
            with loaded.vae_gate:  # moving the VAE: an overlapped decode of the previous task must end first
                apply_profile(loaded.pipe, requested, loaded.device, current=current)
        loaded.profile = requested
        return requested

    def _auto_profile(self, loaded: LoadedModel, p: ResolvedParams) -> str:
        if loaded.device.type != "cuda":
            return "cpu"
        check = check_model(loaded.preset, self.models_dir)
        size = {"width": p.width, "height": p.height, "frames": p.video_length, "fp8": loaded.fp8 is not None}
        estimate = estimate_vram(loaded.preset, check, **size)
        budget = device_budget_bytes(loaded.device)
        vae = next((c for c in estimate.components if c.name == "vae"), None) if estimate else None
        if vae is not None and vae.weight_bytes + vae.activation_bytes > budget * self.vram_fraction:
            # The decode alone would not fit untiled: tile it, and choose the profile with the tiled decode
            # (otherwise the full-frame decode would push every task down to the slowest profile).
            with loaded.vae_gate:
                tile_vae(loaded.pipe)
            estimate = estimate_vram(loaded.preset, check, tiled_vae=True, **size)
        return choose_profile(estimate.profiles if estimate else None, budget, self.vram_fraction)

    def _run(
        self,
        loaded: LoadedModel,
        p: ResolvedParams,
        output_path: Path,
        progress: ProgressCallback | None,
        *,
        mode: str,
        call: dict[str, Any],
        notes: dict[str, Any] | None = None,
        inputs_seconds: float = 0.0,
        num_reference_images: int = 0,
        pipe: Any = None,
        deferred: bool = False,
    ) -> GenerationResult | PendingWrite:
        """Steps 2-7 of the module docstring for every mode; step 1 (inputs) is the caller's.

        `deferred`: step 7 is left to the returned `PendingWrite` (see `generate_t2v`)."""
        clock = gen.start_clock(loaded, inputs_seconds)  # 1. inputs were read in `inputs_seconds`
        # 2. Experts: which transformer runs each step (refuses step counts that repeat timesteps).
        plan = plan_experts(loaded, p)
        # 3. LoRAs: resolve the names (errors before any work), then load exactly this call's set.
        requests = gen.lora_requests(loaded, p, self.loras_dirs, plan, allow_download=self.allow_download)
        clock.mark("prepared")
        loras = gen.prepare_loras(loaded, requests, plan)
        clock.mark("loras")
        # 4. Encode the prompt once (timed on its own; the pipeline then gets embeddings).
        embeds = gen.encode_prompt(loaded, p, progress, plan)
        clock.mark("encode")
        state = gen.DenoiseState()

        not_overlapped: dict[str, Any] = {}

        def attempt() -> np.ndarray | OverlappedDecode:
            # 5. Denoise: per-step timing, progress (and cancel), LoRA schedule per expert.
            latents = gen.denoise(
                loaded, p, call=call, embeds=embeds, plan=plan, loras=loras, state=state, progress=progress, pipe=pipe
            )
            clock.mark("denoise")
            if deferred and decode_overlaps(loaded.device.type, loaded.profile):
                reason = no_room_for_overlap(loaded, latents, num_reference_images, self.vram_fraction)
                if reason is None:
                    # 6, overlapped (issue 15): the finisher decodes on its own CUDA stream while the next task starts.
                    return OverlappedDecode.after_denoise(loaded, latents, num_reference_images)
                not_overlapped.update(overlapped=False, reason=reason)
            # 6. Decode with the VAE here, under the memory ladder (an OOM here steps down).
            return gen.decode(loaded, latents, num_reference_images, progress)

        # 5-6 run as one attempt: on out-of-memory, again one memory profile lower (same seed). A pipeline call
        # that encodes with the VAE (all but plain text-to-video) first waits for an overlapped decode using it.
        with loaded.vae_gate if denoise_uses_vae(pipe or loaded.pipe) else nullcontext():
            profile = self._place(loaded, p)
            decoded, profile, ladder = gen.memory_ladder(loaded, profile, attempt, on_retry=state.reset)
        if isinstance(decoded, OverlappedDecode):
            frame_shape = expected_frame_shape(loaded.pipe, decoded.latents, num_reference_images)
        else:
            clock.mark("decode")
            frame_shape = decoded.shape
        if not deferred:
            # 7. Write atomically (temp name + rename).
            assert isinstance(decoded, np.ndarray)
            output_path = gen.write(decoded, output_path, p.fps, progress)
            clock.mark("write")
        result = gen.build_result(
            loaded,
            p,
            frame_shape=frame_shape,
            written_path=output_path,  # deferred: the requested path until the write ran
            clock=clock,
            state=state,
            plan=plan,
            loras=loras,
            profile=profile,
            ladder=ladder,
            profile_requested=p.memory_profile_requested or self.memory_profile,
            mode=mode,
            notes=notes,
            inputs_seconds=inputs_seconds,
        )
        if not_overlapped:
            result = replace(result, extra={**result.extra, "decode_overlap": not_overlapped})
        # 7, deferred: the caller writes later (PendingWrite.finish), off this lock and this thread.
        return gen.defer_write(decoded, output_path, p.fps, result, clock) if deferred else result


def _control_scale(value: Any) -> float:
    """VACE's control_scale (None: the default), within the bounds of wan_engine.limits."""
    scale = DEFAULT_CONTROL_SCALE if value is None else value
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not MIN_CONTROL_SCALE <= scale <= MAX_CONTROL_SCALE
    ):
        raise InvalidRequestError(
            f"Invalid control_scale: {value!r}; must be from {MIN_CONTROL_SCALE:g} to {MAX_CONTROL_SCALE:g}."
        )
    return float(scale)


def _input_file(value: Path | str | OpenedInput) -> Path | OpenedInput:
    """An input as the engine reads it: a file the worker opened and checked stays that open file (reading it
    by name again could read another file swapped in since); a path is a Path."""
    return value if isinstance(value, OpenedInput) else Path(value)


def _image_refs(image_refs: list[Path | OpenedInput] | None) -> list[Path | OpenedInput]:
    refs = [_input_file(r) for r in (image_refs or [])]
    if len(refs) > MAX_IMAGE_REFS:
        raise InvalidRequestError(f"Invalid image_refs: {len(refs)} images; at most {MAX_IMAGE_REFS}.")
    return refs
