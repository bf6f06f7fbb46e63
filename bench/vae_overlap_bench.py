"""Where the VAE decode can go (issue 15): its cost alone, its variants, and overlapped with the next task's steps.

On the device, with the full Wan 2.1 VAE (random weights, float32 as the model cards load it) and a random
full-size Wan 2.1 T2V 1.3B transformer (bf16):

- decode of 832x480x81 and 480x832x49 latents: as loaded; with `cudnn.benchmark`; with the VAE in
  channels_last_3d; with a bf16 and a float16 copy of the VAE (WAN_VAE_PRECISION=bf16 / 16, Wan2GP's default;
  each with its error against float32, as PSNR, and whether every output value is finite);
- the overlap: N denoising steps (2 transformer forwards each, CFG) alone, the decode alone, then both at once
  (the decode on a second CUDA stream and thread, as the worker's output finisher would run it), wall time of
  each and the saving against running them one after the other.

Device:  python3 bench/vae_overlap_bench.py --out $OUT   (carry .whl; diffusers installed as fetch_wheels.sh says)
CPU dry run (tiny sizes, no timing value):  python bench/vae_overlap_bench.py --tiny --out /tmp/vae_bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from gpu_bench import CONFIG_13B  # noqa: E402  # the official 1.3B transformer config, as the other benches build it

TINY = {**CONFIG_13B, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def latent_shape(width: int, height: int, frames: int) -> tuple[int, ...]:
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def set_conv3d_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> None:
    for parameter in module.parameters():
        if parameter.ndim == 5:
            parameter.data = parameter.data.contiguous(memory_format=memory_format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(base_dim=16 if args.tiny else 96).eval().requires_grad_(False)
        transformer = WanTransformer3DModel(**(TINY if args.tiny else CONFIG_13B)).to(torch.bfloat16).eval()
    shapes = {"832x480x81": (832, 480, 81), "480x832x49": (480, 832, 49)}
    if args.tiny:
        shapes = {"64x48x9": (64, 48, 9)}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for name, (width, height, frames) in shapes.items():
        latents = torch.randn(latent_shape(width, height, frames), device=device)
        row: dict[str, Any] = {}
        decode(vae, latents)  # warm-up (cuDNN handles, allocator)
        row["fp32_s"] = timed(lambda latents=latents: decode(vae, latents), device, args.repeats)
        reference = decode(vae, latents)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            decode(vae, latents)
            row["fp32_cudnn_benchmark_s"] = timed(lambda latents=latents: decode(vae, latents), device, args.repeats)
            torch.backends.cudnn.benchmark = False
            # Module.to(memory_format=...) refuses the VAE's 1-D parameters: only its 3-D conv weights convert.
            set_conv3d_memory_format(vae, torch.channels_last_3d)
            latents_cl = latents.contiguous(memory_format=torch.channels_last_3d)
            decode(vae, latents_cl)
            row["fp32_channels_last_s"] = timed(
                lambda latents_cl=latents_cl: decode(vae, latents_cl), device, args.repeats
            )
            set_conv3d_memory_format(vae, torch.contiguous_format)
            del latents_cl
        # The 16-bit VAEs of WAN_VAE_PRECISION (wan_engine.vae_precision): the same weights, cast.
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            vae_16 = AutoencoderKLWan.from_config(vae.config).to(device, dtype).eval().requires_grad_(False)
            vae_16.load_state_dict({k: v.to(dtype) for k, v in vae.state_dict().items()})
            decode(vae_16, latents)
            row[f"{label}_s"] = timed(
                lambda latents=latents, vae_16=vae_16: decode(vae_16, latents), device, args.repeats
            )
            video = decode(vae_16, latents)
            row[f"{label}_psnr_db_vs_fp32"] = psnr(video, reference)
            row[f"{label}_finite"] = bool(torch.isfinite(video).all())  # float16 overflow shows as inf / nan
            del vae_16, video
        report[f"decode_{name}"] = {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in row.items()}
        report[f"decode_{name}_raw"] = row
        print(name, report[f"decode_{name}"], flush=True)

    # The overlap: the next task's steps (here 832x480x81 with CFG: two forwards per step) against a decode.
    width, height, frames = next(iter(shapes.values()))
    hidden = torch.randn(latent_shape(width, height, frames), device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    timestep = torch.tensor([500], device=device)

    def steps() -> None:
        with torch.no_grad():
            for _ in range(args.steps):
                for _ in range(2):
                    transformer(hidden, timestep, text, return_dict=False)

    latents = torch.randn(latent_shape(width, height, frames), device=device)
    steps()  # warm-up
    alone_steps = statistics.median(timed(steps, device, args.repeats))
    alone_decode = statistics.median(timed(lambda: decode(vae, latents), device, args.repeats))
    together = []
    for _ in range(args.repeats):
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        done: dict[str, float] = {}

        def side_decode(side: Any = side, done: dict[str, float] = done) -> None:
            started = time.perf_counter()
            if side is not None:
                with torch.cuda.stream(side):
                    decode(vae, latents)
                side.synchronize()
            else:
                decode(vae, latents)
            done["decode"] = time.perf_counter() - started

        sync(device)
        started = time.perf_counter()
        thread = threading.Thread(target=side_decode)
        thread.start()
        steps()
        sync(device)
        done["steps"] = time.perf_counter() - started
        thread.join()
        done["wall"] = time.perf_counter() - started
        together.append(done)
    wall = statistics.median(d["wall"] for d in together)
    report["overlap"] = {
        "shape": f"{width}x{height}x{frames}",
        "steps": args.steps,
        "steps_alone_s": alone_steps,
        "decode_alone_s": alone_decode,
        "serial_s": alone_steps + alone_decode,
        "together_wall_s": wall,
        "together_steps_s": statistics.median(d["steps"] for d in together),
        "together_decode_s": statistics.median(d["decode"] for d in together),
        "saved_s": alone_steps + alone_decode - wall,
        "saved_fraction_of_decode": (alone_steps + alone_decode - wall) / alone_decode,
        "runs": together,
    }
    print("overlap", report["overlap"], flush=True)
    (args.out / "vae_overlap.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
