"""VACE, image-to-video, first-last-frame and TI2V through WanOrchestrator on tiny real pipelines.

Every output is checked on disk (frame count and size); conditioning must change the result, and
two-expert VACE / I2V models follow the boundary and per-expert guidance like two-expert T2V.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import UniPCMultistepScheduler

from headless_wgp import GenerationResult, WanOrchestrator
from tests.support.media import half_mask, noise_image, noise_video
from wan_engine.errors import InvalidRequestError
from wan_engine.video_io import read_video_frames, read_video_info

PROMPT = "a lighthouse in a storm"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "guide": noise_video(folder / "guide.mp4", 5, seed=1),
        "guide2": noise_video(folder / "guide2.mp4", 5, seed=2),
        "long_guide": noise_video(folder / "long.mp4", 13, seed=3),
        "mask": half_mask(folder / "mask.png"),
        "ref": noise_image(folder / "ref.png", 40, 40, seed=4),
        "start": noise_image(folder / "start.png", seed=5),
        "end": noise_image(folder / "end.jpg", seed=6),
        "other_start": noise_image(folder / "other.png", seed=7),
    }


@pytest.fixture(scope="module")
def orchestrator(tiny_models_dir: Path) -> Iterator[WanOrchestrator]:
    """One orchestrator for the module; each test loads the model it needs (a no-op when resident)."""
    orch = WanOrchestrator(tiny_models_dir)
    yield orch
    orch.unload_model()


def _check_output(result: GenerationResult, frames: int, width: int, height: int) -> np.ndarray:
    info = read_video_info(result.output_path)
    assert (info.frames, info.width, info.height) == (frames, width, height)
    assert (result.frames, result.width, result.height) == (frames, width, height)
    json.dumps(result.to_dict())  # result_data must be JSON
    return read_video_frames(result.output_path)


# ----- VACE -------------------------------------------------------------------------------------------


def test_vace_with_mask_and_reference(orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path) -> None:
    orchestrator.load_model("tiny_vace")
    run = orchestrator.generate_vace
    common = {"video_mask": media["mask"], "image_refs": [media["ref"]], "seed": 3}
    a = run(PROMPT, video_guide=media["guide"], output_path=tmp_path / "a.mp4", **common)
    frames_a = _check_output(a, 9, 64, 48)
    assert a.mode == "vace" and a.inputs["control_scale"] == 1.0
    assert a.inputs["video_guide"]["resize"] == "resized 80x60 -> 64x48 (cover + center-crop)"
    assert a.inputs["video_guide"]["frames"] == "padded 5 -> 9 frames with 4 neutral grey frames"
    assert a.inputs["image_refs"] and "ref.png" in a.inputs["image_refs"][0]
    again = run(PROMPT, video_guide=media["guide"], output_path=tmp_path / "again.mp4", **common)
    np.testing.assert_array_equal(frames_a, _check_output(again, 9, 64, 48))
    other = run(PROMPT, video_guide=media["guide2"], output_path=tmp_path / "b.mp4", **common)
    assert not np.array_equal(frames_a, _check_output(other, 9, 64, 48)), "the guide must condition the result"
    no_ref = run(PROMPT, video_guide=media["guide"], video_mask=media["mask"], seed=3, output_path=tmp_path / "c.mp4")
    assert not np.array_equal(frames_a, _check_output(no_ref, 9, 64, 48)), "the reference image must count"
    weak = run(PROMPT, video_guide=media["guide"], control_scale=0.0, output_path=tmp_path / "d.mp4", **common)
    assert weak.inputs["control_scale"] == 0.0
    assert not np.array_equal(frames_a, _check_output(weak, 9, 64, 48))


def test_vace_long_guide_trimmed_other_length(
    orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path
) -> None:
    orchestrator.load_model("tiny_vace")
    result = orchestrator.generate_vace(
        PROMPT, video_guide=media["long_guide"], output_path=tmp_path / "t.mp4", video_length=5, resolution="96x64"
    )
    _check_output(result, 5, 96, 64)
    assert result.inputs["video_guide"]["frames"] == "trimmed 13 -> 5 frames (kept the first 5)"
    assert "video_mask" not in result.inputs


def test_vace_needs_a_guide_and_a_vace_model(
    orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path
) -> None:
    orchestrator.load_model("tiny_vace")
    with pytest.raises(InvalidRequestError, match="video_guide"):
        orchestrator.generate_vace(PROMPT, video_guide=None, output_path=tmp_path / "x.mp4")
    with pytest.raises(InvalidRequestError, match="control_scale"):
        orchestrator.generate_vace(PROMPT, video_guide=media["guide"], control_scale=-1, output_path=tmp_path / "x")
    orchestrator.load_model("tiny_t2v")
    with pytest.raises(InvalidRequestError, match="VACE needs one of vace"):
        orchestrator.generate_vace(PROMPT, video_guide=media["guide"], output_path=tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


# ----- image-to-video ---------------------------------------------------------------------------------


def test_i2v_start_image(orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path) -> None:
    orchestrator.load_model("tiny_i2v")
    a = orchestrator.generate_i2v(PROMPT, image_start=media["start"], seed=2, output_path=tmp_path / "a.mp4")
    frames_a = _check_output(a, 9, 64, 48)
    assert a.mode == "i2v" and a.inputs["image_start"]["resize"] == "resized 80x60 -> 64x48 (cover + center-crop)"
    b = orchestrator.generate_i2v(PROMPT, image_start=media["other_start"], seed=2, output_path=tmp_path / "b.mp4")
    assert not np.array_equal(frames_a, _check_output(b, 9, 64, 48)), "the start image must condition the result"
    with pytest.raises(InvalidRequestError, match="flf2v_14B"):
        orchestrator.generate_i2v(PROMPT, image_start=media["start"], image_end=media["end"], output_path=tmp_path)


def test_first_last_frame(orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path) -> None:
    orchestrator.load_model("tiny_flf2v")
    run = orchestrator.generate_i2v
    a = run(PROMPT, image_start=media["start"], image_end=media["end"], seed=2, output_path=tmp_path / "a.mp4")
    frames_a = _check_output(a, 9, 64, 48)
    assert a.mode == "flf2v" and set(a.inputs) == {"image_start", "image_end"}
    b = run(PROMPT, image_start=media["start"], image_end=media["other_start"], seed=2, output_path=tmp_path / "b.mp4")
    assert not np.array_equal(frames_a, _check_output(b, 9, 64, 48)), "the end image must condition the result"
    with pytest.raises(InvalidRequestError, match="image_end"):
        run(PROMPT, image_start=media["start"], output_path=tmp_path / "c.mp4")


def test_wan22_i2v_first_last_frame_with_two_experts(
    orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path
) -> None:
    orchestrator.load_model("tiny_i2v_2_2")
    run = orchestrator.generate_i2v
    a = run(PROMPT, image_start=media["start"], seed=2, output_path=tmp_path / "a.mp4", video_length=5)
    frames_a = _check_output(a, 5, 64, 48)
    assert a.switch_threshold == 900 and a.guidance_scale == a.guidance2_scale == 3.5 and a.flow_shift == 5.0
    assert set(a.experts_used or ()) == {"high", "low"}
    b = run(PROMPT, image_start=media["start"], image_end=media["end"], seed=2, output_path=tmp_path / "b.mp4")
    frames_b = _check_output(b, 9, 64, 48)
    assert b.mode == "flf2v" and frames_b.shape != frames_a.shape


def test_ti2v_text_and_image(orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path) -> None:
    orchestrator.load_model("tiny_ti2v")
    text = orchestrator.generate_t2v(PROMPT, seed=2, output_path=tmp_path / "t.mp4")
    frames_t = _check_output(text, 9, 64, 32)
    image = orchestrator.generate_i2v(PROMPT, image_start=media["start"], seed=2, output_path=tmp_path / "i.mp4")
    frames_i = _check_output(image, 9, 64, 32)
    assert image.mode == "i2v" and image.inputs["image_start"]["resize"].endswith("64x32 (cover + center-crop)")
    assert not np.array_equal(frames_t, frames_i)
    with pytest.raises(InvalidRequestError, match="multiples of 32"):
        orchestrator.generate_t2v(PROMPT, resolution="64x48", output_path=tmp_path / "x.mp4")
    with pytest.raises(InvalidRequestError, match="start image only"):
        orchestrator.generate_i2v(PROMPT, image_start=media["start"], image_end=media["end"], output_path=tmp_path)


# ----- Wan 2.2 two experts on VACE and I2V ----------------------------------------------------------------


def _expected_experts(models_dir: Path, folder: str, flow_shift: float, steps: int, threshold: float) -> list[str]:
    scheduler = UniPCMultistepScheduler.from_pretrained(
        models_dir / folder, subfolder="scheduler", flow_shift=flow_shift
    )
    scheduler.set_timesteps(steps)
    return ["high" if float(t) >= threshold else "low" for t in scheduler.timesteps]


DUAL_MODES = [("tiny_vace_2_2", "tiny-wan2.2-vace", "vace"), ("tiny_i2v_2_2", "tiny-wan2.2-i2v", "i2v")]


def _dual_still(orchestrator: WanOrchestrator, mode: str, media: dict[str, Path], path: Path, **params: object):
    if mode == "vace":
        return orchestrator.generate_vace(PROMPT, video_guide=media["start"], output_path=path, **params)
    return orchestrator.generate_i2v(PROMPT, image_start=media["start"], output_path=path, **params)


@pytest.mark.parametrize(("model", "folder", "mode"), DUAL_MODES)
def test_dual_expert_boundary_and_per_expert_guidance(
    orchestrator: WanOrchestrator,
    tiny_models_dir: Path,
    media: dict[str, Path],
    tmp_path: Path,
    model: str,
    folder: str,
    mode: str,
) -> None:
    orchestrator.load_model(model)

    def still(name: str, **params: object) -> tuple[GenerationResult, np.ndarray]:
        result = _dual_still(orchestrator, mode, media, tmp_path / f"{name}.png", seed=5, video_length=1, **params)
        return result, _check_output(result, 1, 64, 48)

    for flow_shift, steps, threshold in [(12.0, 4, 875), (3.0, 5, 700)]:
        result, _ = still(f"b{steps}", flow_shift=flow_shift, num_inference_steps=steps, switch_threshold=threshold)
        assert list(result.experts_used or ()) == _expected_experts(
            tiny_models_dir, folder, flow_shift, steps, threshold
        )
        assert result.flow_shift == flow_shift and len(result.timesteps) == steps
        assert result.extra["transformer_calls_per_step"] == [2] * steps  # CFG: cond + uncond, one expert
    # All steps high-noise: guidance2_scale is unused. Split: it changes the result.
    _, a = still("a", switch_threshold=0, guidance2_scale=1.5)
    _, b = still("b", switch_threshold=0, guidance2_scale=7.0)
    np.testing.assert_array_equal(a, b)
    _, c = still("c", switch_threshold=875, flow_shift=12.0, guidance2_scale=1.5)
    _, d = still("d", switch_threshold=875, flow_shift=12.0, guidance2_scale=7.0)
    assert not np.array_equal(c, d)
    # All steps low-noise: guidance_scale (kept > 1 so CFG stays on) is unused.
    _, e = still("e", switch_threshold=1000, guidance_scale=2.0)
    _, f = still("f", switch_threshold=1000, guidance_scale=9.0)
    np.testing.assert_array_equal(e, f)


def test_negative_prompt_seed_and_steps_are_honoured(
    orchestrator: WanOrchestrator, media: dict[str, Path], tmp_path: Path
) -> None:
    orchestrator.load_model("tiny_vace_2_2")

    def still(name: str, **params: object) -> tuple[GenerationResult, np.ndarray]:
        result = _dual_still(orchestrator, "vace", media, tmp_path / f"{name}.png", video_length=1, **params)
        return result, _check_output(result, 1, 64, 48)

    base, a = still("a", seed=11)
    assert base.seed == 11 and base.num_inference_steps == 4 and base.extra["negative_prompt"] == ""
    _, same = still("same", seed=11)
    np.testing.assert_array_equal(a, same)
    neg, b = still("neg", seed=11, negative_prompt="blurry")
    assert neg.extra["negative_prompt"] == "blurry" and not np.array_equal(a, b)
    _, c = still("seed", seed=12)
    assert not np.array_equal(a, c)
    steps, d = still("steps", seed=11, num_inference_steps=2)
    assert steps.num_inference_steps == 2 and len(steps.timesteps) == 2 and not np.array_equal(a, d)
