"""The VAE's precision, `WAN_VAE_PRECISION` (issue 15): Wan2GP's `vae_precision` server setting.

- `32` (default): float32, as the diffusers model cards load the Wan VAE; frames identical to plain diffusers.
- `16`: float16, Wan2GP's default (`VAE_dtype = torch.float16 if vae_precision == "16"`, wgp.py): about half
  the decode time on tensor cores and half the VAE's weight and activation memory.
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
DEFAULT_VAE_PRECISION = "32"
VAE_DTYPES: dict[str, torch.dtype] = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}
VAE_PRECISION_CHOICES = tuple(VAE_DTYPES)


def vae_precision_setting(environ: Mapping[str, str] | None = None) -> str:
    """WAN_VAE_PRECISION as one of VAE_PRECISION_CHOICES (unset or empty: `32`)."""
    raw = (os.environ if environ is None else environ).get(VAE_PRECISION_ENV, "")
    value = raw.strip().lower() or DEFAULT_VAE_PRECISION
    if value not in VAE_DTYPES:
        raise InvalidRequestError(
            f"{VAE_PRECISION_ENV}={raw!r}: allowed 32 (float32, the default), 16 (float16, Wan2GP's default) "
            "or bf16 (bfloat16)"
        )
    return value


def vae_dtype_from_env(device: torch.device | str, environ: Mapping[str, str] | None = None) -> torch.dtype:
    """The dtype the VAE is loaded in on `device` under WAN_VAE_PRECISION; a bad value raises
    InvalidRequestError naming it and the allowed ones."""
    dtype = VAE_DTYPES[vae_precision_setting(environ)]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        log.info(
            "%s=16: the VAE runs in float16 on the CPU as asked; it is no faster than float32 there "
            "(bf16 is the fast half precision on a CPU)",
            VAE_PRECISION_ENV,
        )
    return dtype


def vae_element_bytes(environ: Mapping[str, str] | None = None) -> int:
    """Bytes per VAE weight / feature-map element under WAN_VAE_PRECISION (4 for float32, 2 for 16-bit)."""
    return torch.empty((), dtype=VAE_DTYPES[vae_precision_setting(environ)]).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `float16`, `bfloat16`: how result_data names a dtype."""
    return str(dtype).removeprefix("torch.")
