"""fp8 weights (WAN_FP8): the layer's arithmetic, the swap on a real Wan transformer, the orchestrator path.

torch runs `_scaled_mm` on the CPU (row-wise scales from 2.13), so the real fp8 matmul runs here; the
CUDA speed and deviation are measured by bench/gpu_bench.py on the H100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

from headless_wgp import WanOrchestrator
from wan_engine.errors import InvalidRequestError
from wan_engine.fp8 import FP8_DTYPE, Fp8Linear, fp8_from_env, is_fp8, quantize_rows, quantize_transformer
from wan_engine.model_sources import check_model
from wan_engine.presets import load_presets
from wan_engine.video_io import read_video_frames
from wan_engine.vram import estimate_vram


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_quantisation_keeps_each_row_within_fp8_rounding() -> None:
    tensor = torch.randn(32, 64) * torch.logspace(-3, 3, 32).unsqueeze(1)  # rows of very different scales
    values, scale = quantize_rows(tensor)
    assert values.dtype == FP8_DTYPE and scale.shape == (32, 1)
    restored = values.float() * scale
    row_errors = (restored - tensor).norm(dim=1) / tensor.norm(dim=1)
    assert float(row_errors.max()) < 0.05, "per-row scales: a small row is not crushed by a large one"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_rowwise", [True, False])
def test_fp8_linear_matches_the_linear_within_fp8_noise(dtype: torch.dtype, cpu_rowwise: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    layer = Fp8Linear(linear)
    layer.cpu_rowwise = cpu_rowwise  # both CPU paths: _scaled_mm, and the float32 product of older builds
    x = torch.randn(2, 7, 64, dtype=dtype)
    with torch.no_grad():
        out, reference = layer(x), linear(x)
    assert out.shape == reference.shape and out.dtype == dtype
    assert rel_err(out, reference) < 0.06
    assert layer.weight.dtype == FP8_DTYPE and not layer.weight.requires_grad
    assert layer.weight.element_size() == 1


def _aligned_transformer() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def test_the_blocks_of_a_wan_transformer_are_swapped_and_stay_close() -> None:
    model = _aligned_transformer()
    block_linears = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    inputs = (torch.randn(1, 16, 3, 8, 8), torch.tensor([500]), torch.randn(1, 8, 32))
    with torch.no_grad():
        reference = model(*inputs, return_dict=False)[0]
    report = quantize_transformer(model)  # CUDA alignment (16): every dimension here is a multiple
    assert report.layers == block_linears == 20 and report.skipped == 0
    assert report.bytes_after < report.bytes_before
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    assert isinstance(model.proj_out, nn.Linear), "the output head keeps the model dtype"
    with torch.no_grad():
        out = model(*inputs, return_dict=False)[0]
    assert rel_err(out, reference) < 0.1


def test_layers_the_gpu_kernel_cannot_take_are_skipped_and_counted() -> None:
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1
    )
    report = quantize_transformer(model)  # 24-wide attention: not a multiple of 16
    assert report.skipped > 0 and report.layers + report.skipped == 10
    with pytest.raises(InvalidRequestError, match="no `blocks`"):
        quantize_transformer(nn.Sequential())


def test_env_switch() -> None:
    assert fp8_from_env({}) is False
    assert fp8_from_env({"WAN_FP8": "on"}) is True
    assert fp8_from_env({"WAN_FP8": "0"}) is False


@pytest.fixture(scope="module")
def fp8_orchestrator(tiny_models_dir: Path) -> WanOrchestrator:
    orchestrator = WanOrchestrator(tiny_models_dir, device="cpu", fp8=True)
    orchestrator.load_model("tiny_t2v")
    return orchestrator


def test_the_orchestrator_generates_with_fp8_blocks(
    fp8_orchestrator: WanOrchestrator, t2v_orchestrator: WanOrchestrator, tmp_path: Path
) -> None:
    loaded = fp8_orchestrator._loaded
    assert loaded is not None and is_fp8(loaded.pipe.transformer)
    params = {"seed": 5, "num_inference_steps": 3}
    result = fp8_orchestrator.generate_t2v("a fox", output_path=tmp_path / "fp8.mp4", **params)
    reference = t2v_orchestrator.generate_t2v("a fox", output_path=tmp_path / "ref.mp4", **params)
    assert result.extra["fp8"]["transformer"]["layers"] == 20
    assert reference.extra["fp8"] is None
    frames, expected = read_video_frames(result.output_path), read_video_frames(reference.output_path)
    assert frames.shape == expected.shape
    assert not np.array_equal(frames, expected), "fp8 is lossy: the frames differ a little"
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 12.0, "... but only a little"


def test_a_lora_task_on_an_fp8_model_fails_naming_the_switch(fp8_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"loras \['style'\].*WAN_FP8=on"):
        fp8_orchestrator.generate_t2v("a", output_path=tmp_path / "x.mp4", lora_names=["style"])
    assert not list(tmp_path.iterdir())


def test_vram_estimate_counts_one_byte_per_block_weight(tiny_models_dir: Path) -> None:
    preset = load_presets().get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    bf16, fp8 = estimate_vram(preset, check), estimate_vram(preset, check, fp8=True)
    assert bf16 is not None and fp8 is not None
    before = next(c for c in bf16.components if c.name == "transformer")
    after = next(c for c in fp8.components if c.name == "transformer")
    assert after.blocks_bytes == before.blocks_bytes // 2
    assert after.weight_bytes == before.weight_bytes - before.blocks_bytes // 2
    assert fp8.profiles["gpu"] < bf16.profiles["gpu"]
