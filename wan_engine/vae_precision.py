"""The VAE's precision, `WAN_VAE_PRECISION` (issue 15): Wan2GP's `vae_precision` server setting.

- `auto` (default): float16 on CUDA, as Wan2GP runs it; float32 elsewhere (a CPU gains nothing from float16).
  Measured on the H200 (docs/BENCHMARKS.md, "VAE decode"): the full Wan 2.1 VAE decodes 832x480x81 in
  1.84 s in float16 against 2.78 s in float32, at 65 dB PSNR from float32's frames (bfloat16: 47 dB).
- `32`: float32, as the diffusers model cards load the Wan VAE; frames identical to plain diffusers.
- `16`: float16, Wan2GP's default (`VAE_dtype = torch.float16 if vae_precision == "16"`, wgp.py): a third
  less decode time on tensor cores and half the VAE's weight and activation memory.
- `bf16`: bfloat16, the same speed and memory as `16` with float32's range (no float16 overflow), but
  3 fewer mantissa bits, so further from float32 than `16`.

The VAE is loaded in this dtype and stays in it: the pinned-RAM model cache parks and restores every tensor
in its own dtype, the engine's decode and diffusers' VACE / I2V encodes cast their inputs to `vae.dtype`,
and the VRAM estimate counts its bytes (`vae_dtype_bytes`).

On a CPU `16` is float16 as asked: torch's CPU kernels run float16 Conv3d (torch 2.13), but no faster than
float32 (full Wan 2.1 VAE decode of 256x192x9 on 2 cores: float32 31.2 s, float16 30.8 s, bfloat16 7.4 s),
so the load logs that `bf16` is the fast half precision there. The dtype is not swapped behind the user's
back: `16` gives float16's numbers, Wan2GP's, on every device, and result_data records the dtype that ran.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from wan_engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

VAE_PRECISION_ENV = "WAN_VAE_PRECISION"
DEFAULT_VAE_PRECISION = "auto"
VAE_DTYPES: dict[str, torch.dtype] = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}
VAE_PRECISION_CHOICES = ("auto", *VAE_DTYPES)


def vae_precision_setting(environ: Mapping[str, str] | None = None) -> str:
    """WAN_VAE_PRECISION as one of VAE_PRECISION_CHOICES (unset or empty: `auto`)."""
    raw = (os.environ if environ is None else environ).get(VAE_PRECISION_ENV, "")
    value = raw.strip().lower() or DEFAULT_VAE_PRECISION
    if value not in VAE_PRECISION_CHOICES:
        raise InvalidRequestError(
            f"{VAE_PRECISION_ENV}={raw!r}: allowed auto (the default: float16 on CUDA, float32 elsewhere), "
            "32 (float32), 16 (float16, Wan2GP's default) or bf16 (bfloat16)"
        )
    return value


def _dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return VAE_DTYPES[setting]


def vae_dtype_from_env(device: torch.device | str, environ: Mapping[str, str] | None = None) -> torch.dtype:
    """The dtype the VAE is loaded in on `device` under WAN_VAE_PRECISION; a bad value raises
    InvalidRequestError naming it and the allowed ones."""
    setting = vae_precision_setting(environ)
    dtype = _dtype(setting, torch.device(device))
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        log.info(
            "%s=16: the VAE runs in float16 on the CPU as asked; it is no faster than float32 there "
            "(bf16 is the fast half precision on a CPU)",
            VAE_PRECISION_ENV,
        )
    return dtype


def vae_element_bytes(environ: Mapping[str, str] | None = None, device: torch.device | str | None = None) -> int:
    """Bytes per VAE weight / feature-map element under WAN_VAE_PRECISION (4 for float32, 2 for 16-bit) on
    `device` (default: this machine's GPU if it has one, as the worker loads)."""
    where = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.empty((), dtype=_dtype(vae_precision_setting(environ), where)).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `float16`, `bfloat16`: how result_data names a dtype."""
    return str(dtype).removeprefix("torch.")
