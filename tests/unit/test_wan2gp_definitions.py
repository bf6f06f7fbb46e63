"""Wan2GP's model definitions read as they are: architectures, references, variants, modules, other families.

Fixtures are written here in Wan2GP's layout (the keys of its defaults/t2v_2_2.json, vace_14B_2_2.json,
...); the last test reads every definition of a Wan2GP checkout when its mirror is on this machine.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headless_wgp import WanOrchestrator
from wan_engine import model_sources
from wan_engine.errors import ModelUnavailableError, PresetError, UnknownModelError
from wan_engine.model_sources import check_model, resolve_model
from wan_engine.presets import load_presets
from wan_engine.wan2gp_definitions import WAN2GP_ARCHITECTURES

HF = "https://huggingface.co/DeepBeepMeep/Wan2.2/resolve/main/"
MIRROR = Path("/work/.mirror/deepbeepmeep+Wan2GP/repo")


def _write(folder: Path, key: str, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    path.write_text(json.dumps(data))
    return path


def _wan22_t2v() -> dict[str, Any]:
    """defaults/t2v_2_2.json's layout: three variants per expert, guidance phases, no base."""
    return {
        "model": {
            "name": "Wan2.2 Text2video 14B",
            "architecture": "t2v_2_2",
            "description": "Wan 2.2 Text 2 Video model",
            "URLs": [HF + f"wan2.2_text2video_14B_high_{v}.safetensors" for v in ("mbf16", "quanto_mbf16_int8")],
            "URLs2": [HF + f"wan2.2_text2video_14B_low_{v}.safetensors" for v in ("mbf16", "quanto_mbf16_int8")],
            "group": "wan2_2",
        },
        "guidance_phases": 2,
        "switch_threshold": 875,
        "guidance_scale": 4,
        "guidance2_scale": 3,
        "flow_shift": 12,
    }


def _vace22() -> dict[str, Any]:
    """defaults/vace_14B_2_2.json's layout: URLs / URLs2 / modules naming other definitions."""
    return {
        "model": {
            "name": "Wan2.2 Vace 14B",
            "architecture": "vace_14B_2_2",
            "modules": ["vace_14B"],
            "description": "partial support",
            "URLs": "t2v_2_2",
            "URLs2": "t2v_2_2",
        },
        "guidance_phases": 2,
        "guidance_scale": 1,
        "flow_shift": 2,
    }


def _vace14() -> dict[str, Any]:
    module = "https://huggingface.co/DeepBeepMeep/Wan2.1/resolve/main/wan2.1_Vace_14B_module_"
    return {
        "model": {
            "name": "Vace 14B",
            "architecture": "vace_14B",
            "modules": [[module + "mbf16.safetensors", module + "quanto_mbf16_int8.safetensors"]],
            "description": "VACE",
            "URLs": "t2v",
        }
    }


def _other_family(architecture: str) -> dict[str, Any]:
    return {"model": {"name": "x", "architecture": architecture, "description": "", "URLs": ["a.safetensors"]}}


def test_wan2gp_architectures_map_to_ours_with_their_group_and_base(tmp_path: Path) -> None:
    _write(tmp_path, "t2v_2_2", _wan22_t2v())
    _write(tmp_path, "vace_14B_2_2", _vace22())
    _write(tmp_path, "vace_14B", _vace14())
    small = {"name": "s", "architecture": "t2v_1.3B", "description": "", "URLs": ["x_1.3B_mbf16.safetensors"]}
    _write(tmp_path, "t2v_1.3B", {"model": small})
    presets = load_presets(user_dir=tmp_path)
    wan22 = presets.get("t2v_2_2")
    assert (wan22.model.architecture, wan22.model.group, wan22.is_dual_expert) == ("t2v", "wan2_2", True)
    assert wan22.model.default_base == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and wan22.settings.guidance_phases == 2
    small_t2v = presets.get("t2v_1.3B").model
    assert small_t2v.wan2gp_architecture == "t2v_1.3B" and small_t2v.default_base == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    # vace_14B_2_2: no group in the file (its architecture says Wan 2.2), files and module by reference.
    vace = presets.get("vace_14B_2_2")
    assert (vace.model.architecture, vace.model.group, vace.is_dual_expert) == ("vace", "wan2_2", True)
    assert vace.model.urls == wan22.model.urls and vace.model.urls2 == wan22.model.urls2
    assert vace.model.modules == presets.get("vace_14B").model.modules and len(vace.model.modules[0]) == 2
    assert vace.model.modules2 == vace.model.modules  # a list module goes onto both experts (Wan2GP's submodel 0)
    # vace_14B's URLs name the built-in t2v (a diffusers repo): it inherits that folder.
    assert presets.get("vace_14B").model.urls == presets.get("t2v").model.urls


def test_every_served_wan2gp_architecture_has_a_mode_and_a_base() -> None:
    from wan_engine.limits import MODE_ARCHITECTURES

    served = {arch for archs in MODE_ARCHITECTURES.values() for arch in archs}
    for name, wan in WAN2GP_ARCHITECTURES.items():
        assert wan.architecture in served, name
        assert wan.base.count("/") == 1 and wan.group in ("wan", "wan2_2"), name


def test_a_module_per_expert(tmp_path: Path) -> None:
    data = _wan22_t2v()
    data["model"]["modules"] = [{"URLs": ["high_module.safetensors"], "URLs2": ["low_module.safetensors"]}]
    _write(tmp_path, "t2v_2_2", data)
    model = load_presets(user_dir=tmp_path).get("t2v_2_2").model
    assert model.modules == (("high_module.safetensors",),) and model.modules2 == (("low_module.safetensors",),)


def test_ui_keys_are_recorded_as_ignored_and_typos_still_refused(tmp_path: Path) -> None:
    data = _wan22_t2v()
    data.update({"prompt": "a cat", "seed": 7, "batch_size": 1, "sample_solver": ""})
    data["model"].update({"visible": False, "auto_quantize": True, "settings_dir": ["x"], "author": "me"})
    _write(tmp_path, "t2v_2_2", data)
    preset = load_presets(user_dir=tmp_path).get("t2v_2_2")
    assert set(preset.ignored) == {"prompt", "batch_size", "model.visible", "model.auto_quantize", "model.settings_dir",
                                   "model.author"}  # fmt: skip
    assert preset.settings.seed == 7 and preset.settings.sample_solver == "unipc"  # "" is Wan2GP's default
    data["guidance_phase"] = 3  # a typo is not a Wan2GP key: still an error naming it
    path = _write(tmp_path, "t2v_2_2", data)
    with pytest.raises(PresetError, match="guidance_phase") as info:
        load_presets(user_dir=tmp_path)
    assert str(path) in str(info.value)


def test_other_families_are_skipped_with_one_warning_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    others = {"ltx2_22B": "ltx2_22B", "flux": "flux", "hunyuan": "hunyuan", "qwen_image_20B": "qwen_image_20B"}
    others.update({"multitalk": "multitalk", "odd": "new_arch"})
    for key, architecture in others.items():
        _write(tmp_path, key, _other_family(architecture))
    _write(tmp_path, "t2v_2_2", _wan22_t2v())
    with caplog.at_level(logging.WARNING, logger="wan_engine.presets"):
        presets = load_presets(user_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "skipping model definition" in r.getMessage()]
    assert len(warnings) == 6
    assert any("LTX Video" in w for w in warnings) and any("'multitalk' is a Wan variant" in w for w in warnings)
    assert "t2v_2_2" in presets and set(presets.skipped) == set(others)
    with pytest.raises(UnknownModelError, match=r"ltx2_22B.*skipped.*LTX Video"):
        presets.get("ltx2_22B")


def test_several_preset_dirs_later_ones_override(tmp_path: Path) -> None:
    defaults, finetunes = tmp_path / "defaults", tmp_path / "finetunes"
    _write(defaults, "t2v_2_2", _wan22_t2v())
    _write(finetunes, "t2v_2_2", {"model": {"name": "mine"}, "flow_shift": 8})  # Wan2GP: a finetune overrides
    fused = {"name": "f", "architecture": "t2v_2_2", "description": "", "URLs": "t2v_2_2", "URLs2": "t2v_2_2"}
    _write(finetunes, "my_finetune", {"model": fused, "num_inference_steps": 6})
    import os

    for user_dirs in ([defaults, finetunes], f"{defaults}{os.pathsep}{finetunes}"):
        presets = load_presets(user_dir=user_dirs)
        assert presets.get("t2v_2_2").model.name == "mine" and presets.get("t2v_2_2").settings.flow_shift == 8
        assert presets.get("my_finetune").model.urls2 == presets.get("t2v_2_2").model.urls2


def test_unresolvable_references_skip_that_definition_only(tmp_path: Path) -> None:
    for key, other in (("a", "b"), ("b", "a")):
        _write(tmp_path, key, {"model": {"name": key, "architecture": "t2v", "description": "", "URLs": other}})
    # finetunes/ alone: "vace_14B" is the built-in diffusers VACE preset, which has no Wan2GP module file.
    _write(tmp_path, "vace_14B_2_2", _vace22())
    _write(tmp_path, "t2v_2_2", _wan22_t2v())
    presets = load_presets(user_dir=tmp_path)
    assert "loop" in presets.skipped["a"] and "loop" in presets.skipped["b"]
    assert "'vace_14B' must name a definition with exactly one module" in presets.skipped["vace_14B_2_2"]
    assert "t2v_2_2" in presets and "vace_14B" in presets


# ----- files: variants, default base, downloads, modules ------------------------------------------------


def _base_folder(tiny_models_dir: Path, models_dir: Path, name: str, source: str = "tiny-wan2.1-t2v") -> None:
    """The default base's folder name under --models-dir (<models_dir>/<repo name>), from a tiny model."""
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / name).symlink_to(tiny_models_dir / source, target_is_directory=True)


@pytest.fixture(scope="module")
def single_file(tiny_models_dir: Path) -> Path:
    from wan_engine.tiny_models import build_tiny_extras

    return build_tiny_extras(tiny_models_dir)["single_file"]


def test_the_present_variant_is_used_with_the_default_base(
    tiny_models_dir: Path, single_file: Path, tmp_path: Path
) -> None:
    models = tmp_path / "ckpts"  # a Wan2GP ckpts/ folder: file names only
    _base_folder(tiny_models_dir, models, "Wan2.1-T2V-14B-Diffusers")
    shutil.copy(single_file, models / "wan2.1_text2video_14B_mfp16.safetensors")  # only the second variant
    urls = [f"{HF}wan2.1_text2video_14B_{v}.safetensors" for v in ("mbf16", "mfp16")]
    model = {"name": "t", "architecture": "t2v", "description": "", "URLs": urls}
    _write(tmp_path / "defs", "t2v", {"model": model, "resolution": "64x48", "num_inference_steps": 2})
    presets = load_presets(user_dir=tmp_path / "defs")
    check = check_model(presets.get("t2v"), models)
    assert check.status == "present", check
    assert check.single_file == models / "wan2.1_text2video_14B_mfp16.safetensors"
    assert check.path == models / "Wan2.1-T2V-14B-Diffusers"
    orchestrator = WanOrchestrator(models, presets)
    orchestrator.load_model("t2v")
    result = orchestrator.generate_t2v("a boat", output_path=tmp_path / "v.png", seed=1, video_length=1)
    assert result.output_path.is_file()
    orchestrator.unload_model()


def test_allow_download_fetches_only_the_first_variant_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "defs", "t2v_2_2", _wan22_t2v())
    _write(tmp_path / "defs", "vace_14B", _vace14())
    _write(tmp_path / "defs", "vace_14B_2_2", _vace22())  # the same files, by reference
    preset = load_presets(user_dir=tmp_path / "defs").get("t2v_2_2")
    fetched: list[str] = []
    monkeypatch.setattr(model_sources, "download", lambda item: fetched.append(item.describe()))
    with pytest.raises(ModelUnavailableError):  # nothing was really written: still missing after the fetch
        resolve_model(preset, tmp_path / "models", allow_download=True)
    repo = "DeepBeepMeep/Wan2.2/"
    assert fetched == [
        repo + "wan2.2_text2video_14B_high_mbf16.safetensors",
        repo + "wan2.2_text2video_14B_low_mbf16.safetensors",
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers",  # the default base: configs, VAE, text encoder
    ]


def test_a_missing_default_base_says_which_folder_to_put_where(tmp_path: Path) -> None:
    _write(tmp_path / "defs", "t2v_2_2", _wan22_t2v())
    check = check_model(load_presets(user_dir=tmp_path / "defs").get("t2v_2_2"), tmp_path / "models")
    assert any("Wan-AI/Wan2.2-T2V-A14B-Diffusers" in p and "model.base" in p for p in check.problems), check.problems
    assert any(str(tmp_path / "models" / "Wan2.2-T2V-A14B-Diffusers") in m for m in check.missing), check.missing


def test_modules_are_resolved_to_their_present_variant(
    tiny_models_dir: Path, single_file: Path, tmp_path: Path
) -> None:
    models = tmp_path / "ckpts"
    _base_folder(tiny_models_dir, models, "Wan2.1-VACE-14B-diffusers", "tiny-wan2.1-vace")
    shutil.copy(single_file, models / "wan2.1_text2video_14B_mbf16.safetensors")
    shutil.copy(single_file, models / "wan2.1_Vace_14B_module_quanto_mbf16_int8.safetensors")  # header check only
    t2v = {
        "name": "t",
        "architecture": "t2v",
        "description": "",
        "URLs": [HF + "wan2.1_text2video_14B_mbf16.safetensors"],
    }
    _write(tmp_path / "defs", "t2v", {"model": t2v})
    _write(tmp_path / "defs", "vace_14B", _vace14())
    presets = load_presets(user_dir=tmp_path / "defs")
    check = check_model(presets.get("vace_14B"), models)
    assert check.status == "present", check
    assert check.modules == (models / "wan2.1_Vace_14B_module_quanto_mbf16_int8.safetensors",)


# ----- every definition of a Wan2GP checkout ------------------------------------------------------------


def _mirror_definitions(target: Path) -> list[Path]:
    git = ["git", f"--git-dir={MIRROR}"]
    names = subprocess.run(
        [*git, "ls-tree", "-r", "--name-only", "HEAD", "defaults/", "finetunes/"], capture_output=True, text=True
    ).stdout.split()
    written = []
    for name in (n for n in names if n.endswith(".json")):
        text = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True, text=True, check=True).stdout
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no Wan2GP mirror on this machine")
def test_every_wan2gp_definition_loads_or_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _mirror_definitions(tmp_path)
    assert len(files) > 100
    dirs = [tmp_path / "defaults", tmp_path / "finetunes"]
    with caplog.at_level(logging.WARNING, logger="wan_engine.presets"):
        presets = load_presets(user_dir=dirs)
    warnings = [r.getMessage() for r in caplog.records if "skipping model definition" in r.getMessage()]
    for path in files:
        key = path.stem
        assert (key in presets) != (key in presets.skipped), key
        assert sum(str(path) in w for w in warnings) == (1 if key in presets.skipped else 0), key
    wan = [p for p in files if p.stem in presets and json.loads(p.read_text())["model"]["architecture"]
           in WAN2GP_ARCHITECTURES]  # fmt: skip
    assert len(wan) >= 27  # every definition of the Wan families served here
    for path in wan:
        preset = presets.get(path.stem)
        assert preset.model.urls and preset.model.default_base, path.stem
        for variants in preset.model.modules:
            assert variants and all(v.endswith(".safetensors") for v in variants), path.stem
    three = presets.get("vace_14B_lightning_3p_2_2")
    assert three.settings.guidance_phases == 3 and three.settings.sample_solver == "euler"
    assert three.model.loras_multipliers == ("0;1;0", "0;0;1") and three.is_dual_expert
    assert np.isclose(three.settings.switch_threshold2 or 0, 800)
