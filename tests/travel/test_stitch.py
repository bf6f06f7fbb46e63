"""Cross-fade weights and streaming stitching of real MP4 clips (imageio-ffmpeg's ffmpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import travel_between_images as travel
from travel_between_images import crossfade_weights, join_clips, plan_travel, stitch_videos
from wan_engine.video_io import (
    OpenedInput,
    iter_video_frames,
    partial_files_for,
    read_video_frames,
    read_video_info,
    write_video,
)

W, H = 32, 32
TOL = 4.0  # mean absolute error (0..255) allowed by H.264 yuv420p at CRF 17 on flat frames


def _clip(path: Path, values: list[int], width: int = W, height: int = H) -> Path:
    """A clip whose frame k is flat grey values[k]."""
    frames = np.stack([np.full((height, width, 3), v, dtype=np.uint8) for v in values])
    return write_video(frames, path, fps=16)


def _means(path: Path) -> np.ndarray:
    return read_video_frames(path).reshape(read_video_info(path).frames, -1).astype(np.float64).mean(axis=1)


def test_crossfade_weights_cosine_ease() -> None:
    np.testing.assert_allclose(crossfade_weights(4), [0.1464466, 0.5, 0.8535534, 1.0], atol=1e-6)
    k = np.arange(8)
    np.testing.assert_allclose(crossfade_weights(8), 0.5 - 0.5 * np.cos(np.pi * (k + 1) / 8))
    assert crossfade_weights(0).shape == (0,)
    assert crossfade_weights(1).tolist() == [1.0]


@pytest.mark.parametrize("sharpen", [0.5, 1.0, 3.0])
def test_sharpen_steepens_but_stays_a_monotone_ease(sharpen: float) -> None:
    plain, sharp = crossfade_weights(8), crossfade_weights(8, sharpen)
    assert sharp[-1] == 1.0
    assert ((sharp >= 0) & (sharp <= 1)).all()
    assert (np.diff(sharp) > 0).all()
    assert sharp[0] < plain[0]  # lower below the midpoint, higher above: steeper
    assert sharp[5] > plain[5]
    np.testing.assert_allclose(sharp[3], 0.5)  # the midpoint stays put


def test_crossfade_weights_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="overlap"):
        crossfade_weights(-1)
    with pytest.raises(ValueError, match="sharpen"):
        crossfade_weights(4, -0.5)


def test_black_to_white_crossfade_read_back_from_mp4(tmp_path: Path) -> None:
    black = _clip(tmp_path / "black.mp4", [0] * 17)
    white = _clip(tmp_path / "white.mp4", [255] * 17)
    calls: list[tuple[int, int]] = []

    result = stitch_videos(
        [black, white], [4], tmp_path / "out.mp4", fps=16, progress=lambda d, t: calls.append((d, t))
    )

    assert result.frames == 30 and (result.width, result.height) == (W, H)
    assert read_video_info(result.output_path).frames == 30
    weights = _means(result.output_path) / 255.0
    assert np.abs(weights[:13]).max() < TOL / 255
    np.testing.assert_allclose(weights[13:17], [0.146, 0.5, 0.854, 1.0], atol=TOL / 255)
    assert np.abs(weights[17:] - 1.0).max() < TOL / 255
    assert calls[-1] == (30, 30) and len(calls) == 30
    assert partial_files_for("out", tmp_path) == []


def test_join_blends_tail_with_head_in_order(tmp_path: Path) -> None:
    # Every frame has its own value, so a reversed or shifted overlap would show.
    a_values = [20 + 10 * k for k in range(9)]  # 20..100
    b_values = [240 - 10 * k for k in range(9)]  # 240..160
    a, b = _clip(tmp_path / "a.mp4", a_values), _clip(tmp_path / "b.mp4", b_values)
    w = crossfade_weights(4)

    result = stitch_videos([a, b], [4], tmp_path / "ab.mp4", fps=8)

    expected = a_values[:5]
    expected += [(1 - w[k]) * a_values[5 + k] + w[k] * b_values[k] for k in range(4)]
    expected += b_values[4:]
    assert result.frames == 14
    np.testing.assert_allclose(_means(result.output_path), expected, atol=TOL)


def test_plan_lengths_stitch_to_total_frames(tmp_path: Path) -> None:
    plan = plan_travel(3, [64, 81], [9], "p", seed_base=0)
    clips = [_clip(tmp_path / f"seg{s.index}.mp4", [100] * s.frames) for s in plan.segments]

    result = stitch_videos(clips, plan.overlaps, tmp_path / "travel.mp4", fps=16, sharpen=1.0)

    assert result.frames == plan.total_frames == 146
    assert read_video_info(result.output_path).frames == 146


def test_join_clips_uniform_and_explicit_overlap(tmp_path: Path) -> None:
    clips = [_clip(tmp_path / f"c{i}.mp4", [60 * i + 30] * 9) for i in range(3)]
    assert join_clips(clips, 2, tmp_path / "u.mp4", fps=16).frames == 27 - 4
    assert join_clips(clips, [0, 4], tmp_path / "e", fps=16).frames == 27 - 4
    assert (tmp_path / "e.mp4").exists()  # the .mp4 suffix is added
    assert join_clips(clips, [1], tmp_path / "one.mp4", fps=16).frames == 25
    with pytest.raises(ValueError, match="1 or 2"):
        join_clips(clips, [1, 2, 3], tmp_path / "bad.mp4", fps=16)


def test_size_mismatch_names_the_clip_and_leaves_nothing(tmp_path: Path) -> None:
    a = _clip(tmp_path / "a.mp4", [0] * 9)
    b = _clip(tmp_path / "odd_one.mp4", [0] * 9, width=48)
    with pytest.raises(ValueError, match=r"clip 1 .*odd_one\.mp4.* 48x32"):
        stitch_videos([a, b], [2], tmp_path / "out.mp4", fps=16)
    assert not (tmp_path / "out.mp4").exists()
    assert partial_files_for("out", tmp_path) == []


def test_overlap_longer_than_clip_names_the_clip(tmp_path: Path) -> None:
    a = _clip(tmp_path / "a.mp4", [0] * 9)
    short = _clip(tmp_path / "short.mp4", [0] * 5)
    with pytest.raises(ValueError, match=r"clip 1 .*short\.mp4.* 5 frames"):
        stitch_videos([a, short], [6], tmp_path / "out.mp4", fps=16)
    # A middle clip must hold both of its overlaps.
    with pytest.raises(ValueError, match=r"clip 1 .*short\.mp4.*\(4 \+ 2\)"):
        stitch_videos([a, short, a], [4, 2], tmp_path / "out.mp4", fps=16)
    with pytest.raises(ValueError, match="one overlap per join"):
        stitch_videos([a, short], [], tmp_path / "out.mp4", fps=16)
    assert not (tmp_path / "out.mp4").exists()


def test_failure_while_encoding_removes_the_temporary_file(tmp_path: Path) -> None:
    clips = [_clip(tmp_path / f"c{i}.mp4", [50] * 9) for i in range(2)]
    seen: list[Path] = []

    def cancel(done: int, total: int) -> None:
        seen.extend(partial_files_for("out", tmp_path))
        if done == 10:
            raise KeyboardInterrupt  # e.g. a cancel noticed mid-stitch

    with pytest.raises(KeyboardInterrupt):
        stitch_videos(clips, [2], tmp_path / "out.mp4", fps=16, progress=cancel)
    assert seen  # it was writing under a temporary name ...
    assert partial_files_for("out", tmp_path) == []  # ... which is gone
    assert not (tmp_path / "out.mp4").exists()


def test_stitch_streams_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clips = [_clip(tmp_path / f"c{i}.mp4", [40 * i] * 9) for i in range(3)]
    alive: list[int] = []
    real = travel.iter_opened_video_frames

    def counting(clip: OpenedInput):
        alive.append(1)
        try:
            yield from real(clip)
        finally:
            alive.pop()

    monkeypatch.setattr(travel, "iter_opened_video_frames", counting)

    max_alive = []
    result = stitch_videos(
        clips, [2, 2], tmp_path / "s.mp4", fps=16, progress=lambda d, t: max_alive.append(len(alive))
    )
    assert result.frames == 23
    assert max(max_alive) == 1  # one clip decoded at a time, each closed before the next opens


def test_iter_video_frames_matches_read_video_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    mp4 = write_video(frames, tmp_path / "v.mp4", fps=8)
    png = write_video(frames[:1], tmp_path / "still.mp4", fps=8)
    np.testing.assert_array_equal(np.stack(list(iter_video_frames(mp4))), read_video_frames(mp4))
    np.testing.assert_array_equal(np.stack(list(iter_video_frames(png))), frames[:1])


def test_a_stitch_first_progress_report_carries_its_estimate_then_its_own_rate() -> None:
    from worker.live.eta import EtaEstimator
    from worker.task import Task, TaskStatus

    now = [100.0]
    eta = EtaEstimator(None, lambda _task: None, clock=lambda: now[0])
    task = Task(
        id="t-stitch",
        task_type="travel_stitch",
        params_text="{}",
        status=TaskStatus.IN_PROGRESS,
        priority=0,
        dependant_on=None,
        parent_task_id="t",
        attempts=1,
        max_attempts=3,
    )
    estimate = eta.begin(task, None)
    assert estimate is not None and estimate > 0
    now[0] += 0.3  # probing the clips and starting ffmpeg: the first report comes with the first frame out
    first = eta.remaining(task.id, {"stage": "stitching", "step": 1, "total_steps": 100})
    assert first == pytest.approx(estimate * 99 / 100), "no rate yet: the estimate for the frames left"
    now[0] += 2.0  # 20 more frames at 0.1 s each
    assert eta.remaining(task.id, {"stage": "stitching", "step": 21, "total_steps": 100}) == pytest.approx(7.9)
    assert eta.remaining(task.id, {"stage": "stitching", "step": 100, "total_steps": 100}) == 0.0
