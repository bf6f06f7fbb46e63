"""Parameter resolution: precedence, 4N+1 alignment, and errors that name the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import (
    BUILTIN_DEFAULTS,
    align_video_length,
    parse_resolution,
    resolve_params,
)
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets


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
        ({"lora_names": "style.safetensors"}, "lora_names", "style.safetensors"),
        ({"lora_multipliers": "1.0"}, "lora_multipliers", "needs lora_names"),
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


def test_lora_params_and_preset_loras(builtin_presets: PresetRegistry, tmp_path: Path) -> None:
    resolved = resolve_params(
        builtin_presets.get("tiny_t2v"), "x", {"lora_names": ["a", "b"], "lora_multipliers": "1 0.5"}
    )
    assert resolved.lora_names == ("a", "b") and resolved.lora_multipliers == "1 0.5"
    assert not resolved.loras_from_preset
    # A preset's loras apply when the call names none; an explicit empty list turns them off.
    (tmp_path / "tiny_t2v.json").write_text(json.dumps({"model": {"loras": ["fast"], "loras_multipliers": [0.8]}}))
    preset = load_presets(BUILTIN_PRESETS_DIR, tmp_path).get("tiny_t2v")
    from_preset = resolve_params(preset, "x", {})
    assert from_preset.lora_names == ("fast",) and from_preset.lora_multipliers == "0.8"
    assert from_preset.loras_from_preset
    assert resolve_params(preset, "x", {"lora_names": []}).lora_names == ()
