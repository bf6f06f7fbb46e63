"""Video files: MP4 round trip, PNG for one frame, atomic writes, stale partial files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from wan_engine.video_io import (
    partial_files_for,
    read_video_frames,
    read_video_info,
    remove_partial_files,
    write_video,
)


def _gradient_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth frames (easy to compress faithfully), each a little different."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([xs / width, ys / height, np.full_like(xs, i / max(count, 1), dtype=float)], axis=-1)
        for i in range(count)
    ]
    return np.asarray(frames, dtype=np.float32)


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = _gradient_frames(9)
    path = write_video(frames, tmp_path / "clip.mp4", fps=16)
    assert path == tmp_path / "clip.mp4"
    info = read_video_info(path)
    assert (info.frames, info.width, info.height, info.fps) == (9, 64, 48, 16.0)
    decoded = read_video_frames(path)
    assert decoded.shape == (9, 48, 64, 3) and decoded.dtype == np.uint8
    expected = (frames * 255).round()
    assert np.abs(decoded.astype(float) - expected).mean() < 4.0
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_uint8_frames_and_overwrite(tmp_path: Path) -> None:
    frames = (_gradient_frames(5) * 255).astype(np.uint8)
    write_video(frames[:3], tmp_path / "clip.mp4", fps=8)
    path = write_video(frames, tmp_path / "clip.mp4", fps=8)  # replaces the old file atomically
    assert read_video_info(path).frames == 5
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_single_frame_is_a_lossless_png(tmp_path: Path) -> None:
    frames = (_gradient_frames(1) * 255).astype(np.uint8)
    path = write_video(frames, tmp_path / "still.mp4", fps=16)
    assert path == tmp_path / "still.png"
    assert read_video_info(path).frames == 1
    np.testing.assert_array_equal(read_video_frames(path), frames)


def test_failing_frame_source_leaves_no_file(tmp_path: Path) -> None:
    frames = _gradient_frames(4)

    def source() -> Iterator[np.ndarray]:
        yield frames[0]
        yield frames[1]
        raise KeyboardInterrupt  # e.g. a cancel arriving mid-write

    with pytest.raises(KeyboardInterrupt):
        write_video(source(), tmp_path / "clip.mp4", fps=16)
    assert os.listdir(tmp_path) == []


def test_odd_size_is_refused_without_leftovers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(np.zeros((3, 15, 16, 3), dtype=np.uint8), tmp_path / "odd.mp4", fps=16)
    assert os.listdir(tmp_path) == []


def test_partial_files_found_and_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".task_1.4242.partial.mp4"
    stale.write_bytes(b"half")
    other = tmp_path / ".task_10.4242.partial.mp4"
    other.write_bytes(b"half")
    (tmp_path / ".task_1.5.4242.partial.mp4").write_bytes(b"other output")
    (tmp_path / "task_1.mp4").write_bytes(b"done")
    assert partial_files_for("task_1", tmp_path) == [stale]
    assert remove_partial_files("task_1", tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == [
        ".task_1.5.4242.partial.mp4",
        ".task_10.4242.partial.mp4",
        "task_1.mp4",
    ]
