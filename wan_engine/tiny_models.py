"""Builder of tiny random-weight Wan pipelines in diffusers layout.

Tests and the demo run the *real* loading and generation code on these models on a CPU. The
component sizes follow diffusers' own Wan tests (`get_dummy_components`), so every code path of
the full-size pipelines (text encoder, VAE, one or two transformers, VACE blocks) is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from wan_engine.limits import DEFAULT_BOUNDARY_RATIO

# Preset key -> folder name under the models dir (the presets' `URLs` name these folders).
TINY_MODEL_DIRS: dict[str, str] = {
    "tiny_t2v": "tiny-wan2.1-t2v",
    "tiny_t2v_2_2": "tiny-wan2.2-t2v",
    "tiny_vace": "tiny-wan2.1-vace",
    "tiny_vace_2_2": "tiny-wan2.2-vace",
    "tiny_i2v": "tiny-wan2.1-i2v",
    "tiny_flf2v": "tiny-wan2.1-flf2v",
    "tiny_i2v_2_2": "tiny-wan2.2-i2v",
    "tiny_ti2v": "tiny-wan2.2-ti2v",
}

TINY_TEXT_DIM = 32  # UMT5 d_model; the transformers' text_dim must match it
TINY_BOUNDARY_RATIO = DEFAULT_BOUNDARY_RATIO  # Wan 2.2 T2V A14B ships with 0.875
TINY_I2V_BOUNDARY_RATIO = 0.9  # Wan 2.2 I2V A14B ships with 0.9
# CLIP vision encoder of the Wan 2.1 I2V / FLF2V models: 8x8 images in 4x4 patches -> 4 + 1 tokens.
TINY_CLIP_DIM, TINY_CLIP_IMAGE, TINY_CLIP_PATCH = 8, 8, 4
TINY_CLIP_TOKENS = (TINY_CLIP_IMAGE // TINY_CLIP_PATCH) ** 2 + 1
_BASE_SEED = 0  # every component is seeded from this so two builds are byte-identical

# Transformer settings shared by all tiny models (diffusers tests/pipelines/wan/test_wan.py).
_TRANSFORMER_KWARGS: dict[str, object] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


def _tokenizer():
    """A Unigram T5 tokenizer over letters and digits, built without any download."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _text_encoder(vocab_size: int):
    """A two-layer UMT5 encoder whose hidden size is `TINY_TEXT_DIM`."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _vae():
    """The smallest Wan VAE that keeps the real 8x spatial / 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def _vae_2_2():
    """The Wan 2.2 (TI2V-5B) VAE layout: 48 latent channels, 2x2 patching, 16x spatial compression."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()


def _image_encoder():
    """A two-layer CLIP vision tower (the Wan 2.1 I2V models use CLIP ViT-H's penultimate hidden states)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=TINY_CLIP_DIM,
        projection_dim=TINY_CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE,
        intermediate_size=16,
        patch_size=TINY_CLIP_PATCH,
    )
    return CLIPVisionModel(config).eval()


def _image_processor():
    # The PIL-backed class: the default CLIPImageProcessor of transformers 5 wants torchvision.
    try:
        from transformers import CLIPImageProcessorPil as processor_cls
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as processor_cls
    return processor_cls(crop_size=TINY_CLIP_IMAGE, size=TINY_CLIP_IMAGE)


def _scheduler():
    """UniPC with flow sigmas, as the real Wan diffusers repos ship (flow_shift is changed per call)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )


def _seeded(offset: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module under a fixed seed so its random weights never change between builds."""
    torch.manual_seed(_BASE_SEED + offset)
    return factory()


def _transformer(seed: int, **overrides: object) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return _seeded(seed, lambda: WanTransformer3DModel(**{**_TRANSFORMER_KWARGS, **overrides}))


def _vace_transformer(seed: int) -> torch.nn.Module:
    from diffusers import WanVACETransformer3DModel

    # vace_in_channels = 2 * z_dim (inactive + reactive latents) + 8 * 8 mask channels.
    return _seeded(
        seed, lambda: WanVACETransformer3DModel(**_TRANSFORMER_KWARGS, vace_layers=[0, 1], vace_in_channels=96)
    )


# I2V transformers see the noisy latents + 4 mask channels + the image-condition latents (16 + 4 + 16).
_I2V_IN_CHANNELS = 36
# Wan 2.1 I2V: CLIP image tokens through an image projection and extra key/value projections per block.
_CLIP_KWARGS: dict[str, object] = {"image_dim": TINY_CLIP_DIM, "added_kv_proj_dim": 24}  # 24 = 2 heads x 12


def _build_pipeline(kind: str):
    """Assemble one tiny pipeline of the given kind (see `_KINDS`)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanVACEPipeline

    tokenizer = _tokenizer()
    common = {
        "tokenizer": tokenizer,
        "text_encoder": _seeded(1, lambda: _text_encoder(len(tokenizer))),
        "vae": _seeded(2, _vae),
        "scheduler": _scheduler(),
    }
    if kind == "t2v_21":
        return WanPipeline(transformer=_transformer(3), transformer_2=None, boundary_ratio=None, **common)
    if kind == "t2v_22":
        # Two differently seeded experts, so a test can tell which one denoised a step.
        return WanPipeline(
            transformer=_transformer(3), transformer_2=_transformer(4), boundary_ratio=TINY_BOUNDARY_RATIO, **common
        )
    if kind == "vace_21":
        return WanVACEPipeline(transformer=_vace_transformer(5), transformer_2=None, boundary_ratio=None, **common)
    if kind == "vace_22":
        return WanVACEPipeline(
            transformer=_vace_transformer(5),
            transformer_2=_vace_transformer(6),
            boundary_ratio=TINY_BOUNDARY_RATIO,
            **common,
        )
    if kind in ("i2v_21", "flf2v_21"):
        # FLF2V encodes first and last frame with CLIP and adds a learnt position embedding over both.
        pos_embed = {"pos_embed_seq_len": 2 * TINY_CLIP_TOKENS} if kind == "flf2v_21" else {}
        transformer = _transformer(7, in_channels=_I2V_IN_CHANNELS, **_CLIP_KWARGS, **pos_embed)
        return WanImageToVideoPipeline(
            transformer=transformer,
            transformer_2=None,
            image_encoder=_seeded(8, _image_encoder),
            image_processor=_image_processor(),
            boundary_ratio=None,
            **common,
        )
    if kind == "i2v_22":
        # Wan 2.2 I2V A14B: no CLIP encoder; the image conditions through latents only.
        return WanImageToVideoPipeline(
            transformer=_transformer(9, in_channels=_I2V_IN_CHANNELS),
            transformer_2=_transformer(10, in_channels=_I2V_IN_CHANNELS),
            image_encoder=None,
            image_processor=None,
            boundary_ratio=TINY_I2V_BOUNDARY_RATIO,
            **common,
        )
    if kind == "ti2v_22":
        # Wan 2.2 TI2V-5B: one transformer over the 48-channel VAE, per-token timesteps (expand_timesteps).
        common["vae"] = _seeded(2, _vae_2_2)
        transformer = _transformer(11, in_channels=48, out_channels=48)
        return WanPipeline(
            transformer=transformer, transformer_2=None, boundary_ratio=None, expand_timesteps=True, **common
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


_KINDS: dict[str, str] = {
    "tiny_t2v": "t2v_21",
    "tiny_t2v_2_2": "t2v_22",
    "tiny_vace": "vace_21",
    "tiny_vace_2_2": "vace_22",
    "tiny_i2v": "i2v_21",
    "tiny_flf2v": "flf2v_21",
    "tiny_i2v_2_2": "i2v_22",
    "tiny_ti2v": "ti2v_22",
}


def is_complete_model_dir(folder: Path) -> bool:
    """True when `folder` holds a readable model_index.json whose listed components all exist."""
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return False
    for name, value in data.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if not (folder / name).is_dir():
            return False
    return True


def build_tiny_models(models_dir: Path) -> dict[str, Path]:
    """Write every tiny pipeline of `TINY_MODEL_DIRS` under `models_dir`; return preset key -> model folder.

    Idempotent: a model whose folder is already complete is left alone. Each model is written to
    a temporary folder and renamed into place, so a crash never leaves a half-written model.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for key, folder_name in TINY_MODEL_DIRS.items():
        target = models_dir / folder_name
        built[key] = target
        if is_complete_model_dir(target):
            continue
        tmp = models_dir / f".{folder_name}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            pipe = _build_pipeline(_KINDS[key])
            pipe.save_pretrained(tmp, safe_serialization=True)
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return built


# ----- extras for `wan-worker make-tiny-models`: a LoRA, a single-file checkpoint and its preset --------

TINY_LORA_NAME = "tiny_style"  # DIR/loras/tiny_style.safetensors
TINY_SINGLE_FILE = "tiny_t2v_single.safetensors"  # DIR/tiny_t2v_single.safetensors
TINY_SINGLE_PRESET = "tiny_t2v_single"  # DIR/presets/tiny_t2v_single.json
TINY_LORA_RANK = 4
_TINY_INNER_DIM = 24  # num_attention_heads x attention_head_dim of `_TRANSFORMER_KWARGS`
_LORA_SEED = 100
_LORA_STD = 0.5  # changes the tiny model's frames about as much as another seed does


def tiny_lora_weights() -> dict[str, torch.Tensor]:
    """A rank-4 LoRA over the attention projections and feed-forward layers of the tiny Wan 2.1 T2V transformer.

    Key layout: the original Wan / ComfyUI one that most Wan LoRAs on Civitai use (lightx2v, Kijai,
    ComfyUI trainers): `diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `...lora_up.weight` and
    a scalar `...alpha` (scale alpha / rank). The worker loads it through diffusers' Wan LoRA converter,
    so this file goes through the same conversion as a LoRA downloaded for a real Wan model.
    """
    num_layers, ffn_dim = _TRANSFORMER_KWARGS["num_layers"], _TRANSFORMER_KWARGS["ffn_dim"]
    assert isinstance(num_layers, int) and isinstance(ffn_dim, int)
    # (module, in features, out features) of every layer the LoRA adapts.
    layers = [
        (f"blocks.{block}.{attention}.{proj}", _TINY_INNER_DIM, _TINY_INNER_DIM)
        for block in range(num_layers)
        for attention in ("self_attn", "cross_attn")
        for proj in ("q", "k", "v", "o")
    ]
    layers += [(f"blocks.{block}.ffn.0", _TINY_INNER_DIM, ffn_dim) for block in range(num_layers)]
    layers += [(f"blocks.{block}.ffn.2", ffn_dim, _TINY_INNER_DIM) for block in range(num_layers)]
    generator = torch.Generator().manual_seed(_LORA_SEED)
    weights: dict[str, torch.Tensor] = {}
    for module, fan_in, fan_out in layers:
        prefix = f"diffusion_model.{module}"
        weights[f"{prefix}.lora_down.weight"] = torch.randn(TINY_LORA_RANK, fan_in, generator=generator) * _LORA_STD
        weights[f"{prefix}.lora_up.weight"] = torch.randn(fan_out, TINY_LORA_RANK, generator=generator) * _LORA_STD
        weights[f"{prefix}.alpha"] = torch.tensor(float(TINY_LORA_RANK))  # scale alpha / rank = 1
    return weights


def _single_preset(single_file: str, base: str) -> dict[str, object]:
    """The preset of the single-file checkpoint: tiny_t2v's settings, its transformer from one file."""
    return {
        "model": {
            "name": "Tiny Wan2.1 text2video from a single-file checkpoint (random weights)",
            "architecture": "t2v",
            "description": "The tiny_t2v transformer in the original Wan key layout; the rest comes from model.base.",
            "URLs": single_file,
            "base": base,
            "group": "wan",
        },
        "resolution": "64x48",
        "video_length": 9,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "flow_shift": 3.0,
        "fps": 16,
        "negative_prompt": "",
    }


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary sibling and rename, so a crash never leaves a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def build_tiny_extras(models_dir: Path) -> dict[str, Path]:
    """Write the tiny LoRA, the single-file T2V checkpoint and its preset; return what -> file.

    Needs the tiny Wan 2.1 T2V folder (`build_tiny_models` first). The single file holds exactly the
    weights of `<models_dir>/tiny-wan2.1-t2v/transformer`, renamed to the original Wan keys
    (`wan_engine.single_file.export_single_file`, the inverse of the loader's converter). The preset's
    `URLs` and `base` are relative to the models dir, so it works for any `--models-dir DIR
    --presets-dir DIR/presets`. Existing files are left alone (the builds are deterministic).
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from wan_engine.single_file import export_single_file

    models_dir = Path(models_dir)
    base = TINY_MODEL_DIRS["tiny_t2v"]
    if not is_complete_model_dir(models_dir / base):
        raise FileNotFoundError(f"{models_dir / base} is not a complete tiny model: run build_tiny_models first")
    lora = models_dir / "loras" / f"{TINY_LORA_NAME}.safetensors"
    single = models_dir / TINY_SINGLE_FILE
    preset = models_dir / "presets" / f"{TINY_SINGLE_PRESET}.json"
    if not lora.is_file():
        _write_atomically(lora, lambda p: save_file(tiny_lora_weights(), str(p), metadata={"format": "pt"}))
    if not single.is_file():
        transformer = WanTransformer3DModel.from_pretrained(models_dir / base, subfolder="transformer")
        _write_atomically(single, lambda p: export_single_file(transformer, p, "wan"))
    if not preset.is_file():
        text = json.dumps(_single_preset(TINY_SINGLE_FILE, base), indent=4) + "\n"
        _write_atomically(preset, lambda p: p.write_text(text))
    return {"lora": lora, "single_file": single, "preset": preset}
