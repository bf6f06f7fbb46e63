"""Small input files for conditioning tests: random-content images and videos, written with real codecs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wan_engine.video_io import write_video


def noise_image(path: Path, width: int = 80, height: int = 60, seed: int = 0) -> Path:
    """A random RGB image (PNG or JPEG by suffix); 80x60 on purpose: not the tiny models' 64x48."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def noise_video(path: Path, frames: int, width: int = 80, height: int = 60, seed: int = 0) -> Path:
    """A random H.264 MP4 of `frames` frames."""
    rng = np.random.default_rng(seed)
    write_video(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), path, fps=16)
    return path


def half_mask(path: Path, width: int = 80, height: int = 60) -> Path:
    """A VACE mask image: keep the left half (black), generate the right half (white)."""
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    Image.fromarray(mask).save(path)
    return path
