"""Writing and reading generated videos: H.264 MP4 via imageio-ffmpeg's bundled ffmpeg, PNG for one frame.

Every output is written to a hidden temporary name in the target directory and renamed into place,
so a crash or a cancelled task never leaves a half-written file under the final name.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

MP4_CRF = 17  # visually lossless H.264; the default (quality 5) is visibly blocky on small videos
_PARTIAL_MARK = ".partial"


@dataclass(frozen=True)
class VideoInfo:
    """What a written video holds."""

    frames: int
    width: int
    height: int
    fps: float


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """One (H, W, 3) frame as uint8: floats are taken in [0, 1] and clipped."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a frame must have shape (H, W, 3), got {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frame.dtype}")


def partial_path_for(path: Path) -> Path:
    """The temporary name `path` is written under: `.<stem>.<pid>.partial<suffix>`, same directory."""
    return path.with_name(f".{path.stem}.{os.getpid()}{_PARTIAL_MARK}{path.suffix}")


def partial_files_for(stem: str, directory: Path) -> list[Path]:
    """Leftover temporary files of output `stem` in `directory` (from any process)."""
    pattern = os.path.join(glob.escape(str(directory)), f".{glob.escape(stem)}.*{_PARTIAL_MARK}*")
    # Only `.<stem>.<pid>.partial<suffix>`: another output's stem may start with this one ("a.1" vs "a").
    exact = re.compile(rf"^\.{re.escape(stem)}\.\d+{re.escape(_PARTIAL_MARK)}(\.[^.]+)?$")
    return sorted(Path(p) for p in glob.glob(pattern) if exact.match(Path(p).name))


def remove_partial_files(stem: str, directory: Path) -> list[Path]:
    """Delete leftover temporary files of output `stem` (e.g. after a crash); return what was removed."""
    removed = []
    for path in partial_files_for(stem, directory):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _frames_iter(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
        return iter(frames)
    return iter(frames)


def _write_png(frame: np.ndarray, tmp: Path) -> None:
    Image.fromarray(to_uint8(frame)).save(tmp, format="PNG")


def _write_mp4(frames: Iterator[np.ndarray], first: np.ndarray, tmp: Path, fps: int) -> None:
    height, width = first.shape[:2]
    if width % 2 or height % 2:
        # yuv420p halves chroma resolution: odd sizes would need resizing, which we never do silently.
        raise ValueError(f"MP4 output needs an even width and height, got {width}x{height}")
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,  # never resize to a multiple of 16
        ffmpeg_log_level="error",
        output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in itertools.chain([first], frames):
            frame = to_uint8(frame)
            if frame.shape[:2] != (height, width):
                got = f"{frame.shape[1]}x{frame.shape[0]}"
                raise ValueError(f"all frames must be {width}x{height}, got {got}")
            writer.send(np.ascontiguousarray(frame).tobytes())
    finally:
        writer.close()  # waits for ffmpeg; the caller removes the file on error


def write_video(frames: np.ndarray | Iterable[np.ndarray], path: Path, fps: int) -> Path:
    """Write frames (F, H, W, 3) uint8 or float in [0, 1] to `path`; return the path written.

    One frame is written as a PNG (`path` with suffix `.png`), more as an H.264 MP4 (yuv420p, no
    resizing). The file appears under its final name only once complete.
    """
    path = Path(path)
    iterator = _frames_iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("write_video needs at least one frame")
    second = next(iterator, None)
    if second is None:
        path = path.with_suffix(".png")
    elif path.suffix.lower() != ".mp4":
        path = path.with_suffix(".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path_for(path)
    try:
        if second is None:
            _write_png(first, tmp)
        else:
            _write_mp4(itertools.chain([second], iterator), np.asarray(first), tmp, fps)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt / a cancel raised by a frame source: never leave the temp file.
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_video_info(path: Path) -> VideoInfo:
    """Frame count, size and fps of an MP4 (frames counted by decoding) or a PNG (one frame)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            return VideoInfo(frames=1, width=image.width, height=image.height, fps=0.0)
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return VideoInfo(frames=frames, width=width, height=height, fps=float(meta["fps"]))


def read_video_frames(path: Path) -> np.ndarray:
    """All frames of an MP4 or PNG as a (F, H, W, 3) uint8 array."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), dtype=np.uint8)


def iter_video_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield the frames of an MP4 (or a one-frame PNG) one at a time as (H, W, 3) uint8 arrays.

    Streaming counterpart of `read_video_frames`: only one decoded frame is held at a time. The
    ffmpeg reader is closed when the generator finishes or is closed early.
    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            yield np.asarray(image.convert("RGB"))
        return
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        width, height = meta["size"]
        for raw in reader:
            # Copy: frombuffer over bytes is read-only, and callers may blend in place.
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()
    finally:
        reader.close()
