"""Task params of the vace / i2v / flf2v / ti2v task types (worker.tasks.params): required inputs, unknown keys."""

from __future__ import annotations

import pytest

from worker.tasks.params import (
    TASK_TYPE_DEFAULT_MODELS,
    TASK_TYPE_MODES,
    FLF2VParams,
    I2VParams,
    InvalidTaskError,
    VaceParams,
    validate_params,
)

ALIASES = {
    "vace": "vace_1.3B",
    "vace_21": "vace_14B",
    "vace_22": "vace_14B_cocktail_2_2",
    "i2v": "i2v_14B",
    "i2v_22": "i2v_2_2",
    "flf2v": "flf2v_14B",
    "ti2v": "ti2v_2_2",
    "t2v_22": "t2v_2_2",
}


def test_aliases_map_to_their_default_models() -> None:
    for task_type, model in ALIASES.items():
        assert TASK_TYPE_DEFAULT_MODELS[task_type] == model


def test_vace_params_split_into_inputs_and_settings() -> None:
    params = {
        "prompt": "x",
        "video_guide": "g.mp4",
        "video_mask": "m.png",
        "image_refs": ["a.png", "b.png"],
        "control_scale": 0.5,
        "lora_names": ["style"],
        "lora_multipliers": "1.0;0.5",
        "num_inference_steps": 10,
    }
    validated = validate_params("vace_22", params)
    assert isinstance(validated, VaceParams) and validated.model == "vace_14B_cocktail_2_2"
    assert validated.mode_kwargs() == {
        "video_guide": "g.mp4",
        "video_mask": "m.png",
        "image_refs": ["a.png", "b.png"],
        "control_scale": 0.5,
    }
    kwargs = validated.generation_kwargs()
    assert kwargs["lora_names"] == ["style"] and kwargs["lora_multipliers"] == "1.0;0.5"
    assert not set(kwargs) & set(VaceParams.MODE_KEYS)
    assert VaceParams.PATH_KEYS == ("video_guide", "video_mask", "image_refs")


@pytest.mark.parametrize(
    ("task_type", "params", "expected"),
    [
        ("vace", {}, "missing required key 'video_guide'"),
        ("i2v", {}, "missing required key 'image_start'"),
        ("flf2v", {"image_start": "s.png"}, "missing required key 'image_end'"),
        ("vace", {"video_guide": "g.mp4", "image_start": "s.png"}, "unknown key 'image_start'"),
        ("t2v", {"video_guide": "g.mp4"}, "unknown key 'video_guide'"),
        ("vace", {"video_guide": "g.mp4", "control_scale": 11}, "control_scale"),
        ("vace", {"video_guide": "g.mp4", "image_refs": "a.png"}, "image_refs"),
        ("i2v", {"image_start": ""}, "image_start"),
        ("t2v", {"lora_names": "style"}, "lora_names"),
    ],
)
def test_rejections_name_the_key(task_type: str, params: dict, expected: str) -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_params(task_type, {"prompt": "x", **params})
    assert expected in str(info.value)


def test_unknown_key_lists_the_modes_keys() -> None:
    with pytest.raises(InvalidTaskError) as info:
        validate_params("i2v", {"prompt": "x", "image_start": "s.png", "bogus": 1})
    for key in ("image_start", "image_end", "lora_names"):
        assert key in str(info.value)


def test_modes_and_param_models() -> None:
    assert {TASK_TYPE_MODES[t] for t in ("vace", "vace_21", "vace_22")} == {"vace"}
    assert isinstance(validate_params("i2v_22", {"prompt": "x", "image_start": "s.png"}), I2VParams)
    flf = validate_params("flf2v", {"prompt": "x", "image_start": "s.png", "image_end": "e.png"})
    assert isinstance(flf, FLF2VParams) and flf.mode_kwargs() == {"image_start": "s.png", "image_end": "e.png"}
    ti2v = validate_params("ti2v", {"prompt": "x"})
    assert ti2v.model == "ti2v_2_2" and ti2v.mode_kwargs() == {}
