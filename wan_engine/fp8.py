"""Optional fp8 weights and matmuls for the transformer blocks (off by default: lossy).

`WAN_FP8=on` (or `WanOrchestrator(fp8=True)`) replaces every `nn.Linear` inside the Wan transformer
blocks (attention projections and the feed-forward, which hold ~99% of the weights) with `Fp8Linear`:

- the weight is stored once in float8 e4m3 with one float32 scale per output row (half the bytes of
  bf16: a 14B transformer drops from 28 GB to 14 GB, and a switch moves half as much);
- each call quantises its input per token (row-wise amax scaling) and runs `torch._scaled_mm`, the
  fp8 tensor-core matmul (about twice the bf16 rate on Hopper/Ada), with a bf16/float32 output.

Embeddings, norms, the output head and attention itself stay in the model's dtype. The output is no
longer within bf16 noise of the plain pipeline; bench/gpu_bench.py reports the speed and the
deviation. On CUDA it needs compute capability 8.9+ (Ada, Hopper); torch runs `_scaled_mm` on the
CPU too, which is what the tests use. LoRAs cannot be applied to fp8 layers: a LoRA task on an fp8
model fails with a message saying so.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wan_engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

FP8_ENV = "WAN_FP8"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_ON = {"1", "on", "true", "yes"}
CUDA_ALIGN = 16  # on CUDA, _scaled_mm needs both weight dimensions to be multiples of 16 (the CPU takes any)
MIN_CAPABILITY = (8, 9)


def fp8_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """True when WAN_FP8 asks for fp8 (default off)."""
    env = os.environ if environ is None else environ
    return env.get(FP8_ENV, "off").strip().lower() in _ON


def check_fp8_device(device: torch.device) -> None:
    """Refuse fp8 on a GPU without fp8 tensor cores, naming the GPU and what is needed."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise InvalidRequestError(
            f"{FP8_ENV}=on: {name} has compute capability {capability[0]}.{capability[1]}; fp8 matmuls need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell). Turn fp8 off."
        )


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8: (values in e4m3, float32 scale per row) with `values * scale ≈ tensor`."""
    amax = tensor.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    values = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch build's CPU `_scaled_mm` takes row-wise scales (2.13 does, 2.11 does not)."""
    ones = torch.ones(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` with fp8 weights (row-wise scales) and a dynamically quantised input."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.cpu_rowwise = cpu_rowwise_scaled_mm()  # decided once: a plain bool is a constant to torch.compile
        weight, scale = quantize_rows(linear.weight)
        # Parameters (frozen) so that .to(), the pinned-RAM cache and offload hooks move them like any weight.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.reshape(1, -1), requires_grad=False)  # (1, out) for _scaled_mm
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        values, scale = quantize_rows(rows)
        if x.device.type == "cpu" and not self.cpu_rowwise:
            # Older CPU builds take only per-tensor scales: the same fp8 values, multiplied in float32.
            weight = self.weight.float() * self.weight_scale.t()
            out = ((values.float() * scale) @ weight.t()).to(x.dtype)
        else:
            out = self._scaled_mm(values, scale, x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch._scaled_mm(
            values,
            self.weight.t(),  # column-major view, as _scaled_mm wants its second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=dtype,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-wise"


@dataclass(frozen=True)
class Fp8Report:
    """What `quantize_transformer` did: layers converted, weight bytes before and after."""

    layers: int
    skipped: int  # linears whose shape _scaled_mm cannot take (kept in the model dtype)
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "skipped": self.skipped,
            "gb_before": round(self.bytes_before / 1e9, 3),
            "gb_after": round(self.bytes_after / 1e9, 3),
        }


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def quantize_transformer(transformer: nn.Module, align: int = CUDA_ALIGN) -> Fp8Report:
    """Swap the linears of `transformer.blocks` for `Fp8Linear`, in place (those whose dimensions are
    multiples of `align`; the others keep the model dtype and are counted as skipped)."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise InvalidRequestError(f"fp8: {type(transformer).__name__} has no `blocks`; only Wan transformers")
    before = _nbytes(transformer)
    layers = skipped = 0
    for block in blocks:
        for name, child in list(block.named_modules()):
            if not isinstance(child, nn.Linear):
                continue
            if child.in_features % align or child.out_features % align:
                skipped += 1
                continue
            parent_name, _, attribute = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attribute, Fp8Linear(child))
            layers += 1
    report = Fp8Report(layers, skipped, before, _nbytes(transformer))
    log.info("fp8 weights: %s", report.to_dict())
    return report


def quantize_pipeline(pipe: Any, device: torch.device) -> dict[str, Any]:
    """fp8 for every Wan transformer of the pipeline; returns {component: report} for result_data."""
    check_fp8_device(device)
    reports = {}
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            reports[name] = quantize_transformer(module, CUDA_ALIGN if device.type == "cuda" else 1).to_dict()
    return reports


def is_fp8(module: nn.Module) -> bool:
    """True when any layer of `module` is an `Fp8Linear`."""
    return any(isinstance(m, Fp8Linear) for m in module.modules())
