"""LoRAs with constant multipliers fused into the base weights for one call, so the call runs compiled.

peft's LoRA layers wrap each targeted Linear and read their scale as a Python float: under
torch.compile a scale that changes per step is a new constant (a recompile per step), and even a
constant one wraps every Linear in code the plain model's compiled blocks never saw. When every
LoRA's multiplier is constant over the steps each expert runs, the call needs neither: each wrapped
Linear's weight becomes `W + sum(multiplier * scaling * B @ A)` (summed in float32, cast once), and the
wrapper is swapped out of its parent for the bare Linear, so the module tree (and the compiled code
that runs it) is exactly the plain model's. Afterwards the original weights, kept on the CPU, are
copied back bit for bit and the wrappers put back, with their scales set to the multipliers the call
used (what `LoraState.current` then says they are).

Weight deltas that are not peft layers (`.diff` / `diff_m`, `wan_engine.lora_formats.DeltaTable`)
are already applied to the weights and need nothing here. DoRA and other peft variants are not fused
(the call then runs eagerly).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from wan_engine.loras import Expert, LoraRequest, LoraState

log = logging.getLogger(__name__)

_COMPONENTS: dict[Expert, str] = {"high": "transformer", "low": "transformer_2"}
# The original weights are kept on the GPU when this much VRAM stays free beside them (a device copy and
# back is ~1000x faster than through host RAM); else in host RAM.
GPU_STASH_RESERVE_BYTES = 8 * 1024**3


@dataclass
class FusionPlan:
    """Per expert, the constant multiplier of each peft adapter loaded into it; or why none applies."""

    weights: dict[Expert, dict[str, float]] = field(default_factory=dict)
    reason: str = ""

    @property
    def fusible(self) -> bool:
        """True when the call can run with the LoRAs fused (a reason is set otherwise)."""
        return not self.reason


def constant_weights(
    state: LoraState, requests: Sequence[LoraRequest], experts_per_step: Sequence[Expert]
) -> FusionPlan:
    """Each expert's adapter multipliers, when every one is constant over that expert's steps."""
    plan = FusionPlan()
    for lora, request in zip(state.loaded, requests, strict=True):
        for expert in lora.experts:
            if not lora.peft_layers.get(expert):
                continue  # only weight deltas: already in the weights
            values = {
                request.multiplier.value_at(step, experts_per_step)
                for step, e in enumerate(experts_per_step)
                if e == expert
            }
            if len(values) > 1:
                return FusionPlan(reason=f"LoRA {request.name!r} changes its multiplier over the steps (schedule)")
            if values:
                plan.weights.setdefault(expert, {})[lora.adapter] = values.pop()
    return plan


def _tuner_layers(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """(parent, attribute, peft layer) for every peft LoRA layer inside `module`."""
    from peft.tuners.lora.layer import LoraLayer

    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer):
                found.append((parent, name, child))
    return found


def _base_scaling(layer: Any, adapter: str) -> float:
    # peft's scale at multiplier 1 (set_scale multiplies this by the adapter weight).
    rank = layer.r[adapter]
    alpha = layer.lora_alpha[adapter]
    return alpha / math.sqrt(rank) if layer.use_rslora.get(adapter, False) else alpha / rank


def _not_fusible(layer: Any, adapters: dict[str, float]) -> str | None:
    base = getattr(layer, "base_layer", None)
    if not isinstance(base, torch.nn.Linear):
        return f"a LoRA layer wraps {type(base).__name__}, not a Linear"
    if base.weight.is_meta:
        return "a LoRA layer's weight is offloaded (meta tensor)"
    for adapter in adapters:
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
            return f"adapter {adapter!r} is a DoRA/variant layer"
    if getattr(layer, "merged", False):
        return "a LoRA layer is merged already"
    return None


@dataclass
class _Fused:
    parent: torch.nn.Module
    name: str
    layer: Any
    original: torch.Tensor  # the base weight before fusing (a copy on the GPU or in host RAM)


def stash_device(weights: Sequence[torch.Tensor]) -> torch.device:
    """Where the original weights are copied: their own GPU when it keeps `GPU_STASH_RESERVE_BYTES` free
    beside the copies, else the CPU."""
    if not weights or weights[0].device.type != "cuda":
        return torch.device("cpu")
    device = weights[0].device
    needed = sum(w.numel() * w.element_size() for w in weights)
    free, _total = torch.cuda.mem_get_info(device)
    return device if free - needed >= GPU_STASH_RESERVE_BYTES else torch.device("cpu")


@torch.no_grad()
def _fuse_layer(layer: Any, adapters: dict[str, float], stash: torch.device) -> torch.Tensor:
    """Add the adapters' deltas to the base weight; return the original weight (a copy on `stash`)."""
    weight = layer.base_layer.weight
    original = weight.detach().to(stash, copy=True)
    total = weight.detach().float()
    for adapter, multiplier in adapters.items():
        if adapter not in layer.lora_A or multiplier == 0.0:
            continue
        a = layer.lora_A[adapter].weight.detach().to(weight.device, torch.float32)
        b = layer.lora_B[adapter].weight.detach().to(weight.device, torch.float32)
        total = total + (b @ a) * (multiplier * _base_scaling(layer, adapter))
    weight.data.copy_(total.to(weight.dtype))
    return original


@dataclass
class FusionReport:
    """What `fused_loras` did (recorded in result_data under speed.compile)."""

    fused: bool
    reason: str
    layers: int = 0
    seconds: float = 0.0
    stash: str = ""  # where the original weights were kept ("cuda:0", "cpu")


@contextmanager
def fused_loras(pipe: Any, plan: FusionPlan) -> Iterator[FusionReport]:
    """Within this block the pipeline's LoRA layers are fused into plain Linears (see the module doc).

    Yields a report; when the plan is not fusible, or a layer cannot be fused, nothing is changed and
    the report says why (the caller then runs eagerly).
    """
    if not plan.fusible:
        yield FusionReport(False, plan.reason)
        return
    started = time.perf_counter()
    targets: list[tuple[torch.nn.Module, str, Any, dict[str, float]]] = []
    for expert, adapters in plan.weights.items():
        module = getattr(pipe, _COMPONENTS[expert], None)
        if module is None:
            continue
        for parent, name, layer in _tuner_layers(module):
            active = {a: w for a, w in adapters.items() if a in layer.lora_A}
            if not active:
                continue
            why = _not_fusible(layer, active)
            if why is not None:
                yield FusionReport(False, why)
                return
            targets.append((parent, name, layer, active))
    done: list[_Fused] = []
    stash = stash_device([t[2].base_layer.weight for t in targets])
    try:
        for parent, name, layer, active in targets:
            done.append(_Fused(parent, name, layer, _fuse_layer(layer, active, stash)))
            setattr(parent, name, layer.base_layer)  # the bare Linear: the plain model's module tree
        report = FusionReport(True, "constant multipliers fused into the weights", len(done), stash=str(stash))
        report.seconds = time.perf_counter() - started
        log.info("LoRAs fused into %d layers (%.2fs)", len(done), report.seconds)
        yield report
    finally:
        _restore(done, {id(t[2]): t[3] for t in targets})


@torch.no_grad()
def _restore(done: list[_Fused], scales: dict[int, dict[str, float]]) -> None:
    """Copy every original weight back (bit for bit) and put the peft layers back in place."""
    for item in done:
        item.layer.base_layer.weight.data.copy_(item.original)
        setattr(item.parent, item.name, item.layer)
        for adapter, multiplier in scales.get(id(item.layer), {}).items():
            item.layer.set_scale(adapter, multiplier)  # what the call ran with, as LoraState.current records
