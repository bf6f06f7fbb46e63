"""Wan 2.2 two-expert generation: which expert runs each step, and each expert's guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import UniPCMultistepScheduler

from headless_wgp import WanOrchestrator
from wan_engine.video_io import read_video_frames

PROMPT = "two cats play chess"


def _expected_experts(models_dir: Path, flow_shift: float, steps: int, threshold: float) -> list[str]:
    """Independent computation: the scheduler's timesteps against the boundary."""
    scheduler = UniPCMultistepScheduler.from_pretrained(
        models_dir / "tiny-wan2.2-t2v", subfolder="scheduler", flow_shift=flow_shift
    )
    scheduler.set_timesteps(steps)
    return ["high" if float(t) >= threshold else "low" for t in scheduler.timesteps]


@pytest.mark.parametrize(
    ("flow_shift", "steps", "threshold"),
    [(12.0, 4, 875), (3.0, 4, 875), (12.0, 3, 950), (5.0, 4, 0), (5.0, 2, 1000)],
)
def test_experts_follow_the_boundary(
    dual_orchestrator: WanOrchestrator,
    tiny_models_dir: Path,
    tmp_path: Path,
    flow_shift: float,
    steps: int,
    threshold: float,
) -> None:
    result = dual_orchestrator.generate_t2v(
        PROMPT,
        output_path=tmp_path / "v.png",
        seed=1,
        video_length=1,
        flow_shift=flow_shift,
        num_inference_steps=steps,
        switch_threshold=threshold,
    )
    expected = _expected_experts(tiny_models_dir, flow_shift, steps, threshold)
    assert list(result.experts_used or ()) == expected
    assert result.switch_threshold == threshold and len(result.timesteps) == steps
    # CFG is on (guidance 4 > 1): each step calls its expert twice (cond + uncond), never the other.
    assert result.extra["transformer_calls_per_step"] == [2] * steps


def test_preset_defaults_use_both_experts(dual_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    result = dual_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "v.mp4", seed=1)
    assert result.guidance_scale == 4.0 and result.guidance2_scale == 3.0 and result.flow_shift == 12.0
    assert result.experts_used == ("high", "high", "high", "low")
    pipe = dual_orchestrator._loaded.pipe  # type: ignore[union-attr]
    assert pipe.config.boundary_ratio == 0.875  # per-call boundary restored afterwards


def _still(orchestrator: WanOrchestrator, path: Path, **params: object) -> np.ndarray:
    """One lossless frame (PNG), so equal inputs give bit-equal pixels."""
    result = orchestrator.generate_t2v(PROMPT, output_path=path, seed=5, video_length=1, **params)
    return read_video_frames(result.output_path)


def test_guidance2_applies_only_to_the_low_noise_expert(dual_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    # All steps high-noise (threshold 0): guidance2_scale must not matter.
    a = _still(dual_orchestrator, tmp_path / "a.png", switch_threshold=0, guidance2_scale=1.5)
    b = _still(dual_orchestrator, tmp_path / "b.png", switch_threshold=0, guidance2_scale=7.0)
    np.testing.assert_array_equal(a, b)
    # Steps split between experts: guidance2_scale changes the low-noise steps, hence the result.
    c = _still(dual_orchestrator, tmp_path / "c.png", switch_threshold=875, guidance2_scale=1.5)
    d = _still(dual_orchestrator, tmp_path / "d.png", switch_threshold=875, guidance2_scale=7.0)
    assert not np.array_equal(c, d)


def test_guidance_applies_only_to_the_high_noise_expert(dual_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    # All steps low-noise (threshold 1000 > every timestep): guidance_scale (kept > 1 so CFG stays on)
    # must not matter.
    a = _still(dual_orchestrator, tmp_path / "a.png", switch_threshold=1000, guidance_scale=2.0)
    b = _still(dual_orchestrator, tmp_path / "b.png", switch_threshold=1000, guidance_scale=9.0)
    np.testing.assert_array_equal(a, b)
    c = _still(dual_orchestrator, tmp_path / "c.png", switch_threshold=875, guidance_scale=2.0)
    d = _still(dual_orchestrator, tmp_path / "d.png", switch_threshold=875, guidance_scale=9.0)
    assert not np.array_equal(c, d)
