"""The host-RAM model cache (wan_engine.model_cache) on the CPU: budget, LRU, and switching back without a load.

On a CPU a parked model simply stays in RAM; the pinned-memory copy itself needs CUDA and is measured
by bench/gpu_bench.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import headless_wgp
from headless_wgp import WanOrchestrator
from wan_engine.model_cache import GIB, ModelCache, _slots, default_budget_bytes
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
