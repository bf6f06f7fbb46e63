"""Builders of the files users bring from Wan2GP and ComfyUI, in their real key layouts (issue 14).

Each builder writes a tiny file or folder the way the real tool does -- the key names, dtypes, metadata and
folder layout are those of the real files; the weights are the tiny test models' -- and returns what the
loaded weights must equal, so a test can compare with the same weights loaded from a diffusers folder.

- checkpoints: Wan2GP (mmgp / optimum-quanto) `*_quanto_m<bf16|fp16>_int8`, ComfyUI `*_fp8_scaled` and
  per-layer `comfy_quant`, Kijai's unscaled fp8, plain bf16/fp16 in original Wan / ComfyUI / diffusers
  layout, Wan2GP VACE module files, the original Wan repository folder;
- LoRAs: diffusers/peft, original Wan names (ComfyUI / Kijai: lora_A/B or lora_down/up + alpha), musubi
  `lora_unet_*`, DiffSynth-Studio (`.lora_A.default.`), lightx2v / CausVid full deltas (diff, diff_b, diff_m);
- Wan2GP definitions: the key layout of each of its `defaults/*.json` files, with values of our own.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wan_engine.single_file import COMFYUI_PREFIX, diffusers_key_to_wan

HF21 = "https://huggingface.co/DeepBeepMeep/Wan2.1/resolve/main/"
HF22 = "https://huggingface.co/DeepBeepMeep/Wan2.2/resolve/main/"
INNER = 24  # tiny transformers: 2 heads x 12
PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}


# ---- transformer weights ------------------------------------------------------------------------------------


def original_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers Wan transformer's weights under the original Wan names (what Wan2GP and ComfyUI files use)."""
    return {diffusers_key_to_wan(k): v.detach().clone() for k, v in model.state_dict().items()}


def linear_weights(model: torch.nn.Module) -> set[str]:
    """Original names of the blocks' linear weights: what Wan2GP and ComfyUI quantize."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("blocks.", "vace_blocks.")):
            names.add(diffusers_key_to_wan(name + ".weight"))
    return names


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


def write_plain(
    state: dict[str, torch.Tensor], path: Path, *, dtype: torch.dtype, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A plain file (Wan2GP `*_mbf16`, Comfy-Org `*_fp16`, original Wan): every tensor in `dtype`, under `prefix`."""
    save({prefix + k: v.to(dtype) for k, v in state.items()}, path)
    return {k: v.to(dtype).float() for k, v in state.items()}


def write_fp8_unscaled(
    model: torch.nn.Module, path: Path, *, dtype: torch.dtype = torch.float8_e4m3fn, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Kijai's `*_fp8_e4m3fn` / `*_fp8_e5m2`: the blocks' linear weights cast to float8, no scale; the rest bf16."""
    quantized = linear_weights(model)
    out = {k: v.to(dtype if k in quantized else torch.bfloat16) for k, v in original_state(model).items()}
    save({prefix + k: v for k, v in out.items()}, path)
    return {k: v.float() for k, v in out.items()}


def write_quanto_int8(
    model: torch.nn.Module,
    path: Path,
    *,
    other_dtype: torch.dtype,
    map_beside: bool = False,
    prefix: str = "",
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A Wan2GP `*_quanto_m<bf16|fp16>_int8` file as mmgp writes it through optimum-quanto: each quantized linear
    is `<layer>.weight._data` (int8) + `<layer>.weight._scale` ((out, 1), unquantized dtype) + the
    `input_scale` / `output_scale` buffers; other tensors in `other_dtype`; the quantization map in the metadata
    (`quantization_format` + `quantization_map_base64`, mmgp's safetensors2) or in `<file>_map.json`.

    `prefix`: only the weights whose original names start with it (a Wan2GP module file). `state`: other
    weights than the model's own (same names). Returns the weights it stands for: `_scale * _data`."""
    state = {k: v for k, v in (state or original_state(model)).items() if k.startswith(prefix)}
    quantized = linear_weights(model)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    qmap = {}
    for name, value in state.items():
        if name in quantized:
            layer = name[: -len(".weight")]
            scale = (value.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8).to(other_dtype)
            data = torch.round(value / scale.float()).clamp(-127, 127).to(torch.int8)
            tensors[name + "._data"] = data
            tensors[name + "._scale"] = scale
            tensors[layer + ".input_scale"] = torch.ones((), dtype=other_dtype)
            tensors[layer + ".output_scale"] = torch.ones((), dtype=other_dtype)
            qmap[layer] = {"weights": "qint8", "activations": "none"}
            expected[name] = scale.float() * data.float()
        else:
            tensors[name] = value.to(other_dtype)
            expected[name] = tensors[name].float()
    metadata = {"format": "pt"}
    if map_beside:
        path.with_name(path.stem + "_map.json").write_text(json.dumps(qmap))
    else:
        encoded = base64.b64encode(json.dumps(qmap).encode()).decode()
        metadata.update(quantization_format="quanto", quantization_map_base64=encoded)
    save(tensors, path, metadata)
    return expected


def write_fp8_scaled(
    model: torch.nn.Module,
    path: Path,
    *,
    scale_shape: tuple[int, ...] = (),
    prefix: str = COMFYUI_PREFIX,
    marker: bool = True,
) -> dict[str, torch.Tensor]:
    """A ComfyUI `*_fp8_scaled` file: linears in float8 e4m3fn with a float32 `scale_weight`, a `scale_input` on
    some, the `scaled_fp8` marker, the rest fp16, all under `model.diffusion_model.` (comfy/ops.py scaled_fp8).
    `prefix=""`, `marker=False`: Kijai's `*_fp8_e4m3fn_scaled_KJ` files (the same tensors, bare names)."""
    quantized = linear_weights(model)
    tensors: dict[str, torch.Tensor] = {}
    if marker:
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    expected = {}
    for index, (name, value) in enumerate(sorted(original_state(model).items())):
        if name in quantized:
            layer = name[: -len(".weight")]
            scale = (value.abs().amax() / 448).clamp(min=1e-8).reshape(scale_shape).float()
            weight = (value / scale).to(torch.float8_e4m3fn)
            tensors[prefix + name] = weight
            tensors[prefix + layer + ".scale_weight"] = scale
            if index % 2:
                tensors[prefix + layer + ".scale_input"] = torch.ones(scale_shape)
            expected[name] = weight.float() * scale
        else:
            tensors[prefix + name] = value.to(torch.float16)
            expected[name] = tensors[prefix + name].float()
    save(tensors, path)
    return expected


def write_comfy_quant(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's per-layer quantized file: `<layer>.weight` float8 + `<layer>.weight_scale` + `<layer>.comfy_quant`
    (UTF-8 JSON `{"format": "float8_e4m3fn"}` as a uint8 tensor), the rest bf16, no prefix."""
    quantized = linear_weights(model)
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    expected = {}
    for name, value in original_state(model).items():
        if name in quantized:
            layer = name[: -len(".weight")]
            scale = (value.abs().amax() / 448).clamp(min=1e-8).float()
            tensors[name] = (value / scale).to(torch.float8_e4m3fn)
            tensors[layer + ".weight_scale"] = scale
            tensors[layer + ".comfy_quant"] = marker.clone()
            expected[name] = tensors[name].float() * scale
        else:
            tensors[name] = value.to(torch.bfloat16)
            expected[name] = tensors[name].float()
    save(tensors, path)
    return expected


def write_wan_folder(
    model: torch.nn.Module, folder: Path, *, shards: int = 2, model_type: str = "t2v"
) -> dict[str, torch.Tensor]:
    """The original Wan repository layout: Wan's own config.json (WanModel arguments), original-layout shards
    `diffusion_pytorch_model-0000N-of-0000M.safetensors` and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    wan_config = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": model_type,
        "dim": config.num_attention_heads * config.attention_head_dim,
        "num_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "in_dim": config.in_channels,
        "out_dim": config.out_channels,
        "eps": config.eps,
        "text_len": 512,
    }
    (folder / "config.json").write_text(json.dumps(wan_config))
    state = original_state(model)
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        file = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[index::shards]}
        save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return {k: v.float() for k, v in state.items()}


def transformer_class(folder: Path, subfolder: str = "transformer") -> Any:
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    config = json.loads((folder / subfolder / "config.json").read_text())
    return WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel


def load_transformer(folder: Path, subfolder: str = "transformer") -> torch.nn.Module:
    return transformer_class(folder, subfolder).from_pretrained(folder, subfolder=subfolder)


def pipeline_folder(source: Path, target: Path, weights: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A diffusers pipeline folder like `source` whose transformers hold `weights` (subfolder -> original names)."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name not in weights:
            os.symlink(entry, target / entry.name)
    for subfolder, state in weights.items():
        model = load_transformer(source, subfolder)
        model.load_state_dict({k: state[diffusers_key_to_wan(k)] for k in model.state_dict()}, strict=True)
        model.save_pretrained(target / subfolder)
    return target


def bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights rounded to bf16 (what a Wan2GP `*_mbf16` file holds), in float32, original names."""
    return {k: v.to(torch.bfloat16).float() for k, v in original_state(model).items()}


# ---- LoRAs ---------------------------------------------------------------------------------------------------


def lora_pairs(seed: int, rank: int = 4, blocks: int = 2) -> dict[str, torch.Tensor]:
    """A self-attention LoRA of the tiny blocks in diffusers/peft names (`transformer.blocks.N.attn1.to_q...`)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for block in range(blocks):
        for proj in PROJECTIONS:
            prefix = f"transformer.blocks.{block}.attn1.{proj}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, INNER, generator=generator)
            weights[f"{prefix}.lora_B.weight"] = torch.randn(INNER, rank, generator=generator)
    return weights


def _original_name(key: str) -> tuple[str, str]:
    """`transformer.blocks.0.attn1.to_q.lora_A.weight` -> (`blocks.0.self_attn.q`, `A`)."""
    _, _, block, _, proj, *_rest = key.split(".")
    kind = "A" if "lora_A" in key else "B"
    return f"blocks.{block}.self_attn.{PROJECTIONS[proj] if proj != 'to_out' else 'o'}", kind


def as_original(
    weights: dict[str, torch.Tensor],
    *,
    down_up: bool = False,
    alpha: float | None = None,
    prefix: str = "diffusion_model.",
) -> dict[str, torch.Tensor]:
    """The same LoRA in original Wan names (ComfyUI / Kijai / lightx2v): `diffusion_model.blocks.0.self_attn.q.
    lora_A.weight`, or `lora_down`/`lora_up` with an `alpha` per module (scaled so the product is unchanged)."""
    out = {}
    for key, value in weights.items():
        module, kind = _original_name(key)
        name = {"A": "lora_down", "B": "lora_up"}[kind] if down_up else f"lora_{kind}"
        rank = value.shape[0] if kind == "A" else value.shape[1]
        if alpha is not None and kind == "B":
            value = value * rank / alpha  # diffusers multiplies by alpha / rank
        out[f"{prefix}{module}.{name}.weight"] = value
        if alpha is not None:
            out[f"{prefix}{module}.alpha"] = torch.tensor(float(alpha))
    return out


def as_musubi(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """musubi-tuner / kohya names: `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha` (= rank)."""
    out = {}
    for key, value in weights.items():
        module, kind = _original_name(key)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(value.shape[0] if kind == "A" else value.shape[1]))
    return out


def as_diffsynth(weights: dict[str, torch.Tensor], *, default: bool = True) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio: peft on its WanModel, original names without a prefix, the peft adapter name `default`
    in every key (`blocks.0.self_attn.q.lora_A.default.weight`)."""
    out = {}
    for key, value in weights.items():
        module, kind = _original_name(key)
        out[f"{module}.lora_{kind}.default.weight" if default else f"{module}.lora_{kind}.weight"] = value
    return out


def norm_deltas(seed: int) -> dict[str, torch.Tensor]:
    """lightx2v / CausVid full deltas in original names: norm weights and biases, the blocks' modulation tables."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.5

    return {
        "diffusion_model.blocks.0.norm3.diff": rand(INNER),
        "diffusion_model.blocks.0.norm3.diff_b": rand(INNER),
        "diffusion_model.blocks.1.self_attn.norm_q.diff": rand(INNER),
        "diffusion_model.blocks.1.cross_attn.norm_k.diff": rand(INNER),
        "diffusion_model.blocks.0.diff_m": rand(1, 6, INNER),
        "diffusion_model.blocks.1.modulation.diff_m": rand(1, 6, INNER),
    }


# diffusers parameter names of the weights `norm_deltas` changes.
DELTA_TARGETS = {
    "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm2.weight",
    "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
    "diffusion_model.blocks.1.self_attn.norm_q.diff": "blocks.1.attn1.norm_q.weight",
    "diffusion_model.blocks.1.cross_attn.norm_k.diff": "blocks.1.attn2.norm_k.weight",
    "diffusion_model.blocks.0.diff_m": "blocks.0.scale_shift_table",
    "diffusion_model.blocks.1.modulation.diff_m": "blocks.1.scale_shift_table",
}


# ---- Wan2GP definitions --------------------------------------------------------------------------------------


def _variants(base: str, stem: str, kinds: tuple[str, ...] = ("mbf16", "quanto_mbf16_int8", "quanto_mfp16_int8")):
    return [f"{base}{stem}_{kind}.safetensors" for kind in kinds]


def wan2gp_definitions() -> dict[str, dict[str, Any]]:
    """Definitions with the key layout of Wan2GP's defaults/*.json (its keys, nesting and value types; our values).

    Served Wan architectures, references between definitions, variant lists, modules, 3-phase guidance,
    LoRA URLs, the UI keys; then one definition of each family this worker skips."""
    ui = {  # the settings block of Wan2GP's *_fusionix / *_sf files
        "resolution": "64x48", "video_length": 5, "seed": -1, "num_inference_steps": 3, "guidance_scale": 1,
        "flow_shift": 2, "embedded_guidance_scale": 6, "repeat_generation": 1, "multi_images_gen_type": 0,
        "tea_cache_setting": 0, "tea_cache_start_step_perc": 0, "loras_multipliers": "", "temporal_upsampling": "",
        "spatial_upsampling": "", "RIFLEx_setting": 0, "perturbation_switch": 0, "perturbation_start_perc": 10,
        "perturbation_end_perc": 90, "cfg_star_switch": 0, "cfg_zero_step": -1, "prompt_enhancer": "",
        "activated_loras": [],
    }  # fmt: skip
    small = {"resolution": "64x48", "video_length": 5, "num_inference_steps": 3}

    def model(name: str, architecture: str, urls: Any, **extra: Any) -> dict[str, Any]:
        return {"name": name, "architecture": architecture, "description": f"{name} (test)", "URLs": urls, **extra}

    lightning = HF22 + "loras_accelerators/"
    defs: dict[str, dict[str, Any]] = {
        "t2v": {"model": model("T2V 14B", "t2v", _variants(HF21, "wan2.1_text2video_14B")), **small},
        "t2v_1.3B": {"model": model("T2V 1.3B", "t2v_1.3B", [HF21 + "wan2.1_text2video_1.3B_mbf16.safetensors"])},
        "t2v_2_2": {
            "model": model(
                "T2V A14B",
                "t2v_2_2",
                _variants(HF22, "wan2.2_text2video_14B_high"),
                URLs2=_variants(HF22, "wan2.2_text2video_14B_low"),
                group="wan2_2",
            ),
            "guidance_phases": 2,
            "switch_threshold": 875,
            "guidance_scale": 4,
            "guidance2_scale": 3,
            "flow_shift": 12,
            **small,
        },
        "i2v": {"model": model("I2V 480p", "i2v", _variants(HF21, "wan2.1_image2video_480p_14B")), **small},
        "i2v_2_2": {
            "model": model(
                "I2V A14B",
                "i2v_2_2",
                _variants(HF22, "wan2.2_image2video_14B_high"),
                URLs2=_variants(HF22, "wan2.2_image2video_14B_low"),
                group="wan2_2",
            ),
            "guidance_phases": 2,
            "switch_threshold": 900,
            "guidance_scale": 3.5,
            "guidance2_scale": 3.5,
            "masking_strength": 0.1,
            "denoising_strength": 0.9,
            "flow_shift": 5,
            **small,
        },
        "ti2v_2_2": {
            "model": model(
                "TI2V 5B",
                "ti2v_2_2",
                _variants(HF22, "wan2.2_text2video_5B", ("mbf16", "quanto_mbf16_int8")),
                settings_dir=["wan2_2_5B"],
                group="wan2_2",
            ),
            "guidance_scale": 5,
            "flow_shift": 5,
            **small,
        },
        "flf2v_720p": {
            "model": model(
                "FLF2V 720p", "flf2v_720p", _variants(HF21, "wan2.1_FLF2V_720p_14B"), visible=True, auto_quantize=True
            ),
            **small,
        },
        "vace_1.3B": {
            "model": model(
                "Vace 1.3B", "vace_1.3B", "t2v_1.3B", modules=[[HF21 + "wan2.1_Vace_1_3B_module.safetensors"]]
            ),
            **small,
        },
        "vace_14B": {
            "model": model("Vace 14B", "vace_14B", "t2v", modules=[_variants(HF21, "wan2.1_Vace_14B_module")]),
            **small,
        },
        "vace_14B_2_2": {
            "model": model("Vace A14B", "vace_14B_2_2", "t2v_2_2", URLs2="t2v_2_2", modules=["vace_14B"]),
            "guidance_phases": 2,
            "guidance_scale": 1,
            "guidance2_scale": 1,
            "flow_shift": 2,
            "switch_threshold": 875,
            **small,
        },
        "vace_14B_lightning_3p_2_2": {
            "model": model(
                "Vace Lightning 3 phases",
                "vace_14B_2_2",
                "t2v_2_2",
                URLs2="t2v_2_2",
                modules=["vace_14B"],
                loras=[
                    lightning + "Lightning_T2V_A14B_HIGH.safetensors",
                    lightning + "Lightning_T2V_A14B_LOW.safetensors",
                ],
                loras_multipliers=["0;1;0", "0;0;1"],
                lock_guidance_phases=True,
                group="wan2_2",
            ),
            "num_inference_steps": 8,
            "guidance_phases": 3,
            "guidance_scale": 3.5,
            "guidance2_scale": 1,
            "guidance3_scale": 1,
            "switch_threshold": 965,
            "switch_threshold2": 800,
            "model_switch_phase": 2,
            "flow_shift": 3,
            "sample_solver": "euler",
            "resolution": "64x48",
            "video_length": 5,
        },
        "vace_14B_fusionix": {
            "model": model("Vace FusioniX", "vace_14B", "t2v_fusionix", modules=["vace_14B"], profiles_dir=[""]),
            **ui,
        },
        "t2v_fusionix": {
            "model": model(
                "T2V FusioniX",
                "t2v",
                [HF21 + f"Wan14BT2VFusioniX_{v}.safetensors" for v in ("fp16", "quanto_fp16_int8", "quanto_bf16_int8")],
                auto_quantize=True,
            ),
            **ui,
        },
        "t2v_sf": {
            "model": model(
                "T2V Lightning",
                "t2v",
                [HF21 + f"wan2.1_StepDistill-CfgDistill_14B_{v}.safetensors" for v in ("bf16", "quanto_bf16_int8")],
                author="https://huggingface.co/lightx2v",
                auto_quantize=True,
            ),
            "num_inference_steps": 2,
            "guidance_scale": 1,
            "flow_shift": 3,
            "resolution": "64x48",
            "video_length": 5,
        },
        "i2v_fusionix": {
            "model": model(
                "I2V FusioniX",
                "i2v",
                "i2v",
                settings_dir=[""],
                loras=[HF21 + "loras_accelerators/Wan2.1_I2V_14B_FusionX_LoRA.safetensors"],
            ),
            **small,
        },
        "ti2v_2_2_fastwan": {
            "model": model(
                "TI2V FastWan",
                "ti2v_2_2",
                "ti2v_2_2",
                settings_dir=[""],
                loras=[HF22 + "loras_accelerators/Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors"],
                group="wan2_2",
            ),
            "guidance_scale": 1,
            "flow_shift": 3,
            **small,
        },
        "i2v_2_2_Enhanced_Lightning_v2": {
            "model": model(
                "I2V Enhanced Lightning",
                "i2v_2_2",
                [HF22 + "wan22EnhancedLightning_v2I2VFP8HIGH.safetensors"],
                URLs2=[HF22 + "wan22EnhancedLightning_v2I2VFP8LOW.safetensors"],
                author="https://civitai.com/models/1",
                profile_dirs=[""],
                video_prompt_enhancer_instructions="Describe the scene second by second.",
                group="wan2_2",
            ),
            "prompt": "a test prompt",
            "guidance_phases": 2,
            "switch_threshold": 900,
            "guidance_scale": 1,
            "guidance2_scale": 1,
            "flow_shift": 5,
            "sample_solver": "euler",
            **small,
        },
        "vace_fun_14B_2_2": {
            "model": model(
                "Vace Fun A14B",
                "vace_14B_2_2",
                _variants(HF22, "Wan2_2_Fun_VACE_A14B_HIGH"),
                URLs2=_variants(HF22, "Wan2_2_Fun_VACE_A14B_LOW"),
                group="wan2_2",
            ),
            "guidance_phases": 2,
            "guidance_scale": 1,
            "guidance2_scale": 1,
            "flow_shift": 2,
            "switch_threshold": 875,
            **small,
        },
        "vace_fun_14B_cocktail_2_2": {
            "model": model(
                "Vace Fun Cocktail",
                "vace_14B_2_2",
                "vace_fun_14B_2_2",
                URLs2="vace_fun_14B_2_2",
                loras=[HF21 + "loras_accelerators/Wan21_CausVid_14B_T2V_lora_rank32_v2.safetensors"],
                loras_multipliers=[1],
                profiles_dir=[""],
                group="wan2_2",
            ),
            "guidance_phases": 2,
            "guidance_scale": 1,
            "guidance2_scale": 1,
            "flow_shift": 2,
            "switch_threshold": 875,
            **small,
        },
        "i2v_nvfp4": {
            "model": model("I2V NVFP4", "i2v", [HF21 + "wan2.1_i2v_480p_nvfp4_lightx2v_4step.safetensors"]),
            "guidance_scale": 1,
            "num_inference_steps": 4,
            "sampler_solver": "euler",
            "flow_shift": 1,
        },
        "t2v_causvid": {
            "model": model("T2V CausVid", "t2v", "t2v"),
            "sample_solver": "causvid",
            "num_inference_steps": 4,
            "guidance_scale": 1,
        },
    }
    # Families this worker does not serve: the layout of one file of each (their own architecture names).
    others = {
        "ltxv_13B": ("ltxv_13B", {"LTXV_config": "ltxv/ltxv-13b.yaml", "preload_URLs": [HF21 + "x.safetensors"]}),
        "ltx2_22B": ("ltx2_22B", {"ltx2_pipeline": "two_stage", "text_encoder_URLs": [HF21 + "g.safetensors"]}),
        "hunyuan": ("hunyuan", {"teacache_coefficients": [1.0, 2.0]}),
        "hunyuan_1_5_t2v": ("hunyuan_1_5_t2v", {"group": "hunyuan_1_5"}),
        "flux": ("flux", {"image_outputs": True, "attention": {"<89": "sdpa"}}),
        "qwen_image_20B": ("qwen_image_20B", {"text_encoder_folder": "Qwen2.5-VL-7B-Instruct"}),
        "z_image": ("z_image", {"image_outputs": True}),
        "chatterbox": ("chatterbox", {}),
        "ace_step_v1_5": ("ace_step_v1_5", {"ace_step15_transformer_variant": "base"}),
        "k5_lite_t2v": ("k5_lite_t2v", {"k5_config_overrides": {"a": 1}}),
        "multitalk": ("multitalk", {"modules": ["multitalk"]}),
        "phantom_14B": ("phantom_14B", {}),
        "recam_1.3B": ("recam_1.3B", {}),
        "sky_df_14B": ("sky_df_14B", {}),
        "fun_inp": ("fun_inp", {}),
        "lucy_edit": ("lucy_edit", {}),
    }
    for key, (architecture, extra) in others.items():
        urls = [HF21 + f"{key}_bf16.safetensors"]
        defs[key] = {"model": model(key, architecture, urls, **extra), "prompt": "x", "num_inference_steps": 8}
    defs["multitalk"]["model"]["modules"] = [[HF21 + "wan2.1_multitalk_14B_mbf16.safetensors"]]
    return defs
