"""Recently used models parked in pinned host RAM (LRU within a byte budget): switching back is a copy.

When the worker switches from model A to model B, A's weights are copied into page-locked (pinned)
host memory instead of being dropped; switching back to A is then one host-to-device copy at PCIe
speed (tens of GB/s) rather than a disk load, and A keeps everything that lives on its modules:
the compiled blocks, the attention backend, loaded LoRA adapters.

Each parked model owns one pinned slab (a plain host allocation registered with the CUDA driver,
so its size is exact; torch's pinned allocator would round a 28 GB model up to 32 GB), laid out as
one aligned view per parameter and buffer. The slab stays with the model while it is resident, so
parking it again is only a device-to-host copy; slabs are freed when a model is evicted (least
recently used first) to stay within the budget, or unloaded.

On a CPU device a parked model is simply kept as it is (its weights already live in host RAM). The
budget comes from `WAN_PINNED_CACHE_GB` (0 disables); by default half of the machine's RAM on a GPU
machine and 0 (off) on a CPU-only one.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "WAN_PINNED_CACHE_GB"
DEFAULT_RAM_FRACTION = 0.5  # of total host RAM, on a GPU machine
GIB = 1024**3
_ALIGN = 256  # bytes; every view starts on this boundary (any dtype's alignment, DMA friendly)


def default_budget_bytes(device: torch.device, environ: dict[str, str] | None = None) -> int:
    """The RAM budget for parked models: WAN_PINNED_CACHE_GB, else half the RAM on CUDA, else 0."""
    env = os.environ if environ is None else environ
    value = env.get(CACHE_ENV, "").strip()
    if value:
        try:
            return max(0, int(float(value) * GIB))
        except ValueError:
            raise ValueError(f"{CACHE_ENV}={value!r} is not a number of GiB (0 disables the cache)") from None
    if device.type != "cuda":
        return 0  # the weights already live in RAM; keeping old ones would only hold memory longer
    import psutil

    return int(psutil.virtual_memory().total * DEFAULT_RAM_FRACTION)


def _modules(pipe: Any) -> list[torch.nn.Module]:
    return [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]


@dataclass
class _Slot:
    """Where one tensor lives: its owner (module + attribute), its kind and its place in the slab."""

    module: torch.nn.Module
    name: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


def _slots(pipe: Any) -> tuple[list[_Slot], int]:
    """Every distinct parameter and buffer of the pipeline's modules, laid out in one aligned slab."""
    slots: list[_Slot] = []
    seen: set[int] = set()
    offset = 0
    for root in _modules(pipe):
        for module in root.modules():
            entries = [(n, t, True) for n, t in module._parameters.items()]
            entries += [(n, t, False) for n, t in module._buffers.items()]
            for name, tensor, is_param in entries:
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))  # tied weights are stored (and moved) once
                nbytes = tensor.numel() * tensor.element_size()
                slots.append(_Slot(module, name, is_param, tuple(tensor.shape), tensor.dtype, offset, nbytes))
                offset += -(-nbytes // _ALIGN) * _ALIGN
    return slots, offset


def _layout_key(slots: list[_Slot]) -> tuple[tuple[Any, ...], ...]:
    return tuple((s.shape, s.dtype, s.offset) for s in slots)


def _current(slot: _Slot) -> torch.Tensor:
    store = slot.module._parameters if slot.is_param else slot.module._buffers
    return store[slot.name]  # type: ignore[return-value]


def _rebind(slot: _Slot, tensor: torch.Tensor) -> None:
    """Point the module's parameter/buffer at `tensor` (a Parameter keeps its identity)."""
    if slot.is_param:
        slot.module._parameters[slot.name].data = tensor  # type: ignore[union-attr]
    else:
        slot.module._buffers[slot.name] = tensor


class PinnedSlab:
    """One exact-size host allocation registered with the CUDA driver (page-locked), freed on close()."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.registered = False
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if torch.cuda.is_available():
            code = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0))
            self.registered = code == 0
            if not self.registered:  # e.g. a locked-memory limit: fall back to torch's pinned allocator
                log.warning("cudaHostRegister failed (error %d); using torch's pinned allocator", code)
                self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed view of `nbytes` at `offset`."""
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Unregister before the memory can be freed (tensors still viewing it stay valid, just pageable)."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False
        self.buffer = torch.empty(0, dtype=torch.uint8)


@dataclass
class _Entry:
    loaded: Any  # a pipeline_runtime.LoadedModel
    nbytes: int
    slab: PinnedSlab | None = None
    layout: tuple[tuple[Any, ...], ...] = ()
    parked: bool = False  # True: in host RAM; False: resident on the device (its slab kept for the next park)


@dataclass(frozen=True)
class Transfer:
    """One park (device -> host) or restore (host -> device): bytes, seconds, and the slab allocation time."""

    key: str
    direction: str  # "park" or "restore"
    nbytes: int
    seconds: float
    alloc_seconds: float = 0.0

    @property
    def gb_per_s(self) -> float | None:
        """Effective rate, allocation included (decimal GB/s)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else None


class ModelCache:
    """LoadedModels parked in pinned host RAM, least recently used evicted first to fit `budget_bytes`.

    `park(loaded)` moves a model's weights off the device (False: it does not fit, unload it instead);
    `take(key)` brings a parked model back and returns it (None when not parked). Not thread-safe on
    its own: the orchestrator calls it under its lock.
    """

    def __init__(self, budget_bytes: int, device: torch.device | str) -> None:
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.transfers: list[Transfer] = []

    @classmethod
    def from_env(cls, device: torch.device | str) -> ModelCache:
        """A cache with the budget of `default_budget_bytes` (WAN_PINNED_CACHE_GB)."""
        device = torch.device(device)
        return cls(default_budget_bytes(device), device)

    @property
    def enabled(self) -> bool:
        """False when the budget is 0."""
        return self.budget_bytes > 0

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key)  # type: ignore[arg-type]
        return entry is not None and entry.parked

    def parked_keys(self) -> list[str]:
        """Keys of the parked models, least recently used first."""
        return [key for key, entry in self._entries.items() if entry.parked]

    @property
    def used_bytes(self) -> int:
        """Host bytes held: parked models, and the slab kept for a resident one."""
        return sum(e.nbytes for e in self._entries.values() if e.parked or e.slab is not None)

    # ---- moving models ------------------------------------------------------------------------------

    def park(self, key: str, loaded: Any, *, keep: str | None = None) -> bool:
        """Move `loaded` (the resident model `key`) to host RAM; False (nothing moved) if it cannot fit.

        Older parked models are evicted to make room, never `keep` (the model about to be taken back).
        """
        if not self.enabled:
            return False
        slots, nbytes = _slots(loaded.pipe)
        held = self._entries[keep].nbytes if keep in self else 0
        if nbytes + held > self.budget_bytes:
            self.discard(key)
            return False
        entry = self._entries.pop(key, None)
        if entry is not None and entry.loaded is not loaded:
            self._free(entry)  # a stale entry for another load of the same key
            entry = None
        self._make_room(nbytes - (entry.nbytes if entry is not None and entry.slab is not None else 0), keep)
        entry = entry or _Entry(loaded, nbytes)
        started = time.perf_counter()
        alloc = 0.0
        if self.device.type == "cuda":
            layout = _layout_key(slots)
            if entry.slab is None or entry.layout != layout:  # first park, or LoRA adapters changed the tensors
                if entry.slab is not None:
                    entry.slab.close()
                entry.slab, entry.layout = PinnedSlab(nbytes), layout
                alloc = time.perf_counter() - started
            self._to_host(slots, entry.slab)
        entry.nbytes, entry.parked = nbytes, True
        self._entries[key] = entry  # most recently used
        self._record(key, "park", nbytes, time.perf_counter() - started, alloc)
        return True

    def peek(self, key: str) -> Any | None:
        """The parked LoadedModel `key` without moving it (None when not parked): to re-check its files."""
        entry = self._entries.get(key)
        return entry.loaded if entry is not None and entry.parked else None

    def take(self, key: str) -> Any | None:
        """Bring parked model `key` back onto the device; its LoadedModel, or None if it is not parked."""
        entry = self._entries.get(key)
        if entry is None or not entry.parked:
            return None
        started = time.perf_counter()
        if self.device.type == "cuda":
            slots, _ = _slots(entry.loaded.pipe)
            self._to_device(slots)
        entry.parked = False
        self._entries.move_to_end(key)
        self._record(key, "restore", entry.nbytes, time.perf_counter() - started)
        return entry.loaded

    def discard(self, key: str) -> None:
        """Forget `key` (parked or resident) and free its slab."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free(entry)

    def clear(self) -> None:
        """Drop every parked model and slab."""
        for key in list(self._entries):
            self.discard(key)

    def stats(self) -> dict[str, Any]:
        """Budget, bytes held, parked models and the last transfers (for logs and benchmarks)."""
        return {
            "budget_gb": round(self.budget_bytes / GIB, 2),
            "used_gb": round(self.used_bytes / GIB, 3),
            "parked": self.parked_keys(),
            "transfers": [
                {**asdict(t), "gb_per_s": round(t.gb_per_s, 2) if t.gb_per_s else None} for t in self.transfers[-8:]
            ],
        }

    # ---- internals ----------------------------------------------------------------------------------

    def _make_room(self, needed: int, keep: str | None) -> None:
        for key in list(self._entries):
            if self.used_bytes + needed <= self.budget_bytes:
                return
            if key != keep and self._entries[key].parked:  # never the resident model's slab: it is being parked
                log.info("evicting parked model %s from host RAM", key, extra={"model": key})
                self.discard(key)

    def _free(self, entry: _Entry) -> None:
        entry.loaded = None
        slab, entry.slab = entry.slab, None
        gc.collect()  # the parked modules (and their views of the slab) go before the slab is unregistered
        if slab is not None:
            slab.close()

    def _to_host(self, slots: list[_Slot], slab: PinnedSlab) -> None:
        views = []
        for slot in slots:
            view = slab.view(slot.offset, slot.nbytes, slot.dtype, slot.shape)
            view.copy_(_current(slot), non_blocking=True)
            views.append(view)
        torch.cuda.synchronize(self.device)  # copies done before the device memory is released
        for slot, view in zip(slots, views, strict=True):
            _rebind(slot, view)
        torch.cuda.empty_cache()

    def _to_device(self, slots: list[_Slot]) -> None:
        for slot in slots:
            host = _current(slot)
            target = torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
            target.copy_(host, non_blocking=True)
            _rebind(slot, target)
        torch.cuda.synchronize(self.device)  # the load time is the real copy time

    def _record(self, key: str, direction: str, nbytes: int, seconds: float, alloc: float = 0.0) -> None:
        transfer = Transfer(key, direction, nbytes, seconds, alloc)
        self.transfers.append(transfer)
        del self.transfers[:-64]
        log.info(
            "%s %s: %.2f GB in %.3fs%s",
            direction,
            key,
            nbytes / 1e9,
            seconds,
            f" (slab allocation {alloc:.2f}s)" if alloc else "",
            extra={"model": key},
        )
