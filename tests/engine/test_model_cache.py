"""The host-RAM model cache (wan_engine.model_cache) on the CPU: budget, LRU, and switching back without a load.

On a CPU a parked model simply stays in RAM; the pinned-memory copy itself needs CUDA and is measured
by bench/gpu_bench.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import headless_wgp
from headless_wgp import WanOrchestrator
from wan_engine.model_cache import GIB, HostSlab, ModelCache, _pack, _slots, default_budget_bytes
from wan_engine.video_io import read_video_frames

RUN = {"seed": 5, "video_length": 5, "resolution": "64x64", "num_inference_steps": 2}


@pytest.fixture
def disk_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Preset keys loaded from disk (load_pipeline calls), in order."""
    loads: list[str] = []
    real = headless_wgp.load_pipeline

    def counting(preset: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(preset.key)
        return real(preset, *args, **kwargs)

    monkeypatch.setattr(headless_wgp, "load_pipeline", counting)
    return loads


def _orchestrator(models_dir: Path, budget: int) -> WanOrchestrator:
    orchestrator = WanOrchestrator(models_dir)
    orchestrator.model_cache = ModelCache(budget, orchestrator.device)
    return orchestrator


def test_budget_from_env() -> None:
    import torch

    assert default_budget_bytes(torch.device("cpu"), {}) == 0  # off on a CPU-only machine
    assert default_budget_bytes(torch.device("cpu"), {"WAN_PINNED_CACHE_GB": "1.5"}) == int(1.5 * GIB)
    assert default_budget_bytes(torch.device("cuda"), {"WAN_PINNED_CACHE_GB": "0"}) == 0
    assert default_budget_bytes(torch.device("cuda"), {}) > 0  # half the RAM on a GPU machine
    with pytest.raises(ValueError, match="WAN_PINNED_CACHE_GB"):
        default_budget_bytes(torch.device("cpu"), {"WAN_PINNED_CACHE_GB": "lots"})


def test_switching_back_takes_the_parked_model_without_a_load(
    tiny_models_dir: Path, tmp_path: Path, disk_loads: list[str]
) -> None:
    orchestrator = _orchestrator(tiny_models_dir, GIB)
    orchestrator.load_model("tiny_t2v")
    first = orchestrator._loaded
    before = orchestrator.generate_t2v("a cat", output_path=tmp_path / "a.mp4", **RUN)
    orchestrator.load_model("tiny_t2v_2_2")
    assert orchestrator.model_cache.parked_keys() == ["tiny_t2v"]
    orchestrator.load_model("tiny_t2v")
    assert orchestrator._loaded is first  # the same modules: nothing was rebuilt or compiled again
    assert disk_loads == ["tiny_t2v", "tiny_t2v_2_2"]
    assert orchestrator.model_cache.parked_keys() == ["tiny_t2v_2_2"]
    after = orchestrator.generate_t2v("a cat", output_path=tmp_path / "b.mp4", **RUN)
    np.testing.assert_array_equal(read_video_frames(before.output_path), read_video_frames(after.output_path))
    orchestrator.load_model("tiny_t2v_2_2")
    assert disk_loads == ["tiny_t2v", "tiny_t2v_2_2"]
    assert [t.direction for t in orchestrator.model_cache.transfers] == ["park", "park", "restore", "park", "restore"]
    orchestrator.unload_model()
    orchestrator.model_cache.clear()
    assert orchestrator.model_cache.used_bytes == 0


def test_lru_eviction_within_the_budget(tiny_models_dir: Path, disk_loads: list[str]) -> None:
    probe = WanOrchestrator(tiny_models_dir)
    sizes = {}
    for key in ("tiny_t2v", "tiny_vace", "tiny_t2v_2_2"):
        probe.load_model(key)
        sizes[key] = _slots(probe._loaded.pipe)[1]  # type: ignore[union-attr]
    probe.unload_model()
    small, middle, large = sorted(sizes, key=sizes.__getitem__)
    assert sizes[small] < sizes[middle] < sizes[large]
    orchestrator = _orchestrator(tiny_models_dir, sizes[small] + sizes[large])
    for key in (small, large, middle):
        orchestrator.load_model(key)
    assert orchestrator.model_cache.parked_keys() == [small, large]
    # Back to `small`: parking `middle` needs room, so the least recently used other model (`large`) goes.
    orchestrator.load_model(small)
    assert orchestrator.model_cache.parked_keys() == [middle]
    assert disk_loads[-1] == middle and disk_loads.count(small) == 2  # the probe's load + the first one
    assert orchestrator.model_cache.used_bytes <= orchestrator.model_cache.budget_bytes
    orchestrator.load_model(large)  # evicted: a disk load again
    assert disk_loads[-1] == large
    orchestrator.unload_model()


def test_no_budget_means_plain_unload(tiny_models_dir: Path, disk_loads: list[str]) -> None:
    orchestrator = _orchestrator(tiny_models_dir, 0)
    for key in ("tiny_t2v", "tiny_t2v_2_2", "tiny_t2v"):
        orchestrator.load_model(key)
    assert disk_loads == ["tiny_t2v", "tiny_t2v_2_2", "tiny_t2v"]
    assert orchestrator.model_cache.parked_keys() == [] and orchestrator.model_cache.transfers == []
    orchestrator.unload_model()


def test_a_model_larger_than_the_budget_is_unloaded(tiny_models_dir: Path, disk_loads: list[str]) -> None:
    orchestrator = _orchestrator(tiny_models_dir, 1024)  # 1 KiB: nothing fits
    orchestrator.load_model("tiny_t2v")
    orchestrator.load_model("tiny_t2v_2_2")
    assert orchestrator.model_cache.parked_keys() == []
    orchestrator.load_model("tiny_t2v")
    assert disk_loads == ["tiny_t2v", "tiny_t2v_2_2", "tiny_t2v"]
    orchestrator.unload_model()


# ---- slabs reserved ahead of the park (allocation injected: plain host tensors through the pinned path) ----


class _Chunk:
    def __init__(self, owner: _Allocator, nbytes: int) -> None:
        self.owner, self.nbytes, self.closed = owner, nbytes, False
        self.buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8)

    def close(self) -> None:
        assert not self.closed, "a chunk was freed twice"
        self.closed = True


class _Allocator:
    """Makes plain chunks, recording the thread of each; call number `gate` waits for `release`."""

    def __init__(self, gate: int | None = None, fail: tuple[int, ...] = ()) -> None:
        self.gate, self.fail = gate, fail
        self.calls: list[str] = []  # thread name per call
        self.chunks: list[_Chunk] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> _Chunk:
        with self._lock:
            number = len(self.calls)
            self.calls.append(threading.current_thread().name)
        if number == self.gate:
            self.entered.set()
            assert self.release.wait(30), "the test never released the gated allocation"
        if number in self.fail:
            raise RuntimeError("out of host RAM (injected)")
        chunk = _Chunk(self, nbytes)
        with self._lock:
            self.chunks.append(chunk)
        return chunk

    @property
    def open_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks if not c.closed)


CHUNK = 64 * 1024  # tiny models: several chunks each


def _slab_orchestrator(
    models_dir: Path, budget: int, allocate: _Allocator, spare: Callable[[], int] | None = None
) -> WanOrchestrator:
    orchestrator = WanOrchestrator(models_dir)
    orchestrator.model_cache = ModelCache(
        budget,
        orchestrator.device,
        allocate=allocate,
        spare_bytes=spare or (lambda: 64 * GIB),
        chunk_bytes=CHUNK,
        reserve_pause_s=0.0,
    )
    return orchestrator


def _background_done(cache: ModelCache, key: str) -> HostSlab:
    slab = cache.slab_of(key)
    assert slab is not None and slab.thread is not None
    slab.thread.join(30)
    assert not slab.thread.is_alive()
    return slab


def _first_weight(orchestrator: WanOrchestrator) -> torch.Tensor:
    return next(orchestrator._loaded.pipe.transformer.parameters())  # type: ignore[union-attr]


def test_pack_places_every_tensor_whole_and_repacks_the_same() -> None:
    sizes = [100, 70, 300, 10, 2000, 5, 0, 600]
    places, caps = _pack(sizes, [], 512)
    for (chunk, offset), size in zip(places, sizes, strict=True):
        assert offset % 256 == 0 and offset + size <= caps[chunk]  # whole, aligned, inside its chunk
    assert max(caps) == 2048  # the 2000-byte tensor alone in a chunk of its size
    assert sum(caps) == sum(-(-s // 256) * 256 for s in sizes)  # exact: no chunk slack
    assert _pack(sizes, caps, 512) == (places, caps)  # a reserved slab fits the same tensors exactly
    grown_places, grown = _pack([*sizes, 300], caps, 512)  # a new tensor (a LoRA adapter): one chunk more
    assert grown[: len(caps)] == caps and grown_places[:-1] == places and len(grown) == len(caps) + 1
    assert _pack(sizes[:2], caps, 512)[1] == caps[:1]  # fewer tensors: the unused chunks go
    with pytest.raises(ValueError, match="chunk_bytes"):
        ModelCache(GIB, "cpu", chunk_bytes=0)


def test_cpu_default_reserves_nothing(tiny_models_dir: Path) -> None:
    orchestrator = _orchestrator(tiny_models_dir, GIB)  # no allocator: a CPU device keeps parked models as they are
    orchestrator.load_model("tiny_t2v")
    assert orchestrator.model_cache.slab_of("tiny_t2v") is None and orchestrator.model_cache.used_bytes == 0
    orchestrator.load_model("tiny_t2v_2_2")
    assert [t.slab for t in orchestrator.model_cache.transfers] == [""]
    orchestrator.unload_model()


def test_a_park_finds_its_slab_reserved_and_allocates_nothing(
    tiny_models_dir: Path, tmp_path: Path, disk_loads: list[str]
) -> None:
    allocate = _Allocator()
    orchestrator = _slab_orchestrator(tiny_models_dir, GIB, allocate)
    cache = orchestrator.model_cache
    orchestrator.load_model("tiny_t2v")
    slab = _background_done(cache, "tiny_t2v")
    nbytes = _slots(orchestrator._loaded.pipe, CHUNK)[1]  # type: ignore[union-attr]
    assert slab.complete and slab.nbytes == nbytes and len(slab.capacities) >= 3
    assert set(allocate.calls) == {"pin-reserve-tiny_t2v"}  # all on the background thread
    assert cache.used_bytes == nbytes and cache.stats()["reserved"] == {"tiny_t2v": 1.0}
    before = orchestrator.generate_t2v("a cat", output_path=tmp_path / "a.mp4", **RUN)
    calls, count = len(allocate.calls), cache.transfer_count
    orchestrator.load_model("tiny_t2v_2_2")  # parks tiny_t2v into its reserved slab
    park = cache.transfers[-1]
    assert [(t["key"], t["slab"]) for t in cache.transfers_since(count)] == [("tiny_t2v", "reserved")]
    assert (park.key, park.slab, park.alloc_seconds, park.preallocated_bytes) == ("tiny_t2v", "reserved", 0.0, nbytes)
    _background_done(cache, "tiny_t2v_2_2")
    assert all(name == "pin-reserve-tiny_t2v_2_2" for name in allocate.calls[calls:])  # none for the park
    orchestrator.load_model("tiny_t2v")  # restored from the slab (plain memory here, the same code path)
    assert disk_loads == ["tiny_t2v", "tiny_t2v_2_2"]
    after = orchestrator.generate_t2v("a cat", output_path=tmp_path / "b.mp4", **RUN)
    np.testing.assert_array_equal(read_video_frames(before.output_path), read_video_frames(after.output_path))
    orchestrator.load_model("tiny_t2v_2_2")  # the second park of tiny_t2v: its slab was kept
    assert [(t.key, t.slab) for t in cache.transfers if t.direction == "park"] == [
        ("tiny_t2v", "reserved"),
        ("tiny_t2v_2_2", "reserved"),
        ("tiny_t2v", "kept"),
    ]
    assert cache.used_bytes <= cache.budget_bytes
    orchestrator.unload_model()
    cache.clear()
    assert cache.used_bytes == 0 and allocate.open_bytes == 0  # every chunk freed, once


def test_reservations_stay_within_the_budget_and_what_the_host_can_spare(
    tiny_models_dir: Path, disk_loads: list[str]
) -> None:
    probe = WanOrchestrator(tiny_models_dir)
    sizes = {}
    for key in ("tiny_t2v", "tiny_t2v_2_2", "tiny_vace"):
        probe.load_model(key)
        sizes[key] = _slots(probe._loaded.pipe, CHUNK)[1]  # type: ignore[union-attr]
    probe.unload_model()
    budget = sum(sizes.values()) - 1  # two parked models and a third one's reservation do not fit
    allocate = _Allocator()
    orchestrator = _slab_orchestrator(tiny_models_dir, budget, allocate)
    cache = orchestrator.model_cache
    for key in ("tiny_t2v", "tiny_t2v_2_2"):
        orchestrator.load_model(key)
        _background_done(cache, key)
        assert cache.used_bytes <= budget
    orchestrator.load_model("tiny_vace")  # two parked models: no room to reserve tiny_vace's slab
    assert cache.slab_of("tiny_vace") is None  # (a reservation never evicts a parked model)
    assert cache.parked_keys() == ["tiny_t2v", "tiny_t2v_2_2"]
    orchestrator.load_model("tiny_t2v")  # parking tiny_vace evicts tiny_t2v_2_2 and allocates at the park
    park = cache.transfers[-2]
    assert (park.key, park.slab, park.preallocated_bytes) == ("tiny_vace", "allocated", 0) and park.alloc_seconds > 0
    assert cache.parked_keys() == ["tiny_vace"] and cache.used_bytes <= budget
    orchestrator.unload_model()
    cache.clear()
    assert allocate.open_bytes == 0

    # The host cannot spare the slab: nothing is reserved; the park allocates as before.
    scarce = _slab_orchestrator(tiny_models_dir, GIB, _Allocator(), spare=lambda: sizes["tiny_t2v"] - 1)
    scarce.load_model("tiny_t2v")
    assert scarce.model_cache.slab_of("tiny_t2v") is None
    scarce.load_model("tiny_t2v_2_2")
    assert scarce.model_cache.transfers[-1].slab == "allocated"
    scarce.unload_model()
    scarce.model_cache.clear()


def test_a_park_takes_over_a_reservation_in_progress(tiny_models_dir: Path) -> None:
    allocate = _Allocator(gate=1)  # the background thread stops inside its second chunk
    orchestrator = _slab_orchestrator(tiny_models_dir, GIB, allocate)
    cache = orchestrator.model_cache
    orchestrator.load_model("tiny_t2v")
    slab = cache.slab_of("tiny_t2v")
    assert slab is not None and allocate.entered.wait(30)
    weight = _first_weight(orchestrator).detach().clone()
    switch = threading.Thread(target=orchestrator.load_model, args=("tiny_t2v_2_2",))
    switch.start()
    deadline = time.monotonic() + 30
    while slab._waiting == 0 and time.monotonic() < deadline:  # the park waits for the chunk in flight
        time.sleep(0.01)
    assert slab._waiting == 1 and len(allocate.calls) == 2  # and allocated nothing meanwhile
    allocate.release.set()
    switch.join(30)
    assert not switch.is_alive()
    capacities = slab.capacities
    assert len(allocate.chunks) >= len(capacities)  # + the next model's reservation
    assert allocate.calls[:2] == ["pin-reserve-tiny_t2v"] * 2
    assert set(allocate.calls[2 : len(capacities)]) == {switch.name}  # the rest: on the parking thread
    park = cache.transfers[-1]
    assert park.slab == "reserved_partly" and park.preallocated_bytes == sum(capacities[:2])
    _background_done(cache, "tiny_t2v_2_2")
    orchestrator.load_model("tiny_t2v")
    assert torch.equal(_first_weight(orchestrator), weight)  # the weights came back whole
    orchestrator.unload_model()
    cache.clear()
    assert allocate.open_bytes == 0


def test_unloading_releases_a_reservation_even_mid_chunk(tiny_models_dir: Path) -> None:
    allocate = _Allocator(gate=1)
    orchestrator = _slab_orchestrator(tiny_models_dir, GIB, allocate)
    orchestrator.load_model("tiny_t2v")
    slab = orchestrator.model_cache.slab_of("tiny_t2v")
    assert slab is not None and allocate.entered.wait(30)
    orchestrator.unload_model()  # does not wait for the chunk in flight
    assert orchestrator.model_cache.used_bytes == 0 and allocate.open_bytes == 0
    allocate.release.set()
    assert slab.thread is not None
    slab.thread.join(30)
    assert not slab.thread.is_alive() and len(allocate.chunks) == 2  # the late chunk: freed on arrival, no more
    assert allocate.open_bytes == 0


def test_background_failures_and_scarce_ram_leave_the_rest_to_the_park(tiny_models_dir: Path) -> None:
    allocate = _Allocator(fail=(1,))  # the background's second chunk fails: the park retries it
    orchestrator = _slab_orchestrator(tiny_models_dir, GIB, allocate)
    orchestrator.load_model("tiny_t2v")
    slab = _background_done(orchestrator.model_cache, "tiny_t2v")
    assert not slab.complete and slab.allocated_bytes == slab.capacities[0]
    orchestrator.load_model("tiny_t2v_2_2")
    assert orchestrator.model_cache.transfers[-1].slab == "reserved_partly" and slab.complete
    orchestrator.unload_model()
    orchestrator.model_cache.clear()
    assert allocate.open_bytes == 0

    # RAM gets scarce after the first chunk (the reserve check and one chunk's check passed): it pauses.
    answers = iter([64 * GIB, 64 * GIB])
    scarce = _slab_orchestrator(tiny_models_dir, GIB, _Allocator(), spare=lambda: next(answers, 0))
    scarce.load_model("tiny_t2v")
    slab = _background_done(scarce.model_cache, "tiny_t2v")
    assert slab.allocated_bytes == slab.capacities[0] < slab.nbytes
    scarce.load_model("tiny_t2v_2_2")
    assert scarce.model_cache.transfers[-1].slab == "reserved_partly" and slab.complete
    scarce.unload_model()
    scarce.model_cache.clear()

    # A park whose slab cannot be allocated at all unloads the model instead (a disk load next time).
    failing = _slab_orchestrator(tiny_models_dir, GIB, _Allocator(fail=tuple(range(1000))))
    failing.load_model("tiny_t2v")
    _background_done(failing.model_cache, "tiny_t2v")
    failing.load_model("tiny_t2v_2_2")
    assert failing.model_cache.parked_keys() == [] and failing.model_cache.slab_of("tiny_t2v") is None
    failing.unload_model()
