"""Input bounds: decompression bombs, oversized media, long guide videos and playlists posing as videos.

Unit-level on the real decoders (PIL, imageio-ffmpeg) with small real files made in tmp_path; the
limits are lowered with monkeypatch where a real-size file would make the test slow.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.media import noise_image, noise_video
from wan_engine import generation_inputs
from wan_engine.errors import InvalidRequestError
from wan_engine.generation_inputs import prepare_i2v_image, prepare_vace_inputs, read_frames
from wan_engine.limits import MAX_INPUT_PIXELS
from wan_engine.video_io import InputVideoReader, write_video
from worker.loop.retry import RetryPolicy
from worker.task import Task, TaskStatus


def _task() -> Task:
    return Task(id="t1", task_type="i2v", params_text="{}", status=TaskStatus.IN_PROGRESS, attempts=1, max_attempts=3)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zero_png(path: Path, width: int, height: int) -> Path:
    """A black RGB PNG written row by row: a few hundred KiB on disk for hundreds of MiB decoded."""
    row = b"\x00" * (1 + 3 * width)  # filter byte + pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


def _long_video(path: Path, frames: int, fps: int = 30) -> Path:
    """A low-res MP4 of `frames` frames (each a different grey)."""
    greys = (np.arange(frames) % 256).astype(np.uint8)[:, None, None, None]
    write_video(np.broadcast_to(greys, (frames, 32, 32, 3)), path, fps=fps)
    return path


# ---- 1: decompression bombs -----------------------------------------------------------------------


def test_decompression_bomb_is_bad_input_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises past twice this: 100x100 is a "bomb"
    bomb = noise_image(tmp_path / "bomb.png", width=100, height=100)
    with pytest.raises(InvalidRequestError) as info:
        prepare_i2v_image(bomb, key="image_start", width=64, height=48)
    message = str(info.value)
    assert "image_start" in message and "10000 pixels" in message and "2000 pixels" in message
    assert str(MAX_INPUT_PIXELS) in message
    assert not RetryPolicy().decide(info.value, _task()).retry  # fails at once, no back-off


def test_bomb_among_reference_images_names_its_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guide = noise_video(tmp_path / "g.mp4", 5)
    refs = [noise_image(tmp_path / f"r{i}.png", 20, 20) for i in range(2)] + [
        noise_image(tmp_path / "r2.png", 100, 100)
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidRequestError, match=r"image_refs\[2\]"):
        prepare_vace_inputs(guide, None, refs, width=64, height=48, num_frames=5)


# ---- 2: sizes within PIL's limit that would still exhaust memory ----------------------------------


def test_big_compressible_png_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _zero_png(tmp_path / "big.png", 8192, 8192)  # 64 Mpx: under PIL's bomb limit, ~192 MiB as RGB
    assert big.stat().st_size < 1024 * 1024
    guide = noise_image(tmp_path / "g.png")
    decoded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy_load(self: Image.Image) -> Any:
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", spy_load)
    with pytest.raises(InvalidRequestError) as info:
        prepare_vace_inputs(guide, None, [big], width=64, height=48, num_frames=1)
    message = str(info.value)
    assert "image_refs[0]" in message and "8192x8192" in message and str(MAX_INPUT_PIXELS) in message
    assert (8192, 8192) not in decoded  # refused from the header: the big reference was never decoded


def test_video_frame_size_checked_on_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guide = noise_video(tmp_path / "g.mp4", 5)  # 80x60 = 4800 px per frame
    monkeypatch.setattr(generation_inputs, "MAX_INPUT_PIXELS", 4000)
    with pytest.raises(InvalidRequestError, match=r"video_guide.*80x60 frame.*4000 pixels"):
        read_frames(guide, key="video_guide", limit=5)


# ---- 3: long guide videos -------------------------------------------------------------------------


def test_long_guide_decodes_only_the_frames_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guide = _long_video(tmp_path / "long.mp4", 3000)  # 100 s at 30 fps, 32x32
    yielded = [0]
    real_iter = InputVideoReader.__iter__  # the reader every guide is decoded with

    def counting(self: InputVideoReader) -> Iterator[bytes]:
        for raw in real_iter(self):
            yielded[0] += 1
            yield raw

    monkeypatch.setattr(InputVideoReader, "__iter__", counting)
    start = time.monotonic()
    inputs = prepare_vace_inputs(guide, None, [], width=32, height=32, num_frames=9)
    assert time.monotonic() - start < 5.0
    assert yielded[0] <= 10  # the 9 used, plus one to learn that more follow
    assert len(inputs.video) == 9
    assert inputs.notes["video_guide"]["frames"] == "trimmed 3000 -> 9 frames (kept the first 9)"
    assert "3000 frames at 30 fps" in inputs.notes["video_guide"]["source"]


def test_input_frames_and_duration_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guide = _long_video(tmp_path / "long.mp4", 600)  # 20 s at 30 fps
    monkeypatch.setattr(generation_inputs, "MAX_INPUT_FRAMES", 500)
    with pytest.raises(InvalidRequestError, match=r"video_guide.*600 frames.*500 frames"):
        read_frames(guide, key="video_guide", limit=9)
    monkeypatch.setattr(generation_inputs, "MAX_INPUT_FRAMES", 10_000)
    monkeypatch.setattr(generation_inputs, "MAX_INPUT_DURATION_S", 10.0)
    with pytest.raises(InvalidRequestError, match=r"video_mask.*20 s.*10 s"):
        read_frames(guide, key="video_mask", limit=9)


# ---- 4: playlists / concat lists posing as videos -------------------------------------------------


def test_ffconcat_named_mp4_is_refused(tmp_path: Path) -> None:
    # ffmpeg's concat demuxer follows relative entries (absolute ones its "safe" mode refuses itself);
    # a symlinked or shared directory makes such an entry point outside the input roots.
    outside = noise_video(tmp_path / "inputs" / "secret.mp4", 3)
    fake = tmp_path / "inputs" / "guide.mp4"
    fake.write_text(f"ffconcat version 1.0\nfile '{outside.name}'\n")
    with pytest.raises(InvalidRequestError, match=r"video_guide.*not a readable video"):
        read_frames(fake, key="video_guide", limit=3)
    m3u = tmp_path / "inputs" / "list.mkv"
    m3u.write_text(f"#EXTM3U\n{outside}\n")
    with pytest.raises(InvalidRequestError, match="video_mask"):
        read_frames(m3u, key="video_mask", limit=3)
