"""WAN_VAE_PRECISION (issue 15): the VAE in float16 on CUDA / float32 elsewhere (`auto`, the default), float32,
float16 (Wan2GP's default) or bfloat16.

Tolerances were measured on the tiny models (seed 3, 96x64x9; frames as decoded, float in [0, 1], against the
float32 VAE's). The transformer runs in float32 on the CPU in every run, so the latents are the same and only the
VAE's precision differs (for VACE / I2V its encode of the conditioning too). PSNR (dB) / mean |diff|:

    t2v   float16 52.4 / 4.5e-4   bfloat16 33.9 / 9.6e-3
    vace  float16 44.4 / 1.3e-3   bfloat16 38.1 / 5.2e-3   (mask + reference image: three encodes)
    i2v   float16 43.4 / 1.4e-3   bfloat16 34.4 / 8.6e-3

The tiny VAE (3 channels per stage, random weights) is far more sensitive than the real one: the full-size Wan
2.1 VAE layout (random weights, 256x192x9 on the CPU) decodes at 68.6 dB in float16 and 50.5 dB in bfloat16.
The bounds below leave about 3 dB (twice the squared error) of room for another CPU's rounding. Another seed's
frames are at 26.3 dB / 3.2e-2 from these: the float16 bounds are far from that, the bfloat16 ones only about
5 dB, so float16 must also come out closer to float32 than bfloat16 does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from headless_wgp import WanOrchestrator
from tests.support.media import half_mask, noise_image, noise_video
from wan_engine.errors import InvalidRequestError
from wan_engine.model_cache import GIB, ModelCache
from wan_engine.model_sources import check_model
from wan_engine.pipeline_runtime import load_pipeline, vae_dtype_name
from wan_engine.presets import load_presets
from wan_engine.vae_precision import (
    VAE_PRECISION_ENV,
    vae_dtype_from_env,
    vae_element_bytes,
    vae_precision_setting,
)
from wan_engine.vram import estimate_vram

PROMPT = "a heron over a marsh"
RUN: dict[str, Any] = {"seed": 3, "resolution": "96x64", "video_length": 9}
DTYPES = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}
# Lowest PSNR (dB) and largest mean |diff| against the float32 VAE's frames (measured: module docstring).
BOUNDS = {"16": (40.0, 4e-3), "bf16": (31.0, 1.5e-2)}
MODELS = {"t2v": "tiny_t2v", "vace": "tiny_vace", "i2v": "tiny_i2v"}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vae_media")
    return {
        "guide": noise_video(folder / "guide.mp4", 5, seed=1),
        "mask": half_mask(folder / "mask.png"),
        "ref": noise_image(folder / "ref.png", 40, 40, seed=4),
        "start": noise_image(folder / "start.png", seed=5),
    }


@pytest.fixture(autouse=True)
def _decode_on_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred write's frames are decoded before it returns (no overlapped decode), so they can be compared."""
    monkeypatch.setenv("WAN_OVERLAP_DECODE", "off")


def _generate(orchestrator: WanOrchestrator, mode: str, media: dict[str, Path], path: Path) -> np.ndarray:
    """One generation's frames as decoded (float in [0, 1]); the video is written too."""
    if mode == "t2v":
        pending = orchestrator.generate_t2v(PROMPT, output_path=path, deferred_write=True, **RUN)
    elif mode == "vace":
        pending = orchestrator.generate_vace(
            PROMPT,
            video_guide=media["guide"],
            video_mask=media["mask"],
            image_refs=[media["ref"]],
            output_path=path,
            deferred_write=True,
            **RUN,
        )
    else:
        pending = orchestrator.generate_i2v(
            PROMPT, image_start=media["start"], output_path=path, deferred_write=True, **RUN
        )
    frames = np.asarray(pending.frames, dtype=np.float64)  # type: ignore[union-attr]
    result = pending.finish()  # type: ignore[union-attr]
    assert result.extra["vae_dtype"] == vae_dtype_name(orchestrator._loaded.pipe)  # type: ignore[union-attr]
    return frames


def _run(
    models_dir: Path, mode: str, precision: str | None, media: dict[str, Path], path: Path, mp: pytest.MonkeyPatch
) -> tuple[np.ndarray, Any]:
    """Load the mode's tiny model under WAN_VAE_PRECISION=`precision` (None: unset), generate, unload."""
    if precision is None:
        mp.delenv(VAE_PRECISION_ENV, raising=False)
    else:
        mp.setenv(VAE_PRECISION_ENV, precision)
    orchestrator = WanOrchestrator(models_dir)
    orchestrator.load_model(MODELS[mode])
    try:
        pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
        return _generate(orchestrator, mode, media, path), pipe
    finally:
        orchestrator.unload_model()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_the_setting_and_its_errors() -> None:
    assert vae_precision_setting({}) == "auto" and vae_precision_setting({VAE_PRECISION_ENV: ""}) == "auto"
    assert vae_precision_setting({VAE_PRECISION_ENV: " BF16 "}) == "bf16"
    assert vae_dtype_from_env("cpu", {VAE_PRECISION_ENV: "16"}) == torch.float16  # float16 on a CPU too, as asked
    assert vae_dtype_from_env("cuda", {VAE_PRECISION_ENV: "bf16"}) == torch.bfloat16
    # auto: Wan2GP's float16 where it is fast (CUDA), float32 where float16 gains nothing (a CPU)
    assert vae_dtype_from_env("cpu", {}) == vae_dtype_from_env("cpu", {VAE_PRECISION_ENV: "auto"}) == torch.float32
    assert vae_dtype_from_env("cuda", {}) == torch.float16 and vae_dtype_from_env("cuda:1", {}) == torch.float16
    assert vae_dtype_from_env("cuda", {VAE_PRECISION_ENV: "32"}) == torch.float32
    assert [vae_element_bytes({VAE_PRECISION_ENV: p}) for p in ("32", "16", "bf16")] == [4, 2, 2]
    assert [vae_element_bytes({}, device) for device in ("cpu", "cuda")] == [4, 2]
    for bad in ("fp16", "8", "float32", "half"):
        with pytest.raises(
            InvalidRequestError, match=rf"WAN_VAE_PRECISION='{bad}': allowed auto .* 32 .* 16 .* or bf16"
        ):
            vae_precision_setting({VAE_PRECISION_ENV: bad})


def test_a_bad_value_fails_the_load_naming_it(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAE_PRECISION_ENV, "fp16")
    with pytest.raises(InvalidRequestError, match=r"WAN_VAE_PRECISION='fp16': allowed auto"):
        WanOrchestrator(tiny_models_dir).load_model("tiny_t2v")


@pytest.mark.parametrize("mode", list(MODELS))
def test_16_bit_vae_frames_stay_close_to_float32(
    mode: str, tiny_models_dir: Path, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames: dict[str, np.ndarray] = {}
    for precision in ("32", "16", "bf16"):
        frames[precision], pipe = _run(
            tiny_models_dir, mode, precision, media, tmp_path / f"{precision}.mp4", monkeypatch
        )
        vae_dtypes = {p.dtype for p in pipe.vae.parameters()} | {b.dtype for b in pipe.vae.buffers()}
        assert vae_dtypes == {DTYPES[precision]}, (precision, vae_dtypes)
        assert vae_dtype_name(pipe) == str(DTYPES[precision]).removeprefix("torch.")
        assert pipe.transformer.dtype == torch.float32  # the VAE setting leaves the transformer alone
        assert frames[precision].shape == (9, 64, 96, 3)
    psnr = {}
    for precision, (min_psnr, max_mean) in BOUNDS.items():
        assert not np.array_equal(frames[precision], frames["32"]), f"{precision}: the VAE must really run in 16 bit"
        psnr[precision] = _psnr(frames[precision], frames["32"])
        mean = float(np.mean(np.abs(frames[precision] - frames["32"])))
        assert psnr[precision] >= min_psnr and mean <= max_mean, (mode, precision, psnr[precision], mean)
    assert psnr["16"] > psnr["bf16"]  # float16's 3 more mantissa bits: closer to float32 than bfloat16


def test_a_16_bit_vae_stays_16_bit_beside_bf16_transformers(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU layout (bf16 transformers, float16 VAE): the pipeline keeps the VAE it is given as it is; an
    explicit `vae_dtype` wins over the environment."""
    monkeypatch.setenv(VAE_PRECISION_ENV, "bf16")
    preset = load_presets().get("tiny_t2v")
    loaded = load_pipeline(
        preset, check_model(preset, tiny_models_dir), torch.device("cpu"), torch.bfloat16, vae_dtype=torch.float16
    )
    assert loaded.pipe.transformer.dtype == torch.bfloat16 and loaded.pipe.text_encoder.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.pipe.vae.parameters()} == {torch.float16}


def test_default_on_a_cpu_is_float32_and_lossless(
    tiny_models_dir: Path, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unset, pipe = _run(tiny_models_dir, "t2v", None, media, tmp_path / "unset.mp4", monkeypatch)
    assert pipe.vae.dtype == torch.float32 and vae_dtype_name(pipe) == "float32"
    explicit, _ = _run(tiny_models_dir, "t2v", "32", media, tmp_path / "32.mp4", monkeypatch)
    np.testing.assert_array_equal(unset, explicit)


class _PlainChunk:
    """A slab chunk in plain memory: the park copies every tensor through the pinned path's views."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8)

    def close(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)


def test_parking_and_restoring_keep_the_vae_dtype(
    tiny_models_dir: Path, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAE_PRECISION_ENV, "bf16")
    orchestrator = WanOrchestrator(tiny_models_dir)
    cache = orchestrator.model_cache = ModelCache(
        GIB, orchestrator.device, allocate=_PlainChunk, spare_bytes=lambda: 64 * GIB, reserve_pause_s=0.0
    )
    orchestrator.load_model("tiny_t2v")
    before = {k: v.clone() for k, v in orchestrator._loaded.pipe.vae.state_dict().items()}  # type: ignore[union-attr]
    first = _generate(orchestrator, "t2v", media, tmp_path / "first.mp4")
    orchestrator.load_model("tiny_t2v_2_2")  # parks tiny_t2v: every tensor copied into the slab
    park = cache.transfers[-1]
    assert (park.key, park.direction) == ("tiny_t2v", "park") and park.slab
    parked = cache.peek("tiny_t2v")
    assert {p.dtype for p in parked.pipe.vae.parameters()} == {torch.bfloat16}
    orchestrator.load_model("tiny_t2v")
    assert (cache.transfers[-1].key, cache.transfers[-1].direction) == ("tiny_t2v", "restore")
    vae = orchestrator._loaded.pipe.vae  # type: ignore[union-attr]
    after = vae.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    np.testing.assert_array_equal(first, _generate(orchestrator, "t2v", media, tmp_path / "again.mp4"))
    orchestrator.unload_model()


def test_vram_estimate_counts_the_vae_in_its_dtype(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preset = load_presets().get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    monkeypatch.delenv(VAE_PRECISION_ENV, raising=False)
    full = estimate_vram(preset, check, width=832, height=480, frames=81)
    half = estimate_vram(preset, check, width=832, height=480, frames=81, vae_dtype_bytes=2)
    assert full is not None and half is not None
    vae32, vae16 = (next(c for c in e.components if c.name == "vae") for e in (full, half))
    assert vae32.weight_bytes == 2 * vae16.weight_bytes > 0
    assert vae32.activation_bytes == 2 * vae16.activation_bytes > 0
    others = [(c.name, c.weight_bytes) for c in full.components if c.name != "vae"]
    assert others == [(c.name, c.weight_bytes) for c in half.components if c.name != "vae"]
    monkeypatch.setenv(VAE_PRECISION_ENV, "16")  # the default follows the setting, as the load does
    assert estimate_vram(preset, check, width=832, height=480, frames=81) == half
