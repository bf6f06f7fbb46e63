"""Warm a fresh process for its first model load, on a background thread, while the worker starts.

A model load in a new process pays, besides reading the weights, for what only the first load needs:
diffusers' Wan pipeline and model modules (diffusers imports them lazily; seconds), on CUDA the device
context and the cuBLAS / cuDNN handles, and torch's compiler stack (dynamo, inductor, triton) that the
speed path imports. A worker that warms these while it migrates the database, checks its models and
starts its HTTP server hands its first task a process that only has weights left to read.

`WanOrchestrator` starts one `ProcessWarmup` when it is created and waits for it at its first load, so a
task claimed at once waits for nothing it would not have waited for anyway. A failed warm-up step is
logged and skipped: the load then does that step itself, as it always did.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

import torch

from wan_engine.speed import SpeedSettings

log = logging.getLogger(__name__)

# What the first load and the first task resolve lazily (module, attributes): the Wan pipeline modules (the
# first costs ~2 s on a 2-core CPU; the i2v pipeline adds ~0.02 s and a torchvision notice, so it is left to
# its first load), the text encoder and tokenizer, and peft's LoRA layers.
CLASS_IMPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "diffusers",
        (
            "WanPipeline",
            "WanVACEPipeline",
            "AutoencoderKLWan",
            "WanTransformer3DModel",
            "WanVACETransformer3DModel",
            "UniPCMultistepScheduler",
            "FlowMatchEulerDiscreteScheduler",
        ),
    ),
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


class ProcessWarmup:
    """One background warm-up of this process for `device`; `wait()` joins it (at the first load)."""

    def __init__(self, device: torch.device, *, compiler: bool) -> None:
        self.device = device
        self.compiler = compiler
        self.seconds: dict[str, float] = {}  # step -> seconds it took
        self.errors: dict[str, str] = {}  # step -> why it was skipped
        self._thread = threading.Thread(target=self._run, name="wan-process-warmup", daemon=True)

    @classmethod
    def start(cls, device: torch.device, *, compiler: bool) -> ProcessWarmup:
        warmup = cls(device, compiler=compiler)
        warmup._thread.start()
        return warmup

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> float:
        """Block until the warm-up ended (or `timeout`); returns the seconds spent waiting."""
        started = time.perf_counter()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return time.perf_counter() - started

    def _run(self) -> None:
        started = time.perf_counter()
        self._step("imports", _import_classes)
        if self.device.type == "cuda":
            self._step("cuda", lambda: _warm_cuda(self.device))
            if self.compiler:
                self._step("compiler", _import_compiler)
        total = time.perf_counter() - started
        log.info(
            "process warmed for the first load in %.2fs (%s)%s",
            total,
            ", ".join(f"{step} {seconds:.2f}s" for step, seconds in self.seconds.items()),
            "".join(f"; {step} skipped: {why}" for step, why in self.errors.items()),
            extra={"event": "process_warmup", "seconds": round(total, 3)},
        )

    def _step(self, name: str, step: Any) -> None:
        started = time.perf_counter()
        try:
            step()
        except Exception as exc:  # a warm-up must never fail the worker: the load does it instead
            self.errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.seconds[name] = round(time.perf_counter() - started, 3)


def _import_classes() -> None:
    for module_name, attributes in CLASS_IMPORTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional package (peft) that is not installed: its users import it themselves
            continue
        for attribute in attributes:
            getattr(module, attribute, None)  # diffusers / transformers import the class's module here


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
