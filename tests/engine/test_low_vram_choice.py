"""Which profile `auto` picks for a full-size Wan 2.1 14B (configs only, no weights) under VRAM budgets.

The H100 measured the result of this choice (docs/BENCHMARKS.md, S2-3): 14B group-offloaded under a
24 GiB cap ran at 1.17x the resident step time with a 6.7 GiB peak. This pins the decision that leads
there: with 24 GiB the estimate rules out `gpu` and `model_offload` and picks `group_offload`, a load
keeps the weights in host RAM, and a roomy GPU keeps everything resident.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import headless_wgp
from headless_wgp import WanOrchestrator
from wan_engine.memory_profiles import DEFAULT_VRAM_FRACTION, choose_profile
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.vram import estimate_vram

GIB = 1024**3
WAN_14B = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
UMT5_XXL = {
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def wan14b(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PresetRegistry, Path]:
    """A Wan 2.1 14B pipeline folder with the real configs and no weights (sizes come from the configs)."""
    from diffusers import AutoencoderKLWan

    models = tmp_path_factory.mktemp("models")
    folder = models / "wan14b"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    (folder / "transformer" / "config.json").write_text(json.dumps(WAN_14B))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(UMT5_XXL))
    AutoencoderKLWan.from_config({}).save_config(folder / "vae")  # the full-size Wan 2.1 VAE's config
    user = tmp_path_factory.mktemp("presets")
    preset = {"model": {"name": "14B", "architecture": "t2v", "URLs": "wan14b"}, "resolution": "832x480"}
    (user / "wan14b.json").write_text(json.dumps({**preset, "video_length": 81}))
    return load_presets(BUILTIN_PRESETS_DIR, user), models


def test_sizes_come_from_the_real_configs(wan14b: tuple[PresetRegistry, Path]) -> None:
    presets, models = wan14b
    preset = presets.get("wan14b")
    estimate = estimate_vram(preset, check_model(preset, models))
    assert estimate is not None and estimate.tokens == 32760
    sizes = {c.name: c for c in estimate.components}
    assert 14.0e9 < sizes["transformer"].params < 14.5e9
    assert 5.5e9 < sizes["text_encoder"].params < 6.0e9  # umt5-xxl's encoder


@pytest.mark.parametrize(
    ("budget_gib", "expected"),
    [(80, "gpu"), (40, "model_offload"), (24, "group_offload")],
)
def test_auto_picks_by_budget(wan14b: tuple[PresetRegistry, Path], budget_gib: int, expected: str) -> None:
    presets, models = wan14b
    preset = presets.get("wan14b")
    estimate = estimate_vram(preset, check_model(preset, models))
    assert estimate is not None
    assert choose_profile(estimate.profiles, budget_gib * GIB, DEFAULT_VRAM_FRACTION) == expected


@pytest.mark.parametrize(("budget_gib", "resident"), [(80, True), (24, False)])
def test_a_load_under_24_gib_keeps_the_weights_in_host_ram(
    wan14b: tuple[PresetRegistry, Path], monkeypatch: pytest.MonkeyPatch, budget_gib: int, resident: bool
) -> None:
    presets, models = wan14b
    orchestrator = WanOrchestrator(models, presets, device="cpu")
    orchestrator.device = torch.device("cuda")  # decide as on a GPU machine; nothing is loaded here
    monkeypatch.setattr(headless_wgp, "device_budget_bytes", lambda _device: budget_gib * GIB)
    preset = presets.get("wan14b")
    assert orchestrator._load_resident(preset, check_model(preset, models)) is resident
