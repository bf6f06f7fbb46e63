"""Turns on one model's VAE between the loop's thread and the decodes it handed off (wan_engine.decode_overlap).

diffusers' Wan VAE keeps its causal-convolution caches on the module, so two users at once would corrupt each
other's frames. A handed-off decode runs on the output finisher; everything else that touches the VAE runs on
the caller's thread inside `with loaded.vae_gate:` (a VACE or image-to-video call, a memory-profile change,
parking or unloading the model). Entering first runs, here, every handed-off decode that has not run yet:

- a switch never parks a VAE that a decode still needs, whichever thread gets here first;
- a caller never waits for a decode that no other thread will run (a direct API user who holds a
  `PendingWrite` and generates again on the same thread), so the gate cannot deadlock.

A decode's failure is kept for its own task (`OverlappedDecode.run` raises it), never raised into the use that
happened to run it.
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import Protocol


class HandedOffDecode(Protocol):
    def decode_now(self) -> None:
        """Decode if not yet done (called with the gate held); keeps its own failure."""
        ...


class VaeGate:
    """A reentrant lock over the VAE, plus the handed-off decodes still to run, oldest first (weakly held: a
    `PendingWrite` dropped without `finish` leaves nothing behind)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._registry_lock = threading.Lock()  # never held while decoding: a hand-off must not wait for one
        self._pending: list[weakref.ref[HandedOffDecode]] = []

    def hand_off(self, decode: HandedOffDecode) -> None:
        """Register a decode that will run later (on the finisher, or when the gate is next entered)."""
        with self._registry_lock:
            self._pending.append(weakref.ref(decode))

    def ran(self, decode: HandedOffDecode) -> None:
        """`decode` is done (or failed, kept for its task): nothing left to run for it."""
        with self._registry_lock:
            self._pending = [ref for ref in self._pending if ref() is not None and ref() is not decode]

    def pending(self) -> list[HandedOffDecode]:
        """The handed-off decodes not run yet, oldest first."""
        with self._registry_lock:
            alive = [ref() for ref in self._pending]
        return [decode for decode in alive if decode is not None]

    def __enter__(self) -> VaeGate:
        self._lock.acquire()
        try:
            for decode in self.pending():
                decode.decode_now()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._lock.release()

    def held(self) -> threading.RLock:
        """The bare lock: a decode running itself on the finisher takes only this (the decodes older than it
        have run already, in their own jobs, and a newer one runs in its own job or when the gate is entered)."""
        return self._lock
