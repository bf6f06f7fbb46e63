"""The per-step cost of live previews (issue 16) on the GPU: `wan_engine.latent_preview.on_step` on a due step.

It times the engine's own call site with a subscriber that only stores the frame (as the live server's does),
on the latents of the shapes the worker runs (832x480x81 for Wan 2.1 / 2.2 A14B: 16 channels; 1280x704x121
for Wan 2.2 TI2V 5B: 48 channels), in bf16 and float32, with CUDA synchronised before and after each call
(the worst case: nothing overlaps). Only torch is needed (no diffusers, no weights).

    python bench/preview_cost.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wan_engine import latent_preview

SHAPES = {"wan21_832x480x81": (16, 21, 60, 104), "wan22_ti2v_1280x704x121": (48, 31, 44, 80)}


def time_calls(latents: torch.Tensor, repeats: int) -> list[float]:
    frames: list[object] = []
    latent_preview.subscribe(frames.append, every=1)
    kwargs = {"latents": latents}
    for _ in range(5):  # warm-up: the factor tensors are cached per device and dtype
        latent_preview.on_step(1, 10, kwargs)
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        latent_preview.on_step(1, 10, kwargs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    latent_preview.subscribe(None)
    assert len(frames) == repeats + 5
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for name, (channels, frames, height, width) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            latents = torch.randn(1, channels, frames, height, width, device="cuda", dtype=dtype)
            seconds = time_calls(latents, args.repeats)
            results["cases"][f"{name}/{str(dtype).removeprefix('torch.')}"] = {
                "median_ms": round(statistics.median(seconds) * 1e3, 4),
                "p95_ms": round(sorted(seconds)[int(0.95 * len(seconds))] * 1e3, 4),
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preview_cost.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
