"""Resolve and validate the parameters of one generation.

Precedence: `BUILTIN_DEFAULTS` < the preset's settings < the caller's params (a `None` param counts
as not given). Every error names the parameter, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from wan_engine.errors import InvalidRequestError
from wan_engine.limits import (
    DEFAULT_SWITCH_THRESHOLD,
    MAX_FLOW_SHIFT,
    MAX_FPS,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_GUIDANCE_PHASES,
    MAX_LORAS,
    MAX_SEED,
    MAX_SIDE_PX,
    MAX_STEPS,
    MAX_SWITCH_THRESHOLD,
    MIN_FPS,
    MIN_FRAMES,
    MIN_GUIDANCE,
    MIN_GUIDANCE_PHASES,
    MIN_SIDE_PX,
    MIN_STEPS,
    MIN_SWITCH_THRESHOLD,
    RANDOM_SEED,
    SIDE_MULTIPLE_PX,
)
from wan_engine.presets import Preset
from wan_engine.wan2gp_definitions import check_sample_solver

BUILTIN_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "",
    "resolution": "832x480",
    "video_length": 81,
    "num_inference_steps": 30,
    "guidance_scale": 5.0,
    "guidance2_scale": None,  # None: the low-noise expert uses guidance_scale
    "flow_shift": 5.0,
    "switch_threshold": DEFAULT_SWITCH_THRESHOLD,  # Wan 2.2 T2V A14B boundary (timestep out of 1000)
    "seed": RANDOM_SEED,
    "fps": 16,
    # Wan2GP's 3-phase guidance (wan_engine.experts): None phases = the model's (2 with two experts, else 1).
    "guidance_phases": None,
    "guidance3_scale": None,  # None: guidance2_scale
    "switch_threshold2": 0,  # phase 3 from this timestep down (Wan2GP's default: none)
    "model_switch_phase": 1,  # the low-noise expert takes over after this phase
    "sample_solver": None,  # None: the model's own scheduler (UniPC for the Wan repos)
}
# Accepted but not acted on by the T2V path here (the worker/queue layers consume them).
PASS_THROUGH_KEYS = frozenset({"model", "memory_profile"})
LORA_KEYS = frozenset({"lora_names", "lora_multipliers"})

# The bounds live in wan_engine.limits (the worker's task schema uses the same objects); old names kept.
SIDE_MULTIPLE = SIDE_MULTIPLE_PX
MAX_VIDEO_LENGTH = MAX_FRAMES
_RESOLUTION = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ResolvedParams:
    """Fully resolved, validated parameters of one generation (any mode: the inputs come separately)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    video_length: int
    num_inference_steps: int
    guidance_scale: float
    guidance2_scale: float
    flow_shift: float
    switch_threshold: float
    seed: int
    seed_was_random: bool
    fps: int
    video_length_adjusted_from: int | None = None
    memory_profile_requested: Any = None
    lora_names: tuple[str, ...] = ()
    lora_multipliers: str | float | None = None  # raw text; parsed against the loaded model (loras.py)
    loras_from_preset: bool = False
    guidance_phases: int | None = None  # None: the model's (2 on a two-expert model, else 1)
    guidance3_scale: float | None = None
    switch_threshold2: float = 0.0
    model_switch_phase: int = 1
    sample_solver: str | None = None


def _bad(name: str, value: Any, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid {name}: {value!r}; {allowed}.")


def _int(name: str, value: Any, low: int, high: int) -> int:
    """An integer in [low, high]; integral floats (e.g. 30.0 from JSON) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, f"must be an integer from {low} to {high}")
    if isinstance(value, float) and not value.is_integer():
        raise _bad(name, value, f"must be an integer from {low} to {high}")
    if not low <= int(value) <= high:
        raise _bad(name, value, f"must be an integer from {low} to {high}")
    return int(value)


def _float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, f"must be a number from {low} to {high}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"greater than {low}" if low_open else f"from {low}"
        raise _bad(name, value, f"must be a number {bound} up to {high}")
    return float(value)


def parse_resolution(value: Any) -> tuple[int, int]:
    """`"WxH"` -> (width, height): both multiples of 16 within 16..4096."""
    match = _RESOLUTION.match(value.strip()) if isinstance(value, str) else None
    allowed = (
        f'must be "WIDTHxHEIGHT" (e.g. "832x480") with both sides multiples of {SIDE_MULTIPLE} '
        f"from {MIN_SIDE_PX} to {MAX_SIDE_PX}"
    )
    if match is None:
        raise _bad("resolution", value, allowed)
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if side % SIDE_MULTIPLE or not MIN_SIDE_PX <= side <= MAX_SIDE_PX:
            raise _bad("resolution", value, allowed)
    return width, height


def align_video_length(frames: int) -> int:
    """Round up to the next 4N+1 frame count (the VAE compresses time 4x after the first frame)."""
    return frames if (frames - 1) % 4 == 0 else ((frames - 1) // 4 + 1) * 4 + 1


def random_seed() -> int:
    """A fresh seed from the OS entropy pool (32 bits: short enough to read and retype)."""
    return int.from_bytes(os.urandom(4), "little")


def resolve_params(preset: Preset, prompt: Any, params: dict[str, Any]) -> ResolvedParams:
    """Merge defaults < preset < params and validate every value."""
    known = set(BUILTIN_DEFAULTS) | PASS_THROUGH_KEYS | LORA_KEYS
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidRequestError(f"Unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}.")
    if params.get("model") not in (None, preset.key):
        raise _bad("model", params["model"], f"this call runs the resident model {preset.key!r}")
    lora_names, lora_multipliers, loras_from_preset = _lora_params(preset, params)
    merged = {**BUILTIN_DEFAULTS, **preset.settings.as_params()}
    merged.update({k: v for k, v in params.items() if v is not None and k in BUILTIN_DEFAULTS})

    if not isinstance(prompt, str):
        raise _bad("prompt", prompt, "must be a string")
    if not isinstance(merged["negative_prompt"], str):
        raise _bad("negative_prompt", merged["negative_prompt"], "must be a string")
    width, height = parse_resolution(merged["resolution"])
    requested_length = _int("video_length", merged["video_length"], MIN_FRAMES, MAX_VIDEO_LENGTH)
    video_length = align_video_length(requested_length)
    if video_length > MAX_VIDEO_LENGTH:
        raise _bad("video_length", requested_length, f"must be at most {MAX_VIDEO_LENGTH} frames (4N+1)")
    guidance = _float("guidance_scale", merged["guidance_scale"], MIN_GUIDANCE, MAX_GUIDANCE)
    guidance2 = merged["guidance2_scale"]
    guidance2 = guidance if guidance2 is None else _float("guidance2_scale", guidance2, MIN_GUIDANCE, MAX_GUIDANCE)
    seed = _int("seed", merged["seed"], RANDOM_SEED, MAX_SEED)
    switch_threshold = _float(
        "switch_threshold", merged["switch_threshold"], MIN_SWITCH_THRESHOLD, MAX_SWITCH_THRESHOLD
    )
    phases = _phase_params(merged, switch_threshold, guidance2)
    return ResolvedParams(
        prompt=prompt,
        negative_prompt=merged["negative_prompt"],
        width=width,
        height=height,
        video_length=video_length,
        num_inference_steps=_int("num_inference_steps", merged["num_inference_steps"], MIN_STEPS, MAX_STEPS),
        guidance_scale=guidance,
        guidance2_scale=guidance2,
        flow_shift=_float("flow_shift", merged["flow_shift"], 0.0, MAX_FLOW_SHIFT, low_open=True),
        switch_threshold=switch_threshold,
        seed=random_seed() if seed == RANDOM_SEED else seed,
        seed_was_random=seed == RANDOM_SEED,
        fps=_int("fps", merged["fps"], MIN_FPS, MAX_FPS),
        video_length_adjusted_from=requested_length if video_length != requested_length else None,
        memory_profile_requested=params.get("memory_profile"),
        lora_names=lora_names,
        lora_multipliers=lora_multipliers,
        loras_from_preset=loras_from_preset,
        **phases,
    )


def _phase_params(merged: dict[str, Any], switch_threshold: float, guidance2: float) -> dict[str, Any]:
    """guidance_phases, guidance3_scale, switch_threshold2, model_switch_phase and sample_solver, checked."""
    phases = merged["guidance_phases"]
    if phases is not None:
        phases = _int("guidance_phases", phases, MIN_GUIDANCE_PHASES, MAX_GUIDANCE_PHASES)
    guidance3 = merged["guidance3_scale"]
    guidance3 = guidance2 if guidance3 is None else _float("guidance3_scale", guidance3, MIN_GUIDANCE, MAX_GUIDANCE)
    threshold2 = _float("switch_threshold2", merged["switch_threshold2"], MIN_SWITCH_THRESHOLD, MAX_SWITCH_THRESHOLD)
    switch_phase = _int("model_switch_phase", merged["model_switch_phase"], 1, MAX_GUIDANCE_PHASES - 1)
    if phases == 3 and threshold2 > switch_threshold:
        raise _bad(
            "switch_threshold2",
            threshold2,
            f"with guidance_phases 3 it must be at most switch_threshold ({switch_threshold:g}): the phase 2-3 "
            "switch comes after the phase 1-2 one as the noise level falls from 1000 to 0",
        )
    try:
        solver = None if merged["sample_solver"] is None else check_sample_solver(merged["sample_solver"])
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid {exc}.") from None
    return {
        "guidance_phases": phases,
        "guidance3_scale": guidance3,
        "switch_threshold2": threshold2,
        "model_switch_phase": switch_phase if phases == 3 else 1,  # Wan2GP: only 3 phases move the switch
        "sample_solver": solver,
    }


def _lora_params(preset: Preset, params: dict[str, Any]) -> tuple[tuple[str, ...], str | float | None, bool]:
    """The LoRA names and multiplier text of a call; the preset's `loras` when the call names none."""
    names = params.get("lora_names")
    multipliers = params.get("lora_multipliers")
    if names is None:
        if not preset.model.loras:
            if multipliers not in (None, ""):
                raise _bad("lora_multipliers", multipliers, "needs lora_names")
            return (), None, False
        preset_multipliers = " ".join(str(m) for m in preset.model.loras_multipliers) or None
        return preset.model.loras, multipliers if multipliers is not None else preset_multipliers, True
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise _bad("lora_names", names, 'must be a list of LoRA file names, e.g. ["style.safetensors"]')
    if len(names) > MAX_LORAS:
        raise _bad("lora_names", names, f"at most {MAX_LORAS} LoRAs")
    if multipliers is not None and (isinstance(multipliers, bool) or not isinstance(multipliers, (str, int, float))):
        raise _bad("lora_multipliers", multipliers, 'must be a string such as "1.0 0.5;0.8"')
    return tuple(names), multipliers, False
