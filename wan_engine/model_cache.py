"""Recently used models parked in pinned host RAM (LRU within a byte budget): switching back is a copy.

When the worker switches from model A to model B, A's weights are copied into page-locked (pinned)
host memory instead of being dropped; switching back to A is then one host-to-device copy at PCIe
speed (tens of GB/s) rather than a disk load, and A keeps everything that lives on its modules:
the compiled blocks, the attention backend, loaded LoRA adapters.

Each parked model owns one pinned slab: a list of chunks (each a plain host allocation registered
with the CUDA driver, so its size is exact; torch's pinned allocator would round a 28 GB model up to
32 GB), with every parameter and buffer placed whole in one chunk. The slab stays with the model while
it is resident, so parking it again is only a device-to-host copy; slabs are freed when a model is
evicted (least recently used first) to stay within the budget, or unloaded.

Pinning is slow (about 2.5 GB/s: page faults and driver registration), so it is done ahead of need:
once a model is resident, `reserve` plans its slab and a low-priority daemon thread allocates it chunk
by chunk, within the budget and only while the host can spare the RAM. The park then finds its slab
ready, or takes over what is left (waiting for a chunk in flight, never allocating one twice); a
model unloaded for good releases its reservation.

On a CPU device a parked model is simply kept as it is (its weights already live in host RAM) and
nothing is reserved. The budget comes from `WAN_PINNED_CACHE_GB` (0 disables); by default half of the
machine's RAM on a GPU machine and 0 (off) on a CPU-only one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "WAN_PINNED_CACHE_GB"
DEFAULT_RAM_FRACTION = 0.5  # of total host RAM, on a GPU machine
RESERVE_HEADROOM_FRACTION = 0.1  # of total host RAM a reservation leaves free (the task's own buffers)
CHUNK_BYTES = 64 * 1024**2  # one registration (~25 ms at 2.5 GB/s): the longest a driver call is held
RESERVE_PAUSE_S = 0.005  # between a reservation's chunks, so it never hogs the CPU or the driver
GIB = 1024**3
_ALIGN = 256  # bytes; every view starts on this boundary (any dtype's alignment, DMA friendly)
_PAGE = 4096


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


def host_spare_bytes() -> int:
    """Host RAM a reservation may take now: what is available, less a tenth of the total."""
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.available - memory.total * RESERVE_HEADROOM_FRACTION)


class HostChunk(Protocol):
    """One host allocation of a slab: `buffer` is a uint8 tensor of at least the asked size."""

    buffer: torch.Tensor

    def close(self) -> None: ...


Allocator = Callable[[int], HostChunk]  # nbytes -> a chunk (pinned on CUDA; plain memory in CPU tests)


class PinnedChunk:
    """One exact-size host allocation registered with the CUDA driver (page-locked), freed on close()."""

    def __init__(self, nbytes: int, device: torch.device | None = None) -> None:
        self.registered = False
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if not torch.cuda.is_available():
            return
        self.buffer.numpy()[::_PAGE] = 0  # take the page faults here (GIL released), not inside the driver call
        with torch.cuda.device(device if device is not None and device.type == "cuda" else None):
            code = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0))
        self.registered = code == 0
        if not self.registered:  # e.g. a locked-memory limit: fall back to torch's pinned allocator
            log.warning("cudaHostRegister failed (error %d); using torch's pinned allocator", code)
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def close(self) -> None:
        """Unregister before the memory can be freed (tensors still viewing it stay valid, just pageable)."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False
        self.buffer = torch.empty(0, dtype=torch.uint8)


def _lower_priority() -> None:
    """Nice 19 for the calling thread only (Linux threads have their own nice value)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class HostSlab:
    """A slab's chunks: capacities planned up front, allocated by a background reservation or on demand.

    Thread-safe between one background filler and the owner: `settle()` stops the filler (waiting for a
    chunk in flight), after which only the owner's thread touches the slab.
    """

    def __init__(self, allocate: Allocator, capacities: list[int] | None = None) -> None:
        self._allocate = allocate
        self.capacities: list[int] = []
        self._chunks: list[HostChunk | None] = []
        self._todo: list[int] = []  # planned chunk indices nobody is allocating yet
        self._busy = 0  # chunks the background thread is allocating right now
        self._waiting = 0  # owners waiting in settle() (observable by tests)
        self._stop = False  # set by settle()/close(): the background thread claims no more chunks
        self._closed = False
        self._cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.replan(capacities or [])

    @property
    def nbytes(self) -> int:
        """Bytes planned (what the slab holds once complete)."""
        return sum(self.capacities)

    @property
    def allocated_bytes(self) -> int:
        """Bytes already allocated."""
        with self._cond:
            return sum(c for c, chunk in zip(self.capacities, self._chunks, strict=True) if chunk is not None)

    @property
    def complete(self) -> bool:
        """Every planned chunk allocated."""
        with self._cond:
            return all(chunk is not None for chunk in self._chunks)

    def start_background(self, name: str, pause_s: float, spare: Callable[[], int]) -> None:
        """Allocate the planned chunks on a low-priority daemon thread while `spare()` leaves room."""
        self.thread = threading.Thread(target=self._fill, args=(pause_s, spare), name=name, daemon=True)
        self.thread.start()

    def _fill(self, pause_s: float, spare: Callable[[], int]) -> None:
        _lower_priority()
        while self._fill_next(spare):
            time.sleep(pause_s)

    def _fill_next(self, spare: Callable[[], int]) -> bool:
        """Allocate the next planned chunk in the background; False when the filler should stop."""
        with self._cond:
            if self._stop or not self._todo:
                return False
            index = self._todo.pop(0)
            self._busy += 1  # settle() waits for this chunk; capacities do not change meanwhile
        chunk: HostChunk | None = None
        try:
            if spare() >= self.capacities[index]:
                chunk = self._allocate(self.capacities[index])
            else:
                log.info("pinned reservation paused: the host cannot spare more RAM now (the park allocates the rest)")
        except Exception as exc:  # the park retries this chunk on its own thread, where errors surface
            log.warning("pinned reservation stopped: %s", exc)
        with self._cond:
            self._busy -= 1
            closed = self._closed
            if chunk is None and not closed:
                self._todo.insert(0, index)
            elif chunk is not None and not closed:
                self._chunks[index] = chunk
            self._cond.notify_all()
        if chunk is not None and closed:
            chunk.close()  # the slab was released while this chunk was being allocated
        return chunk is not None and not closed

    def settle(self) -> None:
        """Stop the background filler and wait for a chunk it is allocating (nothing is allocated twice)."""
        with self._cond:
            self._stop = True
            self._waiting += 1
            while self._busy:
                self._cond.wait()
            self._waiting -= 1

    def replan(self, capacities: list[int]) -> None:
        """New chunk capacities; the ones kept must equal the current ones (see `_pack`). Owner only."""
        with self._cond:
            keep = min(len(capacities), len(self.capacities))
            if capacities[:keep] != self.capacities[:keep]:
                raise ValueError(f"slab chunks {capacities[:keep]} do not extend {self.capacities[:keep]}")
            dropped = [chunk for chunk in self._chunks[keep:] if chunk is not None]
            self.capacities = list(capacities)
            self._chunks = self._chunks[:keep] + [None] * (len(capacities) - keep)
            self._todo = [i for i in self._todo if i < keep] + list(range(keep, len(capacities)))
        for chunk in dropped:
            chunk.close()

    def fill(self) -> None:
        """Allocate every chunk still missing, on the calling thread (after `settle()`)."""
        for index in list(self._todo):
            chunk = self._allocate(self.capacities[index])
            with self._cond:
                self._chunks[index] = chunk
                self._todo.remove(index)

    def view(self, chunk: int, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed view of `nbytes` at `offset` in chunk `chunk`."""
        held = self._chunks[chunk]
        if held is None:
            raise RuntimeError(f"slab chunk {chunk} is not allocated")
        return held.buffer[offset : offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Free every chunk; a chunk still being allocated in the background is freed when it arrives."""
        with self._cond:
            self._stop = self._closed = True
            chunks = [chunk for chunk in self._chunks if chunk is not None]
            self._chunks = [None] * len(self.capacities)
            self._todo = []
        for chunk in chunks:
            chunk.close()


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
    nbytes: int
    chunk: int = 0
    offset: int = 0


def _tensors(pipe: Any) -> list[_Slot]:
    """Every distinct parameter and buffer of the pipeline's modules (not placed yet)."""
    slots: list[_Slot] = []
    seen: set[int] = set()
    for root in _modules(pipe):
        for module in root.modules():
            entries = [(n, t, True) for n, t in module._parameters.items()]
            entries += [(n, t, False) for n, t in module._buffers.items()]
            for name, tensor, is_param in entries:
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))  # tied weights are stored (and moved) once
                nbytes = tensor.numel() * tensor.element_size()
                slots.append(_Slot(module, name, is_param, tuple(tensor.shape), tensor.dtype, nbytes))
    return slots


def _pack(sizes: list[int], capacities: list[int], chunk_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Place tensors of `sizes` in order, each whole in one chunk: (chunk, offset) per tensor, and the chunks.

    Existing `capacities` are filled first (a tensor that does not fit the rest of one moves to the
    next); new chunks of about `chunk_bytes` (or one tensor, if larger) are appended and cut to what
    they hold; existing chunks left unused at the end are dropped. Packing the same sizes into the
    chunks this returned gives the same places.
    """
    caps = list(capacities)
    fixed = len(caps)
    places: list[tuple[int, int]] = []
    chunk, offset = 0, 0
    for size in sizes:
        aligned = -(-size // _ALIGN) * _ALIGN
        while chunk < len(caps) and offset + aligned > caps[chunk]:
            chunk, offset = chunk + 1, 0
        if chunk == len(caps):
            caps.append(max(chunk_bytes, aligned))
        places.append((chunk, offset))
        offset += aligned
    used = chunk + 1 if places else 0
    del caps[used:]
    ends: dict[int, int] = {}
    for (index, start), size in zip(places, sizes, strict=True):
        ends[index] = start + -(-size // _ALIGN) * _ALIGN
    for index in range(fixed, used):  # new chunks hold exactly what was placed in them
        caps[index] = ends[index]
    return places, caps


def _slots(pipe: Any, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[_Slot], int]:
    """Every distinct parameter and buffer of the pipeline's modules, placed in a fresh slab; its bytes."""
    slots = _tensors(pipe)
    places, caps = _pack([s.nbytes for s in slots], [], chunk_bytes)
    for slot, (chunk, offset) in zip(slots, places, strict=True):
        slot.chunk, slot.offset = chunk, offset
    return slots, sum(caps)


def _current(slot: _Slot) -> torch.Tensor:
    store = slot.module._parameters if slot.is_param else slot.module._buffers
    return store[slot.name]  # type: ignore[return-value]


def _rebind(slot: _Slot, tensor: torch.Tensor) -> None:
    """Point the module's parameter/buffer at `tensor` (a Parameter keeps its identity)."""
    if slot.is_param:
        slot.module._parameters[slot.name].data = tensor  # type: ignore[union-attr]
    else:
        slot.module._buffers[slot.name] = tensor


@dataclass
class _Entry:
    loaded: Any  # a pipeline_runtime.LoadedModel
    nbytes: int
    slab: HostSlab | None = None
    parked: bool = False  # True: in host RAM; False: resident on the device (its slab kept for the next park)
    reserved: bool = False  # its slab was reserved ahead of the first park (not yet used by one)

    @property
    def held_bytes(self) -> int:
        """Host bytes this entry holds or has reserved."""
        if self.slab is not None:
            return self.slab.nbytes
        return self.nbytes if self.parked else 0


@dataclass(frozen=True)
class Transfer:
    """One park (device -> host) or restore (host -> device): bytes, seconds, and the slab allocation time.

    `slab` (parks with a pinned slab): "reserved" (allocated ahead by a reservation), "reserved_partly"
    (the park allocated the rest), "kept" (from the model's last restore) or "allocated" (at the park).
    """

    key: str
    direction: str  # "park" or "restore"
    nbytes: int
    seconds: float
    alloc_seconds: float = 0.0
    slab: str = ""
    preallocated_bytes: int = 0  # slab bytes already allocated when the park came

    @property
    def gb_per_s(self) -> float | None:
        """Effective rate, allocation included (decimal GB/s)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else None


class ModelCache:
    """LoadedModels parked in pinned host RAM, least recently used evicted first to fit `budget_bytes`.

    `park(loaded)` moves a model's weights off the device (False: it does not fit, unload it instead);
    `take(key)` brings a parked model back and returns it (None when not parked); `reserve(key, loaded)`
    pins the resident model's slab ahead of its park. Not thread-safe on its own: the orchestrator calls
    it under its lock (a reservation's background thread touches only its own slab).

    `allocate` makes one slab chunk (default: a `PinnedChunk` on CUDA, and no slabs at all on a CPU
    device); `spare_bytes` says how much host RAM a reservation may still take (default `host_spare_bytes`).
    """

    def __init__(
        self,
        budget_bytes: int,
        device: torch.device | str,
        *,
        allocate: Allocator | None = None,
        spare_bytes: Callable[[], int] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        reserve_pause_s: float = RESERVE_PAUSE_S,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be a positive number of bytes")
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        if allocate is None and self.device.type == "cuda":
            device_ = self.device

            def allocate(nbytes: int) -> HostChunk:
                return PinnedChunk(nbytes, device_)

        self._allocate = allocate
        self._spare = spare_bytes or host_spare_bytes
        self.chunk_bytes = chunk_bytes
        self.reserve_pause_s = reserve_pause_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.transfers: list[Transfer] = []
        self.transfer_count = 0  # transfers ever recorded (`transfers` keeps the last 64)

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
        """Host bytes held: parked models, the slab kept for a resident one, and reservations in progress."""
        return sum(e.held_bytes for e in self._entries.values())

    def slab_of(self, key: str) -> HostSlab | None:
        """The slab held (or being reserved) for `key`, if any."""
        entry = self._entries.get(key)
        return entry.slab if entry is not None else None

    # ---- moving models ------------------------------------------------------------------------------

    def reserve(self, key: str, loaded: Any) -> bool:
        """Start pinning the slab a later park of the resident model `key` will need; True if started.

        Only what fits in the free budget (nothing is evicted for it) and what the host can spare; a
        model that already has its slab (kept from a restore) or does not sit whole on the device gets none.
        """
        if not self.enabled or self._allocate is None or not getattr(loaded, "resident", True):
            return False
        entry = self._entries.get(key)
        if entry is not None and entry.loaded is not loaded:
            self.discard(key)  # a stale entry for another load of the same key
        elif entry is not None:
            return False  # its slab is kept from a restore, or already reserved
        capacities = _pack([s.nbytes for s in _tensors(loaded.pipe)], [], self.chunk_bytes)[1]
        nbytes = sum(capacities)
        free, spare = self.budget_bytes - self.used_bytes, self._spare()
        if nbytes > min(free, spare):
            log.info(
                "no pinned reservation for %s: %.2f GB needed, %.2f GB free in the budget, host can spare %.2f GB",
                key,
                nbytes / 1e9,
                free / 1e9,
                spare / 1e9,
                extra={"model": key},
            )
            return False
        slab = HostSlab(self._allocate, capacities)
        self._entries[key] = _Entry(loaded, nbytes, slab=slab, reserved=True)  # counts in used_bytes at once
        self._entries.move_to_end(key)
        slab.start_background(f"pin-reserve-{key}", self.reserve_pause_s, self._spare)
        log.info(
            "reserving pinned slab for %s: %.2f GB in %d chunks (background)",
            key,
            nbytes / 1e9,
            len(capacities),
            extra={"model": key},
        )
        return True

    def park(self, key: str, loaded: Any, *, keep: str | None = None) -> bool:
        """Move `loaded` (the resident model `key`) to host RAM; False (nothing moved) if it cannot fit.

        Older parked models are evicted to make room, never `keep` (the model about to be taken back).
        A slab reserved ahead is used as it is; one still being reserved is finished here.
        """
        if not self.enabled:
            return False
        slots = _tensors(loaded.pipe)
        sizes = [s.nbytes for s in slots]
        nbytes = sum(_pack(sizes, [], self.chunk_bytes)[1])
        held = self._entries[keep].held_bytes if keep in self else 0
        if nbytes + held > self.budget_bytes:
            self.discard(key)
            return False
        entry = self._entries.pop(key, None)
        if entry is not None and entry.loaded is not loaded:
            self._free(entry)  # a stale entry for another load of the same key
            entry = None
        entry = entry or _Entry(loaded, nbytes)
        started = time.perf_counter()
        alloc, state, ready = 0.0, "", 0
        if self._allocate is not None:
            try:
                alloc, state, ready = self._fill_slab(entry, slots, sizes, held, keep)
            except Exception as exc:  # e.g. the host is out of RAM: unload instead of parking
                log.warning("park %s failed: pinned slab allocation: %s", key, exc, extra={"model": key})
                self._free(entry)
                return False
            self._to_host(slots, entry.slab)  # type: ignore[arg-type]
        else:
            self._make_room(nbytes, keep)
        entry.nbytes, entry.parked, entry.reserved = nbytes, True, False
        self._entries[key] = entry  # most recently used
        self._record(key, "park", nbytes, time.perf_counter() - started, alloc, state, ready)
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
        if entry.slab is not None:
            self._to_device(_tensors(entry.loaded.pipe))
        entry.parked = False
        self._entries.move_to_end(key)
        self._record(key, "restore", entry.nbytes, time.perf_counter() - started)
        return entry.loaded

    def discard(self, key: str) -> None:
        """Forget `key` (parked, resident or reserved) and free its slab."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free(entry)

    def clear(self) -> None:
        """Drop every parked model, slab and reservation."""
        for key in list(self._entries):
            self.discard(key)

    def stats(self) -> dict[str, Any]:
        """Budget, bytes held, parked models, reservations and the last transfers (for logs and benchmarks)."""
        return {
            "budget_gb": round(self.budget_bytes / GIB, 2),
            "used_gb": round(self.used_bytes / GIB, 3),
            "parked": self.parked_keys(),
            "reserved": {
                key: round(e.slab.allocated_bytes / max(e.slab.nbytes, 1), 3)
                for key, e in self._entries.items()
                if e.reserved and e.slab is not None
            },
            "transfers": [
                {**asdict(t), "gb_per_s": round(t.gb_per_s, 2) if t.gb_per_s else None} for t in self.transfers[-8:]
            ],
        }

    def transfers_since(self, count: int) -> list[dict[str, Any]]:
        """The transfers recorded after `transfer_count` was `count` (as dicts: for a task's result data)."""
        new = self.transfers[len(self.transfers) - min(self.transfer_count - count, len(self.transfers)) :]
        return [{**asdict(t), "seconds": round(t.seconds, 3), "alloc_seconds": round(t.alloc_seconds, 3)} for t in new]

    # ---- internals ----------------------------------------------------------------------------------

    def _fill_slab(
        self, entry: _Entry, slots: list[_Slot], sizes: list[int], held: int, keep: str | None
    ) -> tuple[float, str, int]:
        """Give `entry` a complete slab with `slots` placed in it (`held`: bytes kept for `keep`).

        Returns the allocation seconds, the slab's state (see `Transfer.slab`) and the bytes ready before.
        """
        slab = entry.slab
        state = "allocated" if slab is None else ("reserved" if entry.reserved else "kept")
        if slab is not None:
            slab.settle()  # a reservation in progress: wait for its chunk in flight, then take over
            places, capacities = _pack(sizes, slab.capacities, self.chunk_bytes)
            if sum(capacities) + held > self.budget_bytes:
                slab.close()  # reusing it would waste more than the budget allows (tensors changed)
                slab = None
        if slab is None:
            slab = entry.slab = HostSlab(self._allocate)  # type: ignore[arg-type]
            places, capacities = _pack(sizes, [], self.chunk_bytes)
        slab.replan(capacities)  # unchanged unless the model's tensors changed (LoRA adapters)
        ready = slab.allocated_bytes
        if state != "allocated" and ready < slab.nbytes:
            state = "reserved_partly" if ready else "allocated"
        self._make_room(slab.nbytes, keep)  # the entry is out of the table: its whole slab counts
        started = time.perf_counter()
        slab.fill()
        alloc = time.perf_counter() - started if ready < slab.nbytes else 0.0
        for slot, (chunk, offset) in zip(slots, places, strict=True):
            slot.chunk, slot.offset = chunk, offset
        return alloc, state, ready

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

    def _to_host(self, slots: list[_Slot], slab: HostSlab) -> None:
        views = []
        for slot in slots:
            view = slab.view(slot.chunk, slot.offset, slot.nbytes, slot.dtype, slot.shape)
            view.copy_(_current(slot), non_blocking=True)
            views.append(view)
        self._synchronize()  # copies done before the device memory is released
        for slot, view in zip(slots, views, strict=True):
            _rebind(slot, view)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _to_device(self, slots: list[_Slot]) -> None:
        for slot in slots:
            host = _current(slot)
            target = torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
            target.copy_(host, non_blocking=True)
            _rebind(slot, target)
        self._synchronize()  # the load time is the real copy time

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _record(
        self,
        key: str,
        direction: str,
        nbytes: int,
        seconds: float,
        alloc: float = 0.0,
        slab: str = "",
        ready: int = 0,
    ) -> None:
        transfer = Transfer(key, direction, nbytes, seconds, alloc, slab, ready)
        self.transfers.append(transfer)
        self.transfer_count += 1
        del self.transfers[:-64]
        notes = {
            "allocated": f" (slab allocation {alloc:.2f}s)",
            "reserved": " (slab pre-allocated)",
            "reserved_partly": f" (slab {ready / max(nbytes, 1):.0%} pre-allocated, the rest {alloc:.2f}s)",
            "kept": " (slab kept from the last restore)",
        }
        log.info(
            "%s %s: %.2f GB in %.3fs%s",
            direction,
            key,
            nbytes / 1e9,
            seconds,
            notes.get(slab, ""),
            extra={"model": key, "slab": slab or None, "alloc_seconds": round(alloc, 3)},
        )
