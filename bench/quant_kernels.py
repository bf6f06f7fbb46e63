"""Quantized Wan checkpoints: dequantize to bf16 at load, or keep the weights quantized (issue 14)?

Users have Wan2GP's optimum-quanto int8 files and ComfyUI's `fp8_scaled` files. The worker today
dequantizes both at load (wan_engine/checkpoint_formats.py). This benchmark measures, on a random
full-size Wan 2.1 T2V 1.3B transformer (diffusers `WanTransformer3DModel`, official config) at
832x480x81 (32,760 tokens) with CFG as one batch of 2, one forward per option:

- `int8_dequantized_bf16`: the quanto int8 weights (per-row int8 data + bf16 scale, as Wan2GP saves
  them) dequantized once into a bf16 model: what the loader does today. It is the reference of the
  int8 options (same numbers as the file, in bf16).
- `quanto_qint8_w8a16`: the same weights kept as optimum-quanto `qint8` (QLinear, frozen) with bf16
  activations, as Wan2GP runs them. On CUDA quanto's `qbytes_mm` dequantizes the weight on every call
  (its marlin kernels are for fp8/int4 weights; int8 x int8 `_int_mm` needs calibrated int8 activations).
- `torchao_int8_weight_only`: torchao `Int8WeightOnlyConfig` (per-row), kept int8.
- `torchao_int8_dynamic`: torchao `Int8DynamicActivationInt8WeightConfig` (per-token int8 activations,
  `torch._int_mm`): the real int8 tensor-core kernel; activation quantization adds error.
- `fp8_scaled_dequantized_bf16`: ComfyUI fp8_scaled weights (e4m3 + per-tensor float32 scale) dequantized
  into bf16: today's loader; the reference of the fp8 option.
- `fp8_scaled_kept_scaled_mm`: the file's e4m3 values kept, run through the worker's own `Fp8Linear`
  (wan_engine/fp8.py: `torch._scaled_mm`, per-token fp8 activations), the file's per-tensor scale as
  its per-column scale.

Each option: seconds per forward (median of the timed repeats, after one warm-up), resident weight
bytes, peak VRAM of the forward, and max abs / relative L2 error of its output against its reference.
`--compile` repeats the timing with the repeated blocks compiled (`wan_engine.speed.apply_speed_path`,
static shapes) for the options that compile. Every option gets the same attention kernel (diffusers'
default: torch SDPA). A deadline skips what would not fit; results are saved after every option.

Device: PYTHONPATH=/tmp/site:$PWD python3 bench/quant_kernels.py --out $OUT --compile --deadline-s 330
CPU dry run on a tiny model: python bench/quant_kernels.py --tiny --out /tmp/qk --compile
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpu_bench import _COMMON, CONFIG_13B  # noqa: E402  (the official 1.3B config, as every bench builds it)

from wan_engine.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, quantize_transformer  # noqa: E402
from wan_engine.speed import SpeedSettings, apply_speed_path  # noqa: E402

TINY = {**_COMMON, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 32, "num_layers": 2}
TINY = {**TINY, "text_dim": 32, "rope_max_seq_len": 32}
# Latent (frames, height, width) of 832x480x81 and of the tiny dry run; 512 text tokens as Wan pads to.
FULL_LATENT, TINY_LATENT = (21, 60, 104), (3, 8, 8)
REFERENCES = ("int8_dequantized_bf16", "fp8_scaled_dequantized_bf16")
COMPILABLE = ("int8_dequantized_bf16", "torchao_int8_weight_only", "torchao_int8_dynamic", "fp8_scaled_kept_scaled_mm")


class Run:
    """Results, log and deadline."""

    def __init__(self, out: Path, deadline_s: float) -> None:
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.results: dict[str, Any] = {"options": {}, "errors": {}, "skipped": []}

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        (self.out / "quant_kernels.json").write_text(json.dumps(self.results, indent=1, default=str))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def gib(nbytes: float) -> float:
    return round(nbytes / 1024**3, 3)


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the transformer blocks (~99% of the weights)."""
    found = []
    for block in model.blocks:
        for name, child in list(block.named_modules()):
            if isinstance(child, nn.Linear):
                parent_name, _, attribute = name.rpartition(".")
                found.append((block.get_submodule(parent_name) if parent_name else block, attribute, child))
    return found


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random WanTransformer3DModel on `device`, with `_keep_in_fp32_modules` in float32 as from_pretrained."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if any(part in name.split(".") for part in keep):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def as_quanto_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan2GP's quanto int8 layout: per-output-row absmax scale in the weight dtype, int8 data."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12).to(weight.dtype)
    data = torch.round(weight.float() / scale.float()).clamp(-127, 127).to(torch.int8)
    return data, scale


def as_fp8_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's fp8_scaled layout: e4m3 values and one float32 scale for the whole tensor."""
    scale = (weight.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_in_place(model: nn.Module, source: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """What the loader does: weight = scale * data, once, in the model dtype."""
    for index, (_parent, _attribute, linear) in enumerate(block_linears(model)):
        data, scale = source[index]
        linear.weight.data = (data.float() * scale.float()).to(linear.weight.dtype)


def inputs(config: dict[str, Any], latent: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator("cpu").manual_seed(7)
    frames, height, width = latent
    hidden = torch.randn(2, config["in_channels"], frames, height, width, generator=generator)
    text = torch.randn(2, 512, config["text_dim"], generator=generator)
    return {
        "hidden_states": hidden.to(device, dtype),
        "timestep": torch.tensor([500, 500], device=device),
        "encoder_hidden_states": text.to(device, dtype),
        "return_dict": False,
    }


def time_forward(model: nn.Module, feed: dict, device: torch.device, repeats: int) -> tuple[torch.Tensor, dict]:
    """Warm-up forward (timed apart: it holds compilation), then `repeats` timed forwards."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    out = None
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync(device)
            started = time.perf_counter()
            out = model(**feed)[0]
            sync(device)
            times.append(time.perf_counter() - started)
    assert out is not None
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return out.float().cpu(), {
        "first_s": round(times[0], 4),
        "s_per_forward": round(statistics.median(times[1:]), 4),
        "all_s": [round(t, 4) for t in times],
        "peak_vram_gib": gib(peak),
    }


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = out - ref
    return {
        "max_abs": float(diff.abs().max()),
        "rel_l2": float(diff.norm() / ref.norm().clamp_min(1e-30)),
        "ref_max_abs": float(ref.abs().max()),
    }


# ---- the options: each builds a model on the device from the CPU bf16 reference --------------------


def quanto_qint8(model: nn.Module) -> dict[str, Any]:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model.blocks, weights=qint8)
    freeze(model.blocks)
    return {"library": "optimum-quanto", "kernel": "qbytes_mm (dequantize per call, then bf16 matmul)"}


def torchao_int8(model: nn.Module, dynamic: bool) -> dict[str, Any]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    # set_inductor_config=False: torchao would otherwise change inductor settings for every later option too.
    config = (
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        if dynamic
        else Int8WeightOnlyConfig(set_inductor_config=False)
    )
    quantize_(model.blocks, config)
    kernel = (
        "torch._int_mm (per-token int8 activations)" if dynamic else "int8 weight, bf16 matmul (fused when compiled)"
    )
    return {"library": "torchao", "kernel": kernel}


def fp8_kept(model: nn.Module, fp8_source: dict[int, tuple[torch.Tensor, torch.Tensor]], align: int) -> dict[str, Any]:
    """Fp8Linear on every block linear, holding the file's e4m3 values and its per-tensor scale."""
    linears = block_linears(model)
    report = quantize_transformer(model, align)
    exact = 0
    for index, (parent, attribute, _linear) in enumerate(linears):
        layer = getattr(parent, attribute)
        if not isinstance(layer, Fp8Linear):
            continue
        data, scale = fp8_source[index]
        layer.weight.data = data.to(layer.weight.device)
        layer.weight_scale.data = scale.reshape(1, 1).expand(1, layer.out_features).to(layer.weight_scale).contiguous()
        exact += 1
    return {
        "library": "wan_engine.fp8 (torch._scaled_mm)",
        "kernel": "torch._scaled_mm e4m3, per-token activation scale, per-tensor weight scale",
        "fp8_layers": report.layers,
        "file_values_kept": exact,
    }


def measure_option(
    run: Run,
    name: str,
    make: Callable[[nn.Module], dict[str, Any]] | None,
    reference_model: nn.Module,
    reference_out: torch.Tensor | None,
    feed: dict,
    device: torch.device,
    repeats: int,
    compile_too: bool,
) -> torch.Tensor | None:
    """Build one option on the device, time it (eager, then compiled), compare with its reference."""
    needs = 25.0 if device.type == "cuda" else 1.0
    if run.left() < needs:
        run.log(f"SKIP {name}: {run.left():.0f}s left")
        run.results["skipped"].append(name)
        return None
    run.log(f"== {name}")
    result: dict[str, Any] = {}
    out = None
    try:
        free()
        before = allocated(device)
        model = copy.deepcopy(reference_model).to(device)
        result["how"] = make(model) if make else {"kernel": "bf16 matmul (cuBLAS)"}
        free()
        result["weights_vram_gib"] = gib(allocated(device) - before)
        out, result["eager"] = time_forward(model, feed, device, repeats)
        result["error_vs_reference"] = errors(out, reference_out) if reference_out is not None else None
        run.log(f"   eager {result['eager']['s_per_forward']:.4f} s/forward, weights {result['weights_vram_gib']} GiB")
        run.results["options"][name] = result
        run.save()
        if compile_too and name in COMPILABLE:
            if run.left() < (90.0 if device.type == "cuda" else 5.0):
                run.log(f"SKIP compile of {name}: {run.left():.0f}s left")
                run.results["skipped"].append(f"{name}:compiled")
            else:
                settings = SpeedSettings(attention="native", dynamic="off", cache_dir="off", require_cuda=False)
                apply_speed_path(SimpleNamespace(transformer=model), device, settings)
                compiled_out, result["compiled"] = time_forward(model, feed, device, repeats)
                result["compiled"]["compile_s"] = round(
                    result["compiled"]["first_s"] - result["compiled"]["s_per_forward"], 2
                )
                result["compiled"]["error_vs_eager"] = errors(compiled_out, out)
                if reference_out is not None:
                    result["compiled"]["error_vs_reference"] = errors(compiled_out, reference_out)
                run.log(f"   compiled {result['compiled']['s_per_forward']:.4f} s/forward")
        del model
    except Exception as exc:
        run.results["errors"][name] = traceback.format_exc()
        run.log(f"FAILED {name}: {type(exc).__name__}: {exc}")
    finally:
        run.results["options"][name] = result
        run.save()
        free()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (dry run of every path)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled blocks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=330.0)
    parser.add_argument("--options", default="all", help="comma-separated option names to run (default all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.deadline_s)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config, latent = (TINY, TINY_LATENT) if args.tiny else (CONFIG_13B, FULL_LATENT)
    run.results["env"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "Wan 2.1 T2V 1.3B (random)" if not args.tiny else "tiny",
        "tokens": latent[0] * (latent[1] // 2) * (latent[2] // 2),
        "batch": 2,
        "dtype": str(dtype),
    }
    for package in ("diffusers", "torchao", "optimum.quanto"):
        try:
            module = __import__(package, fromlist=["__version__"])
            run.results["env"][package] = getattr(module, "__version__", "?")
        except Exception as exc:  # recorded: the option that needs it fails with the same reason
            run.results["env"][package] = f"missing: {exc}"
    run.log(json.dumps(run.results["env"]))

    base = build_model(config, device, dtype)
    feed = inputs(config, latent, device, dtype)
    linears = block_linears(base)
    int8_source = {i: as_quanto_int8(lin.weight.data) for i, (_p, _a, lin) in enumerate(linears)}
    fp8_source = {i: as_fp8_scaled(lin.weight.data) for i, (_p, _a, lin) in enumerate(linears)}
    run.results["env"]["quantized_linears"] = len(linears)

    # References, kept on the CPU so that only the option being measured is on the device.
    original = base.to("cpu")
    int8_ref = copy.deepcopy(original)
    dequantize_in_place(int8_ref, int8_source)
    fp8_ref = copy.deepcopy(original)
    dequantize_in_place(fp8_ref, fp8_source)
    fp8_source = {i: (data.cpu(), scale.cpu()) for i, (data, scale) in fp8_source.items()}
    del int8_source
    free()

    wanted = None if args.options == "all" else set(args.options.split(","))

    def run_option(run: Run, name: str, *rest: Any, **kwargs: Any) -> torch.Tensor | None:
        # References always run (the others compare against them); other options only when asked for.
        if wanted is not None and name not in wanted and name not in REFERENCES:
            return None
        return measure_option(run, name, *rest, **kwargs)

    common = {"feed": feed, "device": device, "repeats": args.repeats, "compile_too": args.compile}
    original_out = run_option(run, "original_bf16", None, original, None, **{**common, "compile_too": False})
    int8_out = run_option(run, "int8_dequantized_bf16", None, int8_ref, None, **common)
    if int8_out is not None and original_out is not None:
        run.results["file_quantization_error"] = {"int8": errors(int8_out, original_out)}
    run_option(run, "torchao_int8_dynamic", lambda m: torchao_int8(m, True), int8_ref, int8_out, **common)
    run_option(run, "quanto_qint8_w8a16", quanto_qint8, int8_ref, int8_out, **common)
    run_option(run, "torchao_int8_weight_only", lambda m: torchao_int8(m, False), int8_ref, int8_out, **common)
    align = 16 if device.type == "cuda" else 1
    fp8_out = run_option(run, "fp8_scaled_dequantized_bf16", None, fp8_ref, None, **{**common, "compile_too": False})
    if fp8_out is not None and original_out is not None:
        run.results.setdefault("file_quantization_error", {})["fp8_scaled"] = errors(fp8_out, original_out)
    run_option(run, "fp8_scaled_kept_scaled_mm", lambda m: fp8_kept(m, fp8_source, align), fp8_ref, fp8_out, **common)
    run.results["seconds"] = round(time.monotonic() - run.started, 1)
    run.save()
    run.log(f"done: {args.out / 'quant_kernels.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
