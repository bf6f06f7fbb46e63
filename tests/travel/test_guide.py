"""Fitting key images and building VACE guide/mask frames per segment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from travel_between_images import (
    GUIDE_GREY,
    MASK_GENERATE,
    MASK_KEEP,
    build_segment_guide,
    fit_image,
    plan_travel,
)

W, H = 32, 24


def _solid(value: tuple[int, int, int], width: int = W, height: int = H) -> np.ndarray:
    return np.broadcast_to(np.array(value, dtype=np.uint8), (height, width, 3)).copy()


def test_fit_image_same_aspect_is_a_resize() -> None:
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    fitted, description = fit_image(image, 64, 48)
    assert fitted.shape == (48, 64, 3) and fitted.dtype == np.uint8
    assert description == "resized 80x60 -> 64x48 (cover, centre crop)"


def test_fit_image_covers_and_crops_the_centre() -> None:
    # Red | blue | green bands: a 120x48 image cropped to 64x48 keeps exactly the blue centre.
    image = np.zeros((48, 120, 3), dtype=np.uint8)
    image[:, :28] = (255, 0, 0)
    image[:, 28:92] = (0, 0, 255)
    image[:, 92:] = (0, 255, 0)
    fitted, description = fit_image(Image.fromarray(image), 64, 48)
    assert fitted.shape == (48, 64, 3)
    assert (fitted == (0, 0, 255)).all()
    assert "120x48 -> 64x48" in description

    # Too tall: scaled 2x to cover the width; the crop keeps source rows ~15..25 of a vertical ramp.
    ramp = np.repeat((np.arange(40, dtype=np.uint8) * 5)[:, None, None], 10, axis=1).repeat(3, axis=2)
    fitted, _ = fit_image(ramp, 20, 20)
    assert fitted.shape == (20, 20, 3)
    assert abs(int(fitted[0, 10, 0]) - 74) <= 2  # source row 14.75
    assert abs(int(fitted[-1, 10, 0]) - 121) <= 2  # source row 24.25


def test_fit_image_unchanged_and_other_inputs() -> None:
    image = _solid((10, 20, 30))
    fitted, description = fit_image(image, W, H)
    assert description == "unchanged"
    np.testing.assert_array_equal(fitted, image)

    grey, _ = fit_image(np.full((H, W), 90, dtype=np.uint8), W, H)
    assert grey.shape == (H, W, 3) and (grey == 90).all()
    rgba, _ = fit_image(np.full((H, W, 4), 50, dtype=np.uint8), W, H)
    assert rgba.shape == (H, W, 3)
    with pytest.raises(ValueError, match="width and height"):
        fit_image(image, 0, H)


def test_chained_segment_guide_uses_previous_tail_and_end_image() -> None:
    plan = plan_travel(3, 17, 8, "p", seed_base=0)
    segment = plan.segments[1]
    assert (segment.frames, segment.overlap_in) == (25, 8)
    rng = np.random.default_rng(1)
    previous_video = rng.integers(0, 256, (plan.segments[0].frames, H, W, 3), dtype=np.uint8)
    image_2 = _solid((200, 10, 50))

    guide, mask = build_segment_guide(segment, W, H, start_image=None, end_image=image_2, previous_tail=previous_video)

    assert guide.shape == mask.shape == (25, H, W, 3)
    assert guide.dtype == mask.dtype == np.uint8
    np.testing.assert_array_equal(guide[:8], previous_video[-8:])
    np.testing.assert_array_equal(guide[-1], image_2)
    assert (guide[8:-1] == GUIDE_GREY).all()
    assert (mask[:8] == MASK_KEEP).all()
    assert (mask[-1] == MASK_KEEP).all()
    assert (mask[8:-1] == MASK_GENERATE).all()
    assert (MASK_KEEP, MASK_GENERATE) == (0, 255)

    # A tail of exactly `overlap` frames works the same.
    guide2, mask2 = build_segment_guide(segment, W, H, None, image_2, previous_video[-8:])
    np.testing.assert_array_equal(guide2, guide)
    np.testing.assert_array_equal(mask2, mask)


def test_first_segment_guide_uses_start_and_end_images() -> None:
    segment = plan_travel(3, 17, 8, "p", seed_base=0).segments[0]
    start, end = _solid((255, 0, 0)), _solid((0, 0, 255))

    guide, mask = build_segment_guide(segment, W, H, start_image=start, end_image=end, previous_tail=None)

    assert guide.shape == (17, H, W, 3)
    np.testing.assert_array_equal(guide[0], start)
    np.testing.assert_array_equal(guide[-1], end)
    assert (guide[1:-1] == GUIDE_GREY).all()
    assert (mask[[0, -1]] == MASK_KEEP).all()
    assert (mask[1:-1] == MASK_GENERATE).all()


def test_guide_errors() -> None:
    first, second = plan_travel(3, 17, 8, "p", seed_base=0).segments
    image = _solid((1, 2, 3))
    with pytest.raises(ValueError, match="start_image is required"):
        build_segment_guide(first, W, H, None, image, None)
    with pytest.raises(ValueError, match="previous_tail is required"):
        build_segment_guide(second, W, H, image, image, None)
    with pytest.raises(ValueError, match="at least 8 frames"):
        build_segment_guide(second, W, H, None, image, np.zeros((4, H, W, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="fit_image"):
        build_segment_guide(first, W, H, _solid((1, 2, 3), width=W + 2), image, None)
