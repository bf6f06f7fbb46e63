"""Live previews: an RGB frame from the current latents by a linear projection, no VAE call.

Wan's latents map to RGB approximately by one 3x(C) matrix and a bias (the factors ComfyUI's latent
previews use, `comfy/latent_formats.py` Wan21 for the 16-channel Wan 2.1 / 2.2 A14B VAE and Wan22 for
the 48-channel Wan 2.2 TI2V VAE). They apply to the normalized latents the diffusers pipelines
denoise ((z - mean) / std), which is what `callback_on_step_end` receives. The frame shown is the
*current* latent (x_t), so it starts as noise and sharpens as denoising goes on.

Cost: the engine's step callback calls `on_step`; with no subscriber, or on a step that is not due,
it returns at once. On a due step it projects one latent frame on the device (a (C)x3 matmul over
H x W latent pixels) and copies a few kilobytes of uint8 to the host; encoding and sending happen
in the subscriber's own thread (worker.live.http_server), never in the denoising loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EVERY = 4  # a preview every N denoising steps (and at the last one)

# Rows: latent channels; columns: R, G, B (ComfyUI latent_formats.Wan21).
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

# ComfyUI latent_formats.Wan22 (the TI2V-5B VAE, 48 channels).
WAN22_RGB_FACTORS = (
    (0.0119, 0.0103, 0.0046),
    (-0.1062, -0.0504, 0.0165),
    (0.0140, 0.0409, 0.0491),
    (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808),
    (0.0264, 0.0463, 0.0912),
    (0.0295, 0.0326, 0.0590),
    (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288),
    (-0.0465, -0.0090, -0.0205),
    (0.0359, 0.0236, 0.0082),
    (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561),
    (0.0006, 0.0594, 0.0418),
    (-0.0319, -0.0542, -0.0637),
    (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358),
    (-0.0359, -0.0312, -0.0287),
    (-0.0285, -0.1032, -0.1237),
    (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051),
    (0.0390, 0.0670, 0.2863),
    (0.0069, 0.0144, 0.0082),
    (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232),
    (-0.1454, -0.0902, -0.0481),
    (0.0714, 0.0827, 0.0447),
    (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204),
    (-0.0758, -0.0297, -0.0014),
    (0.0568, 0.1307, 0.1372),
    (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325),
    (-0.0663, -0.0673, -0.0140),
    (-0.0416, -0.0047, -0.0023),
    (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331),
    (0.1833, 0.1466, 0.2250),
    (-0.0368, 0.0370, 0.0295),
    (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420),
    (-0.0660, -0.0153, 0.0800),
    (-0.0101, 0.0068, 0.0156),
    (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015),
    (0.0421, 0.0451, 0.0373),
    (0.0504, -0.0483, -0.0356),
    (-0.0837, 0.0168, 0.0055),
)
WAN22_RGB_BIAS = (0.0317, -0.0878, -0.1388)

PROJECTIONS = {16: (WAN21_RGB_FACTORS, WAN21_RGB_BIAS), 48: (WAN22_RGB_FACTORS, WAN22_RGB_BIAS)}


@dataclass(frozen=True)
class PreviewFrame:
    """One preview: RGB uint8 (H x W x 3, at latent resolution) after `step` of `total_steps`."""

    step: int
    total_steps: int
    rgb: np.ndarray


Subscriber = Callable[[PreviewFrame], None]

_lock = threading.Lock()
_subscriber: Subscriber | None = None
_every = DEFAULT_EVERY
_cache: dict[tuple[int, str, Any], tuple[Any, Any]] = {}  # (channels, device, dtype) -> (factors, bias) tensors


def subscribe(subscriber: Subscriber | None, every: int = DEFAULT_EVERY) -> None:
    """Receive a preview every `every` steps (None: stop). The subscriber runs in the denoising thread:
    it must only hand the frame over (store it, queue it) and return."""
    global _subscriber, _every
    if every < 1:
        raise ValueError(f"preview every={every!r}: must be a positive number of steps")
    with _lock:
        _subscriber, _every = subscriber, every


def due(step: int, total: int) -> bool:
    """Whether a preview is wanted after `step` (1-based) of `total`: someone listens, and it is every Nth."""
    return _subscriber is not None and step > 0 and (step % _every == 0 or step == total)


def on_step(step: int, total: int, callback_kwargs: dict[str, Any]) -> None:
    """The engine's call site (diffusers `callback_on_step_end`): a preview when one is due. Never raises:
    a preview must not fail a generation."""
    subscriber = _subscriber
    if subscriber is None or not due(step, total):
        return
    latents = callback_kwargs.get("latents")
    if latents is None:
        return
    try:
        rgb = project(latents)
    except Exception as exc:
        log.debug("latent preview skipped: %s", exc)
        return
    if rgb is None:
        return
    try:
        subscriber(PreviewFrame(step, total, rgb))
    except Exception as exc:
        log.debug("latent preview subscriber failed: %s", exc)


def project(latents: Any, frame: int = -1) -> np.ndarray | None:
    """RGB uint8 (H x W x 3) of one latent frame of a (B, C, F, H, W) or (B, C, H, W) tensor; None for a
    channel count without known factors. The projection runs where the latents are (GPU) and only the
    small uint8 result is copied to the host."""
    import torch

    if latents.ndim == 4:
        latents = latents.unsqueeze(2)
    if latents.ndim != 5 or latents.shape[1] not in PROJECTIONS:
        return None
    channels = int(latents.shape[1])
    key = (channels, str(latents.device), latents.dtype)
    if key not in _cache:
        factors, bias = PROJECTIONS[channels]
        _cache[key] = (
            torch.tensor(factors, device=latents.device, dtype=latents.dtype),
            torch.tensor(bias, device=latents.device, dtype=latents.dtype),
        )
    weights, bias = _cache[key]
    with torch.no_grad():
        latent = latents[0, :, frame]  # C x H x W
        rgb = torch.einsum("chw,cr->hwr", latent, weights) + bias
        rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return rgb.cpu().numpy()


def project_numpy(latent: np.ndarray) -> np.ndarray:
    """The same projection of one C x H x W latent frame, in numpy (tests, tools)."""
    factors, bias = PROJECTIONS[latent.shape[0]]
    rgb = np.einsum("chw,cr->hwr", latent.astype(np.float32), np.asarray(factors, np.float32))
    rgb += np.asarray(bias, np.float32)
    return ((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)
