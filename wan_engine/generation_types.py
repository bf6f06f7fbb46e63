"""Values exchanged with the engine's callers: progress events and generation results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Stage = Literal["loading_model", "encoding_prompt", "denoising", "decoding", "writing_video"]
STAGES: tuple[Stage, ...] = ("loading_model", "encoding_prompt", "denoising", "decoding", "writing_video")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: the stage, and for denoising the step just finished out of the total.

    Non-step stages are reported once as they begin, with step 0 of total_steps 1.
    """

    stage: Stage
    step: int
    total_steps: int


# A callback may raise (e.g. to cancel a task): the exception propagates out of the engine unchanged.
ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced and how it ran; `to_dict()` is the task's result_data."""

    output_path: Path
    model: str
    seed: int
    seed_was_random: bool
    frames: int
    width: int
    height: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance2_scale: float | None  # None on single-transformer models
    flow_shift: float
    switch_threshold: float | None  # None on single-transformer models
    timesteps: tuple[float, ...]  # the scheduler's timestep at each denoising step
    experts_used: tuple[str, ...] | None  # "high"/"low" per step, observed by hooks; None if one transformer
    timings: dict[str, Any]  # seconds: inputs, loras, encode, denoise, decode, write, total, step_times, mean_step
    memory_profile: str  # the memory profile that actually ran (wan_engine.memory_profiles)
    device: str
    dtype: str
    peak_vram_gb: float | None
    peak_rss_gb: float | None
    video_length_adjusted_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    mode: str = "t2v"  # "t2v", "vace", "i2v" or "flf2v" (start + end image)
    inputs: dict[str, Any] = field(default_factory=dict)  # conditioning files and what was done to fit them
    loras: list[dict[str, Any]] = field(default_factory=list)  # file, multipliers, experts, weight per step

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (paths as strings, tuples as lists)."""
        data = asdict(self)
        data["output_path"] = str(self.output_path)
        data["resolution"] = f"{self.width}x{self.height}"
        for key in ("timesteps", "experts_used"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data
