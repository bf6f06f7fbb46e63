"""End-to-end queue benchmark (issue 15): the real `wan-worker run` process against a plain diffusers script.

One realistic mixed queue, side by side in one run, on random-weight full-size models built on the device:

- Wan 2.1 T2V 1.3B and Wan 2.1 VACE 1.3B saved as diffusers folders in a models dir (the full Wan VAE, a
  small random UMT5 text encoder with the real width d_model 4096, both from bench/gpu_bench.py's
  `build_common`, the tiny offline T5 tokenizer of wan_engine/tiny_models.py), found by the built-in
  presets `t2v_1.3B` and `vace_1.3B`; two rank-32 LoRA files in the original Wan key layout
  (`diffusion_model.blocks.N...lora_down`) on every attention and feed-forward Linear.
- The queue, in this order (priorities descending, so the worker runs it in the plain script's order):
  T2V 832x480x81 (20 steps), T2V 480x832x49 (20), two LoRA tasks at 480x832x49 (10 steps, constant
  multipliers 0.8 and 1.0), a 1-frame T2V task (20), a 3-segment travel on VACE 1.3B with segments of
  different lengths (10 steps; the switch to the second model) and T2V 832x480x81 again (10; the switch back).

Phases (`--phases`, a comma list run in its order; default `plain,ours,ours_warm`):

- **plain**: a fresh process runs the same tasks in the same order with `WanPipeline` / `WanVACEPipeline`
  `.from_pretrained` (VAE float32, the rest bf16), eager, LoRAs through `load_lora_weights`, each model
  loaded once, the travel segments built with the same guide/mask rules and stitched, and the same writer
  (`wan_engine.video_io.write_video`).
- **ours** (cold: a worker's first queue): fresh database, empty `<models dir>/.compile_cache`;
  `python3 -m worker run --db sqlite:///... --http 127.0.0.1:PORT` is started, the rows (ids `q00-...`)
  are inserted with raw SQL into its `tasks` table, and the bench follows the WebSocket events (`/ws`) and
  polls the table (progress, status) while NVML samples GPU utilisation every 0.1 s. Right after the
  insert, `/api/status` gives each queued task's predicted start (`queue[].starts_in`, `done_in`), compared
  afterwards with its real start (its first `generation_started` event). After the queue (SIGTERM, the
  worker exits) result_data timings are read back from the table.
- **ours_warm** (a restarted worker): a new worker process over the same models dir (its compile cache,
  `wan_attention_probe.json` and `wan_compiled_layouts.json` reused) and the same database (the learned
  `eta_stats` kept); the same queue again with ids `w00-...` (so new output names).
- **ours_warm_nooverlap**: ours_warm with `WAN_OVERLAP_DECODE=off` in the worker's environment (ids
  `n00-...`), for an A/B of the decode overlap over the same warm state.

A warm phase needs the database and compile cache that an `ours` phase left in --work: `ours` earlier in
the same list, or earlier on the same machine with the same --work (recorded in `<work>/worker_state.json`);
without it the run stops at once, before building anything, and says so. `--worker-env KEY=VALUE`
(repeatable) is added to every worker phase's environment (a phase's own setting wins).

Reported per worker phase: queue wall, GPU busy % (first task's first step to the last task's end), time in
compile, time per stage, per-task ETA at the first progress report against the real remaining time, the
queued-task start predictions against the real starts (median and worst |error| %; issue 15's target is
25%), and the LoRA s/step ratio; wall ratios against plain. One JSON (`worker_queue.json`, written after
each phase) and a markdown table (`summary.md`) in --out; a deadline (`--deadline-s`) is shared among the
phases left, so a phase stops what would not finish and the later ones still run, saving what was measured.
A phase that fails is recorded under its key (`error`) and the next one runs.

Device (~510 s on an H200, inside one 600 s call):   bash bench/worker_queue_run.sh --deadline-s 540
Decode-overlap A/B, on the machine where the default phases just ran (same --work; ~320 s):
          bash bench/worker_queue_run.sh --phases ours_warm,ours_warm_nooverlap --deadline-s 420
  or in one call on a fresh machine (~500 s):  --phases ours,ours_warm,ours_warm_nooverlap --deadline-s 540
CPU dry run with the tiny models:  python bench/worker_queue_bench.py --tiny --out /tmp/wq --work /tmp/wq_work
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent  # gpu_bench (the shared full-size builders) is imported from here
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"
TRAVEL_PROMPTS = ["dawn over a calm sea", "the sea turns into a forest", "the forest burns into sunset"]
TERMINAL = {"Complete", "Failed", "Cancelled"}
T2V_DIR = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # where the built-in presets look in the models dir
VACE_DIR = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
VACE_LAYERS_13B = list(range(0, 30, 2))  # Wan2.1-VACE-1.3B-diffusers: a VACE block beside every second block
LORA_RANK = 32
FPS = 16


@dataclass(frozen=True)
class QueueTask:
    """One row of the queue (a travel row becomes an orchestrator with segment and stitch children)."""

    key: str
    model: str
    width: int
    height: int
    frames: int
    steps: int
    seed: int
    lora: tuple[str, float] | None = None
    travel: dict[str, Any] | None = None  # segment_frames, frame_overlap (a travel_orchestrator row)

    @property
    def task_type(self) -> str:
        return "travel_orchestrator" if self.travel else "t2v"


@dataclass
class Scale:
    """Full size on the GPU, or the tiny models on the CPU (the dry run)."""

    tiny: bool
    t2v: str
    vace: str
    tasks: list[QueueTask] = field(default_factory=list)


def queue_for(tiny: bool) -> Scale:
    if tiny:
        t2v, vace, w, h = "tiny_t2v", "tiny_vace", 64, 48
        tasks = [
            QueueTask("t2v_81f", t2v, w, h, 9, 3, 1),
            QueueTask("t2v_49f_portrait", t2v, h, w, 5, 3, 2),
            QueueTask("lora_a_49f", t2v, h, w, 5, 2, 3, lora=("bench_lora_a", 0.8)),
            QueueTask("lora_b_49f", t2v, h, w, 5, 2, 4, lora=("bench_lora_b", 1.0)),
            QueueTask("one_frame", t2v, w, h, 1, 3, 5),
            QueueTask("travel_3seg", vace, w, h, 0, 2, 6, travel={"segment_frames": [9, 5, 13], "frame_overlap": 4}),
            QueueTask("back_t2v_81f", t2v, w, h, 9, 2, 7),
        ]
        return Scale(True, t2v, vace, tasks)
    t2v, vace = "t2v_1.3B", "vace_1.3B"
    tasks = [
        QueueTask("t2v_81f", t2v, 832, 480, 81, 20, 1),
        QueueTask("t2v_49f_portrait", t2v, 480, 832, 49, 20, 2),
        QueueTask("lora_a_49f", t2v, 480, 832, 49, 10, 3, lora=("bench_lora_a", 0.8)),
        QueueTask("lora_b_49f", t2v, 480, 832, 49, 10, 4, lora=("bench_lora_b", 1.0)),
        QueueTask("one_frame", t2v, 832, 480, 1, 20, 5),
        QueueTask("travel_3seg", vace, 832, 480, 0, 10, 6, travel={"segment_frames": [41, 33, 49], "frame_overlap": 8}),
        QueueTask("back_t2v_81f", t2v, 832, 480, 81, 10, 7),
    ]
    return Scale(False, t2v, vace, tasks)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def preset_negative(model: str) -> str:
    """The negative prompt of the model's built-in preset (the worker uses it; plain gets the same)."""
    data = json.loads((REPO / "defaults" / f"{model}.json").read_text())
    return str(data.get("negative_prompt", ""))


# ---- assets: models, LoRAs, key images -----------------------------------------------------------------


def _random_transformer(cls: Any, config: dict[str, Any], seed: int, device: str) -> Any:
    import torch

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():  # from_pretrained keeps these in float32
        if any(part in name.split(".") for part in keep):
            param.data = param.data.float()
    return model.eval()


def build_full_models(models_dir: Path) -> dict[str, Any]:
    """The two 1.3B pipelines as diffusers folders (random weights, official architectures)."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel
    from gpu_bench import CONFIG_13B, FULL, build_common

    started = time.perf_counter()
    # gpu_bench's tokenizer, UMT5 (UMT5_SMALL, seed 1, bf16), full VAE (float32) and UniPC shift 3, on cuda.
    common = build_common(FULL)
    t2v = _random_transformer(WanTransformer3DModel, CONFIG_13B, 3, "cuda")
    WanPipeline(transformer=t2v, transformer_2=None, boundary_ratio=None, **common).save_pretrained(
        models_dir / T2V_DIR, safe_serialization=True
    )
    del t2v
    vace_config = {**CONFIG_13B, "vace_layers": VACE_LAYERS_13B, "vace_in_channels": 96}
    vace = _random_transformer(WanVACETransformer3DModel, vace_config, 5, "cuda")
    WanVACEPipeline(transformer=vace, transformer_2=None, boundary_ratio=None, **common).save_pretrained(
        models_dir / VACE_DIR, safe_serialization=True
    )
    del vace, common
    torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in models_dir.rglob("*") if f.is_file())
    return {"seconds": round(time.perf_counter() - started, 1), "gb": round(size / 1e9, 2)}


def lora_state(config: dict[str, Any], rank: int, seed: int, dtype: Any) -> dict[str, Any]:
    """A LoRA in the original Wan layout over every attention projection and feed-forward Linear of the blocks."""
    import torch

    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ffn = int(config["ffn_dim"])
    layers = [
        (f"blocks.{b}.{attn}.{proj}", inner, inner)
        for b in range(int(config["num_layers"]))
        for attn in ("self_attn", "cross_attn")
        for proj in ("q", "k", "v", "o")
    ]
    layers += [(f"blocks.{b}.ffn.0", inner, ffn) for b in range(int(config["num_layers"]))]
    layers += [(f"blocks.{b}.ffn.2", ffn, inner) for b in range(int(config["num_layers"]))]
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for module, fan_in, fan_out in layers:
        prefix = f"diffusion_model.{module}"
        state[f"{prefix}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in**0.5).to(dtype)
        state[f"{prefix}.lora_up.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(dtype)
        state[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return state


def build_assets(work: Path, scale: Scale) -> dict[str, Any]:
    """Models dir, LoRA dir and key images under `work` (reused when already there)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    models, loras, inputs = work / "models", work / "loras", work / "inputs"
    for folder in (models, loras, inputs):
        folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if scale.tiny:
        from wan_engine.tiny_models import _TRANSFORMER_KWARGS, build_tiny_models

        if not (models / "tiny-wan2.1-t2v").is_dir():
            build_tiny_models(models)
        config, rank, dtype = dict(_TRANSFORMER_KWARGS), 4, torch.float32
    else:
        from gpu_bench import CONFIG_13B

        if not (models / VACE_DIR / "model_index.json").is_file():
            report["models"] = build_full_models(models)
        config, rank, dtype = CONFIG_13B, LORA_RANK, torch.bfloat16
    for index, name in enumerate(("bench_lora_a", "bench_lora_b")):
        path = loras / f"{name}.safetensors"
        if not path.is_file():
            save_file(lora_state(config, rank, 11 + index, dtype), str(path))
        report[name] = {"rank": rank, "mb": round(path.stat().st_size / 1e6, 1)}
    travel = next(t for t in scale.tasks if t.travel)
    colours = [(220, 60, 40), (40, 180, 90), (40, 80, 220), (230, 200, 40)]
    images = []
    for index, colour in enumerate(colours):
        path = inputs / f"key{index}.png"
        if not path.is_file():
            ramp = np.linspace(0.4, 1.0, travel.width, dtype=np.float32)[None, :, None]
            pixels = (np.array(colour, dtype=np.float32)[None, None, :] * ramp).repeat(travel.height, axis=0)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
        images.append(str(path))
    report["images"] = images
    return report


# ---- sampling: GPU utilisation -------------------------------------------------------------------------


class GpuSampler:
    """NVML utilisation and memory every `period` s in a thread (nothing on a machine without NVML)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.samples: list[tuple[float, int, float]] = []  # (unix time, util %, used GiB)
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self) -> GpuSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # no GPU (the dry run): no samples
            self.error = f"{type(exc).__name__}: {exc}"
            return
        while not self._stop.is_set():
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.samples.append((time.time(), int(util.gpu), round(memory.used / 1024**3, 2)))
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def busy(self, start: float | None, end: float | None) -> dict[str, Any] | None:
        """Mean utilisation and idle share of the samples in [start, end]."""
        if start is None or end is None:
            return None
        window = [s for s in self.samples if start <= s[0] <= end]
        if not window:
            return {"samples": 0, "error": self.error}
        utils = [s[1] for s in window]
        return {
            "samples": len(window),
            "window_s": round(end - start, 2),
            "mean_util_pct": round(statistics.fmean(utils), 1),
            "idle_sample_pct": round(100.0 * sum(u == 0 for u in utils) / len(utils), 1),
            "below_50_pct": round(100.0 * sum(u < 50 for u in utils) / len(utils), 1),
            "peak_used_gib": max(s[2] for s in window),
        }


# ---- ours: the real worker process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode} before serving /healthz")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"/healthz did not answer 200 within {timeout:.0f}s")


class EventListener:
    """The worker's WebSocket event stream, kept in memory (preview frames dropped: only their time)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.error: str | None = None
        self._ws: Any = None
        self._thread = threading.Thread(target=self._run, name="ws-listener", daemon=True)

    def start(self) -> EventListener:
        from websockets.sync.client import connect

        self._ws = connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=10, max_size=2**24)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for message in self._ws:
                event = json.loads(message)
                event["recv"] = time.time()
                if event.get("event") == "preview":
                    event = {k: event.get(k) for k in ("event", "ts", "task_id", "step", "recv")}
                self.events.append(event)
        except Exception as exc:  # closed by stop(), or the worker went away
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        self._thread.join(timeout=5)


def owned(task_id: str, ids: list[str]) -> bool:
    """A row of this phase: one it inserted, or a child the worker made of one (`<parent id>-seg000`)."""
    return task_id in ids or any(task_id.startswith(f"{parent}-") for parent in ids)


class TablePoller:
    """Polls the tasks table: when each of this phase's rows was first seen running / ended, its first progress."""

    def __init__(self, db: Path, ids: list[str], period: float = 0.2) -> None:
        self.db = db
        self.ids = ids
        self.period = period
        self.first_progress: dict[str, tuple[float, Any]] = {}
        self.first_running: dict[str, float] = {}
        self.ended: dict[str, tuple[float, str]] = {}
        self.statuses: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="table-poller", daemon=True)

    def start(self) -> TablePoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
                    rows = conn.execute("SELECT id, status, progress FROM tasks").fetchall()
            except sqlite3.Error:
                rows = []
            for task_id, status, progress in rows:
                if not owned(task_id, self.ids):
                    continue
                self.statuses[task_id] = status
                if status == "In Progress":
                    self.first_running.setdefault(task_id, now)
                if status in TERMINAL and task_id not in self.ended:
                    self.ended[task_id] = (now, status)
                if progress and task_id not in self.first_progress:
                    try:
                        self.first_progress[task_id] = (now, json.loads(progress))
                    except ValueError:
                        self.first_progress[task_id] = (now, progress)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def row_params(task: QueueTask, images: list[str]) -> dict[str, Any]:
    if task.travel:
        return {
            "model": task.model,
            "input_images": images,
            "base_prompts": TRAVEL_PROMPTS,
            "segment_frames": task.travel["segment_frames"],
            "frame_overlap": task.travel["frame_overlap"],
            "seed_base": task.seed,
            "num_inference_steps": task.steps,
            "resolution": f"{task.width}x{task.height}",
        }
    params: dict[str, Any] = {
        "model": task.model,
        "prompt": PROMPT,
        "resolution": f"{task.width}x{task.height}",
        "video_length": task.frames,
        "num_inference_steps": task.steps,
        "seed": task.seed,
        "guidance_scale": 5.0,
        "flow_shift": 3.0,
    }
    if task.lora:
        params["lora_names"] = [task.lora[0]]
        params["lora_multipliers"] = str(task.lora[1])
    return params


def task_ids(scale: Scale, prefix: str) -> list[str]:
    return [f"{prefix}{index:02d}-{task.key}" for index, task in enumerate(scale.tasks)]


def insert_rows(db: Path, scale: Scale, images: list[str], ids: list[str]) -> None:
    """Raw SQL, as any program feeds the worker: one transaction, priorities descending in queue order."""
    with sqlite3.connect(db, timeout=30) as conn:
        for index, (task, task_id) in enumerate(zip(scale.tasks, ids, strict=True)):
            conn.execute(
                "INSERT INTO tasks (id, task_type, params, priority) VALUES (?, ?, ?, ?)",
                (task_id, task.task_type, json.dumps(row_params(task, images)), 100 - index),
            )


def read_rows(db: Path, ids: list[str]) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT id, task_type, status, priority, parent_task_id, params, result_data, progress, "
            "error_message, output_location, attempts, created_at, generation_started_at, "
            "generation_processed_at FROM tasks ORDER BY created_at, id"
        ).fetchall()
    out = []
    for row in rows:
        item = dict(row)
        if not owned(item["id"], ids):
            continue
        for key in ("params", "result_data", "progress"):
            if isinstance(item[key], str):
                with contextlib.suppress(ValueError):
                    item[key] = json.loads(item[key])
        out.append(item)
    return out


# ---- worker phases: cold, restarted, restarted without the decode overlap ----------------------------


@dataclass(frozen=True)
class WorkerPhase:
    """One run of the real worker over the queue."""

    name: str
    prefix: str  # task ids `<prefix>00-<key>`: a warm phase shares the database with the phases before it
    cold: bool  # fresh database and an empty compile cache; otherwise both as the previous worker left them
    env: tuple[tuple[str, str], ...] = ()  # set in the worker's environment over --worker-env


WORKER_PHASES = {
    "ours": WorkerPhase("ours", "q", cold=True),
    "ours_warm": WorkerPhase("ours_warm", "w", cold=False),
    "ours_warm_nooverlap": WorkerPhase("ours_warm_nooverlap", "n", cold=False, env=(("WAN_OVERLAP_DECODE", "off"),)),
}
PHASES = ("plain", *WORKER_PHASES)
# Share of the time left that each phase gets (run 2: plain 133 s, ours 148 s + start-up; warm ~ plain).
PHASE_WEIGHT = {"plain": 1.0, "ours": 1.2, "ours_warm": 1.0, "ours_warm_nooverlap": 1.05}
STATE_FILE = "worker_state.json"  # what the last worker phase left in --work, for a later warm phase
CACHE_FOLDER = ".compile_cache"  # wan_engine.speed.CACHE_FOLDER: <models dir>/.compile_cache
# Environment that would move the compile cache away from <models dir>/.compile_cache (cold / warm would
# then not mean what the phase says); --worker-env may still set them.
CACHE_ENV = ("WAN_COMPILE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def parse_phases(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise ValueError(f"--phases {text!r}: each of {', '.join(PHASES)} (comma-separated), got {unknown or 'none'}")
    if len(set(phases)) != len(phases):
        raise ValueError(f"--phases {text!r}: a phase listed twice")
    return phases


def parse_worker_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"--worker-env {item!r}: KEY=VALUE expected")
        env[key] = value
    return env


def read_state(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def missing_prerequisites(phases: list[str], work: Path, scale_name: str) -> list[str]:
    """Why a warm phase could not run: no `ours` before it in the list and no state of one in --work."""
    problems = []
    state = read_state(work)
    for index, name in enumerate(phases):
        phase = WORKER_PHASES.get(name)
        if phase is None or phase.cold or "ours" in phases[:index]:
            continue
        if state is None or not (work / "tasks.db").is_file():
            problems.append(
                f"phase {name} reuses the database and compile cache of an earlier `ours` phase in {work}, and "
                f"there is none ({STATE_FILE} or tasks.db missing): list ours before it (--phases ours,{name}) "
                "or run ours first on this machine with the same --work"
            )
        elif state.get("scale") != scale_name:
            problems.append(
                f"phase {name}: the state in {work} is of the {state.get('scale')} models, this run is {scale_name}: "
                f"list ours before it (--phases ours,{name})"
            )
    return problems


def cache_state(models: Path) -> dict[str, Any]:
    """What a starting worker finds in <models dir>/.compile_cache (the warm phases' claim, checked)."""
    folder = models / CACHE_FOLDER
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return {
        "files": len(files),
        "mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        "attention_probe": (folder / "wan_attention_probe.json").is_file(),
        "compiled_layouts": (folder / "wan_compiled_layouts.json").is_file(),
    }


def eta_stats_rows(db: Path) -> int | None:
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM eta_stats").fetchone()[0])
    except sqlite3.Error:
        return None


def free_prefix(db: Path, base: str) -> str:
    """`base`, or `base` + b, c, ... when an earlier call on this database used it (ids stay unique)."""
    if not db.is_file():
        return base
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        used = {row[0] for row in conn.execute("SELECT id FROM tasks")}
    for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        if not any(task_id.startswith(f"{base}{suffix}00-") for task_id in used):
            return f"{base}{suffix}"
    raise RuntimeError(f"{db}: task id prefixes {base}..{base}z all used; start from a fresh --work")


def fetch_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as response:
        return json.loads(response.read())


def row_statuses(db: Path, ids: list[str]) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        marks = ",".join("?" * len(ids))
        return dict(conn.execute(f"SELECT id, status FROM tasks WHERE id IN ({marks})", ids).fetchall())


def snapshot_queue(port: int, db: Path, ids: list[str], timeout: float = 15.0) -> dict[str, Any]:
    """The worker's predicted start (and finish) of each inserted task, from /api/status right after the insert.

    `queue[].starts_in` / `done_in` are seconds from the status' `now` (the worker's clock; the same
    machine). A snapshot counts when every inserted task is in it with a known start, or is the task
    running (`current`), or has ended. A start is unknown while the running task has no ETA yet, and a
    task claimed before the server shows it as current would make the walk start from an idle worker,
    so it polls (every 0.05 s) until a snapshot counts, or `timeout` (then the one that knew the most)."""
    best: dict[str, Any] | None = None
    polls, error = 0, None
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        polls += 1
        try:
            status = fetch_status(port)
            rows = row_statuses(db, ids)
        except (OSError, ValueError, sqlite3.Error) as exc:
            error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
            continue
        listed = {q["id"]: q for q in status.get("queue") or [] if q.get("id") in ids}
        current = (status.get("current") or {}).get("task_id")
        tasks = {i: {"starts_in": q.get("starts_in"), "done_in": q.get("done_in")} for i, q in listed.items()}
        known = sum(v["starts_in"] is not None for v in tasks.values())
        accounted = all(i in listed or i == current or rows.get(i) in TERMINAL for i in ids)
        snap = {"now": status.get("now"), "current": current, "tasks": tasks, "known": known, "complete": False}
        if accounted and known == len(tasks):
            best = {**snap, "complete": True}
            break
        if best is None or known > best["known"]:
            best = snap
        time.sleep(0.05)
    return {**(best or {"complete": False}), "polls": polls, "error": error}


def worker_env(phase: WorkerPhase, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_ENV}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    env.update(dict(phase.env))
    return env


def run_worker(
    work: Path,
    out: Path,
    scale: Scale,
    images: list[str],
    deadline: float,
    phase: WorkerPhase,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start `wan-worker run`, feed the queue with SQL, follow it to the end (or the deadline), stop it.

    A cold phase starts from a fresh database and an empty compile cache; a warm one from what the
    previous worker phase left (its worker has exited: each phase ends with SIGTERM and a wait)."""
    import shutil

    db = work / "tasks.db"
    models = work / "models"
    if phase.cold:
        (work / STATE_FILE).unlink(missing_ok=True)
        for stale in (db, db.with_name("tasks.db-wal"), db.with_name("tasks.db-shm")):
            stale.unlink(missing_ok=True)
        shutil.rmtree(models / CACHE_FOLDER, ignore_errors=True)
    elif not db.is_file():
        raise RuntimeError(f"{phase.name}: no database in {work} from an earlier ours phase")
    prefix = free_prefix(db, phase.prefix)
    ids = task_ids(scale, prefix)
    port = free_port()
    env = worker_env(phase, extra_env or {})
    command = [
        sys.executable,
        "-m",
        "worker",
        "run",
        "--db",
        f"sqlite:///{db}",
        "--models-dir",
        str(models),
        "--outputs-dir",
        str(work / "outputs_ours"),
        "--loras-dir",
        str(work / "loras"),
        "--input-roots",
        str(work / "inputs"),
        "--http",
        f"127.0.0.1:{port}",
        "--worker-id",
        "bench",
    ]
    result: dict[str, Any] = {
        "phase": phase.name,
        "prefix": prefix,
        "cold": phase.cold,
        "env": {**(extra_env or {}), **dict(phase.env)},
        "command": " ".join(command[1:]),
        "complete": False,
        "at_start": {"compile_cache": cache_state(models), "eta_stats_rows": eta_stats_rows(db)},
        "ids": ids,
        "keys": {task_id: task.key for task_id, task in zip(ids, scale.tasks, strict=True)},
    }
    sampler = GpuSampler().start()
    log_file = (out / f"worker_{phase.name}.log").open("wb")
    process = subprocess.Popen(command, cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    listener: EventListener | None = None
    poller: TablePoller | None = None
    try:
        result["startup_s"] = round(wait_healthy(port, process, 180), 2)
        listener = EventListener(port).start()
        poller = TablePoller(db, ids).start()
        time.sleep(0.3)
        result["inserted_at"] = time.time()
        insert_rows(db, scale, images, ids)
        log(f"{phase.name}: {len(ids)} rows inserted ({prefix}00-...)")
        try:
            result["queue_eta"] = snapshot_queue(port, db, ids)
        except Exception:  # the predictions are one measurement among many: the queue still runs
            result["queue_eta"] = {"error": traceback.format_exc()}
        travel_children = len(next(t for t in scale.tasks if t.travel).travel["segment_frames"]) + 1  # type: ignore[index]
        expected = len(ids) + travel_children
        while time.time() < deadline:
            if process.poll() is not None:
                result["worker_exit"] = process.returncode
                break
            statuses = dict(poller.statuses)
            if len(statuses) >= expected and all(s in TERMINAL for s in statuses.values()):
                result["complete"] = True
                break
            time.sleep(0.2)
        result["ended_at"] = time.time()
        if not result["complete"]:
            result["stopped_by"] = "deadline" if time.time() >= deadline else "worker exit"
        time.sleep(0.5)  # the last events
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        stop_started = time.monotonic()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            if not result.get("complete"):
                time.sleep(0.5)
                process.send_signal(signal.SIGTERM)  # the second stop abandons the running task
            try:  # up to 60 s to stop; past the deadline only what keeps the device call inside its limit
                process.wait(timeout=max(10.0, min(60.0, deadline + 20 - time.time())))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                result["killed"] = True
        result["stop_s"] = round(time.monotonic() - stop_started, 2)
        result["worker_exit"] = process.returncode
        log_file.close()
        if listener is not None:
            listener.stop()
        if poller is not None:
            poller.stop()
        sampler.stop()
        # What the next warm phase starts from (this worker has exited).
        with contextlib.suppress(OSError):
            state = {"phase": phase.name, "scale": "tiny" if scale.tiny else "full", "complete": result["complete"]}
            (work / STATE_FILE).write_text(json.dumps({**state, "ended_at": time.time()}))
    result["events"] = listener.events if listener else []
    result["events_error"] = listener.error if listener else None
    result["table"] = (
        {
            "first_progress": poller.first_progress,
            "first_running": poller.first_running,
            "ended": poller.ended,
        }
        if poller
        else {}
    )
    try:
        result["rows"] = read_rows(db, ids)
    except sqlite3.Error as exc:
        result["rows"] = []
        result["rows_error"] = str(exc)
    result["gpu_samples"] = sampler.samples
    result["gpu_error"] = sampler.error
    return result


# ---- plain: the same tasks through diffusers, in a fresh process ------------------------------------------


class PlainClock:
    """Per-call stage marks: first transformer call (encode ends), each step end, the call's end."""

    def __init__(self, pipe: Any, sync: Any) -> None:
        self.sync = sync
        self.first: float | None = None
        self.steps: list[float] = []
        self.handle = pipe.transformer.register_forward_pre_hook(self._first)

    def _first(self, _module: Any, _args: Any) -> None:
        if self.first is None:
            self.sync()
            self.first = time.perf_counter()

    def callback(self, _pipe: Any, _index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.sync()
        self.steps.append(time.perf_counter())
        return kwargs

    def close(self) -> list[float]:
        self.handle.remove()
        marks = [self.first, *self.steps] if self.first is not None else []
        return [b - a for a, b in itertools.pairwise(marks)]


def plain_main(work: Path, out: Path, tiny: bool, deadline: float) -> int:
    """The plain script: each model loaded once, the tasks in queue order, the same writer."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanVACEPipeline
    from PIL import Image

    from travel_between_images import build_segment_guide, plan_travel, stitch_videos
    from wan_engine.tiny_models import TINY_MODEL_DIRS
    from wan_engine.video_io import to_uint8, write_video

    scale = queue_for(tiny)
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    folders = (
        {scale.t2v: TINY_MODEL_DIRS["tiny_t2v"], scale.vace: TINY_MODEL_DIRS["tiny_vace"]}
        if tiny
        else {scale.t2v: T2V_DIR, scale.vace: VACE_DIR}
    )
    outputs = work / "outputs_plain"
    outputs.mkdir(parents=True, exist_ok=True)
    images = [np.asarray(Image.open(work / "inputs" / f"key{i}.png").convert("RGB")) for i in range(4)]
    result: dict[str, Any] = {"tasks": [], "loads": {}, "complete": False}
    sampler = GpuSampler().start()
    pipes: dict[str, Any] = {}

    def save() -> None:
        result["gpu_samples"] = sampler.samples
        (out / "plain.json").write_text(json.dumps(result, default=str))

    def pipe_for(model: str) -> Any:
        if model not in pipes:
            started = time.perf_counter()
            folder = work / "models" / folders[model]
            cls = WanVACEPipeline if model == scale.vace else WanPipeline
            vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
            pipe = cls.from_pretrained(folder, vae=vae, torch_dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            pipes[model] = pipe.to(device)
            sync()
            result["loads"][model] = round(time.perf_counter() - started, 3)
        return pipes[model]

    def generate(pipe: Any, task_key: str, width: int, height: int, frames: int, steps: int, seed: int, **extra: Any):
        clock = PlainClock(pipe, sync)
        sync()
        started = time.perf_counter()
        output = pipe(
            prompt=extra.pop("prompt", PROMPT),
            negative_prompt=preset_negative(extra.pop("preset")),
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=clock.callback,
            **extra,
        )
        sync()
        ended = time.perf_counter()
        step_times = clock.close()
        video = output.frames[0]
        timing = {
            "encode": (clock.first or ended) - started,
            "denoise": (clock.steps[-1] if clock.steps else ended) - (clock.first or started),
            "decode": ended - (clock.steps[-1] if clock.steps else ended),
            "step_times": [round(s, 4) for s in step_times],
        }
        return video, timing

    result["started_at"] = time.time()
    t0 = time.perf_counter()
    try:
        for task in scale.tasks:
            if time.time() > deadline:
                result["stopped_by"] = "deadline"
                break
            entry: dict[str, Any] = {"key": task.key, "started_at": time.time()}
            task_start = time.perf_counter()
            had = task.model in pipes
            pipe = pipe_for(task.model)
            entry["load_s"] = 0.0 if had else result["loads"][task.model]
            if task.travel:
                plan = plan_travel(
                    len(images), task.travel["segment_frames"], task.travel["frame_overlap"], TRAVEL_PROMPTS, task.seed
                )
                paths, tail, segments = [], None, []
                for seg in plan.segments:
                    guide, mask = build_segment_guide(
                        seg, task.width, task.height, images[seg.start_image_index], images[seg.end_image_index], tail
                    )
                    video, timing = generate(
                        pipe,
                        task.key,
                        task.width,
                        task.height,
                        seg.frames,
                        task.steps,
                        seg.seed,
                        prompt=seg.prompt,
                        preset=task.model,
                        video=[Image.fromarray(f) for f in guide],
                        mask=[Image.fromarray(f) for f in mask],
                    )
                    write_start = time.perf_counter()
                    path = write_video(video, outputs / f"{task.key}-seg{seg.index:03d}.mp4", FPS)
                    timing["write"] = time.perf_counter() - write_start
                    tail = np.stack([to_uint8(f) for f in video[-max(plan.overlaps or (1,)) :]])
                    paths.append(path)
                    segments.append({"frames": seg.frames, **timing})
                stitch_start = time.perf_counter()
                stitch_videos(paths, plan.overlaps, outputs / f"{task.key}.mp4", FPS)
                entry["stitch"] = round(time.perf_counter() - stitch_start, 3)
                entry["segments"] = segments
            else:
                adapter = None
                lora_start = time.perf_counter()
                if task.lora:
                    adapter = task.lora[0]
                    pipe.load_lora_weights(str(work / "loras" / f"{adapter}.safetensors"), adapter_name=adapter)
                    pipe.set_adapters([adapter], [task.lora[1]])
                entry["loras"] = round(time.perf_counter() - lora_start, 3)
                video, timing = generate(
                    pipe, task.key, task.width, task.height, task.frames, task.steps, task.seed, preset=task.model
                )
                write_start = time.perf_counter()
                write_video(video, outputs / f"{task.key}.mp4", FPS)
                timing["write"] = time.perf_counter() - write_start
                if adapter:
                    unload_start = time.perf_counter()
                    pipe.unload_lora_weights()
                    timing["lora_unload"] = time.perf_counter() - unload_start
                entry.update(timing)
            entry["total"] = round(time.perf_counter() - task_start, 3)
            entry["ended_at"] = time.time()
            result["tasks"].append(entry)
            log(f"plain {task.key}: {entry['total']:.2f}s")
            save()
        else:
            result["complete"] = True
    except Exception:
        result["error"] = traceback.format_exc()
        log(result["error"])
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["ended_at"] = time.time()
    sampler.stop()
    result["gpu_error"] = sampler.error
    save()
    return 0


def run_plain(work: Path, out: Path, tiny: bool, deadline: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--plain-child", "--work", str(work), "--out", str(out)]
    command += ["--deadline-at", str(deadline)] + (["--tiny"] if tiny else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    path = out / "plain.json"
    path.unlink(missing_ok=True)
    exit_code: int | str
    with (out / "plain.log").open("wb") as log_file:
        try:
            exit_code = subprocess.run(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=max(30.0, deadline - time.time() + 30),
            ).returncode
        except subprocess.TimeoutExpired:  # killed in a task past its deadline: the tasks before it were saved
            exit_code = "killed at the deadline"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {"error": "plain.json missing"}
    except ValueError as exc:  # killed while writing it
        data = {"error": f"plain.json unreadable: {exc}"}
    data["exit"] = exit_code
    path.unlink(missing_ok=True)
    return data


# ---- analysis -------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def step_stats(step_times: list[float]) -> dict[str, Any]:
    rest = step_times[1:]
    per_step = statistics.median(rest) if rest else (step_times[0] if step_times else None)
    first_extra = step_times[0] - per_step if step_times and per_step is not None and rest else 0.0
    return {
        "steps": len(step_times),
        "first_step_s": round(step_times[0], 4) if step_times else None,
        "s_per_step": round(per_step, 4) if per_step is not None else None,
        "first_step_extra_s": round(max(0.0, first_extra), 3),
    }


def analyse_ours(ours: dict[str, Any]) -> dict[str, Any]:
    rows = {row["id"]: row for row in ours.get("rows", [])}
    events = ours.get("events", [])
    by_task: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("task_id"):
            by_task.setdefault(event["task_id"], []).append(event)
    table = ours.get("table", {})
    ended_table = {k: v[0] for k, v in (table.get("ended") or {}).items()}
    per_task = []
    first_of_model: dict[str, str] = {}
    for task_id, row in rows.items():
        result = row.get("result_data") if isinstance(row.get("result_data"), dict) else {}
        timings = result.get("timings") or {}
        params = row.get("params") if isinstance(row.get("params"), dict) else {}
        model = params.get("model") or result.get("model")
        evs = by_task.get(task_id, [])
        started = next((e["ts"] for e in evs if e["event"] == "generation_started"), None)
        completed = next(
            (e["ts"] for e in evs if e["event"] in ("generation_completed", "generation_failed", "task_cancelled")),
            ended_table.get(task_id),
        )
        progress = [e for e in evs if e["event"] == "progress"]
        first = progress[0] if progress else None
        first_denoise = next((e for e in progress if e.get("stage") == "denoising"), None)

        def eta_error(event: dict[str, Any] | None, end: float | None = completed) -> dict[str, Any] | None:
            if event is None or end is None or event.get("eta_seconds") is None:
                return None
            actual = end - event["ts"]
            eta = float(event["eta_seconds"])
            return {
                "stage": event.get("stage"),
                "step": event.get("step"),
                "eta_s": round(eta, 2),
                "actual_s": round(actual, 2),
                "error_pct": round(100.0 * (eta - actual) / actual, 1) if actual > 0 else None,
            }

        steps = [float(s) for s in timings.get("step_times") or []]
        start_eta = next((e.get("eta_seconds") for e in evs if e["event"] == "generation_started"), None)
        extra = result.get("extra") if isinstance(result.get("extra"), dict) else {}
        compile_info = (extra.get("speed") or {}).get("compile") or {}
        entry = {
            "id": task_id,
            "task_type": row.get("task_type"),
            "status": row.get("status"),
            "model": model,
            "shape": f"{result.get('resolution')}x{result.get('frames')}" if result.get("frames") else None,
            "load_s": result.get("load_seconds"),
            "model_loaded": result.get("model_loaded"),
            **{k: _round(timings.get(k)) for k in ("inputs", "loras", "encode", "denoise", "decode", "write", "total")},
            **step_stats(steps),
            "compiled": compile_info.get("compiled"),
            "compile_reason": compile_info.get("reason"),
            "write_overlapped": extra.get("write_overlapped"),
            # wan_engine.decode_overlap's record (absent: decoded on the loop); the A/B's check that the env took
            "decode_overlap": extra.get("decode_overlap"),
            "wall_s": round(completed - started, 3) if started and completed else None,
            "eta_first_report": eta_error(first),
            "eta_first_denoising": eta_error(first_denoise),
            "eta_at_start": eta_error({"ts": started, "eta_seconds": start_eta}) if started else None,
            "first_progress_table": (table.get("first_progress") or {}).get(task_id),
            "error": row.get("error_message"),
            "started_ts": started,
            "completed_ts": completed,
        }
        if steps and model and model not in first_of_model:
            first_of_model[model] = task_id
        entry["first_task_of_model"] = first_of_model.get(model) == task_id
        per_task.append(entry)
    return {"tasks": per_task}


START_ERROR_MIN_WAIT_S = 1.0  # a task starting within this of the snapshot: its error in % says nothing


def start_predictions(ours: dict[str, Any], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Each inserted task's predicted start (snapshot `now` + `starts_in`) against its real start (its first
    `generation_started` on /ws, else first seen In Progress in the table); the same for `done_in`
    against its end. Error % = (predicted - real wait) / real wait, the wait counted from the snapshot."""
    snap = ours.get("queue_eta") or {}
    now = snap.get("now")
    by_id = {t["id"]: t for t in tasks}
    running = (ours.get("table") or {}).get("first_running") or {}
    rows = []
    for task_id in ours.get("ids") or []:
        predicted = (snap.get("tasks") or {}).get(task_id)
        task = by_id.get(task_id, {})
        started = task.get("started_ts") or running.get(task_id)
        entry: dict[str, Any] = {"id": task_id, "predicted_start_in_s": None, "actual_start_in_s": None}
        if task_id == snap.get("current"):
            entry["note"] = "running at the snapshot"
        elif predicted is None:
            entry["note"] = "not in the snapshot"
        if now is None:
            rows.append(entry)
            continue
        for what, guess, real in (
            ("start", (predicted or {}).get("starts_in"), started),
            ("done", (predicted or {}).get("done_in"), task.get("completed_ts")),
        ):
            actual = real - now if real is not None else None
            entry[f"predicted_{what}_in_s"] = guess
            entry[f"actual_{what}_in_s"] = round(actual, 2) if actual is not None else None
            if guess is not None and actual is not None:
                entry[f"{what}_error_s"] = round(guess - actual, 2)
                entry[f"{what}_error_pct"] = (
                    round(100.0 * (guess - actual) / actual, 1) if actual >= START_ERROR_MIN_WAIT_S else None
                )
        rows.append(entry)

    def spread(key: str) -> dict[str, Any]:
        values = [r[key] for r in rows if r.get(key) is not None]
        worst = max(values, key=abs) if values else None
        return {"n": len(values), "median_abs_pct": _median([abs(v) for v in values]), "worst_pct": worst}

    return {
        "snapshot_after_insert_s": round(now - ours["inserted_at"], 3) if now and ours.get("inserted_at") else None,
        "snapshot_complete": snap.get("complete"),
        "snapshot_error": snap.get("error"),
        "tasks": rows,
        "start": spread("start_error_pct"),
        "done": spread("done_error_pct"),
        "within_25pct": all(abs(r["start_error_pct"]) <= 25 for r in rows if r.get("start_error_pct") is not None)
        if any(r.get("start_error_pct") is not None for r in rows)
        else None,
    }


def _round(value: Any, digits: int = 3) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) else value


def summarise_worker(ours: dict[str, Any]) -> dict[str, Any]:
    """One worker phase: wall, GPU busy, compile, ETAs, start predictions, LoRA ratio, stage sums."""
    summary: dict[str, Any] = {}
    tasks = analyse_ours(ours)["tasks"]
    summary["tasks"] = tasks
    ends = [t["completed_ts"] for t in tasks if t["completed_ts"]]
    inserted = ours.get("inserted_at")
    wall = (max(ends) - inserted) if ends and inserted else None
    summary["wall_s"] = round(wall, 2) if wall else None
    summary["complete"] = ours.get("complete")
    summary["startup_s"] = ours.get("startup_s")
    summary["at_start"] = ours.get("at_start")
    summary["env"] = ours.get("env")
    gens = [t for t in tasks if t["steps"]]
    first = min(gens, key=lambda t: t["started_ts"] or 1e30) if gens else None
    busy_start = None
    if first is not None:
        events = [e for e in ours.get("events", []) if e.get("task_id") == first["id"] and e.get("event") == "progress"]
        denoise = next((e for e in events if e.get("stage") == "denoising"), None)
        if denoise is not None:  # step 0 is reported as denoising starts; a later step after it ran
            busy_start = denoise["ts"] - (0.0 if not denoise.get("step") else first["first_step_s"] or 0.0)
    sampler = GpuSampler()
    sampler.samples = [tuple(s) for s in ours.get("gpu_samples", [])]  # type: ignore[misc]
    summary["gpu_busy"] = sampler.busy(busy_start, max(ends) if ends else None)
    # An eager task (the policy's `compiled: false`) compiles nothing: its first-step extra is the input work
    # that step 1's clock includes (a VACE segment's guide encode), which plain diffusers counts as encode.
    compiled_later = [t for t in gens if not t["first_task_of_model"] and t["compiled"] is not False]
    compile_after_first = sum(t["first_step_extra_s"] for t in compiled_later)
    compile_all = sum(t["first_step_extra_s"] for t in gens)
    summary["compile"] = {
        "first_step_extra_all_s": round(compile_all, 2),
        "first_step_extra_eager_s": round(sum(t["first_step_extra_s"] for t in gens if t["compiled"] is False), 2),
        "after_each_models_first_task_s": round(compile_after_first, 2),
        "share_of_wall_pct": round(100 * compile_after_first / wall, 2) if wall else None,
        "all_share_of_wall_pct": round(100 * compile_all / wall, 2) if wall else None,
    }
    errors = [abs(t["eta_first_report"]["error_pct"]) for t in tasks if t["eta_first_report"]]
    summary["eta_first_report_median_abs_pct"] = _median([e for e in errors if e is not None])
    signed = [t["eta_first_report"]["error_pct"] for t in tasks if t["eta_first_report"]]
    signed = [e for e in signed if e is not None]
    summary["eta_first_report_worst_pct"] = max(signed, key=abs) if signed else None
    den = [abs(t["eta_first_denoising"]["error_pct"]) for t in tasks if t["eta_first_denoising"]]
    summary["eta_first_denoising_median_abs_pct"] = _median([e for e in den if e is not None])
    summary["start_eta"] = start_predictions(ours, tasks)
    keys = ours.get("keys") or {}
    by_key = {keys[t["id"]]: t for t in tasks if t["id"] in keys}
    base = by_key.get("t2v_49f_portrait", {}).get("s_per_step")
    summary["lora_ratio"] = {
        k: round(by_key[k]["s_per_step"] / base, 3)
        for k in ("lora_a_49f", "lora_b_49f")
        if base and k in by_key and by_key[k].get("s_per_step")
    }
    stages: dict[str, float] = {}
    for t in tasks:
        for k in ("load_s", "inputs", "loras", "encode", "denoise", "decode", "write"):
            if isinstance(t.get(k), (int, float)):
                stages[k] = round(stages.get(k, 0.0) + float(t[k]), 2)
    summary["stage_sums_s"] = stages
    overlapped = [
        t for t in gens if isinstance(t.get("decode_overlap"), dict) and t["decode_overlap"].get("overlapped")
    ]
    summary["decode_overlapped"] = f"{len(overlapped)} of {len(gens)}"
    return summary


def summarise_plain(plain: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    ptasks = plain.get("tasks", [])
    started = plain.get("started_at")
    ended = max((t["ended_at"] for t in ptasks), default=None)
    summary["plain_wall_s"] = round(ended - started, 2) if started and ended else None
    summary["plain_complete"] = plain.get("complete")
    first_steps = ptasks[0].get("step_times") if ptasks else None
    busy_start = None
    if ptasks and first_steps:
        t0 = ptasks[0]
        busy_start = t0["started_at"] + t0.get("load_s", 0) + t0.get("loras", 0) + t0.get("encode", 0)
    sampler = GpuSampler()
    sampler.samples = [tuple(s) for s in plain.get("gpu_samples", [])]  # type: ignore[misc]
    summary["plain_gpu_busy"] = sampler.busy(busy_start, ended)
    per = {}
    for t in ptasks:
        steps = t.get("step_times") or [s for seg in t.get("segments", []) for s in seg.get("step_times", [])]
        per[t["key"]] = {**step_stats(steps), "total": t.get("total"), "load_s": t.get("load_s")}
        per[t["key"]].update({k: _round(t.get(k)) for k in ("loras", "encode", "denoise", "decode", "write")})
        if t.get("segments"):
            per[t["key"]]["segments"] = t["segments"]
            per[t["key"]]["stitch"] = t.get("stitch")
    summary["plain_tasks"] = per
    base = per.get("t2v_49f_portrait", {}).get("s_per_step")
    summary["plain_lora_ratio"] = {
        k: round(per[k]["s_per_step"] / base, 3) for k in ("lora_a_49f", "lora_b_49f") if base and k in per
    }
    return summary


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Every phase that ran, each on its own: one phase's broken data is an error entry, not a lost summary."""
    summary: dict[str, Any] = {"errors": {}}
    if isinstance(results.get("plain"), dict) and "tasks" in results["plain"]:
        try:
            summary.update(summarise_plain(results["plain"]))
        except Exception:
            summary["errors"]["plain"] = traceback.format_exc()
    for name in WORKER_PHASES:
        data = results.get(name)
        if not isinstance(data, dict) or "ids" not in data:
            continue
        try:
            summary.update({f"{name}_{key}": value for key, value in summarise_worker(data).items()})
        except Exception:
            summary["errors"][name] = traceback.format_exc()
        if summary.get(f"{name}_wall_s") and summary.get("plain_wall_s"):
            summary[f"wall_ratio_{name}_vs_plain"] = round(summary[f"{name}_wall_s"] / summary["plain_wall_s"], 3)
    if summary.get("ours_warm_nooverlap_wall_s") and summary.get("ours_warm_wall_s"):
        ratio = summary["ours_warm_nooverlap_wall_s"] / summary["ours_warm_wall_s"]
        summary["wall_ratio_ours_warm_nooverlap_vs_ours_warm"] = round(ratio, 3)
    return summary


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value}%"


def markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    plain = summary.get("plain_tasks", {})
    names = [n for n in WORKER_PHASES if f"{n}_tasks" in summary]
    for name in names:
        lines += [
            f"### {name}",
            "",
            f"| task ({name}) | status | shape | load s | encode s | denoise s | decode s | write s | s/step | "
            "first-step extra s | compiled | ETA at first report: eta / actual s (err %) | plain s/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in summary[f"{name}_tasks"]:
            eta = t.get("eta_first_report")
            eta_text = f"{eta['eta_s']} / {eta['actual_s']} ({eta['error_pct']}%, {eta['stage']})" if eta else "-"
            key = t["id"].split("-", 1)[1] if "-" in t["id"] else None
            p = plain.get(key, {}) if key else {}
            shape = t["shape"] if t["shape"] and not t["shape"].startswith("None") else "-"
            lines.append(
                f"| {t['id']} | {t['status']} | {shape} | {t['load_s']} | {t['encode']} | {t['denoise']} | "
                f"{t['decode']} | {t['write']} | {t['s_per_step']} | {t['first_step_extra_s']} | {t['compiled']} | "
                f"{eta_text} | {p.get('s_per_step', '-')} |"
            )
        start = summary.get(f"{name}_start_eta") or {}
        lines += [
            "",
            f"Queued-task start predictions ({name}; /api/status {start.get('snapshot_after_insert_s')} s after the "
            f"insert, complete snapshot: {start.get('snapshot_complete')}):",
            "",
            "| task | predicted start in s | real s | error s (%) | predicted done in s | real s | error s (%) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in start.get("tasks", []):
            lines.append(
                f"| {r['id']} | {r.get('predicted_start_in_s')} | {r.get('actual_start_in_s')} | "
                f"{r.get('start_error_s', '-')} ({_pct(r.get('start_error_pct'))}) | {r.get('predicted_done_in_s')} | "
                f"{r.get('actual_done_in_s')} | {r.get('done_error_s', '-')} ({_pct(r.get('done_error_pct'))})"
                + (f" {r['note']}" if r.get("note") else "")
                + " |"
            )
        lines.append("")
    has_plain = "plain_tasks" in summary
    columns = [*names, *(["plain"] if has_plain else [])]

    def row(label: str, values: list[Any]) -> str:
        return f"| {label} | " + " | ".join("-" if v is None else str(v) for v in values) + " |"

    def get(name: str, key: str, *path: str) -> Any:
        value = summary.get(f"{name}_{key}")
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def ours_row(label: str, key: str, *path: str) -> str:
        if not names:  # plain alone: no worker rows
            return ""
        return row(label, [get(n, key, *path) for n in names]) + (" - |" if has_plain else "")  # plain has none

    table = [
        "| whole queue | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        row("wall s", [get(n, "wall_s") for n in columns]),
        row("complete", [get(n, "complete") for n in columns]),
        row("/ plain", [summary.get(f"wall_ratio_{n}_vs_plain") for n in names] + ([1] if has_plain else [])),
        ours_row("worker start-up s", "startup_s"),
        row("GPU busy (mean util %)", [get(n, "gpu_busy", "mean_util_pct") for n in columns]),
        ours_row("compile after each model's first task (compiled tasks), % of wall", "compile", "share_of_wall_pct"),
        ours_row("first-step extra, all tasks s", "compile", "first_step_extra_all_s"),
        ours_row("first-step extra of eager tasks s (no compile: input encode)", "compile", "first_step_extra_eager_s"),
        row("LoRA s/step / same task without", [get(n, "lora_ratio") for n in columns]),
        ours_row("median abs ETA error at first report %", "eta_first_report_median_abs_pct"),
        ours_row("worst ETA error at first report %", "eta_first_report_worst_pct"),
        ours_row("start predictions: median abs error %", "start_eta", "start", "median_abs_pct"),
        ours_row("start predictions: worst error %", "start_eta", "start", "worst_pct"),
        ours_row("start predictions within 25%", "start_eta", "within_25pct"),
        ours_row("done predictions: median abs error %", "start_eta", "done", "median_abs_pct"),
        ours_row("compile cache files at start", "at_start", "compile_cache", "files"),
        ours_row("eta_stats rows at start", "at_start", "eta_stats_rows"),
        ours_row("decode overlapped (tasks)", "decode_overlapped"),
        ours_row("worker env", "env"),
        ours_row("stage sums s", "stage_sums_s"),
    ]
    lines += [line for line in table if line]
    if summary.get("wall_ratio_ours_warm_nooverlap_vs_ours_warm"):
        lines.append(
            f"\nours_warm_nooverlap / ours_warm wall: {summary['wall_ratio_ours_warm_nooverlap_vs_ours_warm']}"
        )
    for name, error in (summary.get("errors") or {}).items():
        lines.append(f"\n{name}: summary failed: {error.strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def phase_deadline(now: float, deadline: float, left: list[str]) -> float:
    """This phase's share of the time left, by PHASE_WEIGHT over the phases still to run (it included)."""
    weights = [PHASE_WEIGHT[name] for name in left]
    return now + max(0.0, deadline - now) * weights[0] / sum(weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/worker_queue_bench"))
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a dry run of every path")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="whole run, model building included")
    parser.add_argument(
        "--phases", default="plain,ours,ours_warm", help=f"comma-separated, run in this order; of {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in every worker phase's environment (repeatable; e.g. WAN_OVERLAP_DECODE=off)",
    )
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.plain_child:
        return plain_main(args.work, args.out, args.tiny, args.deadline_at or time.time() + 600)
    try:
        phases = parse_phases(args.phases)
        extra_env = parse_worker_env(args.worker_env)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.time()
    deadline = started + args.deadline_s
    scale = queue_for(args.tiny)
    scale_name = "tiny" if args.tiny else "full"
    results: dict[str, Any] = {
        "scale": scale_name,
        "phases": phases,
        "worker_env": extra_env,
        "deadline_s": args.deadline_s,
        "queue": [asdict(t) for t in scale.tasks],
    }
    path = args.out / "worker_queue.json"

    def save() -> None:
        path.write_text(json.dumps(results, indent=1, default=str))

    # Before building anything: a warm phase without the state it needs fails here, not minutes later.
    problems = missing_prerequisites(phases, args.work, scale_name)
    if problems:
        results["error"] = "; ".join(problems)
        save()
        for problem in problems:
            log(f"error: {problem}")
        return 2
    try:
        results["assets"] = build_assets(args.work, scale)
        log(f"assets: {results['assets'].get('models')}")
    except Exception:
        results["error"] = traceback.format_exc()
        save()
        log(results["error"])
        return 1
    for index, name in enumerate(phases):
        now = time.time()
        if deadline - now < 20:
            results[name] = {"skipped": f"deadline ({deadline - now:.0f} s left)"}
            log(f"{name}: skipped, {deadline - now:.0f} s left")
            save()
            continue
        until = phase_deadline(now, deadline, phases[index:])
        log(f"{name}: starting, {until - now:.0f} s of the {deadline - now:.0f} s left")
        try:  # one phase failing (or its data) costs that phase only
            if name == "plain":
                data = run_plain(args.work, args.out, args.tiny, until)
            else:
                data = run_worker(
                    args.work, args.out, scale, results["assets"]["images"], until, WORKER_PHASES[name], extra_env
                )
        except Exception:
            data = {"error": traceback.format_exc()}
        data["phase_s"] = round(time.time() - now, 1)
        results[name] = data
        log(f"{name}: complete={data.get('complete')} error={data.get('error')} in {data['phase_s']} s")
        save()
    results["summary"] = summarise(results)
    results["seconds"] = round(time.time() - started, 1)
    save()
    text = markdown(results["summary"])
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
