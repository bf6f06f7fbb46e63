"""Static time estimates, before any history: FLOPs per denoising step over the device's throughput.

A Wan step costs 2 x params x tokens for the linear layers plus 4 x tokens^2 x dim per block for
self-attention (and cross-attention to the 512 text tokens), once per transformer pass (two with CFG).
The sizes come from the safetensors headers (wan_engine.vram, nothing is loaded). The throughput is a
per-GPU table calibrated on the measured H200 / H100 runs of docs/BENCHMARKS.md (a compiled 1.3B
832x480x81 CFG step: 566 TFLOP in 1.05 s), or a matmul measured once on this CPU. The VAE decode scales
with latent frames x pixels, the MP4 write with frames x pixels (it runs on the host, not the GPU), a
load with the weight bytes. Compile costs (first time per block layout, ~0.4 s per new shape with the
token dimension dynamic) are not here: the estimator adds them when it predicts a compile
(worker.live.eta). These are rough; the learned timings replace them after the first task of a kind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.live.eta import StageTimes, TaskShape

log = logging.getLogger(__name__)

TEXT_TOKENS = 512
# Effective bf16 throughput of a compiled Wan transformer step (FLOP/s, `step_flops` over the measured
# step): H200 1.3B 832x480x81 CFG 1.054 s/step compiled (docs/BENCHMARKS.md "Queues"), H100 1.075 s
# ("Seconds per step"), scaled by each GPU's dense bf16 peak for the others. An eager step is ~1/0.84 of
# it (wan_engine.compile_policy.COMPILED_SAVING; the estimator applies that). Matched by substring of the
# device name, first match wins (GH200 before H200, L40S before L40).
GPU_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 5.5e14),
    ("H200", 5.5e14),
    ("H100", 5.4e14),
    ("B200", 9.0e14),
    ("A100", 2.0e14),
    ("L40S", 2.3e14),
    ("L40", 1.1e14),
    ("4090", 1.0e14),
    ("A6000", 0.9e14),
    ("A10", 0.8e14),
    ("3090", 0.5e14),
    ("T4", 0.2e14),
)
DEFAULT_GPU_FLOPS = 1.0e14
H200_FLOPS = 5.5e14
# VAE decode (float32 convolutions, not at the matmul rate): H200, 3.2 s for 832x480x81 (21 latent frames)
# with the 127M-parameter Wan 2.1 VAE -> seconds per latent frame x pixel x VAE parameter at H200 speed.
DECODE_S_PER_UNIT = 3.2 / (21 * 832 * 480 * 127e6)
# A 16-bit VAE (WAN_VAE_PRECISION; float16 is the CUDA default) decodes in this share of float32's time on a
# GPU: 1.84 s against 2.78 s for 832x480x81 on the H200 (bench/results/h200_vae_overlap_run1.json).
HALF_VAE_DECODE_SHARE = 0.66
VACE_ENCODE_SHARE = 0.4  # a VACE task encodes its guide and mask video first: ~this share of a decode
# MP4 write (x264 veryfast, the host's CPU): ~2 s for 81 frames at 832x480; a 1-frame task writes a PNG.
WRITE_FIXED_S = 0.15
WRITE_S_PER_PIXEL_FRAME = (2.0 - WRITE_FIXED_S) / (81 * 832 * 480)
# The travel stitch (decode each clip, cross-fade, encode; host CPU work), from the H200 machine's queue run 2
# (docs/BENCHMARKS.md "Run 2", bench/results/h200_worker_queue_run2.json, q05-travel_3seg-stitch: 123 frames
# at 832x480, 1.02 s from claim to Complete): 0.15 s from the claim to the first frame out (the rows read, the
# clips probed, ffmpeg started), 0.761 s for frames 1-123 (6.2 ms a frame), 0.11 s from the last frame to
# Complete (the encoder's flush, the rename). A 2-core host is ~1.6x slower (1.02-1.13 s for 66 frames,
# "MP4 encode and the travel stitch"); the first stitch on a host is learned (eta_stats "travel_stitch").
STITCH_START_S = 0.15
STITCH_END_S = 0.11
STITCH_FIXED_S = STITCH_START_S + STITCH_END_S
STITCH_S_PER_PIXEL_FRAME = 0.761 / (122 * 832 * 480)
# Loading from disk: ~1.2 GB/s with a cold page cache, ~3 GB/s warm (docs/BENCHMARKS.md "Switching").
LOAD_FIXED_S = 0.5
LOAD_BYTES_PER_S = 2.0e9
# Fixed costs the FLOP count misses (kernel launches, Python per block and pass): on the H200 a 1-frame
# 1.3B CFG step takes 0.040 s where its FLOPs take 0.02 s; rough, replaced by history.
OVERHEAD = {"gpu": {"block": 3.5e-4, "encode": 0.3}, "cpu": {"block": 1e-3, "encode": 0.1}}


def gpu_throughput(device: str) -> float:
    """Effective FLOP/s of a Wan step on this device name ("cpu": measured once here)."""
    if device == "cpu":
        return cpu_throughput()
    upper = device.upper()
    return next((flops for name, flops in GPU_FLOPS if name in upper), DEFAULT_GPU_FLOPS)


_CPU_FLOPS: list[float] = []


def cpu_throughput() -> float:
    """FLOP/s of a float32 matmul on this CPU (measured once, a few milliseconds), halved for real layers."""
    if not _CPU_FLOPS:
        try:
            import torch

            a = torch.randn(256, 256)
            torch.mm(a, a)
            started = time.perf_counter()
            for _ in range(20):
                torch.mm(a, a)
            elapsed = max(time.perf_counter() - started, 1e-6)
            _CPU_FLOPS.append(0.5 * 20 * 2 * 256**3 / elapsed)
        except Exception:
            _CPU_FLOPS.append(2e10)
    return _CPU_FLOPS[0]


def step_flops(params: int, tokens: int, layers: int, dim: int, cfg: bool) -> float:
    """FLOPs of one denoising step: linear layers (2 x params x tokens, less the cross-attention key and
    value projections, which see the 512 text tokens only), self-attention (4 x L^2 x dim per block) and
    cross-attention to the text, once per transformer pass (two with CFG)."""
    passes = 2 if cfg else 1
    per_token_params = max(params - layers * 2 * dim * dim, params // 2)
    attention = layers * (4.0 * tokens * tokens * dim + 4.0 * tokens * TEXT_TOKENS * dim)
    return passes * (2.0 * per_token_params * tokens + attention)


@dataclass(frozen=True)
class ModelSizes:
    """What the static estimate needs of a model: sizes from its headers and configs (nothing loaded)."""

    transformer_params: int
    layers: int
    dim: int
    vae_params: int = 0
    text_params: int = 0
    weight_bytes: int = 0
    spatial: int = 8  # VAE scale factors and the transformer's patch, for the token count
    temporal: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    vace: bool = False  # encodes a guide video before denoising

    def tokens(self, width: int, height: int, frames: int) -> int:
        latent_frames = 1 + (frames - 1) // self.temporal
        h, w = height // self.spatial, width // self.spatial
        return max(1, latent_frames // self.patch[0]) * max(1, h // self.patch[1]) * max(1, w // self.patch[2])


def _half_vae_on_gpu() -> bool:
    """Whether WAN_VAE_PRECISION loads a 16-bit VAE on a GPU (imported here: this layer loads no model code)."""
    from wan_engine.errors import InvalidRequestError
    from wan_engine.vae_precision import vae_element_bytes

    try:
        return vae_element_bytes(device="cuda") == 2
    except InvalidRequestError:  # a bad WAN_VAE_PRECISION stops the worker at start-up; not the ETA's to say
        return False


def static_times(sizes: ModelSizes, shape: TaskShape, device: str, flops_per_s: float | None = None) -> StageTimes:
    """Stage times of one task from the model's sizes on this device ("cpu" or a GPU name)."""
    kind = "cpu" if device == "cpu" else "gpu"
    flops = flops_per_s if flops_per_s is not None else gpu_throughput(device)
    overhead = OVERHEAD[kind]
    passes = 2 if shape.cfg else 1
    tokens = sizes.tokens(shape.width, shape.height, shape.frames)
    step = step_flops(sizes.transformer_params, tokens, sizes.layers, sizes.dim, shape.cfg) / flops
    step += overhead["block"] * sizes.layers * passes
    latent_frames = 1 + (shape.frames - 1) // sizes.temporal
    # Scaled from the H200's float32 measurement by the device's matmul rate; a GPU's 16-bit VAE is faster.
    decode = DECODE_S_PER_UNIT * latent_frames * shape.width * shape.height * sizes.vae_params * H200_FLOPS / flops
    if kind == "gpu" and _half_vae_on_gpu():
        decode *= HALF_VAE_DECODE_SHARE
    encode = overhead["encode"] + 2.0 * sizes.text_params * TEXT_TOKENS * passes / flops
    pixel_frames = shape.width * shape.height * shape.frames
    return StageTimes(
        step_s=step,
        first_step_extra_s=VACE_ENCODE_SHARE * decode if sizes.vace else 0.0,
        encode_s=encode,
        decode_s=decode,
        write_s=WRITE_FIXED_S + WRITE_S_PER_PIXEL_FRAME * pixel_frames,
        load_s=LOAD_FIXED_S + sizes.weight_bytes / LOAD_BYTES_PER_S,
    )


def static_stitch_s(frames: int, width: int, height: int) -> float:
    """Seconds of a travel stitch producing `frames` frames at width x height (host CPU work)."""
    return STITCH_FIXED_S + STITCH_S_PER_PIXEL_FRAME * frames * width * height


class StaticCostModel:
    """Stage times from the model's size (safetensors headers, no loading) and the device's throughput.

    `sizes_of` replaces reading the model folder (a model's sizes given directly, e.g. full-size
    architectures whose weights are not on this machine)."""

    def __init__(
        self,
        presets: Any,
        models_dir: Path,
        device: str,
        sizes_of: Callable[[str], ModelSizes | None] | None = None,
    ) -> None:
        self.presets = presets
        self.models_dir = Path(models_dir)
        self.device = device
        self.sizes_of = sizes_of or self._read_sizes
        self._sizes: dict[str, ModelSizes | None] = {}
        self._lock = threading.Lock()

    def times(self, shape: TaskShape) -> StageTimes | None:
        """Static stage times, or None when the model's size cannot be read (read once per model)."""
        with self._lock:
            if shape.model not in self._sizes:
                try:
                    self._sizes[shape.model] = self.sizes_of(shape.model)
                except Exception as exc:  # an estimate is never worth failing a task over
                    log.debug("no static estimate for %s: %s", shape.model, exc)
                    self._sizes[shape.model] = None
            sizes = self._sizes[shape.model]
        if sizes is None:
            return None
        device = "cpu" if shape.memory_profile == "cpu" else self.device
        return static_times(sizes, shape, device)

    def _read_sizes(self, model: str) -> ModelSizes | None:
        from wan_engine.vram import model_report

        preset = self.presets.get(model)
        report = model_report(preset, self.models_dir, None)
        if report.vram is None:
            return None
        sizes = {c.name: c for c in report.vram.components}
        transformer = sizes.get("transformer")
        if transformer is None:
            return None
        config = _read_config(report.check.path, "transformer")
        vae_config = _read_config(report.check.path, "vae")
        downsample = vae_config.get("temperal_downsample", [False, True, True])
        vae, text = sizes.get("vae"), sizes.get("text_encoder")
        return ModelSizes(
            transformer_params=transformer.params,
            layers=int(config.get("num_layers") or 1),
            dim=int(config.get("num_attention_heads") or 1) * int(config.get("attention_head_dim") or 1),
            vae_params=vae.params if vae else 0,
            text_params=text.params if text else 0,
            weight_bytes=sum(c.weight_bytes for c in report.vram.components),
            spatial=int(vae_config.get("scale_factor_spatial") or 2 ** len(downsample)),
            temporal=int(vae_config.get("scale_factor_temporal") or 2 ** sum(bool(x) for x in downsample)),
            patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
            vace=preset.model.architecture == "vace",
        )


def _read_config(folder: Path | None, component: str) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / component / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}
