"""`parallel: N`: one generation on the N ranks of a torchrun group (context parallelism).

Rank 0 is the worker everybody knows: it claims from the table, writes the outputs and the rows, and
serves --http. Its orchestrator is a `GroupLeaderProxy`, which sends every orchestrator call to the
other ranks (`Command`, one `broadcast_object_list`) and runs it itself; ranks > 0 run `serve_follower`,
which executes each command on their own orchestrator. So every rank loads the same model, and runs
the same pipeline call with the same seed, its transformers split over the group (Ulysses degree N).

- Validation runs on rank 0 before anything is sent: the generate command goes out at the call's first
  progress event, when the orchestrator has resolved the params, read the inputs and applied the LoRAs.
  A random seed is drawn on rank 0 and sent, so every rank draws the same noise.
- Cancellation is exact: at every denoising step rank 0 broadcasts one flag (cancelled, lease lost,
  shutdown abort), and every rank stops at that same step.
- Followers stop after the last denoising step: only rank 0 decodes and writes.
- While idle, rank 0 sends a ping every `ping_interval_s`, so followers waiting for the next command
  never reach the process-group timeout (WAN_PARALLEL_TIMEOUT_S, default 600 s).
- Failures: a load that fails on any rank fails on all (gathered, then every rank unloads). Any other
  error while the followers are inside a call leaves the group out of step: a follower exits 1; rank 0
  records the task's failure (retried with back-off), stops claiming and exits 1. The group launcher
  then ends the other ranks and exits non-zero, the supervisor (--gpus) restarts the group, and a task
  whose worker vanished is re-queued when its lease expires. A rank stuck in a collective gives up
  after the process-group timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from wan_engine.context_parallel import GroupInfo, check_tokens, enable_context_parallel, video_tokens
from wan_engine.generation_params import resolve_params
from wan_engine.generation_types import GenerationResult, ProgressCallback, ProgressEvent
from wan_engine.model_sources import resolve_model
from worker.config import WorkerSettings
from worker.tasks.orchestrator import Orchestrator

if TYPE_CHECKING:
    from wan_engine.model_cache import ModelCache
    from wan_engine.presets import PresetRegistry


class RankOrchestrator(Orchestrator, Protocol):
    """What a rank needs from its own orchestrator (`headless_wgp.WanOrchestrator` provides it): the runner's
    `Orchestrator` protocol plus the pipeline to split, unloading, and where the weights are found."""

    @property
    def pipeline(self) -> Any: ...
    @property
    def model_cache(self) -> ModelCache: ...

    allow_download: bool

    def unload_model(self) -> None: ...
    def needs_reload(self, model_key: str) -> str | None: ...


# Builds this rank's orchestrator on a device (the CLI passes one around `headless_wgp.WanOrchestrator`).
OrchestratorFactory = Callable[[WorkerSettings, str, bool], RankOrchestrator]

log = logging.getLogger(__name__)

PING_INTERVAL_S = 30.0
# Keyword arguments of the generate_* methods that are not generation params (resolve_params refuses them).
_CALL_ARGS = frozenset(
    {"output_path", "video_guide", "video_mask", "image_refs", "control_scale", "image_start", "image_end"}
)
_GENERATE_METHODS = frozenset({"generate_t2v", "generate_vace", "generate_i2v"})


class GroupOutOfStep(RuntimeError):
    """The ranks no longer run the same call (an error inside a shared call); the group must restart."""


class _StopTogether(Exception):
    """Rank 0 said stop at this step (cancel, lease lost, shutdown abort): a follower's normal way out."""


class _FollowerDone(Exception):
    """Denoising is over: rank 0 alone decodes and writes."""


@dataclass(frozen=True)
class Command:
    """One orchestrator call sent from rank 0: `op` is ping, load, unload, generate or stop."""

    op: str
    name: str = ""  # the model key (load) or the orchestrator method (generate)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class GroupChannel:
    """The few collectives the group needs, on the default process group (rank 0 is the source)."""

    def __init__(self, info: GroupInfo) -> None:
        self.info = info
        # NCCL moves tensors on the rank's GPU; gloo on the CPU.
        self._flag = torch.zeros(1, dtype=torch.int32, device=info.device)

    def send(self, command: Command) -> None:
        dist.broadcast_object_list([command], src=0)

    def receive(self) -> Command:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree_stop(self, stop: bool = False) -> bool:
        """Rank 0's stop flag, on every rank (one tiny broadcast)."""
        self._flag.fill_(1 if stop else 0)
        dist.broadcast(self._flag, src=0)
        return bool(self._flag.item())

    def gather(self, value: str | None) -> list[str | None]:
        """Every rank's value, on every rank (load errors)."""
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, value)
        return out


def _describe(exc: BaseException | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def load_and_split(orchestrator: RankOrchestrator, model_key: str, degree: int) -> float:
    """Load the model and split its transformers over the group (idempotent for a restored model)."""
    seconds = orchestrator.load_model(model_key)
    enable_context_parallel(orchestrator.pipeline, degree)
    return seconds


class _LeaderCall:
    """Rank 0's progress callback around one generate call: sends the command at the first event, then
    makes every denoising step a point where all ranks agree to go on or stop."""

    SOLO, SHARED, DONE = "solo", "shared", "done"

    def __init__(self, channel: GroupChannel, command: Command, progress: ProgressCallback | None) -> None:
        self.channel = channel
        self.command = command
        self.progress = progress
        self.phase = self.SOLO
        self.pending: Exception | None = None  # raised by `progress` before the next agreement point
        self.denoised_steps = 0

    def __call__(self, event: ProgressEvent) -> None:
        if self.phase == self.SOLO:
            # The orchestrator has validated everything by its first event: now the followers join.
            self.channel.send(self.command)
            self.phase = self.SHARED
        if self.phase == self.DONE:
            if event.stage == "denoising":
                # A retry of the denoising (out of memory while decoding) cannot run without the followers.
                raise GroupOutOfStep("the denoising restarted after the group had finished it; retry the task")
            self._report(event, defer=False)
            return
        if event.stage != "denoising":
            self._report(event, defer=True)  # encoding_prompt: the followers are encoding too
            return
        if event.step == 0 and self.denoised_steps:
            raise GroupOutOfStep("the denoising restarted on rank 0 (out of memory?) while the group was inside it")
        self.denoised_steps = max(self.denoised_steps, event.step)
        if self.pending is None:
            self._report(event, defer=True)
        stop = self.channel.agree_stop(self.pending is not None)
        if stop or event.step >= event.total_steps:
            self.phase = self.DONE  # the followers have left the call
        if stop:
            assert self.pending is not None
            raise self.pending

    def _report(self, event: ProgressEvent, *, defer: bool) -> None:
        if self.progress is None:
            return
        if not defer:
            self.progress(event)
            return
        try:
            self.progress(event)
        except Exception as exc:  # cancel / lease lost / abort: acted on at the next agreement point
            self.pending = self.pending or exc


class GroupLeaderProxy:
    """Rank 0's stand-in for its orchestrator (the `worker.tasks.orchestrator.Orchestrator` protocol): every
    call runs here and on all other ranks of the group (see the module docstring)."""

    def __init__(
        self,
        orchestrator: RankOrchestrator,
        channel: GroupChannel,
        *,
        on_out_of_step: Callable[[], None] | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.orchestrator = orchestrator
        self.channel = channel
        self.degree = channel.info.world_size
        self.out_of_step = False
        self.on_out_of_step = on_out_of_step
        self.ping_interval_s = ping_interval_s
        self._lock = threading.RLock()  # one collective sequence at a time: calls and pings never interleave
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._pinger: threading.Thread | None = None

    @property
    def presets(self) -> PresetRegistry:
        return self.orchestrator.presets

    @property
    def current_model(self) -> str | None:
        return self.orchestrator.current_model

    @property
    def models_dir(self) -> Path:
        return self.orchestrator.models_dir

    def needs_reload(self, model_key: str) -> str | None:
        """What changed in the resident model's weight files (None: nothing); `load_model` then reloads."""
        return self.orchestrator.needs_reload(model_key)

    # ---- model residency --------------------------------------------------------------------------

    def load_model(self, model_key: str, *, progress: ProgressCallback | None = None) -> float:
        """Load `model_key` on every rank; a failure on any rank unloads it everywhere and raises here."""
        orchestrator = self.orchestrator
        with self._lock:
            self._check_usable()
            # Resident and its files as loaded: nothing to do. Changed files: every rank reloads (each rank's
            # orchestrator sees the change in its own load_model).
            if orchestrator.current_model == model_key and orchestrator.needs_reload(model_key) is None:
                return 0.0
            preset = orchestrator.presets.get(model_key)  # unknown key: refused before the followers hear of it
            if model_key not in orchestrator.model_cache:
                resolve_model(preset, orchestrator.models_dir, allow_download=orchestrator.allow_download)
            self._send(Command("load", model_key))
            error: Exception | None = None
            seconds = 0.0
            try:
                seconds = load_and_split(orchestrator, model_key, self.degree)
            except Exception as exc:
                error = exc
            errors = self.channel.gather(_describe(error))
            if any(errors):
                orchestrator.unload_model()  # every rank does the same: the group stays consistent
                if error is not None:
                    raise error
                rank, text = next((r, e) for r, e in enumerate(errors) if e)
                raise RuntimeError(f"rank {rank} of the group could not load {model_key}: {text}")
            return seconds

    def unload_model(self) -> None:
        with self._lock:
            self._check_usable()
            self._send(Command("unload"))
            self.orchestrator.unload_model()

    # ---- generation --------------------------------------------------------------------------------

    def generate_t2v(self, prompt: str, **kwargs: Any) -> GenerationResult:
        return self._generate("generate_t2v", prompt, kwargs)

    def generate_vace(self, prompt: str, **kwargs: Any) -> GenerationResult:
        return self._generate("generate_vace", prompt, kwargs)

    def generate_i2v(self, prompt: str, **kwargs: Any) -> GenerationResult:
        return self._generate("generate_i2v", prompt, kwargs)

    def _generate(self, method: str, prompt: str, kwargs: dict[str, Any]) -> GenerationResult:
        with self._lock:
            self._check_usable()
            progress = kwargs.pop("progress", None)
            kwargs, seed_was_random = self._pin_seed(prompt, kwargs)
            call = _LeaderCall(self.channel, Command("generate", method, (prompt,), kwargs), progress)
            try:
                result = getattr(self.orchestrator, method)(prompt, progress=call, **kwargs)
            except BaseException as exc:
                if call.phase == _LeaderCall.SHARED:
                    self._mark_out_of_step(exc)
                raise
            finally:
                self._last_sent = time.monotonic()
            extra = {**result.extra, "parallel": {"ranks": self.degree, "ulysses_degree": self.degree}}
            extra["parallel"]["backend"] = self.channel.info.backend
            return dataclasses.replace(result, seed_was_random=seed_was_random, extra=extra)

    def _pin_seed(self, prompt: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Resolve the params on rank 0 (errors before anything is sent), draw a random seed here so that
        every rank uses the same one, and check that the video's tokens split evenly over the group."""
        pipe = self.orchestrator.pipeline
        if pipe is None or self.orchestrator.current_model is None:
            return kwargs, False  # the orchestrator refuses the call before its first event
        preset = self.orchestrator.presets.get(self.orchestrator.current_model)
        params = {k: v for k, v in kwargs.items() if k not in _CALL_ARGS}
        resolved = resolve_params(preset, prompt, params)
        size = f"resolution {resolved.width}x{resolved.height} x {resolved.video_length} frames"
        check_tokens(video_tokens(pipe, resolved.width, resolved.height, resolved.video_length), self.degree, size)
        return {**kwargs, "seed": resolved.seed}, resolved.seed_was_random

    # ---- the group's life --------------------------------------------------------------------------

    def start_pings(self) -> None:
        """Keep idle followers from reaching the process-group timeout (a daemon thread)."""
        if self._pinger is None:
            self._pinger = threading.Thread(target=self._ping_loop, name="wan-group-ping", daemon=True)
            self._pinger.start()

    def _ping_loop(self) -> None:
        tick = max(0.05, min(1.0, self.ping_interval_s / 4))
        while not self._closed.wait(tick):
            if self.out_of_step or time.monotonic() - self._last_sent < self.ping_interval_s:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a call is running: its own collectives keep the followers busy
            try:
                if not self._closed.is_set():
                    self._send(Command("ping"))
            except Exception as exc:  # a follower died: nothing can run on this group any more
                self._mark_out_of_step(exc)
            finally:
                self._lock.release()

    def close(self) -> None:
        """Tell the followers to exit (unless the group is out of step: they are stuck or gone) and stop pinging;
        the process group itself stays up for the caller (`leave_group`)."""
        self._closed.set()
        with self._lock:
            if not self.out_of_step:
                try:
                    self._send(Command("stop"))
                except Exception as exc:
                    log.warning("could not tell the followers to stop: %s", exc)
        if self._pinger is not None:
            self._pinger.join(timeout=5.0)  # it sees `_closed` within a tick; no collective of its own after this

    def leave_group(self) -> None:
        """Rank 0's last step: leave the process group. A rank that exits with its group still up may abort in
        the C++ teardown of the group's threads ("terminate called without an active exception", exit -6).
        Out of step, it just exits: a stuck peer could hang the teardown."""
        from wan_engine.context_parallel import destroy_group

        if not self.out_of_step:
            destroy_group()

    def _send(self, command: Command) -> None:
        self.channel.send(command)
        self._last_sent = time.monotonic()

    def _check_usable(self) -> None:
        if self.out_of_step:
            raise GroupOutOfStep("the parallel group is out of step and restarting; the task will be retried")

    def _mark_out_of_step(self, exc: BaseException) -> None:
        if self.out_of_step:
            return
        self.out_of_step = True
        log.error("parallel group out of step (%s); stopping this worker so the group restarts", _describe(exc))
        if self.on_out_of_step is not None:
            self.on_out_of_step()
        else:
            log.error("no stop hook: this worker keeps running on a broken group")


# ---- ranks > 0 ---------------------------------------------------------------------------------------


class _FollowerCall:
    """A follower's progress callback: agree with rank 0 at each denoising step; leave before decoding."""

    def __init__(self, channel: GroupChannel) -> None:
        self.channel = channel
        self.denoised_steps = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "denoising":
            if event.step == 0 and self.denoised_steps:
                raise GroupOutOfStep("the denoising restarted on this rank (out of memory?)")
            self.denoised_steps = max(self.denoised_steps, event.step)
            if self.channel.agree_stop():
                log.info("stopped with rank 0 at denoising step %d/%d", event.step, event.total_steps)
                raise _StopTogether
        elif event.stage in ("decoding", "writing_video"):
            raise _FollowerDone


def serve_follower(orchestrator: RankOrchestrator, channel: GroupChannel) -> int:
    """Run rank 0's commands until it says stop (exit code 0); 1 when this rank fell out of step."""
    scratch = Path(tempfile.mkdtemp(prefix=f"wan-rank{channel.info.rank}-"))  # never written: see _FollowerDone
    degree = channel.info.world_size
    while True:
        command = channel.receive()
        if command.op == "ping":
            continue
        if command.op == "stop":
            return 0
        if command.op == "unload":
            orchestrator.unload_model()
        elif command.op == "load":
            error: Exception | None = None
            try:
                load_and_split(orchestrator, command.name, degree)
            except Exception as exc:
                error = exc
                log.warning("could not load %s: %s", command.name, _describe(exc))
            if any(channel.gather(_describe(error))):
                orchestrator.unload_model()
        elif command.op == "generate" and command.name in _GENERATE_METHODS:
            kwargs = {**command.kwargs, "output_path": scratch / Path(command.kwargs["output_path"]).name}
            try:
                getattr(orchestrator, command.name)(*command.args, progress=_FollowerCall(channel), **kwargs)
            except (_StopTogether, _FollowerDone):
                pass
            except Exception:
                log.exception("rank %d failed inside a shared call; leaving the group", channel.info.rank)
                return 1
        else:
            log.error("unknown command %r; leaving the group", command.op)
            return 1


# ---- entry points (worker.cli cmd_run with --parallel N inside a group) --------------------------------


def join_group(settings: WorkerSettings) -> GroupInfo:
    """Join the torchrun group this process was started in; its size must be `settings.parallel`."""
    from wan_engine.context_parallel import init_group

    info = init_group()
    if info.world_size != settings.parallel:
        raise ValueError(f"--parallel {settings.parallel}, but this torchrun group has {info.world_size} ranks")
    return info


def group_leader_proxy(settings: WorkerSettings, info: GroupInfo, build: OrchestratorFactory) -> GroupLeaderProxy:
    """Rank 0's orchestrator (the worker's): every call also runs on the followers."""
    orchestrator = build(settings, str(info.device), settings.allow_download)
    leader = GroupLeaderProxy(orchestrator, GroupChannel(info))
    leader.start_pings()
    return leader


def run_follower(settings: WorkerSettings, info: GroupInfo, build: OrchestratorFactory) -> int:
    """A rank > 0: serve rank 0's commands until it stops; the exit code of the rank."""
    from wan_engine.context_parallel import destroy_group

    # Only rank 0 downloads (before it sends the load): the followers then find the files locally.
    orchestrator = build(settings, str(info.device), False)
    log.info("rank %d of %d ready on %s", info.rank, info.world_size, info.device)
    code = serve_follower(orchestrator, GroupChannel(info))
    if code == 0:
        destroy_group()
    return code
