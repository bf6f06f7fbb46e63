"""Memory profiles: the `auto` choice, and the out-of-memory ladder on a real (tiny) pipeline.

The out-of-memory error is injected (a forward pre-hook raising torch.OutOfMemoryError), as the issue
allows; the offloading that follows is diffusers' real model / group offloading, run on the CPU as
the execution device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from headless_wgp import WanOrchestrator
from wan_engine.errors import InvalidRequestError
from wan_engine.memory_profiles import (
    DEFAULT_VRAM_FRACTION,
    LADDER,
    apply_vram_limit,
    choose_profile,
    next_profile,
    vram_limit_from_env,
)
from wan_engine.model_sources import check_model
from wan_engine.presets import load_presets
from wan_engine.video_io import read_video_frames
from wan_engine.vram import estimate_vram

GIB = 1024**3
ESTIMATE = {"gpu": 30 * GIB, "model_offload": 12 * GIB, "group_offload": 6 * GIB, "sequential": 2 * GIB, "cpu": 0}


@pytest.mark.parametrize(
    ("free_gib", "expected"),
    [(80, "gpu"), (20, "model_offload"), (10, "group_offload"), (4, "sequential"), (1, "sequential")],
)
def test_auto_picks_the_fastest_profile_that_fits(free_gib: int, expected: str) -> None:
    assert choose_profile(ESTIMATE, free_gib * GIB, vram_fraction=0.9) == expected


def test_auto_without_a_gpu_or_an_estimate() -> None:
    assert choose_profile(ESTIMATE, None) == "cpu"
    assert choose_profile(None, 80 * GIB) == "gpu"


def test_the_ladder_goes_down_to_cpu_and_stops() -> None:
    walked = ["gpu"]
    while (lower := next_profile(walked[-1])) is not None:
        walked.append(lower)
    assert tuple(walked) == LADDER


class InjectedOOM:
    """Raises torch.OutOfMemoryError on the transformer's first `times` forward calls."""

    def __init__(self, module: torch.nn.Module, times: int) -> None:
        self.left = times
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _args: object) -> None:
        if self.left > 0:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


@pytest.fixture
def orchestrator(tiny_models_dir: Path) -> Iterator[WanOrchestrator]:
    built = WanOrchestrator(tiny_models_dir, device="cpu")
    built.load_model("tiny_t2v")
    yield built
    built.unload_model()


def _generate(orchestrator: WanOrchestrator, path: Path, **params: object) -> tuple[object, np.ndarray]:
    result = orchestrator.generate_t2v("a cat", output_path=path, seed=11, num_inference_steps=2, **params)
    return result, read_video_frames(result.output_path)


@pytest.mark.parametrize(("failures", "expected"), [(1, "model_offload"), (2, "group_offload")])
def test_out_of_memory_walks_the_ladder_and_completes(
    orchestrator: WanOrchestrator, tmp_path: Path, failures: int, expected: str
) -> None:
    _, reference = _generate(orchestrator, tmp_path / "reference.mp4", memory_profile="gpu")
    pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
    oom = InjectedOOM(pipe.transformer, failures)
    try:
        result, frames = _generate(orchestrator, tmp_path / "stepped.mp4", memory_profile="gpu")
    finally:
        oom.handle.remove()
    assert result.memory_profile == expected  # type: ignore[attr-defined]
    ladder = result.extra["memory_profile_ladder"]  # type: ignore[attr-defined]
    assert [entry["profile"] for entry in ladder] == list(LADDER[:failures])
    assert "out of memory" in ladder[0]["error"]
    assert pipe.vae.use_tiling, "the VAE is tiled after an out-of-memory error"
    assert frames.shape == reference.shape
    assert np.abs(frames.astype(int) - reference.astype(int)).mean() < 2.0, "same seed, same video"

    # The next task asks for the resident profile again: the offloading hooks are removed cleanly.
    again, frames_again = _generate(orchestrator, tmp_path / "again.mp4", memory_profile="gpu")
    assert again.memory_profile == "gpu"  # type: ignore[attr-defined]
    assert np.abs(frames_again.astype(int) - reference.astype(int)).mean() < 2.0


def test_out_of_memory_at_the_bottom_of_the_ladder_is_raised(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    oom = InjectedOOM(orchestrator._loaded.pipe.transformer, 1)  # type: ignore[union-attr]
    try:
        with pytest.raises(torch.OutOfMemoryError):
            orchestrator.generate_t2v("a", output_path=tmp_path / "x.mp4", memory_profile="cpu", num_inference_steps=1)
    finally:
        oom.handle.remove()
    assert not list(tmp_path.iterdir())


def test_auto_on_a_cpu_runs_cpu_and_a_bad_profile_is_refused(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    result, _ = _generate(orchestrator, tmp_path / "auto.mp4")
    assert result.memory_profile == "cpu"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="turbo"):
        WanOrchestrator(Path("."), memory_profile="turbo")


def test_step_counts_that_repeat_timesteps_are_refused_naming_the_limit(
    orchestrator: WanOrchestrator, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequestError, match=r"num_inference_steps=600 .* use at most 333 steps"):
        orchestrator.generate_t2v("a", output_path=tmp_path / "x.mp4", num_inference_steps=600, flow_shift=3.0)
    assert not list(tmp_path.iterdir())


def test_vram_limit_from_the_environment() -> None:
    assert vram_limit_from_env({}) is None
    assert vram_limit_from_env({"WAN_VRAM_LIMIT_GB": "24"}) == 24.0
    with pytest.raises(ValueError, match=r"WAN_VRAM_LIMIT_GB='lots' is not a number"):
        vram_limit_from_env({"WAN_VRAM_LIMIT_GB": "lots"})
    with pytest.raises(ValueError, match="positive"):
        vram_limit_from_env({"WAN_VRAM_LIMIT_GB": "-2"})
    assert apply_vram_limit(torch.device("cpu"), 24.0) is None, "no cap to set without a GPU"


@pytest.mark.parametrize(
    ("profile", "budget_gib", "resident"),
    [
        ("gpu", 0.0, True),  # asked for: loaded onto the device (the OOM ladder catches a misfit)
        ("group_offload", 80.0, False),  # an offload profile never loads whole onto the device
        ("auto", 80.0, True),
        ("auto", 1e-6, False),  # weights larger than the budget stay in host RAM
    ],
)
def test_a_fresh_load_goes_onto_the_gpu_only_when_it_fits(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch, profile: str, budget_gib: float, resident: bool
) -> None:
    import headless_wgp

    orchestrator = WanOrchestrator(tiny_models_dir, device="cpu", memory_profile=profile)
    orchestrator.device = torch.device("cuda")  # decide as on a GPU machine; nothing is moved here
    monkeypatch.setattr(headless_wgp, "device_budget_bytes", lambda _device: int(budget_gib * GIB))
    preset = orchestrator.presets.get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    assert orchestrator._load_resident(preset, check) is resident


def test_fp8_weights_can_make_a_model_fit_resident(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import headless_wgp

    preset = load_presets().get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    bf16, fp8 = estimate_vram(preset, check), estimate_vram(preset, check, fp8=True)
    assert bf16 is not None and fp8 is not None
    budget = (bf16.profiles["gpu"] + fp8.profiles["gpu"]) / 2 / DEFAULT_VRAM_FRACTION  # between the two
    monkeypatch.setattr(headless_wgp, "device_budget_bytes", lambda _device: int(budget))
    decisions = []
    for use_fp8 in (False, True):
        orchestrator = WanOrchestrator(tiny_models_dir, device="cpu", fp8=use_fp8)
        orchestrator.device = torch.device("cuda")
        decisions.append(orchestrator._load_resident(preset, check))
    assert decisions == [False, True]


def test_sequential_on_a_cpu_runs_as_cpu_and_says_so(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    """accelerate's sequential offload needs a GPU; on a CPU-only worker the task runs (as cpu), recorded."""
    result, frames = _generate(orchestrator, tmp_path / "sequential.mp4", memory_profile="sequential")
    assert result.memory_profile == "cpu"  # type: ignore[attr-defined]
    assert result.extra["memory_profile_requested"] == "sequential"  # type: ignore[attr-defined]
    assert frames.shape[0] >= 1
