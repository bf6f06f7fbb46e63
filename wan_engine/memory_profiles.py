"""Memory profiles: where a loaded pipeline's weights live while it generates.

The seed documents' GPU-only / hybrid RAM+VRAM / CPU-only modes, as diffusers offloading:

    gpu            everything resident on the execution device (fastest)
    model_offload  one component on the device at a time (`enable_model_cpu_offload`)
    group_offload  block-level groups streamed from RAM, the next one prefetched on a CUDA stream
                   (`enable_group_offload`): the hybrid mode; the VAE stays on the device
    sequential     one leaf module at a time (`enable_sequential_cpu_offload`): least VRAM, slowest;
                   the VAE stays on the device
    cpu            everything on the CPU

`auto` picks the first profile of that ladder whose estimated peak fits `vram_fraction` of the free
VRAM (estimates from wan_engine.vram), and tiles the VAE when the decode alone would not fit. On an
out-of-memory error the orchestrator steps one rung down the ladder (and tiles the VAE) and retries
the same generation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

LADDER = ("gpu", "model_offload", "group_offload", "sequential", "cpu")
PROFILE_CHOICES = ("auto", *LADDER)
VRAM_LIMIT_ENV = "WAN_VRAM_LIMIT_GB"
DEFAULT_VRAM_FRACTION = 0.9  # headroom for the CUDA context, fragmentation and other processes


def next_profile(profile: str) -> str | None:
    """The next rung down the ladder (less VRAM), or None at the bottom."""
    index = LADDER.index(profile)
    return LADDER[index + 1] if index + 1 < len(LADDER) else None


def choose_profile(
    profiles_bytes: dict[str, int] | None, free_bytes: int | None, vram_fraction: float = DEFAULT_VRAM_FRACTION
) -> str:
    """`auto`: the fastest profile whose estimate fits the VRAM budget; `cpu` without a GPU."""
    if free_bytes is None:
        return "cpu"
    if not profiles_bytes:
        return "gpu"  # nothing on disk says how big the model is: try resident, the ladder catches OOM
    budget = free_bytes * vram_fraction
    return next((name for name in LADDER[:-1] if profiles_bytes.get(name, 0) <= budget), "sequential")


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current device): the per-process memory calls need an index."""
    if device.index is None:
        return torch.device(device.type, torch.cuda.current_device())
    return device


def device_budget_bytes(device: torch.device) -> int:
    """VRAM this process may use on `device`: free memory plus what it already holds, within the
    per-process cap (`torch.cuda.set_per_process_memory_fraction`, e.g. from WAN_VRAM_LIMIT_GB),
    which `mem_get_info` does not see."""
    device = _indexed(device)
    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)  # the resident weights are ours to move
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        budget = min(budget, int(get_fraction(device) * total))
    return budget


def vram_limit_from_env(environ: dict[str, str] | None = None) -> float | None:
    """WAN_VRAM_LIMIT_GB as GiB (unset or empty: no cap)."""
    value = (os.environ if environ is None else environ).get(VRAM_LIMIT_ENV, "").strip()
    if not value:
        return None
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{VRAM_LIMIT_ENV}={value!r} is not a number of GiB") from None
    if limit <= 0:
        raise ValueError(f"{VRAM_LIMIT_ENV}={value!r}: must be a positive number of GiB")
    return limit


def apply_vram_limit(device: torch.device, limit_gib: float | None) -> float | None:
    """Cap this process's VRAM at `limit_gib` (the allocator raises OOM beyond it); returns the fraction set."""
    if limit_gib is None or device.type != "cuda":
        return None
    if limit_gib <= 0:
        raise ValueError(f"VRAM limit {limit_gib} GiB: must be a positive number of GiB")
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, limit_gib * 1024**3 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    logger.info("VRAM capped", extra={"limit_gib": limit_gib, "fraction": round(fraction, 4)})
    return fraction


def _modules(pipe: Any) -> list[torch.nn.Module]:
    return [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


def reset_placement(pipe: Any) -> None:
    """Remove every offloading hook (accelerate's and diffusers' group offloading) and park on the CPU."""
    from diffusers.hooks import HookRegistry

    pipe.remove_all_hooks()
    for module in _modules(pipe):
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
            registry.remove_hook(name, recurse=True)
        module.to("cpu")


def profile_for_device(profile: str, device: torch.device) -> str:
    """The profile that runs on `device`. `sequential` is accelerate's per-layer offload to a GPU: without
    one its hooks fail (a TypeError deep in accelerate), and the weights already live in host RAM, so it
    runs as `cpu`, with a warning; `result_data` keeps the requested profile beside the one used."""
    if device.type != "cuda" and profile == "sequential":
        logger.warning(
            "memory_profile 'sequential' needs a CUDA GPU; running as 'cpu' on %s", device.type,
            extra={"profile": profile, "device": device.type},
        )  # fmt: skip
        return "cpu"
    return profile


def apply_profile(pipe: Any, profile: str, device: torch.device, *, current: str | None) -> None:
    """Place `pipe` for `profile` on `device` (the execution device), undoing the current profile."""
    if profile == current:
        return
    if current not in (None, "gpu", "cpu"):
        reset_placement(pipe)
    if profile == "gpu":
        pipe.to(device)
    elif profile == "cpu":
        pipe.to("cpu")
    elif profile == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif profile == "group_offload":
        pipe.to("cpu")
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",  # overlap the next block's copy with this block's compute
            # Group hooks onload on forward(), and the VAE is called through decode(): it would run with its
            # top-level weights still in host RAM. It is small (0.5 GB); it stays on the device.
            exclude_modules=["vae"] if getattr(pipe, "vae", None) is not None else None,
        )
    elif profile == "sequential":
        # The Wan VAE's decode breaks under accelerate's per-layer hooks (a weight left on the meta device
        # reaches a tiled convolution); it is small (0.5 GB), so it stays on the device for this profile.
        excluded = list(pipe._exclude_from_cpu_offload)
        pipe._exclude_from_cpu_offload = [*excluded, "vae"]
        try:
            pipe.enable_sequential_cpu_offload(device=device)
        finally:
            pipe._exclude_from_cpu_offload = excluded  # only this profile keeps the VAE on the device
    else:
        raise ValueError(f"unknown memory profile {profile!r}; allowed: {', '.join(PROFILE_CHOICES)}")
    logger.info("memory profile applied", extra={"profile": profile, "previous": current})


def tile_vae(pipe: Any) -> bool:
    """Decode in tiles (much less VRAM for the decode); True when the VAE supports it."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return False
    vae.enable_tiling()
    return True
