"""LoRA folders: several of them, their group and Wan2GP subfolders, preset LoRAs by URL, the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from headless_wgp import WanOrchestrator
from wan_engine import lora_downloads
from wan_engine.errors import InvalidRequestError
from wan_engine.loras import resolve_lora_path
from wan_engine.presets import load_presets
from wan_engine.tiny_models import tiny_lora_weights

URL = "https://huggingface.co/DeepBeepMeep/Wan2.2/resolve/main/loras_accelerators/Lightning_HIGH.safetensors"


def _lora(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_lora_weights(), str(path))
    return path


def _preset(folder: Path, key: str, architecture: str, urls: str, **model: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"model": {"name": key, "architecture": architecture, "description": "", "URLs": urls, **model}}
    (folder / f"{key}.json").write_text(json.dumps({**data, "resolution": "64x48", "num_inference_steps": 2}))


def test_folders_are_looked_in_in_order_each_with_its_subfolders(tmp_path: Path) -> None:
    comfy, wan2gp = tmp_path / "comfy" / "loras", tmp_path / "wan2gp" / "loras"
    flat = _lora(comfy / "style.safetensors")  # ComfyUI models/loras: flat
    in_i2v = _lora(wan2gp / "wan_i2v" / "motion.safetensors")  # Wan2GP's folder for Wan 2.1 i2v
    _lora(wan2gp / "style.safetensors")  # the same name later: the first folder wins
    dirs = (comfy, wan2gp)
    assert resolve_lora_path("style", dirs, subdirs=("wan", "wan_i2v")) == flat
    assert resolve_lora_path("motion.safetensors", dirs, subdirs=("wan", "wan_i2v")) == in_i2v
    with pytest.raises(InvalidRequestError) as info:
        resolve_lora_path("motion", dirs, subdirs=("wan2_2", "wan"))  # a Wan 2.2 model does not look in wan_i2v/
    message = str(info.value)
    for looked in (comfy / "wan2_2", comfy / "wan", comfy, wan2gp / "wan2_2", wan2gp / "wan", wan2gp):
        assert str(looked / "motion.safetensors") in message


def test_each_model_looks_in_its_wan2gp_subfolder(tmp_path: Path) -> None:
    definitions = tmp_path / "defs"
    for key, architecture in [
        ("a", "t2v_1.3B"),
        ("b", "i2v"),
        ("c", "ti2v_2_2"),
        ("d", "t2v_2_2"),
        ("e", "flf2v_720p"),
    ]:
        _preset(definitions, key, architecture, "x.safetensors")
    presets = load_presets(user_dir=definitions)
    assert presets.get("a").model.lora_subdirs == ("wan", "wan_1.3B")
    assert presets.get("b").model.lora_subdirs == ("wan", "wan_i2v")
    assert presets.get("c").model.lora_subdirs == ("wan2_2", "wan_5B")
    assert presets.get("d").model.lora_subdirs == ("wan2_2", "wan")  # Wan2GP keeps A14B LoRAs in loras/wan
    assert presets.get("e").model.lora_subdirs == ("wan", "wan_i2v")


def test_a_preset_lora_url_is_found_by_file_name_or_downloaded_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    present = _lora(second / "wan2_2" / "Lightning_HIGH.safetensors")
    assert lora_downloads.preset_lora_path(URL, (first, second), ("wan2_2",)) == present
    present.unlink()
    with pytest.raises(InvalidRequestError, match="--allow-download"):
        lora_downloads.preset_lora_path(URL, (first, second), ("wan2_2",))
    cached = _lora(tmp_path / "hub" / "cached.safetensors")
    calls: list[tuple[Any, ...]] = []

    def fake_download(repo: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo, filename, revision))
        return str(cached)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    got = lora_downloads.preset_lora_path(URL, (first, second), ("wan2_2",), allow_download=True)
    assert got == first / "Lightning_HIGH.safetensors" and got.read_bytes() == cached.read_bytes()
    assert calls == [("DeepBeepMeep/Wan2.2", "loras_accelerators/Lightning_HIGH.safetensors", None)]
    assert not list(first.glob(".*.part"))  # written under a temporary name, then renamed
    elsewhere = "https://example.com/loras/x.safetensors"
    with pytest.raises(InvalidRequestError, match="not in the download allow-list"):
        lora_downloads.preset_lora_path(elsewhere, (first,), (), allow_download=True)
    with pytest.raises(InvalidRequestError, match=r"only \.safetensors"):
        lora_downloads.preset_lora_path("https://huggingface.co/a/b/resolve/main/x.ckpt", (first,), ())


def test_a_generation_uses_a_lora_from_the_second_folder(tiny_models_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "empty", tmp_path / "wan2gp-loras"
    first.mkdir()
    _lora(second / "wan" / "style.safetensors")
    orchestrator = WanOrchestrator(tiny_models_dir, loras_dir=[first, second])
    orchestrator.load_model("tiny_t2v")
    try:
        result = orchestrator.generate_t2v(
            "a cat", output_path=tmp_path / "v.png", seed=1, video_length=1, num_inference_steps=2, lora_names=["style"]
        )
    finally:
        orchestrator.unload_model()
    assert result.loras[0]["file"] == str(second / "wan" / "style.safetensors")


def test_loras_dir_flag_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    from worker.cli.parser import build_parser
    from worker.cli.run import _settings

    monkeypatch.setenv("WAN_LORAS_DIR", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    monkeypatch.setenv("WAN_PRESETS_DIR", str(tmp_path / "defaults"))
    args = build_parser().parse_args(["run"])
    assert args.loras_dir == (tmp_path / "a", tmp_path / "b") and args.presets_dir == (tmp_path / "defaults",)
    args = build_parser().parse_args(
        ["run", "--loras-dir", str(tmp_path / "c"), "--presets-dir", "d1", "--presets-dir", "d2", "--loras-dir", "e"]
    )
    assert args.loras_dir == (tmp_path / "c", Path("e"))  # the flags replace the environment's list
    assert args.presets_dir == (Path("d1"), Path("d2"))
    settings = _settings(args)
    assert settings.loras_dirs == (tmp_path / "c", Path("e")) and settings.presets_dir == (Path("d1"), Path("d2"))


def test_the_queue_hands_its_lora_folders_to_the_orchestrator(tmp_path: Path, tiny_models_dir: Path) -> None:
    from headless_model_management import HeadlessTaskQueue

    folders = [tmp_path / "l1", tmp_path / "l2"]
    with HeadlessTaskQueue(
        f"sqlite:///{tmp_path / 'q.db'}", models_dir=tiny_models_dir, presets_dir=None, loras_dir=folders
    ) as queue:
        assert queue.settings.loras_dirs == tuple(folders)
