"""Warm a fresh process for its first model load, when the orchestrator is created.

A model load in a new process pays, besides reading the weights, for what only the first load needs:
diffusers' Wan pipeline and model modules (diffusers imports them lazily; seconds), on CUDA the device
context and the cuBLAS / cuDNN handles, and torch's compiler stack (dynamo, inductor, triton) that the
speed path imports. On the H200 a fresh process's first load of Wan 2.1 1.3B took 22.8 s without this and
1.35 s after it (plain diffusers: 1.3-1.9 s; bench/first_load_bench.py). `WanOrchestrator` runs it when it
is created, so a worker pays it during its start-up instead of inside its first task.

It runs in the caller's thread, not beside it: diffusers' lazy imports are not thread-safe (two threads
importing its modules at once can each see the other's half-initialised module and fail with `module
'diffusers' has no attribute ...`; wan_engine.pipeline_runtime.import_diffusers_classes), and a worker
starting up imports its HTTP stack meanwhile. A failed step is logged and skipped: the load then does that
step itself, as it always did.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from wan_engine.pipeline_runtime import import_diffusers_classes
from wan_engine.speed import SpeedSettings

log = logging.getLogger(__name__)

# Besides diffusers' classes (wan_engine.pipeline_runtime.ENGINE_DIFFUSERS_CLASSES), what the first load and
# the first task resolve lazily (module, attributes): the text encoder and tokenizer, diffusers' attention
# dispatcher (the speed path's kernel choice) and peft's LoRA layers.
OTHER_IMPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("transformers", ("UMT5EncoderModel", "AutoTokenizer")),
    ("diffusers.models.attention_dispatch", ()),
    ("peft", ("LoraConfig",)),
)
# The compiler stack the speed path imports at its first compile (CUDA only: elsewhere nothing compiles).
COMPILER_IMPORTS: tuple[str, ...] = ("torch._dynamo", "torch._inductor.compile_fx", "triton")


def speed_path_compiles() -> bool:
    """Whether this process's loads will compile (WAN_SPEED / WAN_COMPILE; a bad value: the load says so)."""
    try:
        settings = SpeedSettings.from_env()
    except ValueError:
        return False
    return settings.enabled and settings.compile


@dataclass
class WarmupReport:
    """What `warm_process` did: seconds per step, and the steps it skipped with why."""

    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return round(sum(self.seconds.values()), 3)


def warm_process(device: torch.device, *, compiler: bool) -> WarmupReport:
    """Import the engine's lazy modules and, on CUDA, warm the device and (`compiler`) the compiler stack."""
    report = WarmupReport()
    _step(report, "imports", _import_classes)
    if device.type == "cuda":
        _step(report, "cuda", lambda: _warm_cuda(device))
        if compiler:
            _step(report, "compiler", _import_compiler)
    log.info(
        "process warmed for the first load in %.2fs (%s)%s",
        report.total_s,
        ", ".join(f"{step} {seconds:.2f}s" for step, seconds in report.seconds.items()),
        "".join(f"; {step} skipped: {why}" for step, why in report.errors.items()),
        extra={"event": "process_warmup", "seconds": report.total_s},
    )
    return report


def _step(report: WarmupReport, name: str, step: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        step()
    except Exception as exc:  # a warm-up must never fail the worker: the load does it instead
        report.errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    report.seconds[name] = round(time.perf_counter() - started, 3)


def _import_classes() -> None:
    import_diffusers_classes()  # the first Wan pipeline class alone imports for ~2 s on a 2-core CPU
    for module_name, attributes in OTHER_IMPORTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional package (peft) that is not installed: its users import it themselves
            continue
        for attribute in attributes:
            getattr(module, attribute, None)  # transformers imports the class's module here


def _warm_cuda(device: torch.device) -> None:
    """The context, cuBLAS (a bf16 matmul) and cuDNN (a 3-D convolution, as the VAE runs) on `device`."""
    with torch.cuda.device(device):
        torch.cuda.init()
        x = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
        (x @ x).sum().item()
        volume = torch.ones(1, 4, 3, 8, 8, device=device)
        torch.nn.functional.conv3d(volume, torch.ones(4, 4, 1, 3, 3, device=device), padding=(0, 1, 1)).sum().item()
        torch.cuda.synchronize(device)


def _import_compiler() -> None:
    for module_name in COMPILER_IMPORTS:
        importlib.import_module(module_name)
