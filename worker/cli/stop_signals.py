"""Stop signals of `wan-worker run`, from its first line to its exit.

Installed before anything heavy loads, so a stop that arrives during start-up (imports, the database wait,
building the worker) is never lost: it is remembered and handed to the queue as soon as there is one.

- SIGTERM / SIGINT: the first lets the current task finish, the second abandons it (back to `Queued`).
- SIGHUP (a closed terminal or ssh session): always the graceful first stop, never the abort.
- Once the worker has stopped, further stop signals are ignored (`SIG_IGN`, which the interpreter keeps
  through its own shutdown), so a late second SIGTERM cannot turn the documented exit 0 into -15.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Protocol

log = logging.getLogger("worker.cli")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stoppable(Protocol):
    """What receives the stops: HeadlessTaskQueue (`request_stop` twice = abort)."""

    def request_stop(self) -> None: ...


class StopSignals:
    """Counts stop requests and forwards them to the target once it exists. Handlers only set state and log."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.requested = threading.Event()  # any stop: ends the database wait too
        self.requests = 0  # 1: finish the current task; 2: abort it
        self._target: Stoppable | None = None

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def attach(self, target: Stoppable) -> None:
        """From now on stops go to `target`; the ones that came before are replayed to it."""
        self._target = target
        for _ in range(self.requests):
            target.request_stop()

    def ignore_from_now(self) -> None:
        """The worker has stopped: later stop signals change nothing, so they must not kill the exit."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP and self.requests >= 1:
            log.warning("%s: already stopping after the current task", name, extra={"worker_id": self.worker_id})
            return
        if self.requests >= 2:
            return
        self.requests += 1
        self.requested.set()
        what = "aborting the current task" if self.requests == 2 else "stopping after the current task"
        hint = "" if self.requests == 2 or signum == signal.SIGHUP else " (send again to abort it)"
        log.warning("%s: %s%s", name, what, hint, extra={"worker_id": self.worker_id})
        if self._target is not None:
            self._target.request_stop()
