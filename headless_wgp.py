"""WanOrchestrator: model presets -> resident diffusers pipelines -> generated videos.

The orchestrator keeps at most one model resident, loads another only when asked, and runs
generations on it. A generation reads like the diffusers pipelines it drives:
1. resolve + validate params, 2. encode the prompt, 3. denoise (progress/cancel per step),
4. decode with the VAE, 5. write the video atomically. Nothing here knows about the task queue.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import GenerationParams, resolve_params
from wan_engine.generation_types import GenerationResult, ProgressCallback, ProgressEvent
from wan_engine.model_sources import resolve_model
from wan_engine.pipeline_runtime import (
    ExpertRecorder,
    LoadedModel,
    decode_latents,
    encode_prompts,
    load_pipeline,
    scheduled,
)
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.video_io import write_video

__all__ = ["GenerationResult", "ProgressCallback", "ProgressEvent", "WanOrchestrator"]

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # Wan's text length; the pipelines' __call__ default
T2V_ARCHITECTURES = ("t2v", "ti2v", "vace")  # a VACE model without a guide video is plain T2V


def _peak_rss_gb() -> float | None:
    """Peak resident memory of this process so far (Linux/macOS getrusage; current RSS elsewhere)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes vs KiB
    except (ImportError, OSError):
        import psutil

        return psutil.Process().memory_info().rss / 1024**3


def _emit(progress: ProgressCallback | None, stage: str, step: int = 0, total: int = 1) -> None:
    # Exceptions from the callback (cancel / shutdown) propagate on purpose.
    if progress is not None:
        progress(ProgressEvent(stage=stage, step=step, total_steps=total))  # type: ignore[arg-type]


class WanOrchestrator:
    """Loads Wan models from presets and generates videos with them, one resident model at a time.

    `presets` defaults to the built-in `defaults/` presets with `presets_dir` (user files) layered
    on top. `device` defaults to CUDA when available, else CPU; `dtype` to bfloat16 on CUDA and
    float32 on CPU. Methods are serialised by a lock: one load or generation at a time.
    """

    def __init__(
        self,
        models_dir: Path,
        presets: PresetRegistry | None = None,
        *,
        presets_dir: Path | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.presets = presets if presets is not None else load_presets(BUILTIN_PRESETS_DIR, presets_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._loaded: LoadedModel | None = None
        self._lock = threading.RLock()

    # ----- model residency -------------------------------------------------------------------------

    @property
    def current_model(self) -> str | None:
        """Preset key of the resident model, or None."""
        return self._loaded.preset.key if self._loaded is not None else None

    def load_model(self, model_key: str, *, progress: ProgressCallback | None = None) -> float:
        """Make `model_key` the resident model; return the seconds spent (0.0 if already resident).

        The weights are located before the previous model is dropped, so a missing model
        (`ModelUnavailableError`) or an unknown key (`UnknownModelError`) leaves the resident one.
        """
        with self._lock:
            preset = self.presets.get(model_key)
            if self.current_model == model_key:
                return 0.0
            check = resolve_model(preset, self.models_dir)
            _emit(progress, "loading_model")
            started = time.perf_counter()
            self.unload_model()  # free the old weights before the new ones arrive
            self._loaded = load_pipeline(preset, check, self.device, self.dtype)
            seconds = time.perf_counter() - started
            logger.info("model loaded", extra={"model": model_key, "seconds": round(seconds, 3)})
            return seconds

    def unload_model(self) -> None:
        """Drop the resident model and return its memory (host and GPU)."""
        with self._lock:
            if self._loaded is None:
                return
            key = self._loaded.preset.key
            self._loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.info("model unloaded", extra={"model": key})

    def is_vace(self) -> bool:
        """True when the resident model is a VACE model (control video + mask + references)."""
        return self._loaded is not None and self._loaded.preset.model.architecture == "vace"

    # ----- generation ------------------------------------------------------------------------------

    def generate_t2v(
        self,
        prompt: str,
        *,
        output_path: Path,
        progress: ProgressCallback | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Generate a video from text with the resident model and write it to `output_path`.

        `params` are the common task parameters (negative_prompt, resolution, video_length,
        num_inference_steps, guidance_scale, guidance2_scale, flow_shift, switch_threshold, seed,
        fps); they override the preset's settings, which override the built-in defaults. A single
        frame is written as `<output_path stem>.png`. If `progress` raises, the exception
        propagates unchanged and no output file is left behind.
        """
        with self._lock:
            loaded = self._loaded
            if loaded is None:
                raise InvalidRequestError("No model is loaded: call load_model(<model key>) first.")
            architecture = loaded.preset.model.architecture
            if architecture not in T2V_ARCHITECTURES:
                raise InvalidRequestError(
                    f"Model {loaded.preset.key!r} has architecture {architecture!r}; text-to-video needs one "
                    f"of {', '.join(T2V_ARCHITECTURES)}."
                )
            resolved = resolve_params(loaded.preset, prompt, params)
            return self._run_t2v(loaded, resolved, Path(output_path), progress)

    def _run_t2v(
        self, loaded: LoadedModel, p: GenerationParams, output_path: Path, progress: ProgressCallback | None
    ) -> GenerationResult:
        started = time.perf_counter()
        on_cuda = loaded.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(loaded.device)
        dual = loaded.is_dual_expert
        do_cfg = p.guidance_scale > 1.0  # diffusers' rule: CFG for both experts hangs on guidance_scale

        # 1. Encode the prompt once (timed on its own; the pipeline then gets embeddings).
        _emit(progress, "encoding_prompt")
        prompt_embeds, negative_embeds = encode_prompts(
            loaded.pipe,
            p.prompt,
            p.negative_prompt,
            do_cfg=do_cfg,
            device=loaded.device,
            max_length=MAX_SEQUENCE_LENGTH,
        )
        encoded = time.perf_counter()

        # 2. Denoise: per-step timing, progress (and cancel) through callback_on_step_end.
        recorder = ExpertRecorder()
        step_times: list[float] = []
        timesteps: list[float] = []
        last_mark = [time.perf_counter()]

        def on_step_end(_pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict:
            now = time.perf_counter()
            step_times.append(now - last_mark[0])
            last_mark[0] = now
            timesteps.append(float(timestep))
            recorder.step = index + 1  # calls from here on belong to the next step
            _emit(progress, "denoising", index + 1, p.num_inference_steps)
            return callback_kwargs

        _emit(progress, "denoising", 0, p.num_inference_steps)
        boundary = p.switch_threshold / 1000.0 if dual else None
        call: dict[str, Any] = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "height": p.height,
            "width": p.width,
            "num_frames": p.video_length,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": torch.Generator(device="cpu").manual_seed(p.seed),
            "output_type": "latent",  # decode ourselves, to time the VAE on its own
            "callback_on_step_end": on_step_end,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
        if dual:
            call["guidance_scale_2"] = p.guidance2_scale
        last_mark[0] = time.perf_counter()
        with scheduled(loaded, p.flow_shift, boundary) as pipe, recorder.attached(pipe):
            latents = pipe(**call).frames
        denoised = time.perf_counter()

        # 3. Decode with the VAE.
        _emit(progress, "decoding")
        frames = decode_latents(loaded.pipe, latents)
        decoded = time.perf_counter()

        # 4. Write atomically (temp name + rename).
        _emit(progress, "writing_video")
        written_path = write_video(frames, output_path, p.fps)
        finished = time.perf_counter()

        steps = len(step_times)
        result = GenerationResult(
            output_path=written_path,
            model=loaded.preset.key,
            seed=p.seed,
            seed_was_random=p.seed_was_random,
            frames=int(frames.shape[0]),
            width=int(frames.shape[2]),
            height=int(frames.shape[1]),
            fps=p.fps,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            guidance2_scale=p.guidance2_scale if dual else None,
            flow_shift=p.flow_shift,
            switch_threshold=p.switch_threshold if dual else None,
            timesteps=tuple(timesteps),
            experts_used=recorder.experts_per_step(steps) if dual else None,
            timings={
                "encode": encoded - started,
                "denoise": denoised - encoded,
                "decode": decoded - denoised,
                "write": finished - decoded,
                "total": finished - started,
                "step_times": step_times,
                "mean_step": sum(step_times) / steps if steps else None,
            },
            memory_profile="gpu" if on_cuda else "cpu",
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            peak_vram_gb=torch.cuda.max_memory_allocated(loaded.device) / 1024**3 if on_cuda else None,
            peak_rss_gb=_peak_rss_gb(),
            video_length_adjusted_from=p.video_length_adjusted_from,
            extra={
                "transformer_calls_per_step": list(recorder.calls_per_step(steps)),
                "memory_profile_requested": p.memory_profile_requested,
            },
        )
        logger.info(
            "generation finished",
            extra={"model": result.model, "seed": result.seed, "seconds": round(result.timings["total"], 3)},
        )
        return result
