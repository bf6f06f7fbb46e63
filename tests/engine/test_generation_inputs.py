"""Conditioning inputs: reading videos/images, cover + center-crop fitting, frame-count alignment, notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.media import half_mask, noise_image, noise_video
from wan_engine.errors import InvalidRequestError
from wan_engine.generation_inputs import (
    GUIDE_PAD_VALUE,
    fit_image,
    prepare_i2v_image,
    prepare_vace_inputs,
    read_frames,
)


def test_fit_image_covers_and_center_crops() -> None:
    # Left third red, middle green, right third blue; 90x30 -> 30x30 keeps only the green middle.
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0], pixels[:, 30:60, 1], pixels[:, 60:, 2] = 255, 255, 255
    fitted = np.asarray(fit_image(Image.fromarray(pixels), 30, 30))
    assert fitted.shape == (30, 30, 3)
    assert (fitted[:, 2:-2, 1] > 200).all() and (fitted[:, 2:-2, 0] < 50).all() and (fitted[:, 2:-2, 2] < 50).all()
    # Upscaling: 40x20 -> 64x48 covers (scale 2.4 on height), never stretches.
    assert fit_image(Image.new("RGB", (40, 20)), 64, 48).size == (64, 48)


def test_read_frames_mp4_png_jpg(tmp_path: Path) -> None:
    video = read_frames(noise_video(tmp_path / "g.mp4", 7), key="video_guide", limit=5)
    assert (len(video.frames), video.total_frames, video.width, video.height, video.kind) == (5, 7, 80, 60, "video")
    assert video.fps == 16
    for name in ("a.png", "b.jpg"):
        image = read_frames(noise_image(tmp_path / name), key="video_guide", limit=9)
        assert (len(image.frames), image.total_frames, image.kind) == (1, 1, "image")
        assert image.frames[0].shape == (60, 80, 3)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("x.mp4", b"not a video", "not a readable video"),
        ("x.png", b"not an image", "not a readable image"),
        ("x.txt", b"hello", "unsupported type"),
    ],
)
def test_unreadable_inputs_name_the_key(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidRequestError, match=match) as info:
        read_frames(path, key="video_guide", limit=9)
    assert "video_guide" in str(info.value)


def test_short_guide_padded_grey_and_mask_generates_there(tmp_path: Path) -> None:
    guide = noise_video(tmp_path / "g.mp4", 5)
    inputs = prepare_vace_inputs(guide, half_mask(tmp_path / "m.png"), [], width=64, height=48, num_frames=9)
    assert len(inputs.video) == len(inputs.mask or []) == 9
    assert all(frame.size == (64, 48) for frame in inputs.video + (inputs.mask or []))
    assert (np.asarray(inputs.video[-1]) == GUIDE_PAD_VALUE).all()
    mask_first, mask_last = np.asarray(inputs.mask[0]), np.asarray(inputs.mask[-1])  # type: ignore[index]
    assert (mask_first[:, :30] == 0).all() and (mask_first[:, 34:] == 255).all()  # keep left, generate right
    assert (mask_last == 255).all()  # padded frames: generate
    notes = inputs.notes
    assert notes["video_guide"]["resize"] == "resized 80x60 -> 64x48 (cover + center-crop)"
    assert notes["video_guide"]["frames"] == "padded 5 -> 9 frames with 4 neutral grey frames"
    assert "one image applied to all 9 frames" in notes["video_mask"]["frames"]
    assert "5-8" in notes["video_mask"]["frames"]


def test_long_guide_trimmed_and_refs_recorded(tmp_path: Path) -> None:
    guide = noise_video(tmp_path / "g.mp4", 13, width=64, height=48)
    ref = noise_image(tmp_path / "ref.png", 40, 40)
    inputs = prepare_vace_inputs(guide, None, [ref], width=64, height=48, num_frames=9)
    assert len(inputs.video) == 9 and inputs.mask is None
    assert inputs.notes["video_guide"]["frames"] == "trimmed 13 -> 9 frames (kept the first 9)"
    assert inputs.notes["video_guide"]["resize"] == "64x48 (kept)"
    assert inputs.reference_images[0].size == (40, 40)  # the pipeline letterboxes it, aspect kept
    assert "ref.png: 40x40" in inputs.notes["image_refs"][0]


def test_i2v_image_fitted(tmp_path: Path) -> None:
    image, note = prepare_i2v_image(noise_image(tmp_path / "s.jpg"), key="image_start", width=32, height=32)
    assert image.size == (32, 32)
    assert note == {"source": "s.jpg: image, 80x60", "resize": "resized 80x60 -> 32x32 (cover + center-crop)"}
