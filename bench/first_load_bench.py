"""A fresh process's first model load: plain diffusers, ours without the process warm-up, ours with it.

Run 3 of the queue benchmark (docs/BENCHMARKS.md) measured the worker's first load of T2V 1.3B at 10.3 s
against the plain script's 1.15 s over the same files (in the page cache). The plain script imports
diffusers' Wan classes before its clock starts; the worker imports them, initialises cuBLAS / cuDNN and
imports the compiler stack inside its first load. This measures each variant in its own fresh process
(interleaved, `--repeats` times):
- `plain`: the classes imported first, then the clock: VAE (float32) + pipeline `from_pretrained`, `.to(cuda)`;
- `ours_cold`: `WanOrchestrator(warm_up=False).load_model(...)`, the load as it was before the warm-up;
- `ours_warmed`: `WanOrchestrator(...)`, which runs the warm-up (wan_engine.process_warmup), then `load_model`.

GPU:  python3 bench/first_load_bench.py --out $OUT          (carry .whl_wq; builds the queue bench's models)
CPU dry run:  python bench/first_load_bench.py --tiny --out /tmp/flb --work /tmp/flb_work
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

VARIANTS = ("plain", "ours_cold", "ours_warmed")


def child(variant: str, work: Path, tiny: bool) -> dict[str, Any]:
    process_started = time.perf_counter()
    import torch
    from worker_queue_bench import T2V_DIR, queue_for

    scale = queue_for(tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = work / "models"
    report: dict[str, Any] = {"variant": variant, "device": str(device)}
    if variant == "plain":
        started = time.perf_counter()
        from diffusers import AutoencoderKLWan, WanPipeline

        report["imports_before_clock_s"] = round(time.perf_counter() - started, 3)
        folder = models / ("tiny-wan2.1-t2v" if tiny else T2V_DIR)
        started = time.perf_counter()
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        report["load_s"] = round(time.perf_counter() - started, 3)
        del pipe
    else:
        from headless_wgp import WanOrchestrator

        report["import_headless_wgp_s"] = round(time.perf_counter() - process_started, 3)
        started = time.perf_counter()
        orchestrator = WanOrchestrator(models, device=str(device), warm_up=variant == "ours_warmed")
        report["orchestrator_s"] = round(time.perf_counter() - started, 3)  # the warm-up runs in here
        if orchestrator.warmup is not None:
            report["warmup_steps_s"] = dict(orchestrator.warmup.seconds)
            report["warmup_errors"] = dict(orchestrator.warmup.errors)
        started = time.perf_counter()
        report["load_model_s"] = round(orchestrator.load_model(scale.t2v), 3)
        report["load_wall_s"] = round(time.perf_counter() - started, 3)
        speed = orchestrator._loaded.speed
        report["speed_path_s"] = round(speed.seconds, 3) if speed is not None and speed.seconds else None
    report["process_s"] = round(time.perf_counter() - process_started, 3)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--work", type=Path, default=Path("/tmp/worker_queue_bench"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.work, args.tiny)), flush=True)
        return 0
    from worker_queue_bench import build_assets, queue_for

    assert args.out is not None, "--out is required"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"assets": build_assets(args.work, queue_for(args.tiny)), "runs": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", variant, "--work", str(args.work)]
            done = subprocess.run(command + (["--tiny"] if args.tiny else []), capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            run = json.loads(lines[-1][7:]) if lines else {"variant": variant, "error": done.stderr[-2000:]}
            run["repeat"] = repeat
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            (args.out / "first_load.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
