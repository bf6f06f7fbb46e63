"""`wan-worker run --parallel N`: start the N ranks of one context-parallel group and watch them.

Each rank is the same `wan-worker run --parallel N` command with torchrun's environment contract
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as `torchrun --standalone
--nproc-per-node N` would start it: a real torchrun works too (`torchrun --standalone --nproc-per-node N
-m worker run --parallel N ...`). This launcher is the default because its stop signals keep the
worker's contract, where torchrun SIGKILLs its ranks 30 s after the first one:

- SIGTERM / SIGINT go to rank 0 only (the first: finish the task; the second: abandon and re-queue it);
  rank 0 then tells the followers to exit. The ranks run in their own session, so a terminal's Ctrl-C
  reaches only this process, and get SIGTERM if it dies.
- A rank that fails (non-zero exit) ends the group: the others get SIGTERM, then SIGKILL after
  `GRACE_S`; the exit code is that rank's (2, a configuration error, is not restarted by --gpus).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

log = logging.getLogger(__name__)

CAUSE_WAIT_S = 1.0  # after a rank fails: how long the others may take to end before the cause is named
TICK_S = 0.2
GRACE_S = 30.0  # how long the other ranks get to exit once the group ends
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_env(environ: Mapping[str, str], rank: int, size: int, port: int) -> dict[str, str]:
    """torchrun --standalone's variables for one rank, plus a fair share of the CPU threads."""
    env = dict(environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_WORLD_SIZE=str(size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # torchrun's default is 1 thread per rank; a CPU-only group would crawl with that.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // size)))
    return env


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _own_session() -> None:
    """Runs in each rank between fork and exec."""
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class GroupLauncher:
    """Starts the ranks, forwards stop signals to rank 0, and ends the group when any rank ends badly."""

    def __init__(self, argv: Sequence[str], size: int, command: Sequence[str] | None = None) -> None:
        self.argv = list(argv)
        self.size = size
        self.command = list(command or [sys.executable, "-m", "worker"])
        self.processes: list[subprocess.Popen[bytes]] = []
        self._pending: list[int] = []

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            port = free_port()
            for rank in range(self.size):
                env = rank_env(os.environ, rank, self.size, port)
                process = subprocess.Popen([*self.command, *self.argv], env=env, preexec_fn=_own_session)
                self.processes.append(process)
            log.info("started a group of %d ranks (pids %s)", self.size, ",".join(str(p.pid) for p in self.processes))
            return self._watch()
        finally:
            self._end_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> int:
        leader = self.processes[0]
        while True:
            while self._pending:
                signum = self._pending.pop(0)
                log.warning("%s: forwarded to rank 0", signal.Signals(signum).name)
                if leader.poll() is None:
                    leader.send_signal(signum)
            codes = [p.poll() for p in self.processes]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                # Name the cause: a follower that dies makes rank 0 exit 1 (out of step) within milliseconds, often
                # before the dead follower can be reaped. So give the others a moment to end, then report a rank
                # killed by a signal (negative code) first, then the lowest rank.
                self._wait_all(CAUSE_WAIT_S)
                codes = [p.poll() for p in self.processes]
                failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
                rank, code = min(failed, key=lambda failure: (failure[1] >= 0, failure[0]))
                log.error("rank %d exited with code %s; ending the group", rank, code)
                for other, other_code in failed:
                    if other != rank:
                        log.warning("rank %d exited with code %s too", other, other_code)
                return code if code > 0 else 1
            if codes[0] == 0:
                # Rank 0 stopped cleanly and told the followers to exit: give them a moment.
                self._wait_all(GRACE_S)
                return 0
            time.sleep(TICK_S)

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))

    def _end_all(self) -> None:
        alive = [p for p in self.processes if p.poll() is None]
        for process in alive:
            process.terminate()
        self._wait_all(GRACE_S)
        for process in alive:
            if process.poll() is None:
                process.kill()
                process.wait()


def launch_group(argv: Sequence[str], size: int) -> int:
    """Run `wan-worker <argv>` as a group of `size` ranks; returns the group's exit code."""
    return GroupLauncher(argv, size).run()
