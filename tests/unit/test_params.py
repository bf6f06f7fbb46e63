"""Task parameter validation: every rejection is permanent and names the bad key or value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.loop.retry import is_permanent
from worker.tasks.params import (
    MAX_PARAMS_BYTES,
    MAX_PROMPT_CHARS,
    SUPPORTED_TASK_TYPES,
    TASK_TYPE_DEFAULT_MODELS,
    TASK_TYPE_MODES,
    GenerationParams,
    InvalidTaskError,
    model_key_for,
    parse_params_text,
    validate_params,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def rejection(task_type: str, params: dict[str, Any]) -> str:
    """The message validate_params raises with (the test fails if it accepts)."""
    with pytest.raises(InvalidTaskError) as info:
        validate_params(task_type, params)
    assert is_permanent(info.value)
    return str(info.value)


def parse_rejection(text: str) -> str:
    with pytest.raises(InvalidTaskError) as info:
        parse_params_text(text)
    assert is_permanent(info.value)
    return str(info.value)


# ---- parse_params_text ---------------------------------------------------------------------------


def test_parse_accepts_an_object() -> None:
    assert parse_params_text('{"model": "t2v_1.3B", "prompt": "a cat"}') == {"model": "t2v_1.3B", "prompt": "a cat"}


@pytest.mark.parametrize("text", ['{"prompt": ', "{'prompt': 'single quotes'}", "", "{prompt: 1}"])
def test_malformed_json_is_rejected_quoting_the_text(text: str) -> None:
    message = parse_rejection(text)
    assert "not valid JSON" in message
    assert repr(text[:80]) in message


@pytest.mark.parametrize(
    ("text", "type_name"), [("[1, 2]", "list"), ('"a cat"', "str"), ("42", "int"), ("4.5", "float"), ("null", "None")]
)
def test_params_must_be_an_object(text: str, type_name: str) -> None:
    message = parse_rejection(text)
    assert "must be a JSON object" in message
    assert type_name in message
    assert text in message


def test_oversized_params_rejected_with_the_limit() -> None:
    text = json.dumps({"prompt": "a" * (MAX_PARAMS_BYTES + 10)})
    message = parse_rejection(text)
    assert str(MAX_PARAMS_BYTES) in message
    assert str(len(text)) in message


def test_params_just_under_the_limit_parse() -> None:
    text = json.dumps({"prompt": "a" * (MAX_PARAMS_BYTES - 100)})
    assert len(parse_params_text(text)["prompt"]) == MAX_PARAMS_BYTES - 100


def test_size_limit_counts_bytes_not_characters() -> None:
    # 4-byte characters: under the limit in characters, over it in bytes.
    text = json.dumps({"prompt": "\U0001f431" * (MAX_PARAMS_BYTES // 4 + 10)}, ensure_ascii=False)
    assert len(text) < MAX_PARAMS_BYTES
    parse_rejection(text)


# ---- validate_params: accepted input ----------------------------------------------------------------


def test_minimal_params_valid_and_model_default_from_task_type() -> None:
    validated = validate_params("t2v", {"prompt": "a cat"})
    assert validated.model == TASK_TYPE_DEFAULT_MODELS["t2v"] == "t2v_1.3B"
    assert validated.seed == -1


# The input files each mode requires (vace / i2v / flf2v tasks are invalid without them).
REQUIRED_INPUTS: dict[str, dict[str, str]] = {
    "vace": {"video_guide": "g.mp4"},
    "i2v": {"image_start": "s.png"},
    "flf2v": {"image_start": "s.png", "image_end": "e.png"},
}


@pytest.mark.parametrize("task_type", sorted(TASK_TYPE_DEFAULT_MODELS))
def test_alias_default_model(task_type: str) -> None:
    params = {"prompt": "x", **REQUIRED_INPUTS.get(TASK_TYPE_MODES[task_type], {})}
    assert validate_params(task_type, params).model == TASK_TYPE_DEFAULT_MODELS[task_type]


def test_wan22_alias_maps_to_the_22_model() -> None:
    assert validate_params("t2v_22", {"prompt": "x"}).model == "t2v_2_2"


@pytest.mark.parametrize("model", sorted(set(TASK_TYPE_DEFAULT_MODELS.values())))
def test_every_default_model_has_a_preset(model: str) -> None:
    assert (REPO_ROOT / "defaults" / f"{model}.json").is_file()


def test_explicit_model_wins_over_alias_default() -> None:
    assert validate_params("t2v_22", {"prompt": "x", "model": "tiny_t2v"}).model == "tiny_t2v"


def test_full_valid_params_round_trip_into_generation_kwargs() -> None:
    params = {
        "model": "t2v_1.3B",
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "resolution": "832x480",
        "video_length": 81,
        "num_inference_steps": 30,
        "guidance_scale": 5,  # an int is a fine float
        "guidance2_scale": 3.5,
        "flow_shift": 8.0,
        "switch_threshold": 875.0,
        "seed": 42,
        "fps": 16,
        "memory_profile": "auto",
    }
    validated = validate_params("t2v", params)
    kwargs = validated.generation_kwargs()
    assert "model" not in kwargs and "prompt" not in kwargs
    assert kwargs["resolution"] == "832x480"
    assert kwargs["video_length"] == 81
    assert kwargs["guidance_scale"] == 5.0
    assert kwargs["seed"] == 42
    assert "guidance2_scale" in kwargs


def test_generation_kwargs_leave_unset_settings_to_the_preset() -> None:
    kwargs = validate_params("t2v", {"prompt": "x"}).generation_kwargs()
    assert "num_inference_steps" not in kwargs
    assert "resolution" not in kwargs


def test_validated_params_are_immutable() -> None:
    validated = validate_params("t2v", {"prompt": "x"})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        validated.prompt = "y"  # type: ignore[misc]


# ---- validate_params: rejections name the key and the value --------------------------------------------


def test_unknown_key_named_and_allowed_keys_listed() -> None:
    message = rejection("t2v", {"prompt": "a cat", "promt": "typo"})
    assert "'promt'" in message
    assert "'typo'" in message
    for allowed in GenerationParams.model_fields:
        assert allowed in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("video_length", "abc"),
        ("video_length", 81.0),
        ("guidance_scale", "high"),
        ("seed", 1.5),
        ("seed", True),
        ("resolution", 832),
        ("prompt", 123),
        ("memory_profile", "turbo"),
    ],
)
def test_wrong_type_names_key_and_value(key: str, value: Any) -> None:
    params = {"prompt": "a cat", key: value}
    message = rejection("t2v", params)
    assert key in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("video_length", -5),
        ("video_length", 0),
        ("num_inference_steps", 0),
        ("num_inference_steps", -1),
        ("guidance_scale", -0.5),
        ("guidance_scale", float("nan")),
        ("flow_shift", 0),
        ("fps", 0),
        ("seed", -2),
        ("resolution", "832x481"),
        ("resolution", "abc"),
        ("resolution", "8x8"),
        ("resolution", "832*480"),
        ("resolution", "8192x480"),
        ("resolution", ""),
    ],
)
def test_out_of_range_names_key_and_value(key: str, value: Any) -> None:
    message = rejection("t2v", {"prompt": "a cat", key: value})
    assert key in message
    assert repr(value) in message


def test_resolution_message_says_what_is_allowed() -> None:
    assert "832x480" in rejection("t2v", {"prompt": "x", "resolution": "abc"})
    assert "multiples of 16" in rejection("t2v", {"prompt": "x", "resolution": "832x481"})


@pytest.mark.parametrize("resolution", ["832x480", "480x832", "16x16", "1280x720"])
def test_valid_resolutions(resolution: str) -> None:
    assert validate_params("t2v", {"prompt": "x", "resolution": resolution}).resolution == resolution


@pytest.mark.parametrize("key", ["prompt", "negative_prompt", "model"])
def test_nul_byte_rejected(key: str) -> None:
    params = {"prompt": "a cat", key: "a\x00cat"}
    message = rejection("t2v", params)
    assert key in message
    assert "NUL" in message


def test_missing_prompt_named() -> None:
    assert "'prompt'" in rejection("t2v", {"model": "t2v_1.3B"})


def test_empty_prompt_rejected() -> None:
    message = rejection("t2v", {"prompt": ""})
    assert "prompt" in message


def test_oversized_prompt_rejected() -> None:
    message = rejection("t2v", {"prompt": "a" * (MAX_PROMPT_CHARS + 1)})
    assert "prompt" in message
    assert str(MAX_PROMPT_CHARS) in message
    assert len(message) < 1000, "the message must not echo a huge value in full"


def test_prompt_at_the_limit_is_accepted() -> None:
    assert len(validate_params("t2v", {"prompt": "a" * MAX_PROMPT_CHARS}).prompt) == MAX_PROMPT_CHARS


def test_several_problems_reported_together() -> None:
    message = rejection("t2v", {"prompt": "x", "seed": "one", "video_length": -1, "bogus": 1})
    assert "seed" in message and "video_length" in message and "'bogus'" in message


def test_unknown_task_type_lists_supported_ones() -> None:
    message = rejection("make_coffee", {"prompt": "a cat"})
    assert "'make_coffee'" in message
    for supported in SUPPORTED_TASK_TYPES:
        assert supported in message


def test_unknown_task_type_rejected_before_params() -> None:
    message = rejection("make_coffee", {"nonsense": True})
    assert "make_coffee" in message


# ---- model_key_for ------------------------------------------------------------------------------


def test_model_key_for_explicit_model() -> None:
    assert model_key_for("t2v", '{"model": "t2v_2_2", "prompt": "x"}') == "t2v_2_2"


def test_model_key_for_alias_default() -> None:
    assert model_key_for("t2v_22", '{"prompt": "x"}') == "t2v_2_2"
    assert model_key_for("t2v", '{"prompt": "x"}') == "t2v_1.3B"


@pytest.mark.parametrize("text", ["{not json", "", "\x00"])
def test_model_key_for_never_raises_on_garbage(text: str) -> None:
    assert model_key_for("t2v_22", text) is None


def test_model_key_for_unknown_type_without_model() -> None:
    assert model_key_for("make_coffee", '{"prompt": "x"}') is None


def test_model_key_for_ignores_non_string_model() -> None:
    assert model_key_for("t2v", '{"model": 5, "prompt": "x"}') == "t2v_1.3B"
