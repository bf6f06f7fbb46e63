"""Single-file transformer checkpoints (original Wan and ComfyUI layouts) through the real loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file

from headless_wgp import WanOrchestrator
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.single_file import (
    COMFYUI_PREFIX,
    detect_layout,
    diffusers_key_to_wan,
    export_single_file,
    load_single_file_transformer,
)
from wan_engine.video_io import read_video_frames

PROMPT = "a lighthouse in a storm"
# Names of the official Wan2.1 checkpoints (Wan-AI/Wan2.1-T2V-1.3B, diffusion_pytorch_model.safetensors).
OFFICIAL_KEYS = {
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "text_embedding.2.weight",
    "time_embedding.0.weight",
    "time_embedding.2.weight",
    "time_projection.1.weight",
    "head.head.weight",
    "head.modulation",
    "blocks.0.modulation",
    "blocks.0.self_attn.q.weight",
    "blocks.0.self_attn.o.weight",
    "blocks.0.self_attn.norm_q.weight",
    "blocks.0.cross_attn.k.weight",
    "blocks.0.norm3.weight",
    "blocks.0.ffn.0.weight",
    "blocks.0.ffn.2.weight",
}


@pytest.fixture(scope="module")
def sf_models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with the tiny diffusers folders (links) and their transformers as single files."""
    models = tmp_path_factory.mktemp("single_file_models")
    for name in ("tiny-wan2.1-t2v", "tiny-wan2.2-t2v", "tiny-wan2.1-vace"):
        os.symlink(tiny_models_dir / name, models / name)
    t21 = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.1-t2v", subfolder="transformer")
    high = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.2-t2v", subfolder="transformer")
    low = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.2-t2v", subfolder="transformer_2")
    vace = WanVACETransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.1-vace", subfolder="transformer")
    for layout in ("wan", "comfyui"):
        export_single_file(t21, models / "single" / f"t2v_{layout}.safetensors", layout)  # type: ignore[arg-type]
    export_single_file(high, models / "single" / "high.safetensors", "wan")
    export_single_file(low, models / "single" / "low_comfy.safetensors", "comfyui")
    export_single_file(vace, models / "single" / "vace.safetensors", "wan")
    return models


def _presets(tmp_path: Path, **models: dict) -> PresetRegistry:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    for key, model in models.items():
        settings = {"resolution": "64x48", "video_length": 5, "num_inference_steps": 3, "guidance_scale": 5.0}
        model = {"name": key, "architecture": "t2v", **model}
        (user / f"{key}.json").write_text(json.dumps({"model": model, **settings}))
    return load_presets(BUILTIN_PRESETS_DIR, user)


def _frames(models_dir: Path, presets: PresetRegistry, key: str, out: Path) -> np.ndarray:
    orchestrator = WanOrchestrator(models_dir, presets)
    orchestrator.load_model(key)
    result = orchestrator.generate_t2v(PROMPT, output_path=out / f"{key}.mp4", seed=7)
    orchestrator.unload_model()
    return read_video_frames(result.output_path).astype(np.float32)


@pytest.mark.parametrize("folder", ["tiny-wan2.1-t2v", "tiny-wan2.1-vace", "tiny-wan2.1-i2v"])
def test_inverse_mapping_roundtrips_through_diffusers_converter(tiny_models_dir: Path, folder: str) -> None:
    cls = WanVACETransformer3DModel if "vace" in folder else WanTransformer3DModel
    state = cls.from_pretrained(tiny_models_dir / folder, subfolder="transformer").state_dict()
    original = {diffusers_key_to_wan(k): v for k, v in state.items()}
    assert set(original) >= OFFICIAL_KEYS, OFFICIAL_KEYS - set(original)
    if "vace" in folder:
        assert {"vace_blocks.0.before_proj.weight", "vace_blocks.0.after_proj.weight"} <= set(original)
    if "i2v" in folder:  # CLIP image projection and the extra image key/value projections
        assert {"img_emb.proj.1.weight", "img_emb.proj.4.bias", "blocks.0.cross_attn.k_img.weight"} <= set(original)
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # every tensor lands where it came from
    comfy = {COMFYUI_PREFIX + k: v for k, v in original.items()}
    if "vace" in folder:
        # diffusers' detector keys VACE on this name, then knows only the 1.3B / 14B widths (and fails on
        # others): one reason an explicit config is always passed.
        assert "vace_blocks.0.after_proj.bias" in original
    else:  # diffusers' own detector takes it for a Wan checkpoint, in both layouts
        assert infer_diffusers_model_type(original).startswith("wan")
        assert infer_diffusers_model_type(comfy).startswith("wan")
    assert (
        detect_layout(original) == "wan" and detect_layout(comfy) == "comfyui" and detect_layout(state) == "diffusers"
    )


def test_exported_files_have_the_layouts(sf_models: Path) -> None:
    wan = load_file(sf_models / "single" / "t2v_wan.safetensors")
    comfy = load_file(sf_models / "single" / "t2v_comfyui.safetensors")
    assert set(wan) >= OFFICIAL_KEYS
    assert set(comfy) == {COMFYUI_PREFIX + k for k in wan}
    assert all(torch.equal(wan[k], comfy[COMFYUI_PREFIX + k]) for k in wan)


@pytest.fixture(scope="module")
def t2v_presets(sf_models: Path, tmp_path_factory: pytest.TempPathFactory) -> PresetRegistry:
    """The tiny T2V folder, its transformer as single files, and another model's weights as a control."""
    single = {f"single_{layout}": f"single/t2v_{layout}.safetensors" for layout in ("wan", "comfyui")}
    return _presets(
        tmp_path_factory.mktemp("t2v_presets"),
        folder={"URLs": "tiny-wan2.1-t2v"},
        other={"URLs": "single/low_comfy.safetensors", "base": "tiny-wan2.1-t2v"},
        **{key: {"URLs": urls, "base": "tiny-wan2.1-t2v"} for key, urls in single.items()},
    )


@pytest.fixture(scope="module")
def folder_frames(sf_models: Path, t2v_presets: PresetRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Frames of the diffusers folder and of the control, generated once."""
    out = tmp_path_factory.mktemp("folder_frames")
    return {key: _frames(sf_models, t2v_presets, key, out) for key in ("folder", "other")}


@pytest.mark.parametrize("layout", ["wan", "comfyui"])
def test_single_file_generates_the_same_frames_as_its_folder(
    sf_models: Path, t2v_presets: PresetRegistry, folder_frames: dict, tmp_path: Path, layout: str
) -> None:
    check = check_model(t2v_presets.get(f"single_{layout}"), sf_models)
    assert check.status == "present", check
    assert check.single_file == sf_models / "single" / f"t2v_{layout}.safetensors"
    assert check.path == sf_models / "tiny-wan2.1-t2v"
    single = _frames(sf_models, t2v_presets, f"single_{layout}", tmp_path)
    reference = folder_frames["folder"]
    assert reference.shape == single.shape == (5, 48, 64, 3)
    np.testing.assert_allclose(single, reference, atol=1.0)
    assert np.abs(folder_frames["other"] - reference).max() > 8  # the comparison can tell other weights apart


def test_wan22_two_single_files_match_the_two_expert_folder(sf_models: Path, tmp_path: Path) -> None:
    presets = _presets(
        tmp_path,
        folder22={"URLs": "tiny-wan2.2-t2v", "group": "wan2_2"},
        single22={
            "URLs": "single/high.safetensors",
            "URLs2": "single/low_comfy.safetensors",
            "base": "tiny-wan2.2-t2v",
            "group": "wan2_2",
        },
    )
    check = check_model(presets.get("single22"), sf_models)
    assert check.status == "present" and check.single_file_2 == sf_models / "single" / "low_comfy.safetensors"
    orchestrator = WanOrchestrator(sf_models, presets)
    orchestrator.load_model("single22")
    pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == pytest.approx(0.875)
    call = {"seed": 7, "flow_shift": 1.0, "num_inference_steps": 4, "switch_threshold": 600}
    result = orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "s22.mp4", **call)
    assert result.experts_used == ("high", "high", "low", "low")
    reference = WanOrchestrator(sf_models, presets)
    reference.load_model("folder22")
    expected = reference.generate_t2v(PROMPT, output_path=tmp_path / "f22.mp4", **call)
    np.testing.assert_allclose(
        read_video_frames(result.output_path).astype(np.float32),
        read_video_frames(expected.output_path).astype(np.float32),
        atol=1.0,
    )


def test_vace_single_file_loads_identical_weights(sf_models: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    presets = _presets(
        tmp_path, vace_single={"URLs": "single/vace.safetensors", "base": "tiny-wan2.1-vace", "architecture": "vace"}
    )
    orchestrator = WanOrchestrator(sf_models, presets)
    orchestrator.load_model("vace_single")
    loaded = orchestrator._loaded.pipe.transformer.state_dict()  # type: ignore[union-attr]
    folder = tiny_models_dir / "tiny-wan2.1-vace"
    expected = WanVACETransformer3DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_bf16_single_file_matches_from_pretrained_dtypes(sf_models: Path, tiny_models_dir: Path) -> None:
    # from_pretrained keeps Wan's _keep_in_fp32_modules (norms, modulation, time embedder) in float32.
    folder = tiny_models_dir / "tiny-wan2.1-t2v"
    reference = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
    single = load_single_file_transformer(
        sf_models / "single" / "t2v_comfyui.safetensors", WanTransformer3DModel, folder, "transformer", torch.bfloat16
    )
    expected = reference.state_dict()
    got = single.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in expected.items()}
    assert {v.dtype for v in got.values()} == {torch.float32, torch.bfloat16}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    buffers = dict(single.named_buffers())
    assert {k: v.dtype for k, v in buffers.items()} == {k: v.dtype for k, v in reference.named_buffers()}


def test_checkpoint_of_another_model_is_refused_naming_both_files(sf_models: Path, tmp_path: Path) -> None:
    presets = _presets(tmp_path, wrong={"URLs": "single/vace.safetensors", "base": "tiny-wan2.1-t2v"})
    orchestrator = WanOrchestrator(sf_models, presets)
    with pytest.raises(ModelUnavailableError) as info:
        orchestrator.load_model("wrong")
    message = str(info.value)
    assert (
        "vace.safetensors" in message and str(sf_models / "tiny-wan2.1-t2v" / "transformer" / "config.json") in message
    )
    assert "vace_blocks" in message and orchestrator.current_model is None


def test_single_file_without_base_says_what_to_set(sf_models: Path, tmp_path: Path) -> None:
    presets = _presets(tmp_path, nobase={"URLs": "single/t2v_wan.safetensors"})
    check = check_model(presets.get("nobase"), sf_models)
    assert check.status == "missing"
    assert any("model.base" in p and "t2v_wan.safetensors" in p for p in check.problems), check.problems


@pytest.mark.parametrize("name", ["wan2.1_t2v.ckpt", "wan2.1_t2v.pt", "wan2.1_t2v.pth", "wan2.1_t2v.bin"])
def test_pickle_checkpoints_are_refused_by_name(sf_models: Path, tmp_path: Path, name: str) -> None:
    (sf_models / name).write_bytes(b"not loaded")  # present on disk: still refused, never unpickled
    presets = _presets(tmp_path, pickled={"URLs": name, "base": "tiny-wan2.1-t2v"})
    check = check_model(presets.get("pickled"), sf_models)
    assert check.status == "missing"
    assert any(name in p and "pickle" in p and ".safetensors" in p for p in check.problems), check.problems
    with pytest.raises(ModelUnavailableError, match=name.replace(".", r"\.")):
        WanOrchestrator(sf_models, presets).load_model("pickled")


def test_truncated_single_file_is_corrupted(sf_models: Path, tmp_path: Path) -> None:
    source = (sf_models / "single" / "t2v_wan.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(source[: len(source) - 1000])
    presets = _presets(tmp_path, cut={"URLs": str(tmp_path / "cut.safetensors"), "base": "tiny-wan2.1-t2v"})
    check = check_model(presets.get("cut"), sf_models)
    assert check.status == "corrupted"
    assert any("cut.safetensors" in c and "truncated" in c for c in check.corrupted), check.corrupted
