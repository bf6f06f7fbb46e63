"""Static time estimates, before any history: FLOPs per denoising step over the device's throughput.

A Wan step costs 2 x params x tokens for the linear layers plus 4 x tokens^2 x dim per block for
self-attention (and cross-attention to the 512 text tokens), once per transformer pass (two with CFG).
The sizes come from the safetensors headers (wan_engine.vram, nothing is loaded). The throughput is a
per-GPU table calibrated on the H100 baselines of docs/DESIGN.md, or a matmul measured once on this CPU.
These are rough; the learned timings (worker.live.eta) replace them after the first task of a kind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from worker.live.eta import StageTimes, TaskShape

log = logging.getLogger(__name__)

TEXT_TOKENS = 512
# Effective bf16 throughput of a Wan transformer step (FLOP/s), calibrated on the H100 baseline of
# docs/DESIGN.md (1.3B: 1.23 s/step, 14B: 6.52 s/step at 832x480x81 with CFG, ~5e14 FLOP/s) and scaled by
# each GPU's dense bf16 peak. Matched by substring of the device name, first match wins.
GPU_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 5.5e14),
    ("H100", 5.0e14),
    ("GH200", 5.5e14),
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
# VAE decode, H100: 2.07 s for 832x480x81 with the 127M-parameter Wan 2.1 VAE -> FLOPs per pixel-frame
# per VAE parameter at the throughput above.
VAE_FLOPS_PER_PIXEL_PARAM = 2.07 * 5.0e14 / (832 * 480 * 81 * 127e6)
# Fixed costs the FLOP count misses (kernel launches, Python per block, ffmpeg); rough, replaced by history.
OVERHEAD = {"gpu": {"block": 1e-4, "frame": 2e-3, "encode": 0.3}, "cpu": {"block": 1e-3, "frame": 0.02, "encode": 0.1}}


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
    """FLOPs of one denoising step: linear layers (2 x params x tokens), self-attention (4 x L^2 x dim per
    block) and cross-attention to the 512 text tokens, once per transformer pass (two with CFG)."""
    passes = 2 if cfg else 1
    attention = layers * (4.0 * tokens * tokens * dim + 4.0 * tokens * TEXT_TOKENS * dim)
    return passes * (2.0 * params * tokens + attention)


class StaticCostModel:
    """Stage times from the model's size (safetensors headers, no loading) and the device's throughput."""

    def __init__(self, presets: Any, models_dir: Path, device: str) -> None:
        self.presets = presets
        self.models_dir = Path(models_dir)
        self.device = device
        self._cache: dict[tuple[str, int, int, int, bool], StageTimes | None] = {}
        self._lock = threading.Lock()

    def times(self, shape: TaskShape) -> StageTimes | None:
        """Static stage times, or None when the model's size cannot be read."""
        key = (shape.model, shape.width, shape.height, shape.frames, shape.cfg)
        with self._lock:
            if key not in self._cache:
                try:
                    self._cache[key] = self._compute(shape)
                except Exception as exc:  # an estimate is never worth failing a task over
                    log.debug("no static estimate for %s: %s", shape.model, exc)
                    self._cache[key] = None
            return self._cache[key]

    def _compute(self, shape: TaskShape) -> StageTimes | None:
        from wan_engine.vram import model_report

        report = model_report(
            self.presets.get(shape.model),
            self.models_dir,
            None,
            width=shape.width,
            height=shape.height,
            frames=shape.frames,
        )
        if report.vram is None:
            return None
        sizes = {c.name: c for c in report.vram.components}
        transformer = sizes.get("transformer")
        if transformer is None:
            return None
        config = _read_config(report.check.path, "transformer")
        layers = int(config.get("num_layers") or 1)
        dim = int(config.get("num_attention_heads") or 1) * int(config.get("attention_head_dim") or 1)
        tokens = report.vram.tokens
        device = "cpu" if shape.memory_profile == "cpu" else self.device
        kind = "cpu" if device == "cpu" else "gpu"
        flops_per_s = gpu_throughput(device)
        overhead = OVERHEAD[kind]
        passes = 2 if shape.cfg else 1
        step = step_flops(transformer.params, tokens, layers, dim, shape.cfg) / flops_per_s
        step += overhead["block"] * layers * passes
        pixel_frames = shape.width * shape.height * shape.frames
        vae = sizes.get("vae")
        decode = (VAE_FLOPS_PER_PIXEL_PARAM * pixel_frames * vae.params / flops_per_s) if vae else 0.0
        text = sizes.get("text_encoder")
        encode = overhead["encode"] + (2.0 * text.params * TEXT_TOKENS * passes / flops_per_s if text else 0.0)
        weights = sum(c.weight_bytes for c in report.vram.components)
        return StageTimes(
            step_s=step,
            encode_s=encode,
            decode_s=decode + overhead["frame"] * shape.frames,
            write_s=overhead["frame"] * shape.frames * 0.5,
            load_s=1.0 + weights / 1.5e9,  # disk to memory at ~1.5 GB/s
        )


def _read_config(folder: Path | None, component: str) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / component / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}
