"""Parameter resolution: precedence, 4N+1 alignment, and errors that name the value."""

from __future__ import annotations

import pytest

from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import (
    BUILTIN_DEFAULTS,
    align_video_length,
    parse_resolution,
    resolve_params,
)
from wan_engine.presets import PresetRegistry


@pytest.mark.parametrize(("frames", "aligned"), [(1, 1), (2, 5), (5, 5), (9, 9), (10, 13), (80, 81), (81, 81)])
def test_align_video_length(frames: int, aligned: int) -> None:
    assert align_video_length(frames) == aligned


def test_precedence_defaults_preset_params(builtin_presets: PresetRegistry) -> None:
    preset = builtin_presets.get("tiny_t2v")
    resolved = resolve_params(preset, "a cat", {"num_inference_steps": 2, "fps": None, "seed": 7})
    assert resolved.num_inference_steps == 2  # params win
    assert resolved.fps == preset.settings.fps  # None counts as not given: the preset's value
    assert (resolved.width, resolved.height) == parse_resolution(preset.settings.resolution)
    assert resolved.switch_threshold == BUILTIN_DEFAULTS["switch_threshold"]  # not in the preset
    assert resolved.guidance2_scale == resolved.guidance_scale  # unset: the low expert follows
    assert resolved.seed == 7 and not resolved.seed_was_random


def test_random_seed_is_drawn_and_flagged(builtin_presets: PresetRegistry) -> None:
    seeds = {resolve_params(builtin_presets.get("tiny_t2v"), "x", {"seed": -1}).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize(
    ("params", "name", "value"),
    [
        ({"resolution": "100x48"}, "resolution", "100x48"),
        ({"resolution": "64"}, "resolution", "64"),
        ({"resolution": "8192x48"}, "resolution", "8192x48"),
        ({"num_inference_steps": 0}, "num_inference_steps", "0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps", "2.5"),
        ({"video_length": 0}, "video_length", "0"),
        ({"video_length": 5000}, "video_length", "5000"),
        ({"guidance_scale": -1}, "guidance_scale", "-1"),
        ({"flow_shift": 0}, "flow_shift", "0"),
        ({"switch_threshold": 1001}, "switch_threshold", "1001"),
        ({"seed": -2}, "seed", "-2"),
        ({"fps": "fast"}, "fps", "fast"),
        ({"lora_names": ["style.safetensors"]}, "lora_names", "style.safetensors"),
        ({"model": "t2v"}, "model", "t2v"),
        ({"video_guide": "x.mp4"}, "video_guide", "video_guide"),
    ],
)
def test_bad_values_name_parameter_and_value(
    builtin_presets: PresetRegistry, params: dict, name: str, value: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_params(builtin_presets.get("tiny_t2v"), "a cat", params)
    assert isinstance(info.value, ValueError)
    assert name in str(info.value) and value in str(info.value)
