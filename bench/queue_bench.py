"""Queue benchmark (issue 15): a sequence of tasks of different shapes, old vs new compile path vs plain diffusers.

Each mode runs in its own process (a fresh torch, its own cold compile cache), on the same random-weight
full-size Wan 2.1 T2V 1.3B transformer (seeded, built on the GPU in bf16), through diffusers' WanPipeline
to latents (prompt embeddings given; decode and write are not part of this benchmark):

- plain:    diffusers as a user runs it, eager; the LoRA task through peft (`load_lora_weights`).
- old:      the speed path as it was before issue 15: probed attention, regional compile with
            `dynamic=False` (each new token count compiles), LoRA tasks eager (`force_eager`).
- new:      `wan_engine.speed.apply_speed_path` as it is now (token dim dynamic from the first compile,
            on-disk caches in a fresh folder, compile-where-it-pays), each task through `task_compile`,
            the LoRA task fused (`wan_engine.lora_fusion`).
- restart:  `new` again in a new process over the cache folder `new` filled: a restarted worker.
- auto:     `new` with WAN_COMPILE_DYNAMIC=auto (torch's automatic dynamic: static first, dynamic after).

The queue: 832x480x81, 480x832x49, 832x480x33 and x41 (travel segments), 832x480x1 (one frame), a LoRA
task (rank 32 on every attention and feed-forward Linear, constant multiplier 0.8), 832x480x81 without
CFG, and 832x480x81 with CFG again (the first plain task after a LoRA task). Per task it records the
first step (compile included), the median later step, new dynamo graphs and the compile decision;
the LoRA task's and the first task's latents are compared with plain's.

Device:  see docs/BENCHMARKS.md (section "Queues: compile per shape, LoRA tasks").
CPU dry run (tiny model, every code path):  python bench/queue_bench.py --tiny --out /tmp/qb
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("plain", "old", "new", "restart", "auto")
# (name, width, height, frames, steps, cfg, lora)
QUEUE: tuple[tuple[str, int, int, int, int, bool, bool], ...] = (
    ("t2v_81f", 832, 480, 81, 6, True, False),
    ("t2v_49f_portrait", 480, 832, 49, 6, True, False),
    ("travel_33f", 832, 480, 33, 4, True, False),
    ("travel_41f", 832, 480, 41, 4, True, False),
    ("one_frame", 832, 480, 1, 4, True, False),
    ("lora_81f", 832, 480, 81, 6, True, True),
    ("no_cfg_81f", 832, 480, 81, 4, False, False),
    ("after_lora_81f", 832, 480, 81, 4, True, False),
)
TINY_QUEUE = tuple((n, 64, 48, 1 + 4 * ((f - 1) // 16), 3, c, lo) for n, _w, _h, f, _s, c, lo in QUEUE[:3] + QUEUE[4:6])
LORA_RANK = 32
LORA_MULTIPLIER = 0.8
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k")
LORA_TARGETS += ("attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def lora_state_dict(transformer: Any, seed: int = 7) -> dict[str, torch.Tensor]:
    """A random rank-32 LoRA in diffusers/peft keys over every attention and feed-forward Linear."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for index, block in enumerate(transformer.blocks):
        for target in LORA_TARGETS:
            layer = block.get_submodule(target)
            a = torch.randn(LORA_RANK, layer.in_features, generator=generator) / layer.in_features**0.5
            b = torch.randn(layer.out_features, LORA_RANK, generator=generator) * 0.02
            out[f"transformer.blocks.{index}.{target}.lora_A.weight"] = a.to(torch.bfloat16)
            out[f"transformer.blocks.{index}.{target}.lora_B.weight"] = b.to(torch.bfloat16)
    return out


def build(tiny: bool) -> tuple[Any, dict[str, Any]]:
    """The pipeline (transformer + scheduler; no text encoder or VAE) and the prompt embeddings."""
    from diffusers import WanPipeline

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    scale = gpu_bench.TINY_SCALE if tiny else gpu_bench.FULL
    config = scale.small
    transformer = gpu_bench.build_transformer(config, scale, seed=0)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=gpu_bench.build_scheduler(3.0)
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    text = int(config["text_dim"])
    embeds = {
        "prompt_embeds": torch.randn(1, 512, text, generator=generator).to(scale.device, scale.dtype),
        "negative_prompt_embeds": torch.randn(1, 512, text, generator=generator).to(scale.device, scale.dtype),
    }
    return pipe, embeds


def run_task(pipe: Any, embeds: dict[str, Any], task: tuple[Any, ...]) -> tuple[dict[str, Any], torch.Tensor]:
    """One denoising call to latents; per-step times (synchronised) and new dynamo graphs."""
    name, width, height, frames, steps, cfg, _lora = task
    marks: list[float] = []

    def first(_module: Any, _args: Any) -> None:
        if not marks:
            sync()
            marks.append(time.perf_counter())

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync()
        marks.append(time.perf_counter())
        return kwargs

    handle = pipe.transformer.register_forward_pre_hook(first)
    before = graphs()
    sync()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            latents = pipe(
                prompt_embeds=embeds["prompt_embeds"],
                negative_prompt_embeds=embeds["negative_prompt_embeds"] if cfg else None,
                width=width,
                height=height,
                num_frames=frames,
                num_inference_steps=steps,
                guidance_scale=5.0 if cfg else 1.0,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
                callback_on_step_end=on_step,
            ).frames
    finally:
        handle.remove()
    sync()
    wall = time.perf_counter() - started
    times = [b - a for a, b in itertools.pairwise(marks)]
    later = times[1:] or times
    median = statistics.median(later)
    record = {
        "task": name,
        "shape": f"{width}x{height}x{frames}",
        "steps": steps,
        "cfg": cfg,
        "first_step_s": round(times[0], 3),
        "s_per_step": round(median, 4),
        "compile_s": round(max(times[0] - median, 0.0), 2),
        "wall_s": round(wall, 3),
        "new_graphs": graphs() - before,
    }
    return record, latents


def run_mode(mode: str, tiny: bool, work: Path, policy: str = "pays", first_steps: int = 0) -> dict[str, Any]:
    """Run the queue in this process as `mode`; latents of the first and LoRA tasks saved under `work`."""
    from wan_engine import speed
    from wan_engine.loras import LoadedLora, LoraMultiplier, LoraRequest, LoraState

    device = "cpu" if tiny else "cuda"
    started = time.perf_counter()
    pipe, embeds = build(tiny)
    built = time.perf_counter() - started
    report = None
    if mode != "plain":
        settings = speed.SpeedSettings(
            require_cuda=not tiny,
            dynamic={"old": "off", "auto": "auto"}.get(mode, "mark"),
            cache_dir=str(work / ("cache_old" if mode == "old" else "cache_auto" if mode == "auto" else "cache_new")),
            policy="always" if mode == "old" else policy,
        )
        report = speed.apply_speed_path(pipe, device, settings)
    setup = time.perf_counter() - started - built
    tasks = []
    queue = list(TINY_QUEUE if tiny else QUEUE)
    if first_steps:  # a realistic first task (20 steps) for the default compile policy to weigh
        queue[0] = (*queue[0][:4], first_steps, *queue[0][5:])
    lora_loaded = False
    for task in queue:
        lora = task[-1]
        if lora and not lora_loaded:
            pipe.load_lora_weights(lora_state_dict(pipe.transformer), adapter_name="bench")
            pipe.transformer.set_adapters(["bench"], [LORA_MULTIPLIER])
            lora_loaded = True
        elif not lora and lora_loaded:
            pipe.unload_lora_weights()
            lora_loaded = False
        if mode == "plain":
            record, latents = run_task(pipe, embeds, task)
        elif mode == "old":
            with speed.eager_blocks(lora):
                record, latents = run_task(pipe, embeds, task)
            record["compiled"] = not lora
        else:
            state, requests = LoraState(), []
            if lora:
                from peft.tuners.lora.layer import LoraLayer

                layers = sum(isinstance(m, LoraLayer) for m in pipe.transformer.modules())
                state.loaded = [
                    LoadedLora("bench", Path("bench"), "bench", ("high",), {"high": layers}, {"high": layers})
                ]
                requests = [LoraRequest("bench", Path("bench"), LoraMultiplier(((LORA_MULTIPLIER,),), "0.8"))]
            _name, width, height, frames, steps, cfg, _ = task
            entered = time.perf_counter()
            with speed.task_compile(
                report,
                pipe,
                width=width,
                height=height,
                frames=frames,
                steps=steps,
                cfg=cfg,
                lora_state=state,
                lora_requests=requests,
                experts_per_step=("high",) * steps,
            ) as decision:
                record, latents = run_task(pipe, embeds, task)
            sync()
            # fusing the LoRAs before the call and restoring the weights after it (0 without LoRAs)
            record["around_call_s"] = round(time.perf_counter() - entered - record["wall_s"], 3)
            record["compiled"] = bool(decision and decision.compiled)
            record["decision"] = decision.to_dict() if decision else None
        tasks.append(record)
        print(json.dumps({"mode": mode, **record}), flush=True)
        if record["task"] in ("t2v_81f", "lora_81f"):
            save_file(
                {"latents": latents.float().cpu().contiguous()}, work / f"latents_{mode}_{record['task']}.safetensors"
            )
    return {
        "mode": mode,
        "build_s": round(built, 2),
        "setup_s": round(setup, 2),
        "attention_backend": report.attention_backend if report else None,
        "cache_dir": report.cache_dir if report else None,
        "tasks": tasks,
        "queue_wall_s": round(sum(t["wall_s"] for t in tasks), 2),
        "compile_total_s": round(sum(t["compile_s"] for t in tasks), 2),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(work: Path, modes: list[str]) -> dict[str, Any]:
    """Latents of each mode against plain's (the LoRA task and the first task)."""
    out: dict[str, Any] = {}
    for task in ("t2v_81f", "lora_81f"):
        ref_path = work / f"latents_plain_{task}.safetensors"
        if not ref_path.exists():
            continue
        ref = load_file(ref_path)["latents"]
        for mode in modes:
            path = work / f"latents_{mode}_{task}.safetensors"
            if mode != "plain" and path.exists():
                other = load_file(path)["latents"]
                out[f"{mode}/{task}"] = round(rel_err(other, ref), 5) if other.shape == ref.shape else "shape differs"
    return out


def markdown(results: dict[str, Any]) -> str:
    """Per-task table (first step / s per step per mode) and the totals."""
    runs = {r["mode"]: r for r in results["modes"]}
    modes = [m for m in MODES if m in runs]
    lines = ["| task | shape | steps | " + " | ".join(f"{m} first / per step" for m in modes) + " |"]
    lines.append("|---|---|---|" + "---|" * len(modes))
    for index, task in enumerate(runs[modes[0]]["tasks"]):
        cells = []
        for mode in modes:
            t = runs[mode]["tasks"][index]
            mark = "" if t.get("compiled", False) or mode == "plain" else " (eager)"
            cells.append(f"{t['first_step_s']:.2f} / {t['s_per_step']:.3f}{mark}")
        lines.append(f"| {task['task']} | {task['shape']} | {task['steps']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| mode | queue wall s | compile s (first steps minus median) | setup s |")
    lines.append("|---|---|---|---|")
    for mode in modes:
        r = runs[mode]
        lines.append(f"| {mode} | {r['queue_wall_s']:.2f} | {r['compile_total_s']:.2f} | {r['setup_s']:.2f} |")
    lines.append("")
    lines.append(f"latents rel. error vs plain: {json.dumps(results.get('errors', {}))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="latents and compile caches (default: a temp dir)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on a tiny model")
    parser.add_argument("--policy", default="pays", help="compile policy of new/restart/auto (pays | always)")
    parser.add_argument("--first-steps", type=int, default=0, help="steps of the first task (default: the table's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="queue_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = run_mode(args.child, args.tiny, work, args.policy, args.first_steps)
        (work / f"mode_{args.child}.json").write_text(json.dumps(result, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, Any] = {"command": " ".join(sys.argv), "modes": [], "failed": {}}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name(0)
    results["torch"] = torch.__version__
    for mode in modes:
        child_mode = mode  # restart: new's code and settings, over the cache folder `new` filled
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, "--out", str(args.out), "--work", str(work), "--child", child_mode]
        cmd += ["--policy", args.policy, "--first-steps", str(args.first_steps)] + (["--tiny"] if args.tiny else [])
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, check=False)
        path = work / f"mode_{child_mode}.json"
        if proc.returncode != 0 or not path.exists():
            results["failed"][mode] = proc.returncode
            continue
        data = json.loads(path.read_text())
        data["mode"] = mode
        data["process_s"] = round(time.perf_counter() - started, 2)
        results["modes"].append(data)
    results["errors"] = compare(work, modes)
    (args.out / "queue_bench.json").write_text(json.dumps(results, indent=1))
    if results["modes"]:
        (args.out / "queue_bench.md").write_text(markdown(results) + "\n")
        print(markdown(results))
    return 0 if not results["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
