"""Checkpoint formats users have (issue 14): Wan2GP quanto int8, ComfyUI fp8_scaled, FLF2V original layout,
Wan2GP VACE module files and the original Wan repository folder, each built here in its real key layout
and compared with the same weights loaded from a diffusers folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import save_file

from headless_wgp import WanOrchestrator
from tests.support import real_formats
from tests.support.real_formats import original_state as _original_state
from tests.support.real_formats import write_fp8_scaled, write_quanto_int8
from wan_engine.checkpoint_formats import plan_file, wan_config_to_diffusers
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_checks import read_safetensors_header
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.single_file import (
    COMFYUI_PREFIX,
    diffusers_key_to_wan,
    export_single_file,
    load_single_file_transformer,
    load_single_file_transformers,
    load_transformer_with_modules,
)
from wan_engine.video_io import read_video_frames
from wan_engine.weight_files import weight_paths

PROMPT = "a lighthouse in a storm"
T2V = "tiny-wan2.1-t2v"


# ---- builders of the real layouts ------------------------------------------------------------------------


def _transformer(tiny_models_dir: Path, folder: str) -> torch.nn.Module:
    cls = WanVACETransformer3DModel if "vace" in folder else WanTransformer3DModel
    return cls.from_pretrained(tiny_models_dir / folder, subfolder="transformer")


def write_wan_folder(model: torch.nn.Module, folder: Path, *, shards: int = 2, model_type: str = "t2v") -> Path:
    """The original Wan repository layout (tests.support.real_formats.write_wan_folder); returns the folder."""
    real_formats.write_wan_folder(model, folder, shards=shards, model_type=model_type)
    return folder


def reference_folder(tiny_models_dir: Path, base: str, target: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A diffusers pipeline folder like `base` whose transformer holds `weights` (original names)."""
    source = tiny_models_dir / base
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "transformer":
            os.symlink(entry, target / entry.name)
    model = _transformer(tiny_models_dir, base)
    converted = {k: weights[diffusers_key_to_wan(k)] for k in model.state_dict()}
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(target / "transformer")
    return target


def _presets(tmp_path: Path, **models: dict) -> PresetRegistry:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    for key, model in models.items():
        settings = {"resolution": "64x48", "video_length": 5, "num_inference_steps": 3, "guidance_scale": 5.0}
        (user / f"{key}.json").write_text(
            json.dumps({"model": {"name": key, "architecture": "t2v", **model}, **settings})
        )
    return load_presets(BUILTIN_PRESETS_DIR, user)


def _generate(models: Path, presets: PresetRegistry, key: str, out: Path) -> tuple[np.ndarray, dict]:
    orchestrator = WanOrchestrator(models, presets)
    orchestrator.load_model(key)
    result = orchestrator.generate_t2v(PROMPT, output_path=out / f"{key}.mp4", seed=7)
    orchestrator.unload_model()
    return read_video_frames(result.output_path), result.to_dict()


def _assert_same_state(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir: the tiny folders, and Wan2GP / ComfyUI / original-Wan files of the tiny T2V transformer."""
    root = tmp_path_factory.mktemp("checkpoint_models")
    for name in (T2V, "tiny-wan2.1-vace", "tiny-wan2.1-flf2v"):
        os.symlink(tiny_models_dir / name, root / name)
    t2v = _transformer(tiny_models_dir, T2V)
    ckpts = root / "ckpts"
    ckpts.mkdir()
    int8 = write_quanto_int8(
        t2v, ckpts / "wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors", other_dtype=torch.bfloat16
    )
    reference_folder(tiny_models_dir, T2V, root / "ref-int8", int8)
    fp16_int8 = write_quanto_int8(
        t2v, ckpts / "wan2.1_text2video_tiny_quanto_fp16_int8.safetensors", other_dtype=torch.float16, map_beside=True
    )
    reference_folder(tiny_models_dir, T2V, root / "ref-fp16-int8", fp16_int8)
    scaled = write_fp8_scaled(t2v, root / "wan2.1_t2v_tiny_fp8_scaled.safetensors", scale_shape=())
    reference_folder(tiny_models_dir, T2V, root / "ref-fp8-scaled", scaled)
    write_wan_folder(t2v, root / "Wan-AI" / "Wan2.1-T2V-tiny")
    return root


# ---- Wan2GP quanto int8 -------------------------------------------------------------------------------


def test_quanto_file_has_the_layout_mmgp_writes(models: Path) -> None:
    plan = plan_file(models / "ckpts" / "wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors")
    assert plan.format == "quanto_int8" and plan.layout == "wan" and plan.quantized > 0
    assert "blocks.0.attn1.to_q.weight" in plan.shapes and "blocks.0.attn1.to_q.input_scale" not in plan.shapes


@pytest.mark.parametrize(
    ("file", "reference"),
    [
        ("wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors", "ref-int8"),
        ("wan2.1_text2video_tiny_quanto_fp16_int8.safetensors", "ref-fp16-int8"),  # map in <file>_map.json
    ],
)
def test_quanto_int8_dequantizes_to_the_folder_weights(models: Path, file: str, reference: str) -> None:
    loaded = load_single_file_transformer(
        models / "ckpts" / file, WanTransformer3DModel, models / T2V, "transformer", torch.float32
    )
    _assert_same_state(loaded, WanTransformer3DModel.from_pretrained(models / reference, subfolder="transformer"))
    assert loaded.wan_checkpoint["checkpoint_format"] == "quanto_int8"
    assert loaded.wan_checkpoint["dequantized_to"] == "float32"


def test_quanto_int8_bf16_keeps_fp32_modules_like_from_pretrained(models: Path) -> None:
    loaded = load_single_file_transformer(
        models / "ckpts" / "wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors",
        WanTransformer3DModel,
        models / T2V,
        "transformer",
        torch.bfloat16,
    )
    reference = WanTransformer3DModel.from_pretrained(
        models / "ref-int8", subfolder="transformer", dtype=torch.bfloat16
    )
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {
        k: v.dtype for k, v in reference.state_dict().items()
    }
    _assert_same_state(loaded, reference)
    assert loaded.wan_checkpoint["dequantized_to"] == "bfloat16"
    # result_data says what was read and how it was loaded (issue 14): dequantized to bf16, not kept int8.
    assert loaded.wan_checkpoint["checkpoint_format"] == "quanto_int8"
    assert loaded.wan_checkpoint["resident_dtype"] == "bfloat16"
    assert loaded.wan_checkpoint["loaded_as"].startswith("dequantized to bfloat16 at load (")
    assert loaded.wan_checkpoint["loaded_as"].endswith("quantized weights; not kept quantized)")


def test_quanto_preset_generates_the_frames_of_its_folder_and_reports_the_format(models: Path, tmp_path: Path) -> None:
    presets = _presets(
        tmp_path,
        int8={"URLs": "ckpts/wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors", "base": T2V},
        ref={"URLs": "ref-int8"},
        plain={"URLs": T2V},
    )
    frames, result = _generate(models, presets, "int8", tmp_path)
    expected, ref_result = _generate(models, presets, "ref", tmp_path)
    plain, _ = _generate(models, presets, "plain", tmp_path)
    assert np.array_equal(frames, expected)
    assert np.abs(plain.astype(np.float32) - frames.astype(np.float32)).max() > 0  # int8 really differs
    report = result["extra"]["checkpoint"]["transformer"]
    assert report["checkpoint_format"] == "quanto_int8" and report["dequantized_to"] == "float32"
    assert report["loaded_as"].startswith("dequantized to float32 at load")
    assert report["files"] == [str(models / "ckpts" / "wan2.1_text2video_tiny_quanto_mbf16_int8.safetensors")]
    assert ref_result["extra"]["checkpoint"] is None


# ---- ComfyUI fp8_scaled -------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_fp8_scaled_dequantizes_to_the_folder_weights(
    models: Path, tiny_models_dir: Path, tmp_path: Path, scale_shape: tuple[int, ...]
) -> None:
    t2v = _transformer(tiny_models_dir, T2V)
    path = tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors"
    expected = write_fp8_scaled(t2v, path, scale_shape=scale_shape)
    plan = plan_file(path)
    assert plan.format == "fp8_scaled" and plan.layout == "comfyui"
    loaded = load_single_file_transformer(path, WanTransformer3DModel, models / T2V, "transformer", torch.float32)
    want = {k: expected[diffusers_key_to_wan(k)] for k in loaded.state_dict()}
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert loaded.wan_checkpoint["checkpoint_format"] == "fp8_scaled"


def test_fp8_scaled_preset_generates_the_frames_of_its_folder(models: Path, tmp_path: Path) -> None:
    presets = _presets(
        tmp_path, scaled={"URLs": "wan2.1_t2v_tiny_fp8_scaled.safetensors", "base": T2V}, ref={"URLs": "ref-fp8-scaled"}
    )
    frames, result = _generate(models, presets, "scaled", tmp_path)
    expected, _ = _generate(models, presets, "ref", tmp_path)
    assert np.array_equal(frames, expected)
    assert result["extra"]["checkpoint"]["transformer"]["checkpoint_format"] == "fp8_scaled"


def test_unscaled_fp8_and_fp16_files_still_load(models: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    t2v = _transformer(tiny_models_dir, T2V)
    loads = {"fp8_e4m3fn": "cast to float32 at load", "fp16": "cast to float32 at load", "fp32": "as stored (float32)"}
    for dtype, fmt in ((torch.float8_e4m3fn, "fp8_e4m3fn"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        state = {COMFYUI_PREFIX + k: v.to(dtype) if v.dim() == 2 else v for k, v in _original_state(t2v).items()}
        path = tmp_path / f"t2v_{fmt}.safetensors"
        save_file(state, str(path))
        loaded = load_single_file_transformer(path, WanTransformer3DModel, models / T2V, "transformer", torch.float32)
        assert loaded.wan_checkpoint["checkpoint_format"] == fmt and "dequantized_to" not in loaded.wan_checkpoint
        assert loaded.wan_checkpoint["loaded_as"] == loads[fmt]
        want = {k: state[COMFYUI_PREFIX + diffusers_key_to_wan(k)].float() for k in loaded.state_dict()}
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


# ---- formats that stay refused, naming the format and what to use -------------------------------------


def test_unsupported_quantizations_are_named(models: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    t2v = _transformer(tiny_models_dir, T2V)
    state = _original_state(t2v)
    int4 = dict(state)
    weight = int4.pop("blocks.0.self_attn.q.weight")
    int4["blocks.0.self_attn.q.weight._data"] = torch.zeros(weight.shape[0], weight.shape[1] // 2, dtype=torch.uint8)
    int4["blocks.0.self_attn.q.weight._scale"] = torch.ones(weight.shape[0], 1)
    int4["blocks.0.self_attn.q.weight._shift"] = torch.zeros(weight.shape[0], 1)
    save_file(int4, str(tmp_path / "t2v_quanto_int4.safetensors"))
    with pytest.raises(ModelUnavailableError, match=r"quanto 4-bit.*int8"):
        plan_file(tmp_path / "t2v_quanto_int4.safetensors")
    gptq = dict(state)
    gptq["blocks.0.self_attn.q.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(gptq, str(tmp_path / "t2v_gptq.safetensors"))
    with pytest.raises(ModelUnavailableError, match="GPTQ/AWQ"):
        plan_file(tmp_path / "t2v_gptq.safetensors")
    (models / "t2v_Q4_K_M.gguf").write_bytes(b"GGUF")
    presets = _presets(tmp_path, gguf={"URLs": "t2v_Q4_K_M.gguf", "base": T2V})
    check = check_model(presets.get("gguf"), models)
    assert check.status == "missing"
    assert any("GGUF" in p and "quanto int8" in p for p in check.problems), check.problems


# ---- FLF2V original layout ----------------------------------------------------------------------------


def test_flf2v_original_layout_loads_its_position_embedding(
    models: Path, tiny_models_dir: Path, tmp_path: Path
) -> None:
    flf = _transformer(tiny_models_dir, "tiny-wan2.1-flf2v")
    path = export_single_file(flf, tmp_path / "wan2.1_flf2v_tiny.safetensors", "wan")
    assert "img_emb.emb_pos" in read_safetensors_header(path).tensors  # the name the Wan repository uses
    loaded = load_single_file_transformer(
        path, WanTransformer3DModel, models / "tiny-wan2.1-flf2v", "transformer", torch.float32
    )
    _assert_same_state(loaded, flf)
    assert loaded.config.pos_embed_seq_len == flf.config.pos_embed_seq_len


# ---- Wan2GP VACE module files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vace_split(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A VACE transformer as Wan2GP ships it: a base T2V file and a module file of the VACE blocks only."""
    root = tmp_path_factory.mktemp("vace_modules")
    state = _original_state(_transformer(tiny_models_dir, "tiny-wan2.1-vace"))
    base = {k: v for k, v in state.items() if not k.startswith("vace_")}
    module = {k: v for k, v in state.items() if k.startswith("vace_")}
    assert {k.split(".")[0] for k in module} == {"vace_blocks", "vace_patch_embedding"}
    save_file(base, str(root / "wan2.1_text2video_tiny_mbf16.safetensors"))
    save_file(module, str(root / "wan2.1_Vace_tiny_module_mbf16.safetensors"))
    return root / "wan2.1_text2video_tiny_mbf16.safetensors", root / "wan2.1_Vace_tiny_module_mbf16.safetensors"


def test_vace_module_file_merges_onto_the_base_transformer(
    vace_split: tuple[Path, Path], tiny_models_dir: Path
) -> None:
    base, module = vace_split
    vace_dir = tiny_models_dir / "tiny-wan2.1-vace"
    loaded = load_transformer_with_modules(
        base, [module], WanVACETransformer3DModel, vace_dir, "transformer", torch.float32
    )
    _assert_same_state(loaded, _transformer(tiny_models_dir, "tiny-wan2.1-vace"))
    assert loaded.wan_checkpoint["files"] == [str(base), str(module)]


def test_a_model_check_with_modules_loads_them_and_watches_their_files(
    vace_split: tuple[Path, Path], tiny_models_dir: Path
) -> None:
    base, module = vace_split
    check = SimpleNamespace(
        path=tiny_models_dir / "tiny-wan2.1-vace", path2=None, single_file=base, single_file_2=None, modules=(module,)
    )
    components = load_single_file_transformers(check, "WanVACEPipeline", torch.float32)
    _assert_same_state(components["transformer"], _transformer(tiny_models_dir, "tiny-wan2.1-vace"))
    assert {base, module} <= set(weight_paths(check))


def test_module_file_overlapping_the_base_or_missing_fails_naming_the_files(
    vace_split: tuple[Path, Path], tiny_models_dir: Path, tmp_path: Path
) -> None:
    base, _module = vace_split
    vace_dir = tiny_models_dir / "tiny-wan2.1-vace"
    with pytest.raises(ModelUnavailableError, match=r"weights missing \(first: vace_"):
        load_single_file_transformer(base, WanVACETransformer3DModel, vace_dir, "transformer", torch.float32)
    overlap = tmp_path / "overlap_module.safetensors"
    shutil.copy(base, overlap)
    with pytest.raises(ModelUnavailableError) as info:
        load_transformer_with_modules(
            base, [overlap], WanVACETransformer3DModel, vace_dir, "transformer", torch.float32
        )
    assert str(base) in str(info.value) and str(overlap) in str(info.value)


# ---- the original Wan repository folder ----------------------------------------------------------------


def test_wan_config_maps_to_the_diffusers_config(tiny_models_dir: Path, tmp_path: Path) -> None:
    for folder, model_type in ((T2V, "t2v"), ("tiny-wan2.1-flf2v", "flf2v"), ("tiny-wan2.1-i2v", "i2v")):
        model = _transformer(tiny_models_dir, folder)
        wan = write_wan_folder(model, tmp_path / folder, model_type=model_type)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        mapped = wan_config_to_diffusers(json.loads((wan / "config.json").read_text()), shapes)
        for key, value in mapped.items():
            if key == "rope_max_seq_len":  # Wan's rotary table is 1024 long; the tiny models use a shorter one
                continue
            want = model.config[key]
            assert (tuple(value) if isinstance(value, list) else value) == (
                tuple(want) if isinstance(want, (list, tuple)) else want
            ), key
        loaded = load_single_file_transformer(wan, WanTransformer3DModel, tmp_path, None, torch.float32)
        _assert_same_state(loaded, model)


def test_original_wan_folder_is_a_model_source(models: Path, tmp_path: Path) -> None:
    presets = _presets(
        tmp_path,
        wan_folder={"URLs": "Wan-AI/Wan2.1-T2V-tiny", "base": T2V},
        folder={"URLs": T2V},
    )
    check = check_model(presets.get("wan_folder"), models)
    assert check.status == "present", check
    assert check.single_file == models / "Wan-AI" / "Wan2.1-T2V-tiny" and check.path == models / T2V
    assert {p.name for p in weight_paths(check)} >= {
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    }
    frames, result = _generate(models, presets, "wan_folder", tmp_path)
    expected, _ = _generate(models, presets, "folder", tmp_path)
    assert np.array_equal(frames, expected)
    assert result["extra"]["checkpoint"]["transformer"]["layout"] == "wan"


def test_original_wan_folder_with_a_missing_shard_is_reported(
    models: Path, tiny_models_dir: Path, tmp_path: Path
) -> None:
    folder = write_wan_folder(_transformer(tiny_models_dir, T2V), tmp_path / "Wan2.1-T2V-cut", shards=3)
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    presets = _presets(tmp_path, cut={"URLs": str(folder), "base": T2V})
    check = check_model(presets.get("cut"), models)
    assert check.status == "missing"
    assert any("diffusion_pytorch_model-00002-of-00003.safetensors" in m for m in check.missing), check.missing


def test_wan22_original_expert_folders_match_the_two_expert_folder(
    models: Path, tiny_models_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "Wan2.2-T2V-tiny"
    for folder, subfolder in (("high_noise_model", "transformer"), ("low_noise_model", "transformer_2")):
        model = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.2-t2v", subfolder=subfolder)
        write_wan_folder(model, root / folder)
    os.symlink(tiny_models_dir / "tiny-wan2.2-t2v", tmp_path / "tiny-wan2.2-t2v")
    presets = _presets(
        tmp_path,
        experts={
            "URLs": str(root / "high_noise_model"),
            "URLs2": str(root / "low_noise_model"),
            "base": "tiny-wan2.2-t2v",
            "group": "wan2_2",
        },
        root={"URLs": str(root), "base": "tiny-wan2.2-t2v", "group": "wan2_2"},
        folder22={"URLs": "tiny-wan2.2-t2v", "group": "wan2_2"},
    )
    check = check_model(presets.get("experts"), tmp_path)
    assert check.status == "present" and check.single_file_2 == root / "low_noise_model", check
    hint = check_model(presets.get("root"), tmp_path)
    assert hint.status == "missing"
    assert any("high_noise_model" in p and "URLs2" in p for p in hint.problems), hint.problems
    call = {"seed": 7, "flow_shift": 1.0, "num_inference_steps": 4, "switch_threshold": 600}
    frames = []
    for key in ("experts", "folder22"):
        orchestrator = WanOrchestrator(tmp_path, presets)
        orchestrator.load_model(key)
        result = orchestrator.generate_t2v(PROMPT, output_path=tmp_path / f"{key}.mp4", **call)
        assert result.experts_used == ("high", "high", "low", "low")
        frames.append(read_video_frames(result.output_path))
        orchestrator.unload_model()
    assert np.array_equal(frames[0], frames[1])


def test_the_startup_check_names_an_unsupported_quantization(models: Path, tmp_path: Path) -> None:
    state = {"patch_embedding.weight": torch.zeros(2, 2), "head.modulation": torch.zeros(1, 2, 2)}
    state["blocks.0.self_attn.q.weight._data"] = torch.zeros(4, 2, dtype=torch.uint8)
    state["blocks.0.self_attn.q.weight._scale"] = torch.ones(4, 1)
    state["blocks.0.self_attn.q.weight._shift"] = torch.zeros(4, 1)
    save_file(state, str(tmp_path / "t2v_quanto_int4.safetensors"))
    presets = _presets(tmp_path, int4={"URLs": str(tmp_path / "t2v_quanto_int4.safetensors"), "base": T2V})
    check = check_model(presets.get("int4"), models)
    assert check.status == "missing"
    assert any("quanto 4-bit" in p and "int8" in p for p in check.problems), check.problems


def test_quanto_int8_vace_module_file_merges_dequantized(
    vace_split: tuple[Path, Path], tiny_models_dir: Path, tmp_path: Path
) -> None:
    base, _module = vace_split
    vace = _transformer(tiny_models_dir, "tiny-wan2.1-vace")
    module = tmp_path / "wan2.1_Vace_tiny_module_quanto_mbf16_int8.safetensors"
    dequantized = write_quanto_int8(vace, module, other_dtype=torch.bfloat16, prefix="vace_")
    assert plan_file(module, partial=True).format == "quanto_int8"
    weights = {**_original_state(vace), **dequantized}
    reference = reference_folder(tiny_models_dir, "tiny-wan2.1-vace", tmp_path / "ref-vace", weights)
    loaded = load_transformer_with_modules(
        base, [module], WanVACETransformer3DModel, tiny_models_dir / "tiny-wan2.1-vace", "transformer", torch.float32
    )
    _assert_same_state(loaded, WanVACETransformer3DModel.from_pretrained(reference, subfolder="transformer"))
    assert loaded.wan_checkpoint["checkpoint_format"] == ["fp32", "quanto_int8"]  # base fp32, module int8


def test_a_preset_with_modules_loads_the_merged_vace_transformer(
    vace_split: tuple[Path, Path], tiny_models_dir: Path, tmp_path: Path
) -> None:
    base, module = vace_split
    models = tmp_path / "ckpts"
    models.mkdir()
    os.symlink(tiny_models_dir / "tiny-wan2.1-vace", models / "tiny-wan2.1-vace")
    for path in (base, module):
        os.symlink(path, models / path.name)
    model = {"architecture": "vace", "URLs": base.name, "modules": [[module.name]], "base": "tiny-wan2.1-vace"}
    presets = _presets(tmp_path, vace_modules=model)
    orchestrator = WanOrchestrator(models, presets)
    orchestrator.load_model("vace_modules")
    loaded = orchestrator._loaded  # type: ignore[union-attr]
    _assert_same_state(loaded.pipe.transformer, _transformer(tiny_models_dir, "tiny-wan2.1-vace"))
    assert loaded.pipe.transformer.wan_checkpoint["files"] == [str(models / base.name), str(models / module.name)]
    assert models / module.name in loaded.weight_files.paths  # a rewritten module file reloads the model
    orchestrator.unload_model()
