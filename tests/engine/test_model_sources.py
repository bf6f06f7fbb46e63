"""Finding a preset's weights on disk: folders, repo ids, the local HF cache, clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from headless_wgp import WanOrchestrator
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_sources import check_model, resolve_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, Preset, PresetRegistry, load_presets


def _user_preset(tmp_path: Path, key: str, urls: str, *, group: str = "wan") -> Preset:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    model = {"name": key, "architecture": "t2v", "URLs": urls, "group": group}
    (user / f"{key}.json").write_text(json.dumps({"model": model}))
    return load_presets(BUILTIN_PRESETS_DIR, user).get(key)


def test_tiny_models_are_present(tiny_models_dir: Path, builtin_presets: PresetRegistry) -> None:
    for key in ("tiny_t2v", "tiny_t2v_2_2", "tiny_vace"):
        check = check_model(builtin_presets.get(key), tiny_models_dir)
        assert check.status == "present", check
        assert check.path is not None and (check.path / "model_index.json").is_file()


def test_missing_model_report_names_every_path(tmp_path: Path, builtin_presets: PresetRegistry) -> None:
    preset = builtin_presets.get("t2v_1.3B")
    check = check_model(preset, tmp_path)
    assert check.status == "missing"
    assert any("model_index.json" in m for m in check.missing)
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model(preset, tmp_path)
    message = str(info.value)
    assert "'t2v_1.3B'" in message and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in message
    assert str(tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers") in message
    assert str(tmp_path / "Wan2.1-T2V-1.3B-Diffusers") in message
    assert "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" in message  # the HF cache location
    assert "--models-dir" in message
    for candidate in check.candidates:
        assert str(candidate.path) in message


def test_repo_id_found_under_models_dir_by_name(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", models / "tiny-repo")
    check = check_model(_user_preset(tmp_path, "by_repo", "SomeOrg/tiny-repo"), models)
    assert check.status == "present" and check.path == models / "tiny-repo"


def test_repo_id_found_in_local_hf_cache(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    repo = cache / "models--SomeOrg--cached-tiny"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the lookup must never download
    check = check_model(_user_preset(tmp_path, "cached", "SomeOrg/cached-tiny"), tmp_path / "empty")
    assert check.status == "present"
    assert check.path == (repo / "snapshots" / commit).resolve()


def test_incomplete_folder_lists_missing_files(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", models / "tiny-wan2.1-t2v")
    (models / "tiny-wan2.1-t2v" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    check = check_model(load_presets().get("tiny_t2v"), models)
    assert check.status == "missing"
    assert any("vae/" in m and "safetensors" in m for m in check.missing), check.missing


def test_pickle_only_component_is_refused(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = models / "tiny-wan2.1-t2v"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    check = check_model(load_presets().get("tiny_t2v"), models)
    assert check.status == "missing"
    assert any("pickle" in p and "diffusion_pytorch_model.bin" in p for p in check.problems), check.problems
    orchestrator = WanOrchestrator(models)
    with pytest.raises(ModelUnavailableError, match="pickle"):
        orchestrator.load_model("tiny_t2v")
    assert orchestrator.current_model is None


def test_dual_expert_preset_needs_transformer_2(tiny_models_dir: Path, tmp_path: Path) -> None:
    preset = _user_preset(tmp_path, "fake22", str(tiny_models_dir / "tiny-wan2.1-t2v"), group="wan2_2")
    check = check_model(preset, tmp_path)
    assert check.status == "missing"
    assert any("transformer_2" in m for m in check.missing)


def test_single_file_checkpoint_is_reported(tmp_path: Path) -> None:
    check = check_model(_user_preset(tmp_path, "single", "wan2.1_t2v_1.3B_bf16.safetensors"), tmp_path)
    assert check.status == "missing"
    assert any("single-file" in p for p in check.problems)
