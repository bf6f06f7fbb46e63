"""`wan-worker run --gpus 0,1,...`: one worker process per GPU, restarted when it crashes, stopped together.

The parent holds no model, no CUDA context and no database connection: it starts the children,
watches them and forwards signals. Each child is the ordinary `wan-worker run` (the same arguments
minus `--gpus`) with `CUDA_VISIBLE_DEVICES=<gpu>` and the worker id `<id>-gpu<gpu>`, so it claims
from the shared table like any other worker and the table already guarantees one task, one worker.

- A child that crashes (non-zero exit, or killed by a signal the parent did not send) is restarted
  after an exponential back-off, at most `max_per_minute` times in any minute (`RestartPolicy`).
  Exit code 2 is the CLI's configuration error: restarting cannot fix it, so it is not restarted.
- The parent's first SIGTERM/SIGINT is forwarded once to every child, as SIGTERM (each finishes its
  current task); a second one is forwarded again, as SIGINT (each abandons and re-queues it). The
  parent then waits for every child and exits 0.
- With `--parallel N`, each child is a group of N GPUs (`CUDA_VISIBLE_DEVICES=<a>,<b>`, worker id
  `<id>-gpu<a>-<b>`): the same `wan-worker run --parallel N`, which starts its N ranks (worker.processes.group_launch).
  `--gpus` must list a multiple of N GPUs.
- Children run in their own session (a terminal's Ctrl-C reaches only the parent, which forwards it
  once, instead of every child counting it as well) and, on Linux, get SIGTERM if the parent dies.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

ENV_GPUS = "WAN_GPUS"
CONFIG_ERROR_EXIT = 2  # worker.cli.main's exit code for a ValueError/KeyError (bad flag, preset, address)
TICK_S = 0.2  # how often the parent polls its children and its pending signals
PINNED_CACHE_ENV = "WAN_PINNED_CACHE_GB"
PINNED_RAM_FRACTION = 0.5  # wan_engine.model_cache.DEFAULT_RAM_FRACTION (not imported: it would load torch)
_PR_SET_PDEATHSIG = 1
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a child treats both as "stop"; see _forward_signals


# ---- restart policy (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartDecision:
    """When to restart a crashed child, and whether the per-minute limit is what delays it."""

    delay_s: float
    limited: bool


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off per child plus a cap on restarts per minute (a crash loop must not spin)."""

    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_per_minute: int = 5
    stable_after_s: float = 60.0  # a child that ran this long before crashing starts the back-off over
    window_s: float = 60.0

    def decide(self, consecutive_crashes: int, recent_restarts: Sequence[float], now: float) -> RestartDecision:
        """Delay before the next restart after `consecutive_crashes` (>= 1) crashes in a row, given the
        monotonic times of this child's earlier restarts."""
        exponent = max(0, consecutive_crashes - 1)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** min(exponent, 32))
        in_window = sorted(t for t in recent_restarts if now - t < self.window_s)
        if len(in_window) < self.max_per_minute:
            return RestartDecision(backoff, limited=False)
        # The restart that would exceed the cap waits until the oldest counted one leaves the window.
        allowed_at = in_window[len(in_window) - self.max_per_minute] + self.window_s
        wait = allowed_at - now
        return RestartDecision(max(backoff, wait), limited=wait > backoff)


# ---- which GPUs ------------------------------------------------------------------------------------


def count_gpus() -> int:
    """GPUs on this machine: NVML's count (every GPU, nvidia-smi's numbering), else torch.cuda's, else 0."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # not installed, no driver: ask torch (slower to import, same answer)
        pass
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _indices(text: str, what: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"{what} {text!r}: expected GPU indices separated by commas (e.g. 0,1) or 'all'")
    indices = tuple(int(part) for part in parts)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what} {text!r}: a GPU is listed twice")
    return indices


def parse_gpus(value: str, gpu_count: int, visible_devices: str | None = None) -> tuple[int, ...]:
    """`--gpus` -> GPU indices. `all` is every GPU found (those in CUDA_VISIBLE_DEVICES when it is set);
    explicit indices must exist when GPUs are found (without any, each index still gets a CPU worker)."""
    if value.strip().lower() == "all":
        if gpu_count == 0:
            raise ValueError(
                "--gpus all: no GPU found (NVML and torch.cuda report none); run without --gpus on a CPU machine"
            )
        if visible_devices is not None:
            if not visible_devices.strip():
                raise ValueError("--gpus all: CUDA_VISIBLE_DEVICES is empty, so no GPU is visible")
            return _indices(visible_devices, "--gpus all: CUDA_VISIBLE_DEVICES")
        return tuple(range(gpu_count))
    indices = _indices(value, "--gpus")
    missing = [index for index in indices if gpu_count and index >= gpu_count]
    if missing:
        found = f"this machine has {gpu_count}: 0-{gpu_count - 1}"
        raise ValueError(f"--gpus {value!r}: GPU {missing[0]} not found ({found})")
    return indices


# ---- each child's command and environment (pure) ----------------------------------------------------


def _is_gpus_option(token: str) -> bool:
    # argparse accepts unambiguous prefixes; --gpus is the only `run` option (and no global one) starting --g.
    name = token.split("=", 1)[0]
    return len(name) >= 3 and "--gpus".startswith(name)


def child_argv(argv: Sequence[str], worker_id: str, http: str | None = None) -> list[str]:
    """The parent's CLI arguments without `--gpus`, with this child's worker id (and --http address)
    appended: argparse keeps the last value, so the user's own `--worker-id` is overridden."""
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        if _is_gpus_option(token):
            skip_value = "=" not in token
            continue
        kept.append(token)
    kept += ["--worker-id", worker_id]
    if http is not None:
        kept += ["--http", http]
    return kept


def child_http(address: tuple[str, int], position: int) -> str:
    """The n-th child serves on PORT+n (port 0 stays 0: each child gets its own free port)."""
    host, port = address
    port = port + position if port else 0
    if port > 65535:
        raise ValueError(f"--http port {address[1]} + {position} (one port per GPU) is beyond 65535")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_env(
    environ: Mapping[str, str],
    gpu: int | Sequence[int],
    children: int,
    gpus_found: bool,
    ram_bytes: int | None = None,
) -> dict[str, str]:
    """The parent's environment for one child: only its GPU visible, no WAN_GPUS (it must not supervise
    again), NVML's GPU numbering, and its share of the default pinned-RAM model cache."""
    env = {key: value for key, value in environ.items() if key != ENV_GPUS}
    # A parallel group sees its GPUs as cuda:0..N-1, one per rank (LOCAL_RANK).
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in _as_tuple(gpu))
    # CUDA numbers GPUs fastest first by default; nvidia-smi and NVML by PCI bus: make `--gpus 1` mean one GPU.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if gpus_found and PINNED_CACHE_ENV not in env and ram_bytes:
        # Each child would otherwise take half the machine's RAM for parked models.
        env[PINNED_CACHE_ENV] = f"{ram_bytes * PINNED_RAM_FRACTION / children / 2**30:.2f}"
    return env


def _as_tuple(gpu: int | Sequence[int]) -> tuple[int, ...]:
    return (gpu,) if isinstance(gpu, int) else tuple(gpu)


def gpu_groups(gpus: Sequence[int], parallel: int) -> list[tuple[int, ...]]:
    """`--gpus` split into groups of `parallel` consecutive GPUs, one worker (group) each."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: must be at least 1")
    if len(gpus) % parallel:
        listed = ",".join(str(g) for g in gpus)
        raise ValueError(
            f"--gpus {listed} with --parallel {parallel}: {len(gpus)} GPUs do not split into groups of {parallel}; "
            f"list a multiple of {parallel} GPUs"
        )
    return [tuple(gpus[i : i + parallel]) for i in range(0, len(gpus), parallel)]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---- the supervisor ------------------------------------------------------------------------------------


@dataclass
class Child:
    """One GPU's worker process across its restarts."""

    gpu: int  # the first (or only) GPU of this worker
    worker_id: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic time of a pending restart
    consecutive_crashes: int = 0
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    finished: bool = False  # ended for good: clean exit, configuration error, or shutdown
    gpus: tuple[int, ...] = ()  # all GPUs of a parallel group (empty: just `gpu`)

    @property
    def label(self) -> str:
        gpus = self.gpus or (self.gpu,)
        return f"GPU {gpus[0]}" if len(gpus) == 1 else f"GPUs {','.join(str(g) for g in gpus)}"


def _new_session_and_parent_death_signal() -> None:
    """Runs in the child between fork and exec."""
    os.setsid()  # Ctrl-C in a terminal signals the foreground group: only the parent must get it
    if _LIBC is not None:
        # If the parent is killed (kill -9, OOM), the child finishes its task and exits instead of
        # living on unsupervised under the same worker id as the restarted supervisor's child.
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)  # loaded here: nothing is loaded after fork
    except OSError:
        return None


_LIBC = _load_libc()


class Supervisor:
    """Starts one child per GPU and keeps them running until a stop signal; `run` returns the exit code."""

    def __init__(
        self,
        children: list[Child],
        command: Sequence[str] | None = None,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self.command = list(command or [sys.executable, "-m", "worker"])
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.signals_forwarded = 0
        self.config_error = False
        self._pending: list[int] = []

    @property
    def stopping(self) -> bool:
        return self.signals_forwarded > 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)  # only recorded here; the loop forwards it (no Popen calls in a handler)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._spawn(child)
            while not self._all_done():
                self._forward_signals()
                self._reap_and_restart()
                time.sleep(TICK_S)
        finally:
            self._stop_leftovers()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stopping:
            log.info("all %d workers stopped", len(self.children))
            return 0
        return CONFIG_ERROR_EXIT if self.config_error else 0

    def _all_done(self) -> bool:
        return all(child.process is None and (child.finished or child.restart_at is None) for child in self.children)

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        try:
            child.process = subprocess.Popen(
                [*self.command, *child.argv], env=child.env, preexec_fn=_new_session_and_parent_death_signal
            )
        except OSError as exc:  # e.g. out of processes: count it as a crash and back off
            log.error("could not start worker: %s", exc, extra={"worker_id": child.worker_id})
            self._schedule_restart(child, self.clock())
            return
        log.info("started worker on %s (pid %d)", child.label, child.process.pid, extra={"worker_id": child.worker_id})

    def _forward_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            self.signals_forwarded += 1
            action = (
                "every worker stops after its current task (send again to abort the tasks)"
                if self.signals_forwarded == 1
                else "every worker aborts its current task (re-queued)"
            )
            log.warning("%s: %s", signal.Signals(signum).name, action)
            # CPython runs a handler once for several deliveries of one signal that arrive while the main
            # thread is in a long C call (a denoising step): alternating the two stop signals keeps the
            # second forward from merging into the first.
            forwarded = FORWARDED_SIGNALS[(self.signals_forwarded - 1) % len(FORWARDED_SIGNALS)]
            for child in self.children:
                child.restart_at = None  # no restarts once stopping
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(forwarded)

    def _reap_and_restart(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is not None:
                    child.process = None
                    self._on_exit(child, code, now)
            elif child.restart_at is not None and not self.stopping and now >= child.restart_at:
                child.restarts.append(now)
                self._spawn(child)

    def _on_exit(self, child: Child, code: int, now: float) -> None:
        extra = {"worker_id": child.worker_id}
        if self.stopping:
            log.info("worker on %s %s", child.label, describe_exit(code), extra=extra)
            child.finished = True
        elif code == 0:
            log.warning("worker on %s stopped on its own (exit 0); not restarted", child.label, extra=extra)
            child.finished = True
        elif code == CONFIG_ERROR_EXIT:
            log.error(
                "worker on %s exited with code 2 (a configuration error, see its log); not restarted",
                child.label,
                extra=extra,
            )
            child.finished = True
            self.config_error = True
        else:
            ran_s = now - child.started_at
            log.error("worker on %s %s after %.1f s", child.label, describe_exit(code), ran_s, extra=extra)
            if ran_s >= self.policy.stable_after_s:
                child.consecutive_crashes = 0
            self._schedule_restart(child, now)

    def _schedule_restart(self, child: Child, now: float) -> None:
        child.consecutive_crashes += 1
        decision = self.policy.decide(child.consecutive_crashes, child.restarts, now)
        child.restart_at = now + decision.delay_s
        extra = {"worker_id": child.worker_id}
        if decision.limited:
            log.error(
                "worker on %s: restart limit reached (%d per minute); restarting in %.1f s",
                child.label,
                self.policy.max_per_minute,
                decision.delay_s,
                extra=extra,
            )
        else:
            log.warning(
                "restarting worker on %s in %.1f s (crash %d in a row)",
                child.label,
                decision.delay_s,
                child.consecutive_crashes,
                extra=extra,
            )

    def _stop_leftovers(self) -> None:
        """Only reached with children alive when the loop itself failed: never leave orphans behind."""
        alive = [child.process for child in self.children if child.process is not None and child.process.poll() is None]
        for process in alive:
            process.terminate()
        for process in alive:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- entry point (worker.cli cmd_run with --gpus) -------------------------------------------------------


def build_children(
    gpus: Sequence[int],
    argv: Sequence[str],
    base_worker_id: str,
    environ: Mapping[str, str],
    gpus_found: bool,
    http: tuple[str, int] | None = None,
    ram_bytes: int | None = None,
    parallel: int = 1,
) -> list[Child]:
    """One Child per GPU (per group of `parallel` GPUs), each with its command line and environment."""
    children = []
    for position, group in enumerate(gpu_groups(gpus, parallel)):
        worker_id = f"{base_worker_id}-gpu{'-'.join(str(g) for g in group)}"
        address = child_http(http, position) if http else None
        children.append(
            Child(
                gpu=group[0],
                worker_id=worker_id,
                argv=child_argv(argv, worker_id, address),
                # Every rank is a process with its own pinned-RAM cache: share the budget per GPU.
                env=child_env(environ, group, len(gpus), gpus_found, ram_bytes),
                gpus=group if len(group) > 1 else (),
            )
        )
    return children


def run_supervisor(args: argparse.Namespace, base_worker_id: str) -> int:
    """`wan-worker run --gpus ...`: validate in the parent (errors are immediate), then supervise."""
    import psutil

    found = count_gpus()
    gpus = parse_gpus(args.gpus, found, os.environ.get("CUDA_VISIBLE_DEVICES"))
    parallel = getattr(args, "parallel", 1)
    groups = gpu_groups(gpus, parallel)  # a count that does not split into groups is refused before any start
    if not found:
        log.warning("no GPU found: the %d workers run on the CPU (CUDA_VISIBLE_DEVICES has no effect)", len(groups))
    address = None
    if args.http:
        from worker.live.http_server import check_bind, parse_address

        address = parse_address(args.http)
        check_bind(address[0], args.http_token)
    children = build_children(
        gpus,
        args.argv,
        base_worker_id,
        os.environ,
        gpus_found=found > 0,
        http=address,
        ram_bytes=psutil.virtual_memory().total,
        parallel=parallel,
    )
    per = f" in groups of {parallel}" if parallel > 1 else ""
    log.info("supervising %d workers on GPUs %s%s", len(children), ",".join(str(g) for g in gpus), per)
    return Supervisor(children).run()
