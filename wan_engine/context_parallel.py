"""Context parallelism: one generation split over the ranks of a torch.distributed group.

diffusers' context parallelism (`ModelMixin.enable_parallelism(config=ContextParallelConfig(...))`)
splits the video tokens of every Wan transformer over the ranks; Ulysses attention exchanges heads
for tokens with an all-to-all around each attention, so every rank holds 1/N of the sequence and
the output matches the single-process one (within bf16 noise on a GPU, bit-for-bit on a CPU).

Rules checked here, before anything is split:
- the Ulysses degree must divide the transformer's head count (12 for 1.3B, 40 for 14B);
- the token count (latent frames x patches) must divide by the degree (diffusers shards evenly);
- the attention backend must support context parallelism (the speed path may pick one that does not);
- only transformers with a context-parallel plan can be split (diffusers has none for VACE).

The process group is NCCL with one GPU per rank (`LOCAL_RANK` -> `cuda:LOCAL_RANK`) on CUDA and gloo
on a CPU (tests); its timeout bounds how long a rank waits for a peer that died or hung.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from wan_engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "WAN_PARALLEL_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # longest wait for a peer in one collective (a model load, a compile, a slow step)
FALLBACK_BACKEND = "native"  # torch SDPA: supports context parallelism and picks cuDNN / flash on a GPU


@dataclass(frozen=True)
class GroupInfo:
    """This process's place in the group (torchrun's environment contract)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def group_env(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None outside a group."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    return rank, world, int(env.get("LOCAL_RANK", rank))


def init_group(timeout_s: float | None = None) -> GroupInfo:
    """Join the group described by torchrun's environment: NCCL on CUDA (one GPU per rank), gloo otherwise."""
    found = group_env()
    if found is None:
        raise RuntimeError("not inside a torchrun group: RANK and WORLD_SIZE are not set")
    rank, world, local_rank = found
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # The timeout turns a dead or hung peer into an error in every rank instead of a hang forever.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return GroupInfo(rank, world, local_rank, device, backend)


def destroy_group() -> None:
    """Leave the group (no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def allowed_degrees(heads: int) -> list[int]:
    """The Ulysses degrees a transformer with `heads` attention heads can be split by (> 1)."""
    return [d for d in range(2, heads + 1) if heads % d == 0]


def check_degree(heads: int, degree: int, what: str = "the transformer") -> None:
    """ValueError (permanent for a task) unless `degree` divides the head count."""
    if degree < 1 or heads % degree:
        raise InvalidRequestError(
            f"parallel {degree}: the Ulysses degree must divide the head count of {what} ({heads} heads); "
            f"allowed: {', '.join(str(d) for d in [1, *allowed_degrees(heads)])}"
        )


def check_tokens(tokens: int, degree: int, where: str) -> None:
    """ValueError unless the video's token count splits evenly over `degree` ranks."""
    if tokens % degree:
        raise InvalidRequestError(
            f"parallel {degree}: {where} gives {tokens} video tokens, which do not split evenly over {degree} "
            "ranks; choose a resolution or video_length whose token count divides by the group size"
        )


def video_tokens(pipe: Any, width: int, height: int, frames: int) -> int:
    """Transformer sequence length of a (frames, height, width) video on this pipeline."""
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    pt, ph, pw = (int(v) for v in transformer.config.patch_size)
    spatial, temporal = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
    latent_frames = (frames - 1) // temporal + 1
    return (latent_frames // pt) * (height // spatial // ph) * (width // spatial // pw)


def _transformers(pipe: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name in ("transformer", "transformer_2") if (m := getattr(pipe, name, None)) is not None]


@contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers picks the rank's device as `rank % torch.accelerator.device_count()`, which divides by
    zero on a machine without an accelerator; report one device there (the CPU) while it does."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def _context_parallel_backend(module: Any) -> str | None:
    """The attention backend `module`'s processors use, when it cannot run context-parallel (else None)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        name = processor._attention_backend
        backend = _AttentionBackendRegistry.get_active_backend()[0] if name is None else AttentionBackendName(name)
        return None if _AttentionBackendRegistry._is_context_parallel_available(backend) else backend.value
    return None


def _set_backend_locally(module: Any, backend: str) -> None:
    """`set_attention_backend` also changes the process-wide default: put that back afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry.get_active_backend()[0]
    module.set_attention_backend(backend)
    _AttentionBackendRegistry.set_active_backend(previous)


def enable_context_parallel(pipe: Any, degree: int) -> list[str]:
    """Split every Wan transformer of `pipe` (transformer, transformer_2) over `degree` ranks (Ulysses).

    Needs an initialised process group of `degree` ranks. Idempotent: a transformer already split by
    this degree (a model restored from the pinned-RAM cache) is left alone. Returns the names split.
    """
    from diffusers import ContextParallelConfig

    transformers = _transformers(pipe)
    if degree <= 1 or not transformers:
        return []
    for name, module in transformers:  # checked before anything is changed: a refused model stays whole
        if getattr(module, "_cp_plan", None) is None:
            raise InvalidRequestError(
                f"parallel {degree}: {type(module).__name__} ({name}) cannot run context-parallel: diffusers has "
                "no context-parallel plan for it (VACE models run on one GPU: parallel 1)"
            )
        check_degree(int(module.config.num_attention_heads), degree, f"{type(module).__name__} ({name})")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != degree:
        raise RuntimeError(f"parallel {degree} needs a process group of {degree} ranks; this one has {world}")
    split = []
    for name, module in transformers:
        existing = getattr(module, "_parallel_config", None)
        if existing is not None:
            cp = existing.context_parallel_config
            if cp is None or cp.ulysses_degree != degree:
                raise RuntimeError(f"{name} is already split differently; reload the model")
            continue
        unsupported = _context_parallel_backend(module)
        if unsupported is not None:
            # The speed path may have chosen a kernel without context-parallel support (e.g. _flash_3).
            log.warning("attention backend %s has no context parallelism; using %s", unsupported, FALLBACK_BACKEND)
            _set_backend_locally(module, FALLBACK_BACKEND)
        with _cpu_device_count():
            module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
        split.append(name)
    return split
