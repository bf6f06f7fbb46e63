"""Preset files: validation, user overrides property by property, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wan_engine.errors import PresetError, UnknownModelError
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets


def _write(folder: Path, key: str, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    path.write_text(json.dumps(data))
    return path


def test_builtin_presets(builtin_presets: PresetRegistry) -> None:
    assert {"tiny_t2v", "tiny_t2v_2_2", "tiny_vace", "t2v_1.3B", "t2v", "t2v_2_2", *MODE_PRESETS} <= set(
        builtin_presets
    )
    small = builtin_presets.get("t2v_1.3B")
    assert small.model.urls == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",)
    assert small.settings.resolution == "832x480" and small.settings.video_length == 81
    assert not small.is_dual_expert
    wan22 = builtin_presets.get("t2v_2_2")
    assert wan22.model.urls == ("Wan-AI/Wan2.2-T2V-A14B-Diffusers",)
    assert wan22.is_dual_expert and wan22.settings.switch_threshold == 875
    assert builtin_presets.get("tiny_t2v_2_2").is_dual_expert
    assert builtin_presets.get("tiny_vace").model.architecture == "vace"
    for key in builtin_presets:
        width, height = (int(v) for v in builtin_presets.get(key).settings.resolution.split("x"))
        assert width % 16 == 0 and height % 16 == 0, key


# key -> (architecture, repo id, dual, steps, guidance, guidance2, flow_shift, switch_threshold, resolution, frames)
MODE_PRESETS = {
    "vace_1.3B": ("vace", "Wan-AI/Wan2.1-VACE-1.3B-diffusers", False, 50, 5.0, None, 3.0, None, "832x480", 81),
    "vace_14B": ("vace", "Wan-AI/Wan2.1-VACE-14B-diffusers", False, 50, 5.0, None, 3.0, None, "832x480", 81),
    "i2v_14B": ("i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", False, 40, 5.0, None, 3.0, None, "832x480", 81),
    "flf2v_14B": ("flf2v", "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", False, 50, 5.0, None, 16.0, None, "1280x720", 81),
    "t2v_2_2": ("t2v", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", True, 40, 4.0, 3.0, 12.0, 875, "832x480", 81),
    "i2v_2_2": ("i2v", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", True, 40, 3.5, 3.5, 5.0, 900, "832x480", 81),
    "ti2v_2_2": ("ti2v", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", False, 50, 5.0, None, 5.0, None, "1280x704", 121),
    "vace_14B_cocktail_2_2": (
        "vace",
        "linoyts/Wan2.2-VACE-Fun-14B-diffusers",
        True,
        10,
        1.0,
        1.0,
        2.0,
        875,
        "832x480",
        81,
    ),
}


@pytest.mark.parametrize("key", sorted(MODE_PRESETS))
def test_mode_presets(builtin_presets: PresetRegistry, key: str) -> None:
    arch, repo, dual, steps, guidance, guidance2, shift, switch, resolution, frames = MODE_PRESETS[key]
    preset = builtin_presets.get(key)
    settings = preset.settings
    assert (preset.model.architecture, preset.model.urls, preset.is_dual_expert) == (arch, (repo,), dual)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.guidance2_scale) == (
        steps,
        guidance,
        guidance2,
    )
    assert (settings.flow_shift, settings.switch_threshold) == (shift, switch)
    assert (settings.resolution, settings.video_length) == (resolution, frames)
    assert preset.model.group == ("wan2_2" if "2_2" in key else "wan")


def test_every_tiny_model_has_a_preset(builtin_presets: PresetRegistry) -> None:
    from wan_engine.tiny_models import TINY_MODEL_DIRS

    for key, folder in TINY_MODEL_DIRS.items():
        assert builtin_presets.get(key).model.urls == (folder,)
    assert builtin_presets.get("tiny_vace_2_2").is_dual_expert and builtin_presets.get("tiny_i2v_2_2").is_dual_expert
    assert not builtin_presets.get("tiny_ti2v").is_dual_expert


def test_user_file_overrides_property_by_property(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user_file = _write(user, "tiny_t2v", {"num_inference_steps": 2, "model": {"name": "Mine"}})
    registry = load_presets(BUILTIN_PRESETS_DIR, user)
    preset = registry.get("tiny_t2v")
    assert preset.settings.num_inference_steps == 2
    assert preset.model.name == "Mine"
    # Everything the user did not mention comes from the built-in file.
    builtin = load_presets(BUILTIN_PRESETS_DIR).get("tiny_t2v")
    assert preset.model.urls == builtin.model.urls
    assert preset.model.architecture == builtin.model.architecture
    assert preset.settings.resolution == builtin.settings.resolution
    assert preset.settings.flow_shift == builtin.settings.flow_shift
    assert preset.source_files == (BUILTIN_PRESETS_DIR / "tiny_t2v.json", user_file)


def test_user_file_adds_a_new_key(tmp_path: Path) -> None:
    user = tmp_path / "user"
    model = {"name": "Local", "architecture": "t2v", "URLs": ["/models/mine"], "group": "wan"}
    _write(user, "my_model", {"model": model, "fps": 24})
    preset = load_presets(BUILTIN_PRESETS_DIR, user).get("my_model")
    assert preset.model.urls == ("/models/mine",)
    assert preset.settings.fps == 24


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"num_inference_step": 3}, "num_inference_step"),  # unknown key (typo)
        ({"model": {"architecture": "t2i"}}, "model.architecture"),
        ({"model": {"URLz": "x"}}, "model.URLz"),
        ({"resolution": "832*480"}, "resolution"),
    ],
)
def test_bad_user_file_names_file_and_field(tmp_path: Path, data: dict, field: str) -> None:
    path = _write(tmp_path / "user", "tiny_t2v", data)
    with pytest.raises(PresetError) as info:
        load_presets(BUILTIN_PRESETS_DIR, tmp_path / "user")
    assert str(path) in str(info.value)
    assert repr(field) in str(info.value)


def test_new_key_without_model_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "user", "orphan", {"fps": 8})
    with pytest.raises(PresetError, match="'model'") as info:
        load_presets(BUILTIN_PRESETS_DIR, tmp_path / "user")
    assert str(path) in str(info.value)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "broken.json").write_text("{")
    with pytest.raises(PresetError, match=r"broken\.json"):
        load_presets(BUILTIN_PRESETS_DIR, user)


def test_unknown_model_lists_known_keys(builtin_presets: PresetRegistry) -> None:
    with pytest.raises(UnknownModelError) as info:
        builtin_presets.get("t2v_9000B")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "t2v_9000B" in message
    for key in builtin_presets:
        assert key in message
