"""The H.264 settings (wan_engine.video_io.mp4_encoding): the preset written, its switch, what result_data records.

x264 writes its options into the stream ("options: ... ref=1 ..."); veryfast uses 1 reference frame,
medium 3, so the file itself shows which preset encoded it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import travel_between_images as travel
from headless_wgp import WanOrchestrator
from wan_engine.video_io import MP4_CRF, mp4_encoding, write_video


def _frames(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (count, 32, 48, 3), dtype=np.uint8)


def _x264_options(path: Path) -> bytes:
    data = path.read_bytes()
    start = data.index(b"options: ")
    return data[start : data.index(b"\x00", start)]


def test_default_settings_and_the_preset_switch() -> None:
    assert mp4_encoding({}) == {
        "codec": "libx264",
        "crf": MP4_CRF,
        "preset": "veryfast",
        "pix_fmt": "yuv420p",
        "movflags": "+faststart",
    }
    assert mp4_encoding({"WAN_MP4_PRESET": " Medium "})["preset"] == "medium"
    with pytest.raises(ValueError, match="WAN_MP4_PRESET='quick' is not an x264 preset; allowed: ultrafast"):
        mp4_encoding({"WAN_MP4_PRESET": "quick"})


def test_the_written_file_uses_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = write_video(_frames(6), tmp_path / "fast.mp4", 16)
    assert b" ref=1 " in _x264_options(fast) and f"crf={MP4_CRF}.0".encode() in _x264_options(fast)
    monkeypatch.setenv("WAN_MP4_PRESET", "medium")
    slow = write_video(_frames(6), tmp_path / "slow.mp4", 16)
    assert b" ref=3 " in _x264_options(slow)


def test_the_stitch_records_its_settings(tmp_path: Path) -> None:
    clips = [write_video(_frames(8, seed), tmp_path / f"c{seed}.mp4", 16) for seed in range(2)]
    result = travel.stitch_videos(clips, [2], tmp_path / "joined.mp4", 16)
    assert result.frames == 14 and result.encoding == mp4_encoding() and result.seconds > 0
    assert b" ref=1 " in _x264_options(result.output_path)


def test_result_data_records_the_encoding(t2v_orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    kwargs = {"seed": 1, "resolution": "64x64", "num_inference_steps": 2}
    video = t2v_orchestrator.generate_t2v("a cat", output_path=tmp_path / "v.mp4", video_length=5, **kwargs)
    assert video.extra["video_encoding"] == mp4_encoding()
    image = t2v_orchestrator.generate_t2v("a cat", output_path=tmp_path / "i.mp4", video_length=1, **kwargs)
    assert image.output_path.suffix == ".png" and image.extra["video_encoding"] is None
    assert video.extra["speed"]["compile"] is None  # CPU: nothing compiled, no decision to record
