"""The tiny model builder: complete diffusers folders, deterministic, small, idempotent."""

from __future__ import annotations

import json
from pathlib import Path

from wan_engine.tiny_models import TINY_MODEL_DIRS, build_tiny_models, is_complete_model_dir

MAX_MODEL_BYTES = 600 * 1024


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_builds_every_complete_small_model(tiny_models_dir: Path) -> None:
    for key, name in TINY_MODEL_DIRS.items():
        folder = tiny_models_dir / name
        assert is_complete_model_dir(folder), key
        size = sum(len(b) for b in _files(folder).values())
        assert size < MAX_MODEL_BYTES, (key, size)
        assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
        assert list((folder / "transformer").glob("*.safetensors"))


def test_model_index_layout(tiny_models_dir: Path) -> None:
    t21 = json.loads((tiny_models_dir / "tiny-wan2.1-t2v" / "model_index.json").read_text())
    t22 = json.loads((tiny_models_dir / "tiny-wan2.2-t2v" / "model_index.json").read_text())
    vace = json.loads((tiny_models_dir / "tiny-wan2.1-vace" / "model_index.json").read_text())
    assert t21["_class_name"] == "WanPipeline" and t21["boundary_ratio"] is None
    assert t21["transformer_2"] == [None, None]
    assert t22["boundary_ratio"] == 0.875 and t22["transformer_2"][1] == "WanTransformer3DModel"
    assert vace["_class_name"] == "WanVACEPipeline"
    assert vace["transformer"][1] == "WanVACETransformer3DModel"
    vace22 = json.loads((tiny_models_dir / "tiny-wan2.2-vace" / "model_index.json").read_text())
    assert vace22["boundary_ratio"] == 0.875 and vace22["transformer_2"][1] == "WanVACETransformer3DModel"
    i2v = json.loads((tiny_models_dir / "tiny-wan2.1-i2v" / "model_index.json").read_text())
    assert i2v["_class_name"] == "WanImageToVideoPipeline" and i2v["image_encoder"][1] == "CLIPVisionModel"
    i2v22 = json.loads((tiny_models_dir / "tiny-wan2.2-i2v" / "model_index.json").read_text())
    assert i2v22["boundary_ratio"] == 0.9 and i2v22["image_encoder"] == [None, None]
    ti2v = json.loads((tiny_models_dir / "tiny-wan2.2-ti2v" / "model_index.json").read_text())
    assert ti2v["_class_name"] == "WanPipeline" and ti2v["expand_timesteps"] is True
    ti2v_vae = json.loads((tiny_models_dir / "tiny-wan2.2-ti2v" / "vae" / "config.json").read_text())
    assert ti2v_vae["z_dim"] == 48 and ti2v_vae["patch_size"] == 2 and ti2v_vae["is_residual"] is True
    flf2v = json.loads((tiny_models_dir / "tiny-wan2.1-flf2v" / "transformer" / "config.json").read_text())
    assert flf2v["pos_embed_seq_len"] is not None and flf2v["image_dim"] is not None


def test_two_experts_have_different_weights(tiny_models_dir: Path) -> None:
    folder = tiny_models_dir / "tiny-wan2.2-t2v"
    high = (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    low = (folder / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert high != low


def test_build_is_deterministic_and_idempotent(tiny_models_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    paths = build_tiny_models(other)
    assert set(paths) == set(TINY_MODEL_DIRS)
    for name in TINY_MODEL_DIRS.values():
        assert _files(other / name) == _files(tiny_models_dir / name), name
    # A second build leaves complete models untouched (same inode, same mtime).
    marker = other / "tiny-wan2.1-t2v" / "model_index.json"
    before = marker.stat().st_mtime_ns
    build_tiny_models(other)
    assert marker.stat().st_mtime_ns == before
    assert not list(other.glob(".*partial*")), "no temporary build folder left behind"


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    broken = tmp_path / "tiny-wan2.1-t2v"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    build_tiny_models(tmp_path)
    assert is_complete_model_dir(broken)
