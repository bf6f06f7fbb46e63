"""WanOrchestrator text-to-video on the tiny Wan 2.1 model: real diffusers pipeline, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from headless_wgp import ProgressEvent, WanOrchestrator
from wan_engine.errors import InvalidRequestError, ModelUnavailableError, UnknownModelError
from wan_engine.pipeline_runtime import decode_latents, encode_prompts
from wan_engine.video_io import read_video_frames, read_video_info

PROMPT = "a red fox runs through snow"


class CancelledForTest(Exception):
    """Raised from a progress callback, as the worker does to cancel a task."""


def test_t2v_writes_mp4_with_requested_frames_and_size(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    result = t2v_orchestrator.generate_t2v(
        PROMPT,
        output_path=tmp_path / "fox.mp4",
        progress=events.append,
        seed=1,
        resolution="96x64",
        video_length=9,
    )
    assert result.output_path == tmp_path / "fox.mp4"
    info = read_video_info(result.output_path)
    assert (info.frames, info.width, info.height) == (9, 96, 64)
    assert (result.frames, result.width, result.height, result.fps) == (9, 96, 64, 16)
    assert result.model == "tiny_t2v" and result.memory_profile == "cpu" and result.peak_vram_gb is None
    assert result.peak_rss_gb is not None and result.peak_rss_gb > 0
    assert result.experts_used is None  # one transformer
    timings = result.timings
    assert len(timings["step_times"]) == result.num_inference_steps == 4
    assert timings["total"] >= timings["encode"] + timings["denoise"] + timings["decode"] + timings["write"] - 1e-6
    json.dumps(result.to_dict())  # result_data must be JSON
    stages = [e.stage for e in events]
    assert stages == ["encoding_prompt"] + ["denoising"] * 5 + ["decoding", "writing_video"]
    assert [e.step for e in events if e.stage == "denoising"] == [0, 1, 2, 3, 4]
    assert all(e.total_steps == 4 for e in events if e.stage == "denoising")
    assert sorted(os.listdir(tmp_path)) == ["fox.mp4"]


def test_same_seed_same_video_other_seed_differs(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    run = t2v_orchestrator.generate_t2v
    a = read_video_frames(run(PROMPT, output_path=tmp_path / "a.mp4", seed=42, video_length=5).output_path)
    b = read_video_frames(run(PROMPT, output_path=tmp_path / "b.mp4", seed=42, video_length=5).output_path)
    c = read_video_frames(run(PROMPT, output_path=tmp_path / "c.mp4", seed=43, video_length=5).output_path)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_seed_is_recorded_and_reproduces(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    first = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "r.mp4", seed=-1, video_length=1)
    assert first.seed_was_random and first.seed >= 0
    again = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "s.mp4", seed=first.seed, video_length=1)
    np.testing.assert_array_equal(read_video_frames(first.output_path), read_video_frames(again.output_path))


def test_video_length_aligned_to_4n_plus_1(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    result = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "v.mp4", seed=1, video_length=10)
    assert result.frames == 13 and result.video_length_adjusted_from == 10
    assert read_video_info(result.output_path).frames == 13
    assert result.to_dict()["video_length_adjusted_from"] == 10


def test_single_frame_writes_png(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    result = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "still.mp4", seed=1, video_length=1)
    assert result.output_path == tmp_path / "still.png" and result.frames == 1
    assert read_video_frames(result.output_path).shape == (1, 48, 64, 3)


@pytest.mark.parametrize(
    ("params", "quoted"),
    [({"resolution": "70x48"}, "70x48"), ({"num_inference_steps": 0}, "num_inference_steps: 0")],
)
def test_bad_params_raise_before_any_work(
    t2v_orchestrator: WanOrchestrator, tmp_path: Path, params: dict, quoted: str
) -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(InvalidRequestError, match=quoted):
        t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "x.mp4", progress=events.append, **params)
    assert events == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage", ["denoising", "decoding", "writing_video"])
def test_raising_callback_stops_without_output(t2v_orchestrator: WanOrchestrator, tmp_path: Path, stage: str) -> None:
    seen: list[ProgressEvent] = []

    def cancel(event: ProgressEvent) -> None:
        seen.append(event)
        if event.stage == stage and (stage != "denoising" or event.step == 2):
            raise CancelledForTest(stage)

    with pytest.raises(CancelledForTest):
        t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "x.mp4", progress=cancel, seed=1)
    assert os.listdir(tmp_path) == []  # no output, not even a partial file
    if stage == "denoising":
        assert [e.step for e in seen if e.stage == "denoising"][-1] == 2  # stopped at once
    # The pipeline is left clean: the next call works and matches an undisturbed run.
    ok = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "ok.mp4", seed=1)
    assert read_video_info(ok.output_path).frames == 9


def test_flow_shift_is_per_call(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    pipe = t2v_orchestrator._loaded.pipe  # type: ignore[union-attr]
    base = dict(pipe.scheduler.config)
    low = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "a.png", video_length=1, flow_shift=1.0)
    high = t2v_orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "b.png", video_length=1, flow_shift=8.0)
    assert low.timesteps != high.timesteps and low.flow_shift == 1.0 and high.flow_shift == 8.0
    assert dict(pipe.scheduler.config) == base  # restored after each call


def test_split_encode_denoise_decode_matches_plain_pipeline(t2v_orchestrator: WanOrchestrator) -> None:
    """Timing the stages separately must not change the result: compare with one plain pipe() call."""
    loaded = t2v_orchestrator._loaded
    assert loaded is not None
    pipe, device = loaded.pipe, loaded.device
    common = {"height": 48, "width": 64, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 5.0}
    plain = pipe(prompt=PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(3), **common).frames[
        0
    ]
    embeds, negative = encode_prompts(pipe, PROMPT, "blurry", do_cfg=True, device=device, max_length=512)
    latents = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **common,
    ).frames
    np.testing.assert_allclose(decode_latents(pipe, latents), plain, atol=1e-5)


def test_load_model_twice_is_a_noop(tiny_models_dir: Path) -> None:
    orchestrator = WanOrchestrator(tiny_models_dir)
    events: list[ProgressEvent] = []
    assert orchestrator.load_model("tiny_t2v", progress=events.append) > 0.0
    pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
    assert orchestrator.load_model("tiny_t2v", progress=events.append) == 0.0
    assert orchestrator._loaded.pipe is pipe  # type: ignore[union-attr]
    assert [e.stage for e in events] == ["loading_model"]
    assert orchestrator.current_model == "tiny_t2v" and not orchestrator.is_vace()


def test_switching_models_and_failed_loads(tiny_models_dir: Path, tmp_path: Path) -> None:
    orchestrator = WanOrchestrator(tiny_models_dir)
    with pytest.raises(InvalidRequestError, match="load_model"):
        orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "x.mp4")
    orchestrator.load_model("tiny_vace")
    assert orchestrator.is_vace()
    # An unknown key or absent weights leave the resident model in place.
    with pytest.raises(UnknownModelError):
        orchestrator.load_model("nope")
    with pytest.raises(ModelUnavailableError, match=r"t2v_1\.3B"):
        orchestrator.load_model("t2v_1.3B")
    assert orchestrator.current_model == "tiny_vace"
    result = orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "vace.mp4", seed=1, video_length=5)
    assert result.model == "tiny_vace" and read_video_info(result.output_path).frames == 5
    orchestrator.unload_model()
    assert orchestrator.current_model is None
