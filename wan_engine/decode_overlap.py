"""The VAE decode off the critical path (issue 15): decoded on the output finisher while the next task denoises.

With a deferred write (the worker's output finisher), a generation whose model stays resident can leave its VAE
decode to the finisher too: the loop's thread ends the generation when the denoising ends, and the finisher
decodes the latents on a CUDA stream of its own, then encodes and writes the video, while the loop claims and
starts the next task. The decode needs the same GPU as the next task's steps; what it gains is the host-side
time between two tasks (claim, prompt encoding, LoRA fusion, the compile decision), which the GPU would
otherwise spend idle, and whatever SMs a step leaves free. Set by `WAN_OVERLAP_DECODE`:

    auto (default)  on CUDA when the model is resident (memory profile `gpu`); off elsewhere
    on              whenever the write is deferred and the model is resident (CPU too: tests, many-core hosts)
    off             never: the decode stays on the loop's thread, before the next task starts

The VAE is shared with the loop's thread, and diffusers' Wan VAE keeps its causal-convolution caches on the
module, so its users take turns through `LoadedModel.vae_gate` (wan_engine.vae_gate): the finisher decodes
with it held; the loop enters it for a task whose pipeline call encodes with the VAE (`denoise_uses_vae`:
VACE guides, i2v / flf2v images), around a memory-profile change, and around parking or unloading the model,
and entering first runs any handed-off decode the finisher has not started. A text-to-video pipeline's
denoising never touches the VAE, so it runs beside the decode.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wan_engine.errors import InvalidRequestError
from wan_engine.memory_profiles import device_budget_bytes
from wan_engine.pipeline_runtime import LoadedModel, decode_latents, expected_frame_shape
from wan_engine.vram import GIB, vae_decode_bytes

logger = logging.getLogger(__name__)

OVERLAP_DECODE_ENV = "WAN_OVERLAP_DECODE"
OVERLAP_CHOICES = ("auto", "on", "off")


def denoise_uses_vae(pipe: Any) -> bool:
    """Whether this pipeline's call (output_type "latent") uses the VAE: every one but diffusers' text-to-video
    `WanPipeline` (a VACE pipeline encodes its guide, even the blank one of a t2v task on a VACE model; an
    image-to-video one encodes its image). Only a call that does not may denoise beside an overlapped decode."""
    import diffusers

    return not isinstance(pipe, diffusers.WanPipeline)


def overlap_setting(environ: Mapping[str, str] | None = None) -> str:
    """WAN_OVERLAP_DECODE as one of OVERLAP_CHOICES (unset or empty: auto)."""
    value = (os.environ if environ is None else environ).get(OVERLAP_DECODE_ENV, "").strip().lower() or "auto"
    if value not in OVERLAP_CHOICES:
        raise InvalidRequestError(f"{OVERLAP_DECODE_ENV}={value!r}: allowed {', '.join(OVERLAP_CHOICES)}")
    return value


def decode_overlaps(device_type: str, profile: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a deferred-write generation on `device_type` under memory `profile` leaves its decode to the
    finisher. Only a resident model qualifies: an offloaded one moves the VAE on and off the device."""
    setting = overlap_setting(environ)
    if setting == "off":
        return False
    resident = profile == ("gpu" if device_type == "cuda" else "cpu")
    if setting == "on":
        return resident
    return device_type == "cuda" and resident


def no_room_for_overlap(
    loaded: LoadedModel, latents: torch.Tensor, num_reference_images: int, vram_fraction: float
) -> str | None:
    """Why this decode cannot run beside the next task's steps (VRAM), or None when it can (always off CUDA).

    Called when the denoising ends: what is allocated now (weights, latents, embeddings) plus this task's step
    activations (its peak above that: the next task's steps need about as much) plus the decode's own peak
    (wan_engine.vram) must fit the budget the memory profiles use. Otherwise the decode runs here, before the
    next task, so an overlap never pushes a task down the memory ladder."""
    device = latents.device
    if device.type != "cuda":
        return None
    frames, height, width = expected_frame_shape(loaded.pipe, latents, num_reference_images)
    vae = loaded.pipe.vae
    decode = vae_decode_bytes(
        vae.config,
        width,
        height,
        frames,
        element_bytes=vae.dtype.itemsize,
        tiled=bool(getattr(vae, "use_tiling", False)),
    )
    in_use = torch.cuda.memory_allocated(device)
    steps = max(0, torch.cuda.max_memory_allocated(device) - in_use)
    budget = device_budget_bytes(device) * vram_fraction
    if in_use + steps + decode <= budget:
        return None
    return (
        f"not enough VRAM to decode beside the next task: {in_use / GIB:.1f} GiB in use + ~{steps / GIB:.1f} GiB "
        f"for its steps + {decode / GIB:.1f} GiB for the decode > {budget / GIB:.1f} GiB budget"
    )


_STREAMS: dict[int, torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The one CUDA stream overlapped decodes run on, per device. One, not a new one per decode: the caching
    allocator reuses a freed block only for the stream it was allocated on, so decodes on ever new streams
    (torch hands them out round-robin from a pool) would each keep a decode's workspace reserved."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STREAMS_LOCK:
        if index not in _STREAMS:
            _STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
        return _STREAMS[index]


@dataclass(eq=False)
class OverlappedDecode:
    """Latents whose decode runs later (`run`, on the finisher), on a CUDA stream of its own.

    Built on the loop's thread right after the denoising, and handed off to the model's `VaeGate` at once: if
    the loop needs the VAE before the finisher got to it (a switch, a VACE task), the gate runs it there first
    (`decode_now`), and `run` then finds the frames ready. The event marks where the latents are complete on the
    loop's stream, so the decode's stream waits for exactly that and no more."""

    loaded: LoadedModel
    latents: torch.Tensor
    num_reference_images: int
    ready: Any = None  # torch.cuda.Event recorded on the producing stream (None off CUDA)
    frames: np.ndarray | None = None
    failure: BaseException | None = None  # the decode's own error, raised by `run` for its task
    seconds: float | None = None  # the decode's own time, once run
    waited_s: float | None = None  # `run`'s wait for the VAE (a loop-side user held it)
    thread: str | None = None  # which thread decoded (the finisher, or a loop-side VAE user that came first)
    retried_tiled: bool = False
    error: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def after_denoise(cls, loaded: LoadedModel, latents: torch.Tensor, num_reference_images: int) -> OverlappedDecode:
        ready = None
        if latents.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
        decode = cls(loaded, latents, num_reference_images, ready)
        loaded.vae_gate.hand_off(decode)
        return decode

    def run(self) -> np.ndarray:
        """The frames: decoded now (waiting for the VAE first), or already by a loop-side VAE user."""
        asked = time.perf_counter()
        with self.loaded.vae_gate.held():
            self.waited_s = time.perf_counter() - asked
            self.decode_now()
        if self.failure is not None:
            raise self.failure
        assert self.frames is not None
        return self.frames

    def decode_now(self) -> None:
        """Decode unless done (with the VAE gate held); on out-of-memory, once more tiled. Frees the latents;
        an error is kept for `run`."""
        if self.frames is not None or self.failure is not None:
            return
        self.thread = threading.current_thread().name
        started = time.perf_counter()
        try:
            try:
                self.frames = self._decode(tiled=False)
            except torch.OutOfMemoryError as exc:  # the next task's activations took the room the decode needed
                self.error = {"error": str(exc).splitlines()[0][:200]}
                logger.warning(
                    "overlapped decode out of memory; decoding again tiled", extra={"model": self.loaded.preset.key}
                )
                torch.cuda.empty_cache()
                self.retried_tiled = True
                self.frames = self._decode(tiled=True)
        except BaseException as exc:  # its task's failure, not that of whoever ran it
            self.failure = exc
        finally:
            self.seconds = time.perf_counter() - started
            self.discard()

    def discard(self) -> None:
        """Nothing more to decode (done, failed, or its task was cancelled first): drop the GPU latents."""
        self.loaded.vae_gate.ran(self)
        self.latents = torch.empty(0)

    def _decode(self, *, tiled: bool) -> np.ndarray:
        if self.ready is None:
            return decode_latents(self.loaded.pipe, self.latents, self.num_reference_images, tiled=tiled)
        stream = decode_stream(self.latents.device)
        stream.wait_event(self.ready)
        with torch.cuda.stream(stream):
            # The latents were allocated on the loop's stream: tell the allocator this stream uses them too.
            self.latents.record_stream(stream)
            frames = decode_latents(self.loaded.pipe, self.latents, self.num_reference_images, tiled=tiled)
        stream.synchronize()
        return frames

    def report(self) -> dict[str, Any]:
        """What result_data.extra records about it."""
        return {
            "overlapped": True,
            "vae_wait_s": None if self.waited_s is None else round(self.waited_s, 4),
            "thread": self.thread,
            "retried_tiled": self.retried_tiled,
            **({"out_of_memory": self.error} if self.error else {}),
        }
