"""Outputs on a full disk: the task's error says the disk is full, not "Broken pipe" and an ffmpeg command line.

There is no small filesystem to fill here, so ffmpeg writes through a symlink to /dev/full (every write fails
with ENOSPC, as on a full disk; the symlink is what the writers unlink afterwards, never /dev/full). ffmpeg's
messages are captured, so its "No space left on device" says the disk is full; a broken pipe with nothing said
is read as a full disk only when the directory has next to no free space left (`shutil.disk_usage` reports
what a full disk would in those tests).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import travel_between_images
import wan_engine.video_io as video_io
from wan_engine.video_io import OutputDiskFull, write_video

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")

FRAMES = np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)


@pytest.fixture
def full_disk_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every partial file the writers open is a symlink to /dev/full."""
    link = tmp_path / "out" / ".partial-on-a-full-disk.mp4"
    link.parent.mkdir()

    def partial_path_for(path: Path) -> Path:
        if not link.is_symlink():
            link.symlink_to("/dev/full")
        return link

    monkeypatch.setattr(video_io, "partial_path_for", partial_path_for)
    monkeypatch.setattr(travel_between_images, "partial_path_for", partial_path_for)
    return link


def _no_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total, 0)

    monkeypatch.setattr(video_io.shutil, "disk_usage", disk_usage)


def _assert_disk_full(exc: BaseException, directory: Path) -> None:
    text = str(exc)
    assert isinstance(exc, OutputDiskFull), text
    assert f"the disk holding the outputs dir {directory} is full" in text, text
    assert "free)" in text and "32x48" not in text and "48x32" in text, text
    assert "Broken pipe" not in text and "FFMPEG COMMAND" not in text, text


def test_write_video_on_a_full_disk_says_so(full_disk_target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_free_space(monkeypatch)
    with pytest.raises(OutputDiskFull) as raised:
        write_video(FRAMES, full_disk_target.parent / "video.mp4", fps=8)
    _assert_disk_full(raised.value, full_disk_target.parent)
    assert "(0 B free)" in str(raised.value) and "raw RGB" in str(raised.value)
    assert not full_disk_target.is_symlink(), "the partial file (here the symlink) is removed"
    assert Path("/dev/full").exists()
    assert list(full_disk_target.parent.iterdir()) == []


def test_an_enospc_oserror_is_a_full_disk_whatever_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stdin:
        def __init__(self, path: str) -> None:
            self.path, self.sent, self.closed = path, 0, False

        def write(self, _data: bytes) -> None:
            Path(self.path).write_bytes(b"\0" * 5000)  # what ffmpeg had written when the disk filled
            self.sent += 1
            if self.sent == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self) -> None:
            self.closed = True

    class Ffmpeg:  # the encoder process as `_write_mp4` drives it
        def __init__(self, cmd: list[str], **_: Any) -> None:
            self.stdin, self.returncode = Stdin(cmd[-1]), None

        def wait(self) -> int:
            self.returncode = -9
            return self.returncode

        def kill(self) -> None:
            pass

    monkeypatch.setattr(video_io.subprocess, "Popen", Ffmpeg)
    with pytest.raises(OutputDiskFull) as raised:
        write_video(FRAMES, tmp_path / "video.mp4", fps=8)
    _assert_disk_full(raised.value, tmp_path)
    assert "2 frame(s) of 48x32" in str(raised.value) and "partial file had reached 4.9 KiB" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_saying_no_space_left_is_a_full_disk_whatever_the_free_space(full_disk_target: Path) -> None:
    with pytest.raises(OutputDiskFull) as raised:  # free space left: ffmpeg's own message says why
        write_video(FRAMES, full_disk_target.parent / "video.mp4", fps=8)
    _assert_disk_full(raised.value, full_disk_target.parent)


def test_a_broken_pipe_with_free_space_left_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = video_io.mp4_encoding
    # ffmpeg refuses the encoder and exits: the pipe breaks, but the disk is fine.
    monkeypatch.setattr(video_io, "mp4_encoding", lambda: {**real(), "codec": "no_such_encoder"})
    with pytest.raises(OSError) as raised:
        write_video(FRAMES, tmp_path / "video.mp4", fps=8)
    assert not isinstance(raised.value, OutputDiskFull)
    assert "Broken pipe" in str(raised.value) or "ffmpeg failed writing" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_the_travel_stitch_on_a_full_disk_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clips = [write_video(FRAMES, tmp_path / f"clip{i}.mp4", fps=8) for i in range(2)]
    link = tmp_path / "out" / ".stitch-on-a-full-disk.mp4"
    link.parent.mkdir()
    link.symlink_to("/dev/full")
    monkeypatch.setattr(travel_between_images, "partial_path_for", lambda path: link)
    # Real ffmpeg, its stderr captured: "No space left on device" alone says the disk is full.
    with pytest.raises(OutputDiskFull) as raised:
        travel_between_images.stitch_videos(clips, [2], link.parent / "travel.mp4", fps=8)
    _assert_disk_full(raised.value, link.parent)
    assert not link.is_symlink() and Path("/dev/full").exists()
