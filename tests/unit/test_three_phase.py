"""Wan2GP's 3-phase guidance on the tiny Wan 2.2 models: which expert and which guidance ran each step.

The expected phases are computed here from the scheduler's own timesteps with Wan2GP's rule
(any2video.update_guidance: phase 2 from the first timestep <= switch_threshold, phase 3 from the first
<= switch_threshold2; the low-noise expert after `model_switch_phase`), and checked against what the
ExpertRecorder saw: the expert of each step, and one transformer call per step without CFG
(guidance 1) or two with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from headless_wgp import WanOrchestrator
from wan_engine.errors import InvalidRequestError, PresetError, UnknownModelError
from wan_engine.loras import parse_lora_multipliers
from wan_engine.presets import load_presets
from wan_engine.video_io import read_video_frames

PROMPT = "a lighthouse in a storm"


def _definition(folder: Path, key: str, architecture: str, urls: str, **settings: Any) -> None:
    """A Wan2GP-layout definition file (the keys of its defaults/vace_14B_lightning_3p_2_2.json)."""
    model = {"name": key, "architecture": architecture, "description": "test", "URLs": urls}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}.json").write_text(json.dumps({"model": model, "resolution": "64x48", **settings}))


THREE_PHASES = {
    "guidance_phases": 3,
    "guidance_scale": 3.5,
    "guidance2_scale": 2.0,
    "guidance3_scale": 1,
    "switch_threshold": 965,
    "switch_threshold2": 800,
    "model_switch_phase": 2,
    "flow_shift": 3,
    "num_inference_steps": 8,
}


@pytest.fixture(scope="module")
def presets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("definitions")
    _definition(folder, "p3", "t2v_2_2", "tiny-wan2.2-t2v", **THREE_PHASES)
    _definition(folder, "p3_euler", "t2v_2_2", "tiny-wan2.2-t2v", **THREE_PHASES, sample_solver="euler")
    _definition(folder, "p3_single", "t2v", "tiny-wan2.1-t2v", **{**THREE_PHASES, "model_switch_phase": 1})
    _definition(folder, "p3_i2v", "i2v_2_2", "tiny-wan2.2-i2v", **THREE_PHASES)
    return folder


@pytest.fixture(scope="module")
def orchestrator(tiny_models_dir: Path, presets_dir: Path) -> Iterator[WanOrchestrator]:
    built = WanOrchestrator(tiny_models_dir, load_presets(user_dir=presets_dir))
    yield built
    built.unload_model()


def _timesteps(folder: Path, flow_shift: float, steps: int, euler: bool = False) -> list[float]:
    if euler:
        scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    else:
        scheduler = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler", flow_shift=flow_shift)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def _expected(timesteps: list[float], first: float, second: float, switch_phase: int, dual: bool) -> tuple:
    """(phase 1-3 per step, expert per step), Wan2GP's rule written out independently."""
    phases = []
    for t in timesteps:
        previous = phases[-1] if phases else 1
        phases.append(max(previous, 3 if t <= second else 2 if t <= first else 1))
    experts = ["low" if dual and phase > switch_phase else "high" for phase in phases]
    return phases, experts


def _run(orchestrator: WanOrchestrator, key: str, path: Path, seed: int = 3, **params: Any) -> Any:
    orchestrator.load_model(key)
    return orchestrator.generate_t2v(PROMPT, output_path=path, seed=seed, video_length=1, **params)


@pytest.mark.parametrize("switch_phase", [1, 2])
def test_each_step_runs_the_planned_expert_and_guidance(
    orchestrator: WanOrchestrator, tiny_models_dir: Path, tmp_path: Path, switch_phase: int
) -> None:
    result = _run(orchestrator, "p3", tmp_path / "v.png", model_switch_phase=switch_phase)
    timesteps = _timesteps(tiny_models_dir / "tiny-wan2.2-t2v", 3.0, 8)
    phases, experts = _expected(timesteps, 965, 800, switch_phase, dual=True)
    assert {1, 2, 3} <= set(phases), phases  # the thresholds really split the 8 steps into three phases
    assert list(result.experts_used) == experts
    report = result.extra["guidance_phases"]
    assert report["phase_per_step"] == phases and report["model_switch_phase"] == switch_phase
    scales = {1: 3.5, 2: 2.0, 3: 1.0}
    assert report["guidance_per_step"] == [scales[p] for p in phases]
    # CFG (cond + uncond) where the phase's guidance is not 1, one pass where it is.
    assert result.extra["transformer_calls_per_step"] == [1 if scales[p] == 1.0 else 2 for p in phases]
    assert orchestrator.pipeline.transformer.__class__.__name__ == "WanTransformer3DModel"  # slot restored


def test_a_two_phase_plan_run_by_phases_equals_the_pipelines_own_switch(
    orchestrator: WanOrchestrator, tmp_path: Path
) -> None:
    # Phase 3 never starts (threshold 0) and the expert switches after phase 1: the same as diffusers'
    # own two-expert call with guidance_scale / guidance_scale_2 (no timestep lies on the boundary).
    common = {"num_inference_steps": 4, "flow_shift": 12.0, "switch_threshold": 875.0, "guidance2_scale": 2.5}
    orchestrator.load_model("tiny_t2v_2_2")
    native = orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "a.png", seed=9, video_length=1, **common)
    phased = _run(
        orchestrator,
        "p3",
        tmp_path / "b.png",
        seed=9,
        **common,
        guidance_scale=4.0,
        guidance3_scale=2.5,
        switch_threshold2=0,
        model_switch_phase=1,
    )
    assert phased.extra["guidance_phases"] is not None and native.extra["guidance_phases"] is None
    assert phased.experts_used == native.experts_used and "low" in native.experts_used
    np.testing.assert_array_equal(read_video_frames(phased.output_path), read_video_frames(native.output_path))


def test_phases_on_one_transformer_switch_guidance_only(
    orchestrator: WanOrchestrator, tiny_models_dir: Path, tmp_path: Path
) -> None:
    result = _run(orchestrator, "p3_single", tmp_path / "v.png")
    phases, _ = _expected(_timesteps(tiny_models_dir / "tiny-wan2.1-t2v", 3.0, 8), 965, 800, 1, dual=False)
    assert result.experts_used is None  # one transformer: nothing to switch
    assert result.extra["guidance_phases"]["phase_per_step"] == phases
    assert result.extra["transformer_calls_per_step"] == [1 if p == 3 else 2 for p in phases]
    # Equal scales in every phase: exactly the plain run at that guidance.
    same = {"guidance_scale": 3.0, "guidance2_scale": 3.0, "guidance3_scale": 3.0}
    phased = _run(orchestrator, "p3_single", tmp_path / "a.png", **same)
    orchestrator.load_model("tiny_t2v")
    plain = orchestrator.generate_t2v(
        PROMPT, output_path=tmp_path / "b.png", seed=3, video_length=1, guidance_scale=3.0, num_inference_steps=8,
        flow_shift=3.0, resolution="64x48",
    )  # fmt: skip
    np.testing.assert_array_equal(read_video_frames(phased.output_path), read_video_frames(plain.output_path))


def test_sample_solver_euler_plans_on_its_own_timesteps(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    result = _run(orchestrator, "p3_euler", tmp_path / "v.png")
    timesteps = _timesteps(Path(), 3.0, 8, euler=True)
    assert result.timesteps == pytest.approx(timesteps)
    phases, experts = _expected(timesteps, 965, 800, 2, dual=True)
    assert list(result.experts_used) == experts and result.extra["sample_solver"] == "euler"
    assert result.extra["guidance_phases"]["phase_per_step"] == phases


def test_three_phases_on_wan22_image_to_video(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "start.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    orchestrator.load_model("p3_i2v")
    result = orchestrator.generate_i2v(
        PROMPT, image_start=image, output_path=tmp_path / "v.mp4", seed=2, video_length=5
    )
    assert result.extra["guidance_phases"]["guidance_phases"] == 3
    assert "high" in result.experts_used and "low" in result.experts_used


def test_switch_threshold2_above_switch_threshold_is_refused(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    orchestrator.load_model("p3")
    with pytest.raises(InvalidRequestError, match=r"switch_threshold2.*at most switch_threshold \(965\)"):
        orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "v.png", switch_threshold2=970)


def test_sample_solvers_without_a_diffusers_scheduler_are_refused_with_the_allowed_ones(tmp_path: Path) -> None:
    # Wan2GP's causvid / lcm: that definition is skipped (start-up goes on); asking for it says why.
    _definition(tmp_path, "causvid", "t2v", "tiny-wan2.1-t2v", sample_solver="causvid")
    presets = load_presets(user_dir=tmp_path)
    with pytest.raises(UnknownModelError, match=r"sample_solver 'causvid' is not supported.*allowed: unipc .*euler"):
        presets.get("causvid")
    _definition(tmp_path, "typo", "t2v", "tiny-wan2.1-t2v", sample_solver="eulr")  # not a Wan2GP value: an error
    with pytest.raises(PresetError, match=r"sample_solver 'eulr' is not supported; allowed: unipc"):
        load_presets(user_dir=tmp_path)


# ----- 3-phase LoRA multipliers ---------------------------------------------------------------------------


def test_three_phase_multipliers_follow_the_guidance_phases() -> None:
    phases = (0, 1, 1, 1, 2, 2, 2, 2)  # guidance phase of each of 8 steps
    experts = ["high"] * 4 + ["low"] * 4  # model_switch_phase 2
    first, second, sched = parse_lora_multipliers("0;1;0 0;0;1 1;0.5,0.25;0", 3, dual=True, guidance_phases=3)
    values = [[m.for_phases(phases).value_at(s, experts) for s in range(8)] for m in (first, second, sched)]
    assert values[0] == [0, 1, 1, 1, 0, 0, 0, 0]
    assert values[1] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert values[2] == [1, 0.5, 0.5, 0.25, 0, 0, 0, 0]  # a schedule spread over its phase's steps


@pytest.mark.parametrize(("switch_phase", "expanded"), [(1, ((1.0,), (0.5,), (0.5,))), (2, ((1.0,), (1.0,), (0.5,)))])
def test_two_values_on_three_phases_follow_the_expert_switch(switch_phase: int, expanded: tuple) -> None:
    (multiplier,) = parse_lora_multipliers("1;0.5", 1, dual=True, guidance_phases=3, model_switch_phase=switch_phase)
    assert multiplier.phases == expanded  # Wan2GP: a;a;b when the switch is after phase 2, else a;b;b


def test_three_values_on_a_two_phase_model_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"'0;1;0'.*3-phase definition \(guidance_phases 3\)"):
        parse_lora_multipliers("0;1;0", 1, dual=True, guidance_phases=2)
    with pytest.raises(InvalidRequestError, match="one transformer"):
        parse_lora_multipliers("0;1;0", 1, dual=False)


def test_a_lora_follows_its_phases_on_a_three_phase_run(
    orchestrator: WanOrchestrator, tmp_path: Path, tiny_models_dir: Path
) -> None:
    from safetensors.torch import save_file

    from wan_engine.tiny_models import tiny_lora_weights

    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(tiny_lora_weights(), str(loras / "style.safetensors"))
    orchestrator.loras_dirs = (loras,)
    try:
        result = _run(orchestrator, "p3", tmp_path / "v.png", lora_names=["style"], lora_multipliers="0;1;0")
    finally:
        orchestrator.loras_dirs = (tiny_models_dir / "no-loras",)
    phases = result.extra["guidance_phases"]["phase_per_step"]
    (record,) = result.loras
    assert record["per_step"] == [1.0 if p == 2 else 0.0 for p in phases]
    assert record["loaded_into"] == ["high"]  # phase 2 runs on the high-noise expert (model_switch_phase 2)
