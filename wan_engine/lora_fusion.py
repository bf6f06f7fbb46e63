"""LoRAs fused into the base weights for one call, so the call runs compiled.

peft's LoRA layers wrap each targeted Linear and read their scale as a Python float: under
torch.compile a scale that changes per step is a new constant (a recompile per step), and even a
constant one wraps every Linear in code the plain model's compiled blocks never saw. The call needs
neither: each wrapped Linear's weight becomes `W + sum(multiplier * scaling * B @ A)` (summed in float32,
cast once), and the wrapper is swapped out of its parent for the bare Linear, so the module tree (and the
compiled code that runs it) is exactly the plain model's. Afterwards the original weights are copied back
bit for bit and the wrappers put back, with their scales set to the multipliers the call last used (what
`LoraState.current` then says they are).

A multiplier that changes over the steps (a schedule such as "1.0,0.5", or 3-phase multipliers whose two
phases on one expert differ) is re-fused at each step where it changes: from the kept original, so the
weights are always exactly `original + deltas` for the step's multipliers, never an accumulation of
rounding. Re-fusing takes about 0.08 s on an H200 for a rank-32 LoRA on the 1.3B model with the originals
kept on the GPU (docs/BENCHMARKS.md, *Queues*), against the +25% per step that running eagerly costs; so
a schedule is fused unless the originals had to go to host RAM and it changes more than
`MAX_CHANGES_FROM_HOST` times (each re-fuse then copies every original back from host RAM).

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


MAX_CHANGES_FROM_HOST = 2  # re-fuses a schedule may cost when the originals sit in host RAM (see above)


@dataclass
class FusionPlan:
    """Per expert, the multiplier of each peft adapter at the expert's first step, and the steps where
    they change (a schedule); or why the LoRAs cannot be fused."""

    weights: dict[Expert, dict[str, float]] = field(default_factory=dict)
    changes: dict[int, tuple[Expert, dict[str, float]]] = field(default_factory=dict)  # step -> new weights
    reason: str = ""

    @property
    def fusible(self) -> bool:
        """True when the call can run with the LoRAs fused (a reason is set otherwise)."""
        return not self.reason


def fusion_plan(state: LoraState, requests: Sequence[LoraRequest], experts_per_step: Sequence[Expert]) -> FusionPlan:
    """Each expert's adapter multipliers at its first step, and where a schedule changes them."""
    plan = FusionPlan()
    previous: dict[Expert, dict[str, float]] = {}
    for step, expert in enumerate(experts_per_step):
        weights = {
            lora.adapter: request.multiplier.value_at(step, experts_per_step)
            for lora, request in zip(state.loaded, requests, strict=True)
            if expert in lora.experts and lora.peft_layers.get(expert)  # only deltas: already in the weights
        }
        if not weights:
            continue
        if expert not in previous:
            plan.weights[expert] = weights
        elif weights != previous[expert]:
            plan.changes[step] = (expert, weights)
        previous[expert] = weights
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
    original = layer.base_layer.weight.detach().to(stash, copy=True)
    _add_deltas(layer, adapters)
    return original


def _add_deltas(layer: Any, adapters: dict[str, float]) -> None:
    """Base weight += sum(multiplier * scaling * B @ A) over `adapters`, summed in float32 and cast once."""
    weight = layer.base_layer.weight
    total = weight.detach().float()
    for adapter, multiplier in adapters.items():
        if adapter not in layer.lora_A or multiplier == 0.0:
            continue
        a = layer.lora_A[adapter].weight.detach().to(weight.device, torch.float32)
        b = layer.lora_B[adapter].weight.detach().to(weight.device, torch.float32)
        total = total + (b @ a) * (multiplier * _base_scaling(layer, adapter))
    weight.data.copy_(total.to(weight.dtype))


@dataclass
class FusionReport:
    """What `fused_loras` did (recorded in result_data under speed.compile)."""

    fused: bool
    reason: str
    layers: int = 0
    seconds: float = 0.0  # fusing, and re-fusing where a schedule changes
    refuses: int = 0
    stash: str = ""  # where the original weights were kept ("cuda:0", "cpu")


@contextmanager
def fused_loras(pipe: Any, plan: FusionPlan, state: LoraState | None = None) -> Iterator[FusionReport]:
    """Within this block the pipeline's LoRA layers are fused into plain Linears (see the module doc).

    With a `state`, the per-step weight updates (`wan_engine.loras.set_step_weights`) re-fuse the changed
    expert through `state.fused_update` instead of reaching peft. Yields a report; when the plan is not
    fusible, or a layer cannot be fused, nothing is changed and the report says why (the caller then runs
    eagerly).
    """
    if not plan.fusible:
        yield FusionReport(False, plan.reason)
        return
    started = time.perf_counter()
    targets: list[tuple[Expert, torch.nn.Module, str, Any]] = []
    experts = set(plan.weights) | {expert for expert, _w in plan.changes.values()}
    for expert in experts:
        module = getattr(pipe, _COMPONENTS[expert], None)
        if module is None:
            continue
        adapters = set(plan.weights.get(expert, {})) | {
            a for e, weights in plan.changes.values() if e == expert for a in weights
        }
        for parent, name, layer in _tuner_layers(module):
            active = {a: 1.0 for a in adapters if a in layer.lora_A}
            if not active:
                continue
            why = _not_fusible(layer, active)
            if why is not None:
                yield FusionReport(False, why)
                return
            targets.append((expert, parent, name, layer))
    stash = stash_device([t[3].base_layer.weight for t in targets])
    if plan.changes and stash.type == "cpu" and len(plan.changes) > MAX_CHANGES_FROM_HOST:
        yield FusionReport(
            False,
            f"the multipliers change at {len(plan.changes)} steps and the original weights would sit in host RAM: "
            "re-fusing each time costs more than running eagerly",
        )
        return
    done: list[_Fused] = []
    by_expert: dict[Expert, list[_Fused]] = {}
    current = {expert: dict(weights) for expert, weights in plan.weights.items()}
    try:
        for expert, parent, name, layer in targets:
            active = {a: w for a, w in current.get(expert, {}).items() if a in layer.lora_A}
            item = _Fused(parent, name, layer, _fuse_layer(layer, active, stash))
            done.append(item)
            by_expert.setdefault(expert, []).append(item)
            setattr(parent, name, layer.base_layer)  # the bare Linear: the plain model's module tree
        report = FusionReport(True, _fused_reason(plan), len(done), stash=str(stash))
        report.seconds = time.perf_counter() - started

        def update(expert: Expert, weights: dict[str, float]) -> None:
            """A step's new multipliers for `expert`: its layers re-fused from their originals."""
            tick = time.perf_counter()
            current[expert] = dict(weights)
            for item in by_expert.get(expert, []):
                _refuse_layer(item, {a: w for a, w in weights.items() if a in item.layer.lora_A})
            report.refuses += 1
            report.seconds += time.perf_counter() - tick

        if state is not None:
            state.fused_update = update
        log.info("LoRAs fused into %d layers (%.2fs)", len(done), report.seconds)
        yield report
    finally:
        if state is not None:
            state.fused_update = None
        _restore(done, by_expert, current)


def _fused_reason(plan: FusionPlan) -> str:
    if not plan.changes:
        return "constant multipliers fused into the weights"
    return f"multipliers fused into the weights, re-fused at the {len(plan.changes)} step(s) where they change"


@torch.no_grad()
def _refuse_layer(item: _Fused, adapters: dict[str, float]) -> None:
    """The layer's weight set again to its original plus the adapters' deltas at these multipliers."""
    item.layer.base_layer.weight.data.copy_(item.original)
    _add_deltas(item.layer, adapters)


@torch.no_grad()
def _restore(
    done: list[_Fused], by_expert: dict[Expert, list[_Fused]], current: dict[Expert, dict[str, float]]
) -> None:
    """Copy every original weight back (bit for bit) and put the peft layers back in place, their scales
    set to the multipliers the call last ran with."""
    expert_of = {id(item): expert for expert, items in by_expert.items() for item in items}
    for item in done:
        item.layer.base_layer.weight.data.copy_(item.original)
        setattr(item.parent, item.name, item.layer)
        for adapter, multiplier in current.get(expert_of[id(item)], {}).items():
            if adapter in item.layer.lora_A:
                item.layer.set_scale(adapter, multiplier)
