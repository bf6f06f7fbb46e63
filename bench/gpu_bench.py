"""One-run GPU benchmark: plain diffusers vs this worker (orchestrator + daemon) on full-size Wan models.

Random weights at the official architectures (speed does not depend on the values):
- Wan 2.1 T2V 1.3B and 14B and Wan 2.2 T2V A14B (two 14B experts) at 832x480, 81 frames, CFG;
- the Wan 2.1 VAE at its full default config; a small random UMT5 text encoder with the real width
  (d_model 4096, 2 of 24 layers): it only changes prompt-encoding time, not a denoising step.

Sections (each guarded: a failure is recorded and the next one runs; a deadline skips what would not fit):
  env     GPU, versions, bf16 matmul ceiling, pinned host<->device copy rate
  m13     1.3B saved as a diffusers folder; plain = `WanPipeline.from_pretrained(...).to("cuda")` as a user
          writes it; attention kernels and CFG batching measured eagerly on one forward; VAE decode with
          and without cuDNN autotuning; ours = WanOrchestrator.load_model (speed path) on the same folder;
          s/step, compile time, MFU, peak VRAM, rel. error of the final latents vs plain (same seed)
  daemon  tasks through HeadlessTaskQueue (SQLite) with the model resident vs the same pipeline called
          directly with the same parameters + the same MP4 writer: the daemon's overhead per task
  switch  1.3B parked in pinned RAM and taken back (vs disk loads, cold and warm page cache)
  m14     14B and A14B in memory: plain eager vs the same modules after `apply_speed_path`; then a
          14B park/restore through the pinned-RAM cache

          + the same bf16 modules group-offloaded under a VRAM cap (--vram-limit-gib, default 24) against
          the resident run; then fp8 blocks on them (in place, last); m13 also loads the 1.3B with fp8

  capped  the orchestrator under a VRAM cap (--capped-limit-gib, default 5): the 1.3B stays in host RAM at
          load, `auto` picks an offload profile, the video is written

  fp8switch  an fp8 1.3B parked in pinned RAM and taken back twice: the same frames after

Options: --sections (any of env,m13,capped,fp8switch,daemon,switch,m14,a14b, run in that order of listing),
--skip (extras: the kernel / CFG-batching / VAE measurements; noise: plain with FA2; variant: compile without
emulated casts; fp32: the float32 reference; pin14: the 14B park/restore; lowvram; fp8), --daemon-steps,
--daemon-tasks, --deadline-s.

Device:   bash bench/device_run.sh            (writes results.json, summary.md, bench.log under $OUT)
CPU dry run of every code path on tiny models:  python bench/gpu_bench.py --tiny --out /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from wan_engine.speed import SpeedSettings, apply_speed_path, wan_tokens, wan_transformer_flops  # noqa: E402

_COMMON = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
CONFIG_13B = {**_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
CONFIG_14B = {**_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
TINY = {**_COMMON, "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2}
TINY = {**TINY, "text_dim": 32, "rope_max_seq_len": 32}
UMT5_SMALL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64}  # umt5-xxl width
UMT5_TINY = {"d_model": 32, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 4}
VAE_TINY = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100 SXM (and H200)
MODEL_13B_DIR = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # where the t2v_1.3B preset looks in the models dir
PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"
A14B_BOUNDARY = 0.875
A14B_SHIFT = 12.0


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark flavour: the full-size GPU run or the tiny CPU dry run."""

    name: str
    device: str
    dtype: torch.dtype
    width: int
    height: int
    frames: int
    small: dict[str, Any]
    large: dict[str, Any]
    umt5: dict[str, Any]
    vae: dict[str, Any]
    steps: int = 5  # 1.3B timed runs: first step is warm-up (compilation), the median of the rest is reported
    large_steps: int = 3
    dual_steps: int = 5  # shift 12, boundary 0.875: timesteps 999, 979, 947, 889 (high-noise), 750 (low-noise)
    daemon_steps: int = 10
    daemon_tasks: int = 2


FULL = Scale("full", "cuda", torch.bfloat16, 832, 480, 81, CONFIG_13B, CONFIG_14B, UMT5_SMALL, {})
TINY_SCALE = Scale(
    "tiny", "cpu", torch.float32, 64, 64, 9, TINY, {**TINY, "num_layers": 3}, UMT5_TINY, VAE_TINY, daemon_steps=3
)


# ---- bookkeeping -------------------------------------------------------------------------------


class Bench:
    """Results, logging and the deadline shared by all sections."""

    def __init__(self, out: Path, deadline_s: float, scale: Scale) -> None:
        self.out = out
        self.scale = scale
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.results: dict[str, Any] = {"scale": scale.name, "errors": {}, "skipped": []}
        self.log_file = (out / "bench.log").open("a")
        self.speed_settings = SpeedSettings()
        self.skip: set[str] = set()
        self.vram_limit_gib = 24.0
        self.capped_limit_gib = 5.0

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    @contextmanager
    def section(self, name: str, needs_s: float) -> Iterator[bool]:
        """Run a section if `needs_s` seconds remain; record (not raise) its failure."""
        if self.remaining() < needs_s:
            self.log(f"SKIP {name}: {self.remaining():.0f}s left, needs ~{needs_s:.0f}s")
            self.results["skipped"].append(name)
            yield False
            return
        self.log(f"== {name}")
        started = time.monotonic()
        try:
            yield True
        except Exception as exc:
            self.results["errors"][name] = traceback.format_exc()
            self.log(f"FAILED {name}: {type(exc).__name__}: {exc}")
        finally:
            self.results.setdefault("section_seconds", {})[name] = round(time.monotonic() - started, 1)
            free()
            self.save()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gib(nbytes: float) -> float:
    return round(nbytes / 1024**3, 3)


def peak_gib() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    sync()
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    sync()
    return value, time.perf_counter() - started


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- building full-size random-weight components -------------------------------------------------


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(config: dict[str, Any], scale: Scale, seed: int) -> Any:
    """A random WanTransformer3DModel built directly on the device, dtypes as from_pretrained leaves them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(scale.device), default_dtype(scale.dtype):
        model = WanTransformer3DModel(**config)
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():  # from_pretrained keeps these in float32
        if any(part in name.split(".") for part in keep):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_scheduler(flow_shift: float) -> Any:
    """UniPC with flow sigmas, as the Wan diffusers repos ship it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )


def build_common(scale: Scale, flow_shift: float = 3.0) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE (float32) and scheduler, on the device."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from wan_engine.tiny_models import _tokenizer

    tokenizer = _tokenizer()
    torch.manual_seed(1)
    with torch.device(scale.device), default_dtype(scale.dtype):
        config = UMT5Config(
            vocab_size=len(tokenizer),
            **scale.umt5,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        text_encoder = UMT5EncoderModel(config).eval().requires_grad_(False)
    with torch.device(scale.device):
        vae = AutoencoderKLWan(**scale.vae).eval().requires_grad_(False)  # float32 like the real VAE
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": build_scheduler(flow_shift)}


def module_bytes(*modules: Any) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# ---- timing a pipeline call ----------------------------------------------------------------------


class StepTimer:
    """Per-step times of one pipeline call: synchronised at the first transformer call and each step end."""

    def __init__(self, pipe: Any) -> None:
        self.marks: list[float] = []
        self.handles = [
            m.register_forward_pre_hook(self._first)
            for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if m is not None
        ]

    def _first(self, _module: Any, _args: Any) -> None:
        if not self.marks:
            sync()
            self.marks.append(time.perf_counter())

    def callback(self, _pipe: Any, _index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync()
        self.marks.append(time.perf_counter())
        return kwargs

    def close(self) -> list[float]:
        for handle in self.handles:
            handle.remove()
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def denoise(pipe: Any, scale: Scale, steps: int, *, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """One timed pipeline call to latents; per-step times, final latents, peak VRAM."""
    timer = StepTimer(pipe)
    reset_peak()
    graphs = dynamo_graphs()
    kwargs = {
        "prompt": PROMPT,
        "negative_prompt": "blurry, low quality",
        "height": scale.height,
        "width": scale.width,
        "num_frames": scale.frames,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "latent",
        "callback_on_step_end": timer.callback,
        **extra,
    }
    try:
        with torch.no_grad():
            latents = pipe(**kwargs).frames
    finally:
        step_times = timer.close()
    steady = step_times[1:] or step_times
    median = statistics.median(steady)
    return {
        "step_times": [round(t, 4) for t in step_times],
        "s_per_step": round(median, 4),
        "spread": [round(min(steady), 4), round(max(steady), 4)],
        "first_step": round(step_times[0], 3),
        "compile_s": round(step_times[0] - median, 2),
        "peak_vram_gib": peak_gib(),
        "finite": bool(torch.isfinite(latents).all()),
        "new_dynamo_graphs": dynamo_graphs() - graphs,
        "latents": latents,
    }


def mfu(config: dict[str, Any], scale: Scale, s_per_step: float, ceiling: float | None, cfg: bool = True) -> dict:
    flops = (2 if cfg else 1) * wan_transformer_flops(config, wan_tokens(scale.width, scale.height, scale.frames))
    return {
        "step_tflop": round(flops / 1e12, 1),
        "achieved_tflops": round(flops / s_per_step / 1e12, 1),
        "mfu_vs_spec": round(flops / s_per_step / H100_BF16_PEAK, 3),
        "mfu_vs_measured": round(flops / s_per_step / ceiling, 3) if ceiling else None,
        "floor_s_at_measured": round(flops / ceiling, 3) if ceiling else None,
    }


def strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "latents"}


# ---- sections ------------------------------------------------------------------------------------


def section_env(bench: Bench) -> None:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=gib(props.total_memory), sms=props.multi_processor_count)
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            _, seconds = timed(lambda: a @ b)
            times.append(seconds)
        env["matmul_tflops"] = round(2 * 8192**3 / statistics.median(times) / 1e12, 1)
        del a, b
        host = torch.empty(2 * 1024**3, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host)
        _, h2d = timed(lambda: dev.copy_(host, non_blocking=True))
        _, d2h = timed(lambda: host.copy_(dev, non_blocking=True))
        env["pinned_h2d_gbps"] = round(host.numel() / h2d / 1e9, 1)
        env["pinned_d2h_gbps"] = round(host.numel() / d2h / 1e9, 1)
        del host, dev
    bench.results["env"] = env
    bench.log(json.dumps(env))


def _forward_inputs(scale: Scale, batch: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(11)
    latent = (batch, 16, 1 + (scale.frames - 1) // 4, scale.height // 8, scale.width // 8)
    text_dim = scale.small["text_dim"]
    return {
        "hidden_states": torch.randn(latent, generator=generator).to(scale.device, scale.dtype),
        "timestep": torch.full((batch,), 500.0, device=scale.device),
        "encoder_hidden_states": torch.randn(batch, 512, text_dim, generator=generator).to(scale.device, scale.dtype),
    }


def _forward(transformer: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _median_forward(transformer: Any, inputs: dict[str, torch.Tensor], repeats: int = 2) -> tuple[torch.Tensor, float]:
    out = _forward(transformer, inputs)  # warm-up (cuDNN plans, autotuning)
    times = []
    for _ in range(repeats):
        out, seconds = timed(lambda: _forward(transformer, inputs))
        times.append(seconds)
    return out, statistics.median(times)


def _save_13b_folder(bench: Bench, folder: Path, res: dict[str, Any]) -> None:
    from diffusers import WanPipeline

    scale = bench.scale
    transformer = build_transformer(scale.small, scale, seed=3)
    pipe = WanPipeline(transformer=transformer, **build_common(scale))
    _, seconds = timed(pipe.save_pretrained, folder, safe_serialization=True)
    res["folder_gb"] = round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 2)
    res["save_s"] = round(seconds, 1)
    res["transformer_gib"] = gib(module_bytes(transformer))
    del pipe, transformer
    free()
    bench.log(f"saved 1.3B folder: {res['folder_gb']} GB in {res['save_s']}s")


def section_capped(bench: Bench, state: dict[str, Any]) -> None:
    """The orchestrator end to end under a VRAM cap: `auto` keeps the 1.3B weights in host RAM at load
    (they do not fit), picks an offload profile from its estimate, and writes the video."""
    from headless_wgp import WanOrchestrator

    scale, res = bench.scale, bench.results.setdefault("capped", {})
    models_dir: Path = state["models_dir"]
    folder = models_dir / MODEL_13B_DIR
    if not folder.is_dir():
        _save_13b_folder(bench, folder, res)
    limit = bench.capped_limit_gib if scale.device == "cuda" else None
    orchestrator = WanOrchestrator(models_dir, vram_limit_gb=limit)
    try:
        load_s = orchestrator.load_model("t2v_1.3B")
        loaded = orchestrator._loaded
        assert loaded is not None
        on_device_at_load = loaded.loaded_on_device
        result = orchestrator.generate_t2v(
            PROMPT,
            output_path=state["work"] / "capped.mp4",
            resolution=f"{scale.width}x{scale.height}",
            video_length=scale.frames,
            num_inference_steps=scale.steps,
            seed=1,
        )
    finally:
        if limit is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        orchestrator.unload_model()
        orchestrator.model_cache.clear()
    steps = result.timings["step_times"]
    res.update(
        limit_gib=limit,
        load_s=round(load_s, 2),
        loaded_on_device=on_device_at_load,
        memory_profile=result.memory_profile,
        ladder=result.extra["memory_profile_ladder"],
        vae_tiled=bool(getattr(loaded.pipe.vae, "use_tiling", False)),
        step_times=[round(t, 3) for t in steps],
        s_per_step=round(statistics.median(steps[1:] or steps), 4),
        decode_s=round(result.timings["decode"], 2),
        total_s=round(result.timings["total"], 2),
        peak_vram_gib=None if result.peak_vram_gb is None else round(result.peak_vram_gb, 3),
        output_bytes=result.output_path.stat().st_size,
    )
    bench.log(f"capped 1.3B: {json.dumps(res)}")


def section_fp8_switch(bench: Bench, state: dict[str, Any]) -> None:
    """An fp8 model through the pinned-RAM cache: park, take back, and the same frames as before."""
    from headless_wgp import WanOrchestrator
    from wan_engine.video_io import read_video_frames

    scale, res = bench.scale, bench.results.setdefault("fp8_switch", {})
    models_dir: Path = state["models_dir"]
    folder = models_dir / MODEL_13B_DIR
    if not folder.is_dir():
        _save_13b_folder(bench, folder, res)
    orchestrator = WanOrchestrator(models_dir, fp8=True)
    params = {"resolution": f"{scale.width}x{scale.height}", "video_length": 17, "num_inference_steps": 2, "seed": 4}
    try:
        orchestrator.load_model("t2v_1.3B")
        before = orchestrator.generate_t2v(PROMPT, output_path=state["work"] / "fp8_a.mp4", **params)
        loaded, cache = orchestrator._loaded, orchestrator.model_cache
        assert loaded is not None
        for _ in range(2):  # the first park allocates the pinned slab, the second reuses it
            assert cache.park("t2v_1.3B", loaded), "the fp8 model fits the pinned-RAM budget"
            assert cache.take("t2v_1.3B") is loaded
        after = orchestrator.generate_t2v(PROMPT, output_path=state["work"] / "fp8_b.mp4", **params)
    finally:
        orchestrator.unload_model()
        orchestrator.model_cache.clear()
    a, b = (read_video_frames(r.output_path).astype(int) for r in (before, after))
    res.update(
        transfers=cache.stats()["transfers"],
        same_frames=bool((a == b).all()),
        max_abs_diff=int(abs(a - b).max()),
        fp8=before.extra["fp8"],
    )
    bench.log(f"fp8 park/restore: {json.dumps(res, default=str)}")


def section_m13(bench: Bench, state: dict[str, Any]) -> None:
    from diffusers import AutoencoderKLWan, WanPipeline

    from headless_wgp import WanOrchestrator

    scale, res = bench.scale, bench.results.setdefault("m13", {})
    ceiling = bench.results.get("env", {}).get("matmul_tflops")
    ceiling = ceiling * 1e12 if ceiling else None
    models_dir: Path = state["models_dir"]
    folder = models_dir / MODEL_13B_DIR

    # 1. Save a full-size random 1.3B pipeline as a diffusers folder (what the orchestrator loads).
    _save_13b_folder(bench, folder, res)

    # 2. Plain diffusers, as a user writes it (VAE in float32, the rest in bf16).
    def load_plain() -> Any:
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        loaded = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=scale.dtype)
        loaded.set_progress_bar_config(disable=True)
        return loaded.to(scale.device)

    plain, seconds = timed(load_plain)
    res["plain_load_s"] = round(seconds, 2)
    run = denoise(plain, scale, scale.steps)
    plain_latents = run.pop("latents")
    res["plain"] = {**run, **mfu(scale.small, scale, run["s_per_step"], ceiling)}
    bench.log(f"plain 1.3B: {run['s_per_step']} s/step (steps {run['step_times']})")
    bench.save()

    # 3. Plain's own forward on fixed inputs (the reference of the forward-level errors below).
    inputs = _forward_inputs(scale)
    reference, seconds = _median_forward(plain.transformer, inputs)
    forwards: dict[str, torch.Tensor] = {"plain": reference.cpu()}
    if "noise" not in bench.skip:  # plain's own bf16 noise: the same pipeline with another exact kernel (FA2)
        plain.transformer.set_attention_backend("_native_flash")
        run = denoise(plain, scale, scale.steps)
        forwards["plain_fa2"] = _forward(plain.transformer, inputs).cpu()
        res["plain_fa2"] = {
            **strip(run),
            "rel_err_latents_vs_plain": rel_err(run["latents"], plain_latents),
            "rel_err_forward_vs_plain": rel_err(forwards["plain_fa2"], reference),
        }
        plain.transformer.set_attention_backend("native")
        bench.log(f"plain with FA2: {json.dumps(res['plain_fa2'])}")
    if "extras" not in bench.skip:
        _m13_extras(bench, plain, inputs, reference, plain_latents)
        plain.transformer.set_attention_backend("native")

    # 4. Variant: the speed path without emulate_precision_casts (inductor's default numerics).
    if "variant" not in bench.skip and scale.device == "cuda":
        import torch._inductor.config as inductor_config

        apply_speed_path(plain, scale.device, bench.speed_settings)
        inductor_config.emulate_precision_casts = False
        run = denoise(plain, scale, scale.steps)
        res["variant_no_emulate"] = {
            **strip(run),
            "rel_err_latents_vs_plain": rel_err(run["latents"], plain_latents),
            "ratio_s_per_step": round(run["s_per_step"] / res["plain"]["s_per_step"], 3),
        }
        forwards["variant_no_emulate"] = _forward(plain.transformer, inputs).cpu()
        res["variant_no_emulate"]["rel_err_forward_vs_plain"] = rel_err(forwards["variant_no_emulate"], reference)
        bench.log(f"variant (no emulate_precision_casts): {json.dumps(res['variant_no_emulate'])}")
        torch._dynamo.reset()  # ours compiles afresh with the speed path's own settings
        inductor_config.emulate_precision_casts = True
    del plain
    free()

    # 5. Ours: the orchestrator's load (speed path on) and the same timed call on its pipeline.
    orchestrator = WanOrchestrator(models_dir)
    seconds = orchestrator.load_model("t2v_1.3B")
    loaded = orchestrator._loaded
    assert loaded is not None
    if not bench.speed_settings.require_cuda and scale.device != "cuda":  # CPU dry run of the compiled path
        loaded.speed = apply_speed_path(loaded.pipe, scale.device, bench.speed_settings)
    res["ours_load_s"] = round(seconds, 2)
    res["speed_report"] = loaded.speed.to_dict() if loaded.speed else None
    bench.log(f"ours load {seconds:.2f}s, speed: {res['speed_report']}")
    run = denoise(loaded.pipe, scale, scale.steps)
    ours_latents = run.pop("latents")
    res["ours"] = {**run, **mfu(scale.small, scale, run["s_per_step"], ceiling)}
    res["rel_err_latents_vs_plain"] = rel_err(ours_latents, plain_latents)
    forwards["ours"] = _forward(loaded.main_transformer, inputs).cpu()
    res["rel_err_forward_vs_plain"] = rel_err(forwards["ours"], reference)
    res["ratio_s_per_step"] = round(res["ours"]["s_per_step"] / res["plain"]["s_per_step"], 3)
    res["sdp_flags_after_ours"] = sdp_flags()
    bench.log(
        f"ours 1.3B: {run['s_per_step']} s/step, compile {run['compile_s']}s, ratio {res['ratio_s_per_step']}, "
        f"rel err latents {res['rel_err_latents_vs_plain']:.2e} forward {res['rel_err_forward_vs_plain']:.2e}"
    )
    bench.save()

    # 6. A float32 reference of the same forward: how far plain bf16 and ours each are from it.
    if scale.device == "cuda" and "fp32" not in bench.skip:
        del reference
        free()
        try:
            from diffusers import WanTransformer3DModel
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with torch.device(scale.device):  # an eager float32 copy of the same weights
                fp32 = WanTransformer3DModel.from_config(loaded.main_transformer.config).float().eval()
            fp32.load_state_dict(loaded.main_transformer.state_dict())
            fp32.set_attention_backend("native")
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # float32 kernels
                ref32 = _forward(fp32, {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
            res["rel_err_forward_vs_fp32"] = {name: rel_err(out, ref32) for name, out in forwards.items()}
            del fp32, ref32
        except Exception as exc:
            res["rel_err_forward_vs_fp32"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        bench.log(f"vs float32: {res['rel_err_forward_vs_fp32']}")
    state["orchestrator"] = orchestrator

    # 7. Optional fp8 (WAN_FP8=on): the orchestrator's own fp8 load of the same folder.
    if "fp8" not in bench.skip:
        with bench.section("m13_fp8", 40) as run_it:
            if run_it:
                _m13_fp8(bench, models_dir, plain_latents, inputs, forwards["plain"], ceiling)


def sdp_flags() -> dict[str, bool]:
    """torch's global SDPA kernel switches (a compiled `sdpa_kernel` must leave them as it found them)."""
    cuda = torch.backends.cuda
    return {
        "flash": cuda.flash_sdp_enabled(),
        "mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled(),
    }


def _m13_extras(
    bench: Bench, plain: Any, inputs: dict[str, torch.Tensor], reference: torch.Tensor, latents: Any
) -> None:
    """Attention kernels and CFG batching on one eager forward; VAE decode with and without cuDNN autotuning."""
    from wan_engine.pipeline_runtime import decode_latents

    res = bench.results["m13"]
    kernels: dict[str, Any] = {}
    for name in ("native", "_native_flash", "_native_cudnn", "_native_efficient"):
        try:
            plain.transformer.set_attention_backend(name)
            out, seconds = _median_forward(plain.transformer, inputs)
            kernels[name] = {"forward_s": round(seconds, 4), "rel_err_vs_default": rel_err(out, reference)}
        except Exception as exc:
            kernels[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    res["attention_kernels_eager_forward"] = kernels
    bench.log(f"kernels: {json.dumps(kernels)}")
    measured = [k for k in kernels if "forward_s" in kernels[k]]
    best = min(measured, key=lambda k: kernels[k]["forward_s"])
    plain.transformer.set_attention_backend(best)
    batch2 = _forward_inputs(bench.scale, batch=2)
    _, two = _median_forward(plain.transformer, inputs)
    _, one = _median_forward(plain.transformer, batch2)
    res["cfg_batching_eager"] = {"kernel": best, "two_batch1_s": round(2 * two, 4), "one_batch2_s": round(one, 4)}
    res["cfg_batching_eager"]["ratio"] = round(one / (2 * two), 3)
    bench.log(f"cfg batching: {res['cfg_batching_eager']}")
    _, seconds = timed(decode_latents, plain, latents)
    frames_default, seconds = timed(decode_latents, plain, latents)
    vae_res: dict[str, Any] = {"default_s": round(seconds, 3)}
    reset_peak()
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True):
        _, first = timed(decode_latents, plain, latents)
        frames_tuned, seconds = timed(decode_latents, plain, latents)
    vae_res.update(
        benchmark_first_s=round(first, 3),
        benchmark_s=round(seconds, 3),
        max_abs_diff=float(abs(frames_tuned - frames_default).max()),
        peak_vram_gib=peak_gib(),
    )
    res["vae_decode"] = vae_res
    bench.log(f"vae decode: {vae_res}")


def _m13_fp8(
    bench: Bench,
    models_dir: Path,
    plain_latents: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    reference: torch.Tensor,
    ceiling: float | None,
) -> None:
    from headless_wgp import WanOrchestrator

    scale, res = bench.scale, bench.results["m13"]
    orchestrator = WanOrchestrator(models_dir, fp8=True)
    seconds = orchestrator.load_model("t2v_1.3B")
    loaded = orchestrator._loaded
    assert loaded is not None
    if not bench.speed_settings.require_cuda and scale.device != "cuda":
        loaded.speed = apply_speed_path(loaded.pipe, scale.device, bench.speed_settings)
    run = denoise(loaded.pipe, scale, scale.steps)
    latents = run.pop("latents")
    res["fp8"] = {
        **run,
        **mfu(scale.small, scale, run["s_per_step"], ceiling),
        "load_s": round(seconds, 2),
        "quantized": loaded.fp8,
        "rel_err_latents_vs_plain": rel_err(latents, plain_latents),
        "rel_err_forward_vs_plain": rel_err(_forward(loaded.main_transformer, inputs).cpu(), reference),
        "ratio_vs_plain": round(run["s_per_step"] / res["plain"]["s_per_step"], 3),
        "ratio_vs_ours": round(run["s_per_step"] / res["ours"]["s_per_step"], 3),
    }
    bench.log(f"fp8 1.3B: {json.dumps(strip(res['fp8']), default=str)}")
    orchestrator.unload_model()
    orchestrator.model_cache.clear()


def _m14_lowvram(bench: Bench, pipe: Any, res: dict[str, Any], limit_gib: float) -> None:
    """The same bf16 14B modules, group-offloaded (the `group_offload` profile) under a VRAM cap."""
    from wan_engine.memory_profiles import apply_profile, apply_vram_limit

    scale = bench.scale
    device = torch.device(scale.device)
    apply_profile(pipe, "cpu", device, current="gpu")
    free()
    fraction = None
    try:
        fraction = apply_vram_limit(device, limit_gib)  # None on the CPU dry run
        _, setup_s = timed(apply_profile, pipe, "group_offload", device, current="cpu")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run = denoise(pipe, scale, scale.large_steps)
        reserved = gib(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        apply_profile(pipe, "gpu", device, current="group_offload")  # hooks off, back on the device
        free()
    latents = run.pop("latents")
    res["lowvram"] = {
        **run,
        "limit_gib": limit_gib,
        "memory_fraction": fraction,
        "peak_reserved_gib": reserved,
        "setup_s": round(setup_s, 2),
        "ratio_vs_resident_ours": round(run["s_per_step"] / res["ours"]["s_per_step"], 3),
        "ratio_vs_plain": round(run["s_per_step"] / res["plain"]["s_per_step"], 3),
        "rel_err_latents_vs_resident_ours": rel_err(latents, res.pop("_ours_latents")),
    }
    bench.log(f"14B group offload under {limit_gib} GiB: {json.dumps(res['lowvram'])}")


def _m14_fp8(bench: Bench, pipe: Any, res: dict[str, Any], plain_latents: torch.Tensor, ceiling: float | None) -> None:
    """fp8 blocks on the same 14B modules (in place: run last), compiled as the orchestrator runs them."""
    from wan_engine.fp8 import quantize_pipeline

    scale = bench.scale
    reports, seconds = timed(quantize_pipeline, pipe, torch.device(scale.device))
    free()
    run = denoise(pipe, scale, scale.large_steps)
    latents = run.pop("latents")
    res["fp8"] = {
        **run,
        **mfu(scale.large, scale, run["s_per_step"], ceiling),
        "quantized": reports,
        "quantize_s": round(seconds, 2),
        "rel_err_latents_vs_plain": rel_err(latents, plain_latents),
        "ratio_vs_plain": round(run["s_per_step"] / res["plain"]["s_per_step"], 3),
        "ratio_vs_ours": round(run["s_per_step"] / res["ours"]["s_per_step"], 3),
    }
    bench.log(f"fp8 14B: {json.dumps(res['fp8'], default=str)}")


def _resident_13b(bench: Bench, state: dict[str, Any]) -> None:
    """The orchestrator with the 1.3B model resident and compiled (after m14 freed it: reload, warm up)."""
    if "orchestrator" in state:
        return
    from headless_wgp import WanOrchestrator

    orchestrator = WanOrchestrator(state["models_dir"])
    seconds = orchestrator.load_model("t2v_1.3B")
    run = denoise(orchestrator._loaded.pipe, bench.scale, 2)  # compiles (or reuses) the 1.3B blocks
    bench.results.setdefault("reload_13b", {}).update(load_s=round(seconds, 2), warmup=strip(run))
    state["orchestrator"] = orchestrator


def section_daemon(bench: Bench, state: dict[str, Any]) -> None:
    from headless_model_management import GenerationTask, HeadlessTaskQueue
    from wan_engine.video_io import write_video

    scale, res = bench.scale, bench.results.setdefault("daemon", {})
    orchestrator = state["orchestrator"]
    work: Path = state["work"]
    preset = orchestrator.presets.get("t2v_1.3B")
    steps = scale.daemon_steps
    params = {
        "seed": 7,
        "num_inference_steps": steps,
        "resolution": f"{scale.width}x{scale.height}",
        "video_length": scale.frames,
    }
    negative = preset.settings.as_params().get("negative_prompt", "")
    pipe = orchestrator._loaded.pipe

    def reference(index: int) -> float:
        """The same work without the daemon: one pipeline call (prompt -> frames) and the same MP4 writer."""

        def run() -> Path:
            with torch.no_grad():
                frames = pipe(
                    prompt=PROMPT,
                    negative_prompt=negative,
                    height=scale.height,
                    width=scale.width,
                    num_frames=scale.frames,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(7),
                    output_type="np",
                ).frames[0]
            return write_video(frames, work / f"reference_{index}.mp4", fps=16)

        return timed(run)[1]

    references = [reference(0)]
    queue = HeadlessTaskQueue(  # on the resident, compiled model
        f"sqlite:///{work / 'tasks.db'}", outputs_dir=work / "outputs", orchestrator=orchestrator
    )
    loads_before = orchestrator.model_cache.transfers[:]
    ids = [
        queue.submit_task(GenerationTask(model="t2v_1.3B", prompt=PROMPT, parameters=params))
        for _ in range(scale.daemon_tasks)
    ]
    _, wall = timed(lambda: queue.run_forever(until_idle=True))
    references.append(reference(1))
    tasks = []
    for task_id in ids:
        task = queue.repository.get(task_id)
        data = task.result_data or {}
        claim_to_complete = (task.generation_processed_at - task.generation_started_at).total_seconds()
        tasks.append(
            {
                "status": task.status.value,
                "claim_to_complete_s": round(claim_to_complete, 3),
                "engine_total_s": round(data.get("timings", {}).get("total", float("nan")), 3),
                "model_loaded": data.get("model_loaded"),
                "speed": data.get("extra", {}).get("speed"),
                "error": task.error_message,
            }
        )
    runner = queue.runner
    res.update(
        steps=steps,
        tasks=tasks,
        reference_s=[round(r, 3) for r in references],
        queue_wall_s=round(wall, 3),
        model_loads_in_queue=runner.model_loads if runner else None,
        host_cache_transfers=len(orchestrator.model_cache.transfers) - len(loads_before),
    )
    task_s = statistics.median(t["claim_to_complete_s"] for t in tasks)
    engine_s = statistics.median(t["engine_total_s"] for t in tasks)
    ref_s = statistics.median(references)
    res["overhead_s"] = round(task_s - ref_s, 3)
    res["overhead_pct"] = round(100 * (task_s - ref_s) / task_s, 2)
    res["daemon_layer_s"] = round(task_s - engine_s, 3)  # claim..complete minus the orchestrator's own total
    res["engine_layer_s"] = round(engine_s - ref_s, 3)  # orchestrator total minus the plain call
    step_s = bench.results.get("m13", {}).get("ours", {}).get("s_per_step")
    if step_s:  # the same absolute overhead on a 50-step task (denoise scales, the rest does not)
        task_50 = task_s + (50 - steps) * step_s
        res["overhead_pct_at_50_steps_extrapolated"] = round(100 * res["overhead_s"] / task_50, 2)
    queue.close()
    bench.log(f"daemon: {json.dumps(res)}")


def section_switch(bench: Bench, state: dict[str, Any]) -> None:
    from wan_engine.model_cache import _slots
    from wan_engine.tiny_models import build_tiny_models

    scale, res = bench.scale, bench.results.setdefault("switch", {})
    orchestrator = state["orchestrator"]
    build_tiny_models(state["models_dir"])
    if orchestrator.current_model != "t2v_1.3B":
        orchestrator.load_model("t2v_1.3B")
    nbytes = _slots(orchestrator._loaded.pipe)[1]
    res["model_gb"] = round(nbytes / 1e9, 2)
    res["budget_gib"] = gib(orchestrator.model_cache.budget_bytes)
    rounds = []
    for _ in range(2):
        away = orchestrator.load_model("tiny_t2v")  # parks 1.3B, loads the tiny model from disk
        back = orchestrator.load_model("t2v_1.3B")  # pinned RAM -> GPU
        rounds.append({"switch_away_s": round(away, 3), "switch_back_s": round(back, 3)})
    res["rounds"] = rounds
    res["transfers"] = orchestrator.model_cache.stats()["transfers"]
    back = statistics.median(r["switch_back_s"] for r in rounds)
    res["switch_back_gbps"] = round(nbytes / back / 1e9, 1)
    run = denoise(orchestrator._loaded.pipe, scale, 3)  # still compiled after the round trip?
    res["after_switch"] = {k: run[k] for k in ("step_times", "new_dynamo_graphs", "finite")}
    bench.log(f"switch: {json.dumps(res)}")

    # Disk loads of the same model for comparison: cold page cache, then warm.
    orchestrator.unload_model()
    orchestrator.model_cache.clear()
    res["cold_cache"] = "not dropped (CPU dry run)"
    if scale.device == "cuda":  # only on the lent machine: dropping a shared host's page cache is rude
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            res["cold_cache"] = True
        except OSError as exc:
            res["cold_cache"] = f"could not drop the page cache: {exc}"
    res["disk_load_cold_s"] = round(orchestrator.load_model("t2v_1.3B"), 3)
    orchestrator.unload_model()
    res["disk_load_warm_s"] = round(orchestrator.load_model("t2v_1.3B"), 3)
    res["disk_cold_gbps"] = round(nbytes / res["disk_load_cold_s"] / 1e9, 2)
    res["disk_warm_gbps"] = round(nbytes / res["disk_load_warm_s"] / 1e9, 2)
    bench.log(f"disk loads: cold {res['disk_load_cold_s']}s warm {res['disk_load_warm_s']}s")


def _set_backend(pipe: Any, backend: str) -> None:
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.set_attention_backend(backend)


def section_m14(bench: Bench, state: dict[str, Any], dual: bool) -> None:
    from diffusers import WanPipeline

    from wan_engine.model_cache import ModelCache
    from wan_engine.speed import eager_blocks

    scale, res = bench.scale, bench.results.setdefault("m14", {})
    ceiling = bench.results.get("env", {}).get("matmul_tflops")
    ceiling = ceiling * 1e12 if ceiling else None
    orchestrator = state.pop("orchestrator", None)
    if orchestrator is not None:  # make room: the 1.3B model and its pinned copies go
        orchestrator.unload_model()
        orchestrator.model_cache.clear()
        del orchestrator
        free()
    common = build_common(scale)
    high = build_transformer(scale.large, scale, seed=5)
    res["transformer_gib"] = gib(module_bytes(high))
    pipe = WanPipeline(transformer=high, **common)
    pipe.set_progress_bar_config(disable=True)

    # 1. Plain eager 14B, then the same modules after the orchestrator's speed path.
    run = denoise(pipe, scale, scale.large_steps)
    plain_latents = run.pop("latents")
    res["plain"] = {**run, **mfu(scale.large, scale, run["s_per_step"], ceiling)}
    bench.log(f"plain 14B: {run['s_per_step']} s/step ({run['step_times']})")
    bench.save()
    report = apply_speed_path(pipe, scale.device, bench.speed_settings)
    res["speed_report"] = report.to_dict()
    run = denoise(pipe, scale, scale.large_steps)
    res["_ours_latents"] = run.pop("latents")  # the low-VRAM run's reference
    res["rel_err_latents_vs_plain"] = rel_err(res["_ours_latents"], plain_latents)
    res["ours"] = {**run, **mfu(scale.large, scale, run["s_per_step"], ceiling)}
    res["ratio_s_per_step"] = round(run["s_per_step"] / res["plain"]["s_per_step"], 3)
    res["sdp_flags_after_ours"] = sdp_flags()
    bench.log(f"ours 14B: {run['s_per_step']} s/step ratio {res['ratio_s_per_step']} ({run['step_times']})")
    bench.save()

    # 2. Switching: the 14B pipeline parked in pinned RAM and taken back, twice (the first park allocates).
    if "pin14" not in bench.skip and bench.remaining() > 60:
        cache = ModelCache(160 * 1024**3, scale.device)
        holder = SimpleNamespace(pipe=pipe)
        for _ in range(2):
            cache.park("t2v", holder)
            cache.take("t2v")
        res["pinned_transfers"] = cache.stats()["transfers"]
        run = denoise(pipe, scale, 2)  # still compiled, same output path after the round trip?
        res["after_switch"] = {k: run[k] for k in ("step_times", "new_dynamo_graphs", "finite")}
        cache.clear()
        bench.log(f"14B park/restore: {json.dumps(res['pinned_transfers'])}")
        bench.save()

    # 3. Wan 2.2 A14B: a second 14B expert. Plain = both experts eager with diffusers' default kernel
    #    (the speed path switched off at run time); ours = the same modules with it on.
    if dual and bench.remaining() > 120:
        low = build_transformer(scale.large, scale, seed=6)
        shifted = {**common, "scheduler": build_scheduler(A14B_SHIFT)}
        dual_pipe = WanPipeline(transformer=high, transformer_2=low, boundary_ratio=A14B_BOUNDARY, **shifted)
        dual_pipe.set_progress_bar_config(disable=True)
        backend = report.attention_backend
        apply_speed_path(
            SimpleNamespace(transformer_2=low),
            scale.device,
            SpeedSettings(
                attention=backend or "native",
                compile=report.enabled and bool(report.compiled),
                require_cuda=bench.speed_settings.require_cuda,
            ),
        )
        cfg = {"guidance_scale": 4.0, "guidance_scale_2": 3.0}
        _set_backend(dual_pipe, "native")
        with eager_blocks(True):
            run = denoise(dual_pipe, scale, scale.dual_steps, **cfg)
        dual_plain_latents = run.pop("latents")
        res["a14b_plain"] = {**run, **mfu(scale.large, scale, run["s_per_step"], ceiling)}
        bench.log(f"plain A14B: {run['s_per_step']} s/step ({run['step_times']})")
        bench.save()
        if backend:
            _set_backend(dual_pipe, backend)
        run = denoise(dual_pipe, scale, scale.dual_steps, **cfg)
        res["a14b_rel_err_latents_vs_plain"] = rel_err(run.pop("latents"), dual_plain_latents)
        res["a14b_ours"] = {**run, **mfu(scale.large, scale, run["s_per_step"], ceiling)}
        res["a14b_ratio_s_per_step"] = round(run["s_per_step"] / res["a14b_plain"]["s_per_step"], 3)
        res["a14b_expert_steps"] = f"{scale.dual_steps} steps, shift 12, boundary 0.875: high-noise then low-noise"
        bench.log(f"ours A14B: {run['s_per_step']} s/step ({run['step_times']})")
        del dual_pipe, low, dual_plain_latents
        free()

    # 4. Low VRAM: group offload with CUDA streams under a 24 GiB cap, against the resident run above.
    if "lowvram" not in bench.skip:
        with bench.section("m14_lowvram", 90) as run_it:
            if run_it:
                _m14_lowvram(bench, pipe, res, bench.vram_limit_gib)
    res.pop("_ours_latents", None)

    # 5. Optional fp8 on the same modules (quantises them in place, so it runs last).
    if "fp8" not in bench.skip:
        with bench.section("m14_fp8", 45) as run_it:
            if run_it:
                _m14_fp8(bench, pipe, res, plain_latents, ceiling)


def summary_markdown(results: dict[str, Any]) -> str:
    """The tables of docs/BENCHMARKS.md, filled from results.json."""
    lines = []
    env = results.get("env", {})
    lines.append(f"GPU {env.get('gpu')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, ")
    lines.append(f"matmul ceiling {env.get('matmul_tflops')} TFLOP/s, pinned H2D {env.get('pinned_h2d_gbps')} GB/s\n")
    lines.append(
        "| model | plain s/step | ours s/step | ratio | MFU plain / ours (spec) | compile s | rel. err "
        "| peak GiB plain / ours |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    rows = [
        ("Wan 2.1 1.3B", results.get("m13", {}), "", "rel_err_latents_vs_plain"),
        ("Wan 2.1 14B", results.get("m14", {}), "", "rel_err_latents_vs_plain"),
        ("Wan 2.2 A14B", results.get("m14", {}), "a14b_", "a14b_rel_err_latents_vs_plain"),
    ]
    for name, data, prefix, err_key in rows:
        plain, ours = data.get(f"{prefix}plain"), data.get(f"{prefix}ours")
        if not plain or not ours:
            continue
        ratio = data.get(f"{prefix}ratio_s_per_step")
        err = data.get(err_key)
        lines.append(
            f"| {name} | {plain['s_per_step']} | {ours['s_per_step']} | {ratio} | {plain['mfu_vs_spec']} / "
            f"{ours['mfu_vs_spec']} | {ours['compile_s']} | {err:.1e} | {plain['peak_vram_gib']} / "
            f"{ours['peak_vram_gib']} |"
        )
    for name, key in (("1.3B", "m13"), ("14B", "m14")):
        fp8 = results.get(key, {}).get("fp8")
        if fp8:
            lines.append(
                f"\nfp8 {name}: {fp8['s_per_step']} s/step, x{fp8['ratio_vs_plain']} plain, "
                f"x{fp8['ratio_vs_ours']} ours, "
                f"rel. err latents {fp8['rel_err_latents_vs_plain']:.2e}, peak {fp8['peak_vram_gib']} GiB"
            )
    low = results.get("m14", {}).get("lowvram")
    if low:
        lines.append(
            f"\n14B group offload under {low['limit_gib']} GiB: {low['s_per_step']} s/step, "
            f"x{low['ratio_vs_resident_ours']} resident, peak {low['peak_vram_gib']} GiB allocated / "
            f"{low['peak_reserved_gib']} GiB reserved"
        )
    daemon = results.get("daemon")
    if daemon:
        lines.append(f"\ndaemon: {json.dumps({k: v for k, v in daemon.items() if k != 'tasks'})}")
    switch = results.get("switch")
    if switch:
        lines.append(f"\nswitch: {json.dumps(switch)}")
    if results.get("errors"):
        lines.append(f"\nerrors in: {', '.join(results['errors'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--work", type=Path, default=None, help="models, database and videos (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on tiny models")
    parser.add_argument("--sections", default="env,m13,daemon,switch,m14,a14b")
    parser.add_argument("--deadline-s", type=float, default=500.0, help="skip sections that would not fit")
    parser.add_argument("--daemon-steps", type=int, default=None)
    parser.add_argument("--force-speed", action="store_true", help="apply the speed path on a CPU too (dry run)")
    parser.add_argument("--daemon-tasks", type=int, default=None)
    parser.add_argument(
        "--skip", default="", help="sub-measurements to leave out: extras,noise,variant,fp32,pin14,lowvram,fp8"
    )
    parser.add_argument("--vram-limit-gib", type=float, default=24.0, help="the 14B low-VRAM run's cap")
    parser.add_argument("--capped-limit-gib", type=float, default=5.0, help="the capped 1.3B run's cap")
    args = parser.parse_args(argv)
    scale = TINY_SCALE if args.tiny else FULL
    if args.daemon_steps:
        scale = dataclasses.replace(scale, daemon_steps=args.daemon_steps)
    if args.daemon_tasks:
        scale = dataclasses.replace(scale, daemon_tasks=args.daemon_tasks)

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="wan_bench_"))
    bench = Bench(args.out, args.deadline_s, scale)
    bench.speed_settings = SpeedSettings(require_cuda=not args.force_speed)
    bench.skip = set(filter(None, args.skip.split(",")))
    bench.vram_limit_gib = args.vram_limit_gib
    bench.capped_limit_gib = args.capped_limit_gib
    bench.results["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    state: dict[str, Any] = {"work": work, "models_dir": work / "models"}
    needs = {"env": 5, "m13": 120, "capped": 60, "fp8switch": 60, "daemon": 185, "switch": 30, "m14": 150}
    for name in args.sections.split(","):
        if name not in needs:
            continue  # "a14b" is an option of m14
        with bench.section(name, needs[name]) as run:
            if not run:
                continue
            if name == "env":
                section_env(bench)
            elif name == "m13":
                section_m13(bench, state)
            elif name == "capped":
                section_capped(bench, state)
            elif name == "fp8switch":
                section_fp8_switch(bench, state)
            elif name == "m14":
                section_m14(bench, state, dual="a14b" in args.sections.split(","))
            else:
                _resident_13b(bench, state)
                (section_daemon if name == "daemon" else section_switch)(bench, state)
    from torch._dynamo.utils import counters

    bench.results["dynamo"] = {"graph_breaks": dict(counters["graph_break"]), "stats": dict(counters["stats"])}
    bench.results["total_s"] = round(time.monotonic() - bench.started, 1)
    bench.save()
    summary = summary_markdown(bench.results)
    (args.out / "summary.md").write_text(summary)
    print(summary, flush=True)
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
