"""Conditioning inputs of a generation: images and control videos read from files, fitted to the target.

Every adjustment is recorded as a sentence (what was read, how it was resized, how frame counts
were aligned) so a task's result_data says exactly what the model was given. Inputs are never
stretched: they are scaled to cover the target and center-cropped. Paths arrive already checked
by the caller: the worker passes `OpenedInput`s, files it opened and checked inside its input roots, and
every read here goes through that descriptor (PIL reads the file object, ffmpeg inherits the descriptor),
so a path swapped after the check is never followed. A plain `Path` (engine callers) is opened once too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wan_engine.errors import InvalidRequestError
from wan_engine.limits import MAX_INPUT_DURATION_S, MAX_INPUT_FRAMES, MAX_INPUT_PIXELS
from wan_engine.video_io import FFMPEG_INPUT_PARAMS, InputVideoReader, OpenedInput, count_video_frames

InputFile = Path | OpenedInput  # a path (opened here, once) or a file the caller opened and checked

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
GUIDE_PAD_VALUE = 127  # neutral grey: "no control here" once the VAE maps pixels to [-1, 1]
MASK_GENERATE, MASK_KEEP = 255, 0  # VACE masks: white = generate, black = keep the guide's pixels
# The only formats PIL may open for an input image: PIL also knows EPS (runs Ghostscript), ICNS, TIFF ...
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
_SNIFF_BYTES = 16
# ffmpeg demuxer forced for each video signature we accept, so ffmpeg never probes the content itself
# (a text file starting "ffconcat version 1.0" would otherwise open files named inside it).
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")  # MP4 / MOV first atoms


# Demuxer options per forced format: a MOV's data references may name other files (off by default; kept off).
_DEMUXER_OPTIONS: dict[str, tuple[str, ...]] = {"mov": ("-enable_drefs", "0")}


def input_label(source: InputFile) -> Path:
    """The path an input is known by in messages and whose suffix gives its type."""
    return source.path if isinstance(source, OpenedInput) else Path(source)


@contextmanager
def opened_input(source: InputFile, *, key: str, what: str) -> Iterator[OpenedInput]:
    """`source` as an open file: an `OpenedInput` as it is (its owner closes it), a path opened here and closed
    after. A FIFO, a directory or an unopenable path is a clear error naming `key` (a FIFO never blocks)."""
    if isinstance(source, OpenedInput):
        yield source
        return
    path = Path(source)
    try:
        opened = OpenedInput.open(path)
    except OSError as exc:
        raise InvalidRequestError(f"Invalid {key}: {path} is not a readable {what} ({exc}).") from exc
    with opened:
        yield opened


def video_demuxer(head: bytes) -> str | None:
    """The ffmpeg demuxer for a file starting with `head` if it is a real video container, else None."""
    if head[4:8] in _ISO_BOXES:
        return "mov"  # ffmpeg's mov,mp4,m4a,3gp,3g2,mj2 demuxer
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # Matroska / WebM (EBML header)
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def _check_pixels(key: str, path: Path, width: int, height: int, what: str = "image") -> None:
    """Refuse an input whose decoded size would exceed MAX_INPUT_PIXELS (checked on the header only)."""
    if width * height > MAX_INPUT_PIXELS:
        raise InvalidRequestError(
            f"Invalid {key}: {path.name} is a {width}x{height} {what} ({width * height} pixels), over the limit "
            f"of {MAX_INPUT_PIXELS} pixels per {what} (MAX_INPUT_PIXELS); scale it down before submitting."
        )


def fit_image(image: Image.Image, width: int, height: int, *, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale `image` to cover width x height, then center-crop it to exactly that size."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    scaled_w, scaled_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    scaled = image.resize((scaled_w, scaled_h), resample=resample)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def describe_fit(source: tuple[int, int], width: int, height: int) -> str:
    """How `fit_image` changes a source of size (w, h), as recorded in result_data."""
    if source == (width, height):
        return f"{width}x{height} (kept)"
    return f"resized {source[0]}x{source[1]} -> {width}x{height} (cover + center-crop)"


def load_image(source: InputFile, *, key: str) -> Image.Image:
    """An RGB image from a PNG/JPEG/WebP/BMP file; a clear error naming `key` otherwise.

    `Image.open` only reads the header, so the size is checked against MAX_INPUT_PIXELS before any
    pixel is decoded: a small, highly compressible PNG cannot expand to gigabytes in memory.
    PIL reads the open file object (never the path again).
    """
    path = input_label(source)
    try:
        with (
            opened_input(source, key=key, what="image") as opened,
            Image.open(opened.rewound(), formats=IMAGE_FORMATS) as image,
        ):
            _check_pixels(key, path, image.width, image.height)
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        # Not an OSError/ValueError: uncaught it would be retried as a transient failure. PIL's
        # message gives the size and its limit in pixels; ours is lower and named too.
        raise InvalidRequestError(
            f"Invalid {key}: {path.name} is too large to decode ({exc}); "
            f"input images are limited to {MAX_INPUT_PIXELS} pixels (MAX_INPUT_PIXELS)."
        ) from exc
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"Invalid {key}: {path} is not a readable image ({exc}).") from exc


@dataclass
class FrameSource:
    """Frames read from a video or an image file (at most `limit`), and facts about the source."""

    frames: list[np.ndarray]
    total_frames: int
    width: int
    height: int
    fps: float | None
    kind: str  # "video" or "image"


def read_frames(source: InputFile | np.ndarray, *, key: str, limit: int) -> FrameSource:
    """Read up to `limit` RGB frames of a video (MP4 and other ffmpeg formats) or one image file.

    Only the frames used are decoded; the rest are counted from the container (no decoding), so a long
    guide video neither fills the memory nor keeps the worker busy. Sizes, frame counts and durations
    past the `wan_engine.limits` input bounds are refused from the header, before decoding.
    Frames already in memory ((F, H, W, 3) uint8, e.g. a travel segment's guide) are taken as they are.
    The file is opened once (or arrives opened): the sniffed bytes, the decoded frames and the frame count
    all come from that one descriptor.
    """
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8 or not len(source):
            raise InvalidRequestError(f"Invalid {key}: in-memory frames must be (F, H, W, 3) uint8, got {source.shape}")
        return FrameSource(list(source[:limit]), len(source), source.shape[2], source.shape[1], None, "frames")
    path = input_label(source)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        image = np.asarray(load_image(source, key=key))
        return FrameSource([image], 1, image.shape[1], image.shape[0], None, "image")
    if suffix not in VIDEO_SUFFIXES:
        allowed = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        raise InvalidRequestError(f"Invalid {key}: {path.name!r} has an unsupported type; use one of {allowed}.")
    with opened_input(source, key=key, what="video") as opened:
        return _read_video(opened, path, key=key, limit=limit)


def _read_video(opened: OpenedInput, path: Path, *, key: str, limit: int) -> FrameSource:
    """Sniff, bound and decode an opened video (see `read_frames`); `path` names it in messages."""
    try:
        head = opened.rewound().read(_SNIFF_BYTES)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"Invalid {key}: {path} is not a readable video ({exc}).") from exc
    demuxer = video_demuxer(head)
    if demuxer is None:
        # Playlists, concat lists and other text containers make ffmpeg open further files or URLs.
        raise InvalidRequestError(
            f"Invalid {key}: {path} is not a readable video (its content is not MP4/MOV, WebM/MKV, AVI or GIF;"
            " playlists and concat lists are refused)."
        )
    # Forced demuxer, only the file protocol, and the only file named is the inherited descriptor.
    input_params = [*FFMPEG_INPUT_PARAMS, "-f", demuxer, *_DEMUXER_OPTIONS.get(demuxer, ())]
    frames: list[np.ndarray] = []
    try:
        with InputVideoReader(opened, input_params) as reader:
            meta = reader.meta  # the container header: nothing decoded yet
            width, height = meta["size"]
            fps = float(meta.get("fps") or 0.0)
            _check_video_header(key, path, width, height, fps, float(meta.get("duration") or 0.0))
            # Decode only the frames the task uses, plus one to learn whether more follow.
            more = False
            for raw in reader:
                if len(frames) == limit:
                    more = True
                    break
                frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy())
        # Leaving the block stopped ffmpeg: frames past `limit + 1` are never decoded.
        total = len(frames)
        if more:
            # Count the rest from the container's packets (no decoding), never past the bound.
            counted = count_video_frames(opened, at_most=MAX_INPUT_FRAMES + 1, input_params=input_params)
            total = max(limit + 1, counted)
    except (OSError, RuntimeError, StopIteration, KeyError) as exc:
        raise InvalidRequestError(f"Invalid {key}: {path} is not a readable video ({exc}).") from exc
    if total > MAX_INPUT_FRAMES:
        raise InvalidRequestError(
            f"Invalid {key}: {path.name} has more than {MAX_INPUT_FRAMES} frames (MAX_INPUT_FRAMES); "
            "cut it to the frames the task needs."
        )
    if not frames:
        raise InvalidRequestError(f"Invalid {key}: {path} holds no video frames.")
    return FrameSource(frames, total, width, height, fps or None, "video")


def _check_video_header(key: str, path: Path, width: int, height: int, fps: float, duration_s: float) -> None:
    """Refuse a video whose header says its frames or its length exceed the input bounds."""
    _check_pixels(key, path, width, height, what="frame")
    if duration_s > MAX_INPUT_DURATION_S:
        raise InvalidRequestError(
            f"Invalid {key}: {path.name} lasts {duration_s:g} s, over the limit of {MAX_INPUT_DURATION_S:g} s "
            "(MAX_INPUT_DURATION_S); cut it to the frames the task needs."
        )
    if duration_s * fps > MAX_INPUT_FRAMES:
        raise InvalidRequestError(
            f"Invalid {key}: {path.name} holds about {round(duration_s * fps)} frames ({duration_s:g} s at "
            f"{fps:g} fps), over the limit of {MAX_INPUT_FRAMES} frames (MAX_INPUT_FRAMES); cut it first."
        )


def _describe_source(path: InputFile | np.ndarray, source: FrameSource) -> str:
    fps = f" at {source.fps:g} fps" if source.fps else ""
    count = f"{source.total_frames} frame{'s' if source.total_frames != 1 else ''}"
    name = "in-memory" if isinstance(path, np.ndarray) else input_label(path).name
    return f"{name}: {source.kind}, {source.width}x{source.height}, {count}{fps}"


def _align_count(frames: list[Image.Image], target: int, pad: Image.Image, what: str, total: int) -> str:
    """Pad (with `pad`) or trim `frames` in place to `target`; return what was done."""
    if total > target:
        del frames[target:]
        return f"trimmed {total} -> {target} frames (kept the first {target})"
    if len(frames) < target:
        missing = target - len(frames)
        frames.extend([pad] * missing)
        return f"padded {total} -> {target} frames with {missing} {what}"
    return f"{target} frames (kept)"


@dataclass
class VaceInputs:
    """The VACE pipeline's conditioning inputs, fitted to the target, and what was done to them."""

    video: list[Image.Image]
    mask: list[Image.Image] | None
    reference_images: list[Image.Image]
    notes: dict[str, Any] = field(default_factory=dict)


def prepare_vace_inputs(
    video_guide: InputFile | np.ndarray,
    video_mask: InputFile | np.ndarray | None,
    image_refs: list[InputFile],
    *,
    width: int,
    height: int,
    num_frames: int,
) -> VaceInputs:
    """Read the guide (video or image), the mask (video or one image for all frames) and references.

    Guide and mask are fitted to width x height; a shorter guide is padded with neutral grey frames
    (which the mask, when given, marks "generate"), a longer one trimmed. A single-image mask applies
    to every frame; a shorter mask video is padded with "generate" frames. Reference images are passed
    as read (the VACE pipeline fits them inside the frame on a white canvas).
    """
    guide_source = read_frames(video_guide, key="video_guide", limit=num_frames)
    guide = [fit_image(Image.fromarray(f), width, height) for f in guide_source.frames]
    grey = Image.new("RGB", (width, height), (GUIDE_PAD_VALUE,) * 3)
    notes: dict[str, Any] = {
        "video_guide": {
            "source": _describe_source(video_guide, guide_source),
            "resize": describe_fit((guide_source.width, guide_source.height), width, height),
            "frames": _align_count(guide, num_frames, grey, "neutral grey frames", guide_source.total_frames),
        }
    }
    mask: list[Image.Image] | None = None
    if video_mask is not None:
        mask_source = read_frames(video_mask, key="video_mask", limit=num_frames)
        nearest = Image.Resampling.NEAREST  # masks stay hard-edged
        mask = [fit_image(Image.fromarray(f), width, height, resample=nearest) for f in mask_source.frames]
        white = Image.new("RGB", (width, height), (MASK_GENERATE,) * 3)
        if mask_source.kind == "image":
            mask = mask * num_frames
            frames_note = f"one image applied to all {num_frames} frames"
        else:
            frames_note = _align_count(mask, num_frames, white, '"generate" (white) frames', mask_source.total_frames)
        real_guide = min(guide_source.total_frames, num_frames)
        if real_guide < num_frames:
            # The grey padding carries no content to keep: those frames are generated whatever the mask said.
            mask[real_guide:] = [white] * (num_frames - real_guide)
            frames_note += f'; frames {real_guide}-{num_frames - 1} set to "generate" (the guide was padded there)'
        notes["video_mask"] = {
            "source": _describe_source(video_mask, mask_source),
            "resize": describe_fit((mask_source.width, mask_source.height), width, height),
            "frames": frames_note,
        }
    elif guide_source.total_frames < num_frames:
        notes["video_guide"]["frames"] += " (no mask given: every frame is generated under the guide's control)"
    refs = [load_image(path, key=f"image_refs[{i}]") for i, path in enumerate(image_refs)]
    if refs:
        notes["image_refs"] = [
            f"{input_label(path).name}: {ref.width}x{ref.height}, fitted inside {width}x{height} on white (aspect kept)"
            for path, ref in zip(image_refs, refs, strict=True)
        ]
    return VaceInputs(video=guide, mask=mask, reference_images=refs, notes=notes)


def prepare_i2v_image(path: InputFile, *, key: str, width: int, height: int) -> tuple[Image.Image, dict[str, str]]:
    """Read a start/end image and fit it to width x height; return it with its note."""
    image = load_image(path, key=key)
    note = {"source": f"{input_label(path).name}: image, {image.width}x{image.height}"}
    note["resize"] = describe_fit(image.size, width, height)
    return fit_image(image, width, height), note
