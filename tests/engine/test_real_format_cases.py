"""Issue 14's real-format cases, one per user-visible situation: a Wan2GP install (its definitions, ckpts/ and
loras/ folders) or a ComfyUI one (models/diffusion_models, models/loras) used as it is.

Every file is built here in the real key layout (tests/support/real_formats.py) from the tiny models. A case
that works must load and run, and where the weights are known, give the frames of the same weights loaded from
a diffusers folder; a case deliberately not served must fail with a message naming the format and what to do.
The case lists are the matrix; `test_the_matrix_has_every_case` counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from headless_wgp import WanOrchestrator
from tests.support import real_formats as rf
from wan_engine import model_sources
from wan_engine.errors import InvalidRequestError, ModelUnavailableError, UnknownModelError
from wan_engine.model_checks import read_safetensors_header
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.single_file import COMFYUI_PREFIX
from wan_engine.video_io import read_video_frames

PROMPT = "a red kite over a beach"
CALL = {"resolution": "64x48", "num_inference_steps": 2, "seed": 11, "negative_prompt": ""}
T2V, T2V22, I2V, I2V22, TI2V, FLF, VACE, VACE22 = (
    "Wan2.1-T2V-14B-Diffusers",
    "Wan2.2-T2V-A14B-Diffusers",
    "Wan2.1-I2V-14B-480P-Diffusers",
    "Wan2.2-I2V-A14B-Diffusers",
    "Wan2.2-TI2V-5B-Diffusers",
    "Wan2.1-FLF2V-14B-720P-diffusers",
    "Wan2.1-VACE-14B-diffusers",
    "Wan2.2-VACE-Fun-14B-diffusers",
)
TINY = {
    T2V: "tiny-wan2.1-t2v",
    T2V22: "tiny-wan2.2-t2v",
    I2V: "tiny-wan2.1-i2v",
    I2V22: "tiny-wan2.2-i2v",
    TI2V: "tiny-wan2.2-ti2v",
    FLF: "tiny-wan2.1-flf2v",
    VACE: "tiny-wan2.1-vace",
    VACE22: "tiny-wan2.2-vace",
}
LIGHTNING = ("Lightning_T2V_A14B_HIGH.safetensors", "Lightning_T2V_A14B_LOW.safetensors")


# ---- the world: a Wan2GP ckpts/ folder, its definitions and LoRA folders ----------------------------------


def _vace_weights(vace: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in rf.bf16_state(vace).items() if k.startswith("vace_")}


@pytest.fixture(scope="module")
def world(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ckpts/: each default base (bf16 weights) under its repo name and the Wan2GP files of those weights;
    loras/: Wan2GP's subfolders; defaults/: the definitions; reference folders for the other dtypes."""
    root = tmp_path_factory.mktemp("real_formats")
    ckpts, loras, defaults = root / "ckpts", root / "loras", root / "defaults"
    ckpts.mkdir()
    weights: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    vace_module = _vace_weights(rf.load_transformer(tiny_models_dir / TINY[VACE]))
    for name in (T2V, T2V22, I2V, I2V22, TI2V, FLF):
        source = tiny_models_dir / TINY[name]
        subs = [s for s in ("transformer", "transformer_2") if (source / s).is_dir()]
        weights[name] = {s: rf.bf16_state(rf.load_transformer(source, s)) for s in subs}
        rf.pipeline_folder(source, ckpts / name, weights[name])
    # VACE as Wan2GP builds it: the T2V transformer(s) + the VACE module file merged on each expert.
    weights[VACE] = {"transformer": {**weights[T2V]["transformer"], **vace_module}}
    weights[VACE22] = {s: {**weights[T2V22][s], **vace_module} for s in ("transformer", "transformer_2")}
    for name in (VACE, VACE22):
        rf.pipeline_folder(tiny_models_dir / TINY[name], ckpts / name, weights[name])
    os.symlink(ckpts / T2V, ckpts / "Wan2.1-T2V-1.3B-Diffusers")
    os.symlink(ckpts / VACE, ckpts / "Wan2.1-VACE-1.3B-diffusers")

    def bf16(file: str, name: str, sub: str = "transformer", drop_vace: bool = True) -> None:
        state = {k: v for k, v in weights[name][sub].items() if not (drop_vace and k.startswith("vace_"))}
        rf.write_plain(state, ckpts / file, dtype=torch.bfloat16)

    bf16("wan2.1_text2video_14B_mbf16.safetensors", T2V)
    bf16("wan2.1_text2video_1.3B_mbf16.safetensors", T2V)
    bf16("wan2.1_StepDistill-CfgDistill_14B_bf16.safetensors", T2V)
    bf16("wan2.2_text2video_14B_high_mbf16.safetensors", T2V22)
    bf16("wan2.2_text2video_14B_low_mbf16.safetensors", T2V22, "transformer_2")
    bf16("wan2.1_image2video_480p_14B_mbf16.safetensors", I2V)
    bf16("wan2.2_image2video_14B_high_mbf16.safetensors", I2V22)
    bf16("wan2.2_image2video_14B_low_mbf16.safetensors", I2V22, "transformer_2")
    bf16("wan2.2_text2video_5B_mbf16.safetensors", TI2V)
    bf16("wan2.1_FLF2V_720p_14B_mbf16.safetensors", FLF)
    bf16("Wan2_2_Fun_VACE_A14B_HIGH_mbf16.safetensors", VACE22, drop_vace=False)
    bf16("Wan2_2_Fun_VACE_A14B_LOW_mbf16.safetensors", VACE22, "transformer_2", drop_vace=False)
    for file in ("wan2.1_Vace_1_3B_module.safetensors", "wan2.1_Vace_14B_module_mbf16.safetensors"):
        rf.write_plain(vace_module, ckpts / file, dtype=torch.bfloat16)
    # FusioniX ships fp16: its reference folder holds the fp16-rounded weights.
    fp16 = rf.write_plain(
        weights[T2V]["transformer"], ckpts / "Wan14BT2VFusioniX_fp16.safetensors", dtype=torch.float16
    )
    refs = root / "refs"
    rf.pipeline_folder(tiny_models_dir / TINY[T2V], refs / "t2v-fp16", {"transformer": fp16})
    rf.pipeline_folder(tiny_models_dir / TINY[VACE], refs / "vace-fp16", {"transformer": {**fp16, **vace_module}})
    # Enhanced Lightning ships Kijai-style fp8_e4m3fn experts.
    fp8 = {}
    for sub, side in (("transformer", "HIGH"), ("transformer_2", "LOW")):
        model = rf.load_transformer(ckpts / I2V22, sub)
        fp8[sub] = rf.write_fp8_unscaled(model, ckpts / f"wan22EnhancedLightning_v2I2VFP8{side}.safetensors")
    rf.pipeline_folder(tiny_models_dir / TINY[I2V22], refs / "i2v22-fp8", fp8)
    # NVFP4 (Wan2GP's *_nvfp4 files): packed uint8 weights with two scales.
    nvfp4 = dict(weights[I2V]["transformer"])
    nvfp4["blocks.0.self_attn.q.weight"] = torch.zeros(rf.INNER, rf.INNER // 2, dtype=torch.uint8)
    nvfp4["blocks.0.self_attn.q.weight_scale"] = torch.ones(rf.INNER, 1, dtype=torch.float8_e4m3fn)
    nvfp4["blocks.0.self_attn.q.weight_scale_2"] = torch.ones(())
    rf.save(nvfp4, ckpts / "wan2.1_i2v_480p_nvfp4_lightx2v_4step.safetensors")
    # Wan2GP's LoRA folder: accelerators where its models look for them.
    rf.save(rf.lora_pairs(21), loras / "wan" / LIGHTNING[0])
    rf.save(rf.lora_pairs(22), loras / "wan" / LIGHTNING[1])
    rf.save(rf.as_original(rf.lora_pairs(23)), loras / "wan_i2v" / "Wan2.1_I2V_14B_FusionX_LoRA.safetensors")
    rf.save(rf.lora_pairs(24), loras / "wan_5B" / "Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors")
    causvid = {**rf.as_original(rf.lora_pairs(25), down_up=True, alpha=2.0), **rf.norm_deltas(26)}
    rf.save(causvid, loras / "wan" / "Wan21_CausVid_14B_T2V_lora_rank32_v2.safetensors")
    definitions = rf.wan2gp_definitions()
    defaults.mkdir()
    for key, data in definitions.items():
        (defaults / f"{key}.json").write_text(json.dumps(data, indent=2))
    (defaults / "ReadMe.txt").write_text("definitions")
    return {
        "root": root, "ckpts": ckpts, "loras": loras, "defaults": defaults, "refs": refs,
        "definitions": definitions, "tiny": tiny_models_dir,
    }  # fmt: skip


@pytest.fixture(scope="module")
def registry(world: dict[str, Any]) -> Iterator[tuple[PresetRegistry, list[str]]]:
    """--presets-dir pointed at the definitions folder, and the warnings the start-up logged."""
    handler = _Capture()
    logger = logging.getLogger("wan_engine.presets")
    logger.addHandler(handler)
    try:
        presets = load_presets(BUILTIN_PRESETS_DIR, [world["defaults"]])
    finally:
        logger.removeHandler(handler)
    yield presets, handler.messages


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _images(folder: Path) -> tuple[Path, Path]:
    start, end = folder / "start.png", folder / "end.png"
    if not start.exists():
        Image.new("RGB", (64, 48), (200, 40, 40)).save(start)
        Image.new("RGB", (64, 48), (20, 40, 200)).save(end)
    return start, end


def _generate(
    models: Path, presets: PresetRegistry, key: str, out: Path, loras: Any = None, **params: Any
) -> tuple[np.ndarray, Any]:
    """Load `key` and run its own mode (t2v, i2v, flf2v with two images, vace with a guide image)."""
    orchestrator = WanOrchestrator(models, presets, loras_dir=loras or [out / "no-loras"])
    orchestrator.load_model(key)
    try:
        architecture = presets.get(key).model.architecture
        # FLF2V needs frames between its two images; TI2V's VAE sizes in multiples of 32.
        shape = {"flf2v": {"video_length": 5}, "ti2v": {"resolution": "64x64"}}.get(architecture, {})
        call = {**CALL, "video_length": 1, **shape, **params}
        start, end = _images(out)
        path = out / f"{key}.mp4"
        if architecture == "vace":
            result = orchestrator.generate_vace(PROMPT, video_guide=start, output_path=path, **call)
        elif architecture in ("i2v", "flf2v"):
            image_end = end if architecture == "flf2v" else None
            result = orchestrator.generate_i2v(PROMPT, image_start=start, image_end=image_end, output_path=path, **call)
        else:
            result = orchestrator.generate_t2v(PROMPT, output_path=path, **call)
    finally:
        orchestrator.unload_model()
    return read_video_frames(result.output_path), result


def _reference(world: dict[str, Any], key: str, folder: str | Path, tmp_path: Path) -> PresetRegistry:
    """A preset like definition `key` (same settings and LoRAs) whose URLs is the diffusers folder `folder`."""
    builtin = BUILTIN_PRESETS_DIR / f"{key}.json"  # the definition is read over the built-in of its key
    data = {**(json.loads(builtin.read_text()) if builtin.is_file() else {}), **world["definitions"][key]}
    data = json.loads(json.dumps(data))
    model = data["model"]
    kept = {k: model[k] for k in ("name", "architecture", "group", "loras", "loras_multipliers") if k in model}
    data["model"] = {**kept, "URLs": str(folder)}
    user = tmp_path / "ref-presets"
    user.mkdir(exist_ok=True)
    (user / f"ref_{key}.json").write_text(json.dumps(data))
    return load_presets(BUILTIN_PRESETS_DIR, [world["defaults"], user])


# ---- 1. Wan2GP definitions of the families served: load, run, same frames as their diffusers folder ---------

# definition key -> the diffusers folder (under ckpts/ or refs/) holding the same weights.
DEFINITIONS = {
    "t2v": T2V,
    "t2v_1.3B": T2V,
    "t2v_2_2": T2V22,
    "i2v": I2V,
    "i2v_2_2": I2V22,
    "ti2v_2_2": TI2V,
    "flf2v_720p": FLF,
    "vace_1.3B": VACE,
    "vace_14B": VACE,
    "vace_14B_2_2": VACE22,
    "vace_14B_lightning_3p_2_2": VACE22,
    "vace_14B_fusionix": "refs/vace-fp16",
    "t2v_fusionix": "refs/t2v-fp16",
    "t2v_sf": T2V,
    "i2v_fusionix": I2V,
    "ti2v_2_2_fastwan": TI2V,
    "i2v_2_2_Enhanced_Lightning_v2": "refs/i2v22-fp8",
    "vace_fun_14B_2_2": VACE22,
    "vace_fun_14B_cocktail_2_2": VACE22,
}


@pytest.mark.parametrize("key", sorted(DEFINITIONS))
def test_wan2gp_definition_runs_like_its_diffusers_folder(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], key: str, tmp_path: Path
) -> None:
    presets, _ = registry
    assert key in presets, presets.skipped.get(key)
    if key == "flf2v_720p":  # its file is in the original layout, with FLF2V's learnt image position embedding
        file = world["ckpts"] / "wan2.1_FLF2V_720p_14B_mbf16.safetensors"
        assert "img_emb.emb_pos" in read_safetensors_header(file).tensors
    folder = DEFINITIONS[key]
    where = world["root"] / folder if folder.startswith("refs/") else world["ckpts"] / folder
    frames, result = _generate(world["ckpts"], presets, key, tmp_path, loras=[world["loras"]])
    report = result.extra["checkpoint"]
    assert report is not None and all(Path(f).parent == world["ckpts"] for f in report["transformer"]["files"])
    expected, _ = _generate(world["ckpts"], _reference(world, key, where, tmp_path), f"ref_{key}", tmp_path,
                            loras=[world["loras"]])  # fmt: skip
    np.testing.assert_array_equal(frames, expected)
    assert len(result.loras) == len(presets.get(key).model.loras)


def test_three_phase_definition_runs_its_phases_and_lora_multipliers(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], tmp_path: Path
) -> None:
    presets, _ = registry
    preset = presets.get("vace_14B_lightning_3p_2_2")
    assert preset.model.modules == preset.model.modules2 and preset.settings.sample_solver == "euler"
    _, result = _generate(world["ckpts"], presets, "vace_14B_lightning_3p_2_2", tmp_path, loras=[world["loras"]],
                          num_inference_steps=8)  # fmt: skip
    phases = result.extra["guidance_phases"]["phase_per_step"]
    assert set(phases) == {1, 2, 3}
    high, low = result.loras
    assert high["per_step"] == [1.0 if p == 2 else 0.0 for p in phases]
    assert low["per_step"] == [1.0 if p == 3 else 0.0 for p in phases]
    assert result.extra["sample_solver"] == "euler"


# ---- 2. definitions of families not served: skipped with one warning line, start-up goes on ---------------

OTHER_FAMILIES = [
    "ltxv_13B", "ltx2_22B", "hunyuan", "hunyuan_1_5_t2v", "flux", "qwen_image_20B", "z_image", "chatterbox",
    "ace_step_v1_5", "k5_lite_t2v", "multitalk", "phantom_14B", "recam_1.3B", "sky_df_14B", "fun_inp", "lucy_edit",
]  # fmt: skip


@pytest.mark.parametrize("key", OTHER_FAMILIES)
def test_other_family_is_skipped_with_one_warning(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], key: str
) -> None:
    presets, warnings = registry
    path = str(world["defaults"] / f"{key}.json")
    assert key not in presets and key in presets.skipped
    assert sum(path in w for w in warnings) == 1, [w for w in warnings if path in w]
    with pytest.raises(UnknownModelError, match=rf"{key}.*skipped.*architecture '{key}'"):
        presets.get(key)


# ---- 3. definition features ------------------------------------------------------------------------------


def test_a_whole_definitions_folder_and_a_finetunes_folder_load_together(world: dict[str, Any], tmp_path: Path) -> None:
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    (finetunes / "put your finetunes here.txt").write_text("")
    mine = {"model": {"name": "mine", "architecture": "t2v_2_2", "description": "", "URLs": "t2v_2_2",
                      "URLs2": "t2v_2_2", "group": "wan2_2"}, "guidance_phases": 2}  # fmt: skip
    (finetunes / "my_t2v_2_2.json").write_text(json.dumps(mine))
    presets = load_presets(BUILTIN_PRESETS_DIR, [world["defaults"], finetunes])
    defined = {p.stem for p in world["defaults"].glob("*.json")}
    assert defined <= set(presets) | set(presets.skipped)
    assert set(DEFINITIONS) <= set(presets) and set(OTHER_FAMILIES) <= set(presets.skipped)
    preset = presets.get("my_t2v_2_2")  # URLs naming another definition: its files, not a folder
    assert preset.model.urls == presets.get("t2v_2_2").model.urls and preset.model.urls2
    assert check_model(preset, world["ckpts"]).status == "present"


def test_ui_and_metadata_keys_are_recorded_as_ignored(registry: tuple[PresetRegistry, list[str]]) -> None:
    presets, _ = registry
    assert {"prompt", "model.author", "model.profile_dirs", "model.video_prompt_enhancer_instructions"} <= set(
        presets.get("i2v_2_2_Enhanced_Lightning_v2").ignored
    )
    assert {"model.visible", "model.auto_quantize"} <= set(presets.get("flf2v_720p").ignored)
    assert "model.settings_dir" in presets.get("ti2v_2_2").ignored
    assert {"embedded_guidance_scale", "activated_loras", "loras_multipliers"} <= set(
        presets.get("t2v_fusionix").ignored
    )
    assert presets.get("t2v_fusionix").settings.seed == -1  # seed is understood: -1 is random
    assert "model.lock_guidance_phases" in presets.get("vace_14B_lightning_3p_2_2").ignored


SOLVERS = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler",
           "dpm++": "DPMSolverMultistepScheduler", "": "UniPCMultistepScheduler"}  # fmt: skip


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_sample_solver_runs_its_diffusers_scheduler(world: dict[str, Any], solver: str, tmp_path: Path) -> None:
    user = tmp_path / "defs"
    user.mkdir()
    data = {"model": {"name": "s", "architecture": "t2v", "description": "", "URLs": "t2v"}, "sample_solver": solver,
            "flow_shift": 3.0}  # fmt: skip
    (user / "solver.json").write_text(json.dumps(data))
    presets = load_presets(BUILTIN_PRESETS_DIR, [world["defaults"], user])
    orchestrator = WanOrchestrator(world["ckpts"], presets, loras_dir=[tmp_path])
    orchestrator.load_model("solver")
    try:
        result = orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "v.png", video_length=1, **CALL)
    finally:
        orchestrator.unload_model()
    assert result.extra["sample_solver"] == (solver or "unipc")
    import diffusers

    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
    scheduler_cls = getattr(diffusers, SOLVERS[solver])
    scheduler = scheduler_cls(shift=3.0) if solver == "euler" else scheduler_cls(**flow)
    scheduler.set_timesteps(CALL["num_inference_steps"])
    assert result.timesteps == pytest.approx([float(t) for t in scheduler.timesteps])


def test_a_solver_without_a_diffusers_scheduler_skips_that_definition_naming_the_allowed_ones(
    registry: tuple[PresetRegistry, list[str]],
) -> None:
    presets, _ = registry
    with pytest.raises(UnknownModelError, match=r"sample_solver 'causvid'.*no diffusers scheduler.*allowed: unipc"):
        presets.get("t2v_causvid")


def test_an_nvfp4_definition_is_refused_naming_the_format_and_what_to_use(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]]
) -> None:
    presets, _ = registry
    check = check_model(presets.get("i2v_nvfp4"), world["ckpts"])
    assert check.status == "missing"
    assert any("NVFP4" in p and "bf16" in p for p in check.problems), check.problems
    with pytest.raises(ModelUnavailableError, match="NVFP4"):
        WanOrchestrator(world["ckpts"], presets).load_model("i2v_nvfp4")


def test_the_present_variant_is_used_when_the_first_is_missing(world: dict[str, Any], tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    os.symlink(world["ckpts"] / T2V, ckpts / T2V)
    t2v = rf.load_transformer(world["ckpts"] / T2V)
    expected = rf.write_quanto_int8(t2v, ckpts / "wan2.1_text2video_14B_quanto_mbf16_int8.safetensors",
                                    other_dtype=torch.bfloat16)  # fmt: skip
    presets = load_presets(BUILTIN_PRESETS_DIR, [world["defaults"]])
    frames, result = _generate(ckpts, presets, "t2v", tmp_path, video_length=1)
    assert result.extra["checkpoint"]["transformer"]["checkpoint_format"] == "quanto_int8"
    ref = rf.pipeline_folder(world["tiny"] / TINY[T2V], tmp_path / "ref-int8", {"transformer": expected})
    want, _ = _generate(ckpts, _reference(world, "t2v", ref, tmp_path), "ref_t2v", tmp_path, video_length=1)
    np.testing.assert_array_equal(frames, want)


def test_allow_download_fetches_only_the_first_variant_once(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    presets = load_presets(BUILTIN_PRESETS_DIR, [world["defaults"]])
    fetched: list[str] = []
    monkeypatch.setattr(model_sources, "download", lambda item: fetched.append(item.describe()))
    with pytest.raises(ModelUnavailableError):
        model_sources.resolve_model(presets.get("vace_14B_2_2"), tmp_path / "empty", allow_download=True)
    assert sorted(fetched) == [
        "DeepBeepMeep/Wan2.1/wan2.1_Vace_14B_module_mbf16.safetensors",
        "DeepBeepMeep/Wan2.2/wan2.2_text2video_14B_high_mbf16.safetensors",
        "DeepBeepMeep/Wan2.2/wan2.2_text2video_14B_low_mbf16.safetensors",
        "linoyts/Wan2.2-VACE-Fun-14B-diffusers",
    ], fetched  # the first variant of each file, once; the default base for the rest


def test_a_preset_lora_url_is_fetched_only_when_allowed_into_the_lora_dir(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    presets, _ = registry
    empty = tmp_path / "loras"
    with pytest.raises(InvalidRequestError, match=r"Lightning_T2V_A14B_HIGH.*--allow-download"):
        _generate(world["ckpts"], presets, "vace_14B_lightning_3p_2_2", tmp_path, loras=[empty])
    calls: list[tuple[str, str]] = []

    def fake_download(repo: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo, filename))
        return str(world["loras"] / "wan" / Path(filename).name)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    orchestrator = WanOrchestrator(world["ckpts"], presets, loras_dir=[empty], allow_download=True)
    orchestrator.load_model("vace_14B_lightning_3p_2_2")
    try:
        result = orchestrator.generate_vace(
            PROMPT, video_guide=_images(tmp_path)[0], output_path=tmp_path / "v.mp4", video_length=5, **CALL
        )
    finally:
        orchestrator.unload_model()
    assert sorted(calls) == [("DeepBeepMeep/Wan2.2", "loras_accelerators/" + n) for n in LIGHTNING]
    assert sorted(p.name for p in empty.iterdir()) == sorted(LIGHTNING)
    assert [r["file"] for r in result.loras] == [str(empty / n) for n in LIGHTNING]


def test_three_phase_multipliers_on_a_two_phase_definition_are_a_clear_error(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], tmp_path: Path
) -> None:
    presets, _ = registry
    with pytest.raises(InvalidRequestError, match=r"'0;1;0'.*3-phase definition \(guidance_phases 3\)"):
        _generate(world["ckpts"], presets, "t2v_2_2", tmp_path, loras=[world["loras"]],
                  lora_names=[LIGHTNING[0]], lora_multipliers="0;1;0")  # fmt: skip


def test_three_phase_multipliers_from_a_task(
    world: dict[str, Any], registry: tuple[PresetRegistry, list[str]], tmp_path: Path
) -> None:
    presets, _ = registry
    _, result = _generate(world["ckpts"], presets, "vace_14B_lightning_3p_2_2", tmp_path, loras=[world["loras"]],
                          num_inference_steps=8, lora_names=[LIGHTNING[0]], lora_multipliers="1;0;0.5")  # fmt: skip
    phases = result.extra["guidance_phases"]["phase_per_step"]
    assert result.loras[0]["per_step"] == [{1: 1.0, 2: 0.0, 3: 0.5}[p] for p in phases]


def test_comfyui_models_dir_finds_files_in_diffusion_models(world: dict[str, Any], tmp_path: Path) -> None:
    models = tmp_path / "ComfyUI" / "models"
    (models / "diffusion_models").mkdir(parents=True)
    os.symlink(world["ckpts"] / T2V, models / T2V)
    comfy = "wan2.1_t2v_14B_fp16.safetensors"
    rf.write_plain(rf.original_state(rf.load_transformer(world["ckpts"] / T2V)), models / "diffusion_models" / comfy,
                   dtype=torch.float32, prefix=COMFYUI_PREFIX)  # fmt: skip
    user = tmp_path / "defs"
    user.mkdir()
    url = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/"
    for key, urls in (("by_url", url + comfy), ("by_path", f"diffusion_models/{comfy}")):
        data = {"model": {"name": key, "architecture": "t2v", "description": "", "URLs": [urls]}}
        (user / f"{key}.json").write_text(json.dumps(data))
    presets = load_presets(BUILTIN_PRESETS_DIR, user)
    for key in ("by_url", "by_path"):
        check = check_model(presets.get(key), models)
        assert check.status == "present" and check.single_file == models / "diffusion_models" / comfy, check


# ---- 4. checkpoint files: same frames as the same weights in a diffusers folder ---------------------------


def _t2v_case(world: dict[str, Any], tmp_path: Path, case: str) -> tuple[Path, dict[str, torch.Tensor], str]:
    """Write checkpoint `case` of the (bf16) T2V transformer; return it, the weights it stands for, its format."""
    model = rf.load_transformer(world["ckpts"] / T2V)
    state = rf.original_state(model)
    d = tmp_path / "case"
    d.mkdir()
    name = {
        "quanto_mbf16_int8": "wan2.1_text2video_14B_quanto_mbf16_int8.safetensors",
        "quanto_mfp16_int8": "wan2.1_text2video_14B_quanto_mfp16_int8.safetensors",
        "quanto_map_beside": "Wan14BT2VFusioniX_quanto_fp16_int8.safetensors",
        "quanto_bf16_int8": "wan2.1_StepDistill-CfgDistill_14B_quanto_bf16_int8.safetensors",
        "fp8_scaled": "wan2.1_t2v_14B_fp8_scaled.safetensors",
        "fp8_scaled_row": "wan2.1_t2v_14B_fp8_scaled_v2.safetensors",
        "fp8_scaled_kijai": "Wan2_1-T2V-14B_fp8_e4m3fn_scaled_KJ.safetensors",
        "comfy_quant_fp8": "wan2.1_t2v_14B_fp8_e4m3fn_scaled_comfy.safetensors",
        "kijai_fp8_e4m3fn": "Wan2_1-T2V-14B_fp8_e4m3fn.safetensors",
        "kijai_fp8_e5m2": "Wan2_1-T2V-14B_fp8_e5m2.safetensors",
        "comfy_fp16": "wan2.1_t2v_14B_fp16.safetensors",
        "comfy_checkpoint_prefix": "wan2.1_t2v_14B_checkpoint.safetensors",
        "original_fp32": "wan2.1_t2v_14B_fp32.safetensors",
        "wan2gp_bf16": "wan2.1_text2video_14B_mbf16.safetensors",
        "diffusers_single_file": "diffusion_pytorch_model.safetensors",
        "wan_repo_folder": "Wan2.1-T2V-14B",
    }[case]
    path = d / name
    if case.startswith("quanto"):
        other = torch.float16 if "fp16" in case else torch.bfloat16
        return (
            path,
            rf.write_quanto_int8(model, path, other_dtype=other, map_beside=case == "quanto_map_beside"),
            "quanto_int8",
        )
    if case == "fp8_scaled_kijai":
        return path, rf.write_fp8_scaled(model, path, prefix="", marker=False), "fp8_scaled"
    if case.startswith("fp8_scaled"):
        return path, rf.write_fp8_scaled(model, path, scale_shape=(1,) if case.endswith("row") else ()), "fp8_scaled"
    if case == "comfy_quant_fp8":
        return path, rf.write_comfy_quant(model, path), "comfy_quant_fp8"
    if case.startswith("kijai"):
        dtype = torch.float8_e4m3fn if case.endswith("e4m3fn") else torch.float8_e5m2
        return path, rf.write_fp8_unscaled(model, path, dtype=dtype), case.removeprefix("kijai_")
    if case == "comfy_fp16":
        return path, rf.write_plain(state, path, dtype=torch.float16), "fp16"
    if case == "comfy_checkpoint_prefix":
        return path, rf.write_plain(state, path, dtype=torch.float16, prefix=COMFYUI_PREFIX), "fp16"
    if case == "original_fp32":
        return path, rf.write_plain(state, path, dtype=torch.float32), "fp32"
    if case == "wan2gp_bf16":
        return path, rf.write_plain(state, path, dtype=torch.bfloat16), "bf16"
    if case == "diffusers_single_file":
        rf.save(model.state_dict(), path)
        return path, {k: v.float() for k, v in state.items()}, "fp32"
    return path, rf.write_wan_folder(model, path), "fp32"


CHECKPOINTS = [
    "quanto_mbf16_int8", "quanto_mfp16_int8", "quanto_map_beside", "quanto_bf16_int8", "fp8_scaled",
    "fp8_scaled_row", "fp8_scaled_kijai", "comfy_quant_fp8", "kijai_fp8_e4m3fn", "kijai_fp8_e5m2", "comfy_fp16",
    "comfy_checkpoint_prefix", "original_fp32", "wan2gp_bf16", "diffusers_single_file", "wan_repo_folder",
]  # fmt: skip


def _file_preset(tmp_path: Path, key: str, **model: Any) -> PresetRegistry:
    user = tmp_path / "file-presets"
    user.mkdir(parents=True, exist_ok=True)
    data = {"model": {"name": key, "architecture": "t2v", **model}, "num_inference_steps": 2}
    (user / f"{key}.json").write_text(json.dumps(data))
    return load_presets(BUILTIN_PRESETS_DIR, user)


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_checkpoint_format_gives_the_frames_of_its_diffusers_folder(
    world: dict[str, Any], case: str, tmp_path: Path
) -> None:
    path, weights, fmt = _t2v_case(world, tmp_path, case)
    presets = _file_preset(tmp_path, "file", URLs=str(path), base=str(world["ckpts"] / T2V))
    frames, result = _generate(world["ckpts"], presets, "file", tmp_path, video_length=1)
    np.testing.assert_array_equal(frames, _reference_frames(world, weights, tmp_path))
    report = result.extra["checkpoint"]["transformer"]
    assert report["checkpoint_format"] == fmt, report
    if case in ("quanto_mbf16_int8", "fp8_scaled", "comfy_quant_fp8"):
        assert report["dequantized_to"] == "float32"


_REFERENCE_FRAMES: dict[str, np.ndarray] = {}  # weights' fingerprint -> frames (several formats hold the same)


def _reference_frames(world: dict[str, Any], weights: dict[str, torch.Tensor], tmp_path: Path) -> np.ndarray:
    """The frames of a T2V diffusers folder holding `weights`, built once per distinct set of weights."""
    digest = hashlib.sha1()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].float().numpy().tobytes())
    key = digest.hexdigest()
    if key not in _REFERENCE_FRAMES:
        ref = rf.pipeline_folder(world["tiny"] / TINY[T2V], tmp_path / "ref", {"transformer": weights})
        frames, _ = _generate(world["ckpts"], _file_preset(tmp_path, "ref", URLs=str(ref)), "ref", tmp_path)
        _REFERENCE_FRAMES[key] = frames
    return _REFERENCE_FRAMES[key]


@pytest.mark.parametrize("module_format", ["bf16", "quanto_int8"])
def test_vace_module_file_merged_onto_the_base_transformer(
    world: dict[str, Any], module_format: str, tmp_path: Path
) -> None:
    vace = rf.load_transformer(world["ckpts"] / VACE)
    module = (
        tmp_path / f"wan2.1_Vace_14B_module_{'mbf16' if module_format == 'bf16' else 'quanto_mbf16_int8'}.safetensors"
    )
    if module_format == "bf16":
        weights = rf.original_state(vace)
        rf.write_plain({k: v for k, v in weights.items() if k.startswith("vace_")}, module, dtype=torch.bfloat16)
    else:
        weights = {**rf.original_state(vace), **rf.write_quanto_int8(vace, module, other_dtype=torch.bfloat16,
                                                                    prefix="vace_")}  # fmt: skip
    ref = rf.pipeline_folder(world["tiny"] / TINY[VACE], tmp_path / "ref", {"transformer": weights})
    base = world["ckpts"] / "wan2.1_text2video_14B_mbf16.safetensors"
    presets = _file_preset(tmp_path, "merged", architecture="vace", URLs=str(base), modules=[[str(module)]], base=VACE)
    frames, result = _generate(world["ckpts"], presets, "merged", tmp_path)
    expected, _ = _generate(world["ckpts"], _file_preset(tmp_path, "ref", architecture="vace", URLs=str(ref)), "ref",
                            tmp_path)  # fmt: skip
    np.testing.assert_array_equal(frames, expected)
    assert result.extra["checkpoint"]["transformer"]["files"] == [str(base), str(module)]


def test_wan22_original_expert_folders(world: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "Wan2.2-T2V-A14B"
    for folder, sub in (("high_noise_model", "transformer"), ("low_noise_model", "transformer_2")):
        rf.write_wan_folder(rf.load_transformer(world["ckpts"] / T2V22, sub), root / folder)
    presets = _file_preset(tmp_path, "experts", URLs=str(root / "high_noise_model"),
                           URLs2=str(root / "low_noise_model"), base=T2V22, group="wan2_2")  # fmt: skip
    frames, result = _generate(world["ckpts"], presets, "experts", tmp_path, video_length=1, num_inference_steps=4)
    expected, _ = _generate(world["ckpts"], _file_preset(tmp_path, "ref", URLs=T2V22, group="wan2_2"), "ref",
                            tmp_path, video_length=1, num_inference_steps=4)  # fmt: skip
    np.testing.assert_array_equal(frames, expected)
    assert "low" in result.experts_used


def test_wan22_quanto_int8_experts(world: dict[str, Any], tmp_path: Path) -> None:
    weights = {}
    for sub, side in (("transformer", "high"), ("transformer_2", "low")):
        model = rf.load_transformer(world["ckpts"] / T2V22, sub)
        path = tmp_path / f"wan2.2_text2video_14B_{side}_quanto_mbf16_int8.safetensors"
        weights[sub] = rf.write_quanto_int8(model, path, other_dtype=torch.bfloat16)
    ref = rf.pipeline_folder(world["tiny"] / TINY[T2V22], tmp_path / "ref-folder", weights)
    high, low = (str(tmp_path / f"wan2.2_text2video_14B_{s}_quanto_mbf16_int8.safetensors") for s in ("high", "low"))
    presets = _file_preset(tmp_path, "q", URLs=high, URLs2=low, base=T2V22, group="wan2_2")
    frames, result = _generate(world["ckpts"], presets, "q", tmp_path, video_length=1, num_inference_steps=4)
    expected, _ = _generate(world["ckpts"], _file_preset(tmp_path, "ref", URLs=str(ref), group="wan2_2"), "ref",
                            tmp_path, video_length=1, num_inference_steps=4)  # fmt: skip
    np.testing.assert_array_equal(frames, expected)
    assert result.extra["checkpoint"]["transformer_2"]["checkpoint_format"] == "quanto_int8"


def test_i2v_fp8_scaled_with_its_image_layers(world: dict[str, Any], tmp_path: Path) -> None:
    model = rf.load_transformer(world["ckpts"] / I2V)
    path = tmp_path / "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"
    ref = rf.pipeline_folder(world["tiny"] / TINY[I2V], tmp_path / "ref-folder",
                             {"transformer": rf.write_fp8_scaled(model, path)})  # fmt: skip
    presets = _file_preset(tmp_path, "f", architecture="i2v", URLs=str(path), base=I2V)
    frames, _ = _generate(world["ckpts"], presets, "f", tmp_path)
    expected, _ = _generate(world["ckpts"], _file_preset(tmp_path, "ref", architecture="i2v", URLs=str(ref)), "ref",
                            tmp_path)  # fmt: skip
    np.testing.assert_array_equal(frames, expected)


REFUSED_CHECKPOINTS = {
    "gguf": ("wan2.1-t2v-14b-Q4_K_M.gguf", r"GGUF.*quanto int8"),
    "quanto_int4": ("wan2.1_t2v_quanto_int4.safetensors", r"quanto 4-bit.*int8"),
    "nvfp4": ("wan2.1_t2v_nvfp4.safetensors", r"NVFP4.*bf16"),
    "gptq": ("wan2.1_t2v_gptq.safetensors", r"GPTQ/AWQ.*bf16"),
    "pickle": ("wan2.1_t2v_14B.ckpt", r"pickle|\.safetensors"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CHECKPOINTS))
def test_unsupported_checkpoint_is_refused_naming_the_format(world: dict[str, Any], case: str, tmp_path: Path) -> None:
    name, message = REFUSED_CHECKPOINTS[case]
    state = dict(rf.original_state(rf.load_transformer(world["ckpts"] / T2V)))
    path = tmp_path / name
    weight = state.pop("blocks.0.self_attn.q.weight")
    if case == "gguf" or case == "pickle":
        path.write_bytes(b"GGUF" if case == "gguf" else b"\x80\x02")
    elif case == "quanto_int4":
        state["blocks.0.self_attn.q.weight._data"] = torch.zeros(
            weight.shape[0], weight.shape[1] // 2, dtype=torch.uint8
        )
        state["blocks.0.self_attn.q.weight._scale"] = torch.ones(weight.shape[0], 1)
        state["blocks.0.self_attn.q.weight._shift"] = torch.zeros(weight.shape[0], 1)
        rf.save(state, path)
    elif case == "nvfp4":
        state["blocks.0.self_attn.q.weight"] = torch.zeros(weight.shape[0], weight.shape[1] // 2, dtype=torch.uint8)
        state["blocks.0.self_attn.q.weight_scale"] = torch.ones(weight.shape[0], 1, dtype=torch.float8_e4m3fn)
        state["blocks.0.self_attn.q.weight_scale_2"] = torch.ones(())
        rf.save(state, path)
    else:
        state["blocks.0.self_attn.q.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
        state["blocks.0.self_attn.q.qzeros"] = torch.zeros(1, 4, dtype=torch.int32)
        rf.save(state, path)
    presets = _file_preset(tmp_path, "bad", URLs=str(path), base=str(world["ckpts"] / T2V))
    check = check_model(presets.get("bad"), world["ckpts"])
    assert check.status != "present"
    text = " ".join([*check.problems, *check.missing, *check.corrupted])
    assert re.search(message, text), text
    with pytest.raises(ModelUnavailableError, match=message):
        WanOrchestrator(world["ckpts"], presets).load_model("bad")


# ---- 5. LoRA files: every layout gives the frames of the diffusers-layout LoRA -----------------------------


def _dotted(key: str) -> str:
    """`.lora_A.weight` as `.lora.A.weight` (a spelling Wan2GP's loader reads too)."""
    return key.replace(".lora_A.", ".lora.A.").replace(".lora_B.", ".lora.B.")


@pytest.fixture(scope="module")
def lora_world(world: dict[str, Any]) -> Iterator[dict[str, Any]]:
    root = world["root"] / "lora_layouts"
    pairs = rf.lora_pairs(31)
    files = {
        "diffusers": pairs,
        "original_lora_A_B": rf.as_original(pairs),
        "original_down_up_alpha": rf.as_original(pairs, down_up=True, alpha=2.0),
        "musubi": rf.as_musubi(pairs),
        "diffsynth": rf.as_diffsynth(pairs),
        "diffsynth_plain": rf.as_diffsynth(pairs, default=False),
        "diffusers_unprefixed": {k.removeprefix("transformer."): v for k, v in pairs.items()},
        "original_unprefixed": rf.as_original(pairs, prefix=""),
        "original_dotted": {_dotted(k): v for k, v in rf.as_original(pairs).items()},
        "norm_deltas": rf.norm_deltas(32),
        "lightx2v": {**rf.as_original(rf.lora_pairs(33), down_up=True, alpha=4.0), **rf.norm_deltas(32)},
        "lokr": {"diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(2, 2)},
        "dora": {**rf.as_original(pairs), "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, 24)},
        "flux_lora": {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 24),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(24, 4),
        },
    }
    for name, state in files.items():
        rf.save(state, root / f"{name}.safetensors")
    # The weights the deltas stand for, in a diffusers folder.
    model = rf.load_transformer(world["ckpts"] / T2V)
    state = rf.original_state(model)
    with torch.no_grad():
        edited = model.state_dict()
        for key, delta in rf.norm_deltas(32).items():
            edited[rf.DELTA_TARGETS[key]] = edited[rf.DELTA_TARGETS[key]] + delta
    from wan_engine.single_file import diffusers_key_to_wan

    state = {diffusers_key_to_wan(k): v for k, v in edited.items()}
    rf.pipeline_folder(world["tiny"] / TINY[T2V], root / "edited", {"transformer": state})
    presets = _file_preset(root, "plain", URLs=str(world["ckpts"] / T2V))
    presets_edited = _file_preset(root / "e", "edited", URLs=str(root / "edited"))
    orchestrator = WanOrchestrator(world["ckpts"], presets, loras_dir=[root])
    orchestrator.load_model("plain")
    yield {"root": root, "orchestrator": orchestrator, "edited": presets_edited, "ckpts": world["ckpts"]}
    orchestrator.unload_model()


def _still(orchestrator: WanOrchestrator, path: Path, **params: Any) -> tuple[Any, np.ndarray]:
    result = orchestrator.generate_t2v(PROMPT, output_path=path, video_length=1, **{**CALL, **params})
    return result, read_video_frames(result.output_path)


LORA_LAYOUTS = [
    "original_lora_A_B", "original_down_up_alpha", "musubi", "diffsynth", "diffsynth_plain",
    "diffusers_unprefixed", "original_unprefixed", "original_dotted",
]  # fmt: skip


@pytest.mark.parametrize("layout", ["diffusers", *LORA_LAYOUTS])
def test_lora_layout_gives_the_frames_of_the_diffusers_layout(
    lora_world: dict[str, Any], layout: str, tmp_path: Path
) -> None:
    orchestrator = lora_world["orchestrator"]
    _, expected = _still(orchestrator, tmp_path / "d.png", lora_names=["diffusers"])
    _, base = _still(orchestrator, tmp_path / "b.png")
    result, got = _still(orchestrator, tmp_path / "x.png", lora_names=[layout])
    assert result.loras[0]["layers"] == {"transformer": 8}
    np.testing.assert_allclose(got.astype(float), expected.astype(float), atol=1 if "alpha" in layout else 0)
    assert not np.array_equal(got, base)


def test_lightx2v_norm_and_modulation_deltas_give_the_frames_of_the_edited_folder(
    lora_world: dict[str, Any], tmp_path: Path
) -> None:
    result, got = _still(lora_world["orchestrator"], tmp_path / "n.png", lora_names=["norm_deltas"])
    assert result.loras[0]["layers"] == {"transformer": len(rf.DELTA_TARGETS)}
    orchestrator = WanOrchestrator(lora_world["ckpts"], lora_world["edited"], loras_dir=[tmp_path])
    orchestrator.load_model("edited")
    try:
        _, expected = _still(orchestrator, tmp_path / "e.png")
    finally:
        orchestrator.unload_model()
    np.testing.assert_array_equal(got, expected)


def test_comfyui_generic_modulation_deltas_change_exactly_their_tables(
    lora_world: dict[str, Any], tmp_path: Path
) -> None:
    # ComfyUI's key map names a parameter that is not a `.weight` by its own name: `<param>.diff`.
    orchestrator = lora_world["orchestrator"]
    transformer = orchestrator.pipeline.transformer
    _still(orchestrator, tmp_path / "plain.png")  # no LoRA left applied by an earlier case
    targets = {"diffusion_model.blocks.0.modulation.diff": "blocks.0.scale_shift_table",
               "diffusion_model.head.modulation.diff": "scale_shift_table"}  # fmt: skip
    before = {name: transformer.get_parameter(name).detach().clone() for name in targets.values()}
    deltas = {key: torch.randn(before[name].shape) * 0.1 for key, name in targets.items()}
    rf.save(deltas, lora_world["root"] / "comfy_modulation.safetensors")
    result, _ = _still(orchestrator, tmp_path / "m.png", lora_names=["comfy_modulation"])
    assert result.loras[0]["layers"] == {"transformer": 2}
    for key, name in targets.items():
        assert torch.equal(transformer.get_parameter(name), before[name] + deltas[key]), name
    _still(orchestrator, tmp_path / "none.png")
    assert all(torch.equal(transformer.get_parameter(n), before[n]) for n in before)


def test_lightx2v_pairs_and_deltas_of_one_file_are_both_applied(lora_world: dict[str, Any], tmp_path: Path) -> None:
    result, _ = _still(lora_world["orchestrator"], tmp_path / "l.png", lora_names=["lightx2v"])
    assert result.loras[0]["layers"] == {"transformer": 8 + len(rf.DELTA_TARGETS)}


@pytest.mark.parametrize(
    ("name", "message"), [("lokr", "LyCORIS LoKr"), ("dora", "DoRA file"), ("flux_lora", "another model family")]
)
def test_unsupported_lora_is_refused_naming_it(
    lora_world: dict[str, Any], name: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _still(lora_world["orchestrator"], tmp_path / "x.png", lora_names=[name])


# ---- 6. LoRA folders: ComfyUI models/loras and Wan2GP loras/ as they are ----------------------------------


def _lora_file(path: Path, seed: int = 41) -> Path:
    return rf.save(rf.as_original(rf.lora_pairs(seed)), path)


LORA_FOLDERS = {
    # case -> (where the file lies relative to the LoRA dirs, the model, which dir list)
    "comfyui_flat": ("comfy/style.safetensors", T2V),
    "comfyui_group_wan": ("comfy/wan/style.safetensors", T2V),
    "wan2gp_wan2_2": ("wan2gp/wan2_2/style.safetensors", T2V22),
    "wan2gp_wan_i2v": ("wan2gp/wan_i2v/style.safetensors", I2V),
    "second_folder": ("wan2gp/style.safetensors", T2V),
}


@pytest.mark.parametrize("case", sorted(LORA_FOLDERS))
def test_lora_folders_serve_as_they_are(world: dict[str, Any], case: str, tmp_path: Path) -> None:
    relative, folder = LORA_FOLDERS[case]
    (tmp_path / "comfy").mkdir()
    (tmp_path / "wan2gp").mkdir()
    file = _lora_file(tmp_path / relative)
    architecture = {T2V: "t2v", T2V22: "t2v_2_2", I2V: "i2v"}[folder]
    presets = _file_preset(tmp_path, "m", architecture=architecture, URLs=str(world["ckpts"] / folder))
    _, result = _generate(world["ckpts"], presets, "m", tmp_path, loras=[tmp_path / "comfy", tmp_path / "wan2gp"],
                          lora_names=["style"], video_length=1)  # fmt: skip
    assert result.loras[0]["file"] == str(file)


def test_wan_loras_dir_environment_gives_several_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker.cli.parser import build_parser

    monkeypatch.setenv("WAN_LORAS_DIR", f"{tmp_path / 'comfy'}{os.pathsep}{tmp_path / 'wan2gp'}")
    assert build_parser().parse_args(["run"]).loras_dir == (tmp_path / "comfy", tmp_path / "wan2gp")
