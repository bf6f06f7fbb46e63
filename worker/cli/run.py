"""`wan-worker run`: serve tasks from the table until SIGTERM/SIGINT.

The steps, in order: engine switches (environment), process layout (`--gpus` supervisor, `--parallel`
group launch), settings, the `--http` address check, the database wait, the group join, then the queue,
its live server and signal handlers. Only this module (and worker.demo) imports `headless_*`; it uses
the public API of HeadlessTaskQueue.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from wan_engine.progress_bars import quiet_progress_bars
from worker.cli.stop_signals import StopSignals
from worker.config import WorkerSettings, default_worker_id, parse_input_roots
from worker.store.file_identity import DATABASE_REPLACED_EXIT, FileIdentity, sqlite_file, truncate_wal
from worker.store.schema import redact_url, wait_for_database

if TYPE_CHECKING:
    from headless_model_management import HeadlessTaskQueue

log = logging.getLogger("worker.cli")  # one logger for the whole CLI: tests and log filters key on the name
DB_FILE_POLL_S = 1.0  # how often `run` checks that its SQLite file is still the one it opened


# ---- before anything loads ------------------------------------------------------------------------------


def _apply_engine_switches(args: argparse.Namespace) -> None:
    """Check --parallel/--vram-limit-gb and export the engine switches.

    They travel as environment variables, so per-GPU workers and group ranks inherit them."""
    if args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel}: must be at least 1")
    if args.fp8:
        os.environ["WAN_FP8"] = "on"
    if args.vram_limit_gb is not None:
        if args.vram_limit_gb <= 0:
            raise ValueError(f"--vram-limit-gb {args.vram_limit_gb}: must be a positive number of GiB")
        os.environ["WAN_VRAM_LIMIT_GB"] = str(args.vram_limit_gb)


def _delegate_processes(args: argparse.Namespace) -> int | None:
    """`--gpus`: the supervisor; `--parallel N` outside a group: launch its N ranks. None: serve here."""
    if args.gpus:
        from worker.processes.supervisor import run_supervisor

        return run_supervisor(args, args.worker_id or default_worker_id())  # before torch/diffusers load
    if args.parallel > 1 and "RANK" not in os.environ:
        from worker.processes.group_launch import launch_group

        return launch_group(args.argv, args.parallel)  # N ranks of this same command (torchrun's contract)
    return None


def _settings(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(
        db_url=args.db,
        models_dir=args.models_dir,
        outputs_dir=args.outputs_dir,
        presets_dir=args.presets_dir,
        loras_dirs=tuple(args.loras_dir or ()),
        input_roots=parse_input_roots(args.input_roots),
        lease_s=args.lease_seconds,
        worker_id=args.worker_id or default_worker_id(),
        preload_model=args.preload_model,
        allow_download=args.allow_download,
        allow_fallbacks=args.allow_fallbacks,
        parallel=args.parallel,
    )


def _http_token(args: argparse.Namespace) -> str | None:
    """The `--http` token, read once at start-up: a flag beats the environment, and giving both a token and a
    file at the same level is an error. A token file that cannot be used is a ValueError naming its path (exit
    2). The token itself is never logged."""
    from worker.live.http_server import TOKEN_ENV, TOKEN_FILE_ENV, read_token_file

    if args.http_token is not None and args.http_token_file:
        raise ValueError("--http-token and --http-token-file: give one of them")
    if args.http_token is not None:
        if args.http_token:
            log.warning("--http-token on the command line is visible in ps: use --http-token-file or %s", TOKEN_ENV)
        return args.http_token or None
    if args.http_token_file:
        return read_token_file(args.http_token_file, "--http-token-file")
    from_env, file_env = os.environ.get(TOKEN_ENV) or None, os.environ.get(TOKEN_FILE_ENV) or None
    if from_env and file_env:
        raise ValueError(f"{TOKEN_ENV} and {TOKEN_FILE_ENV} are both set: set one of them")
    return read_token_file(file_env, TOKEN_FILE_ENV) if file_env else from_env


def _http_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """The `--http` address, checked before anything starts: a refusal (no token off loopback) is immediate."""
    if not args.http:
        return None
    from worker.live.http_server import check_bind, parse_address

    address = parse_address(args.http)
    check_bind(address[0], args.http_token)
    return address


def _wait_for_database(url: str, timeout_s: float, stop: threading.Event) -> bool:
    """Wait for the database at start-up (a stop signal ends the wait: False)."""
    return wait_for_database(url, timeout_s, stop)


# ---- group parallelism ------------------------------------------------------------------------------------


def _group_orchestrator(settings: WorkerSettings, device: str, allow_download: bool) -> Any:
    """One rank's orchestrator on its device (`--parallel N`): the factory worker.processes.group_ranks calls."""
    from headless_wgp import WanOrchestrator
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets

    presets = load_presets(BUILTIN_PRESETS_DIR, settings.presets_dir)
    loras = settings.loras_dirs or None
    return WanOrchestrator(settings.models_dir, presets, device=device, allow_download=allow_download, loras_dir=loras)


# ---- serving ----------------------------------------------------------------------------------------------


def _log_model_reports(presets: Any, models_dir: Path, allow_download: bool) -> dict[str, str]:
    """Start-up report: one line per preset (present / missing / corrupted, VRAM, GPU fit); returns the
    presets that cannot run here (key -> why), for the live status page."""
    from wan_engine.vram import detect_gpu, model_report

    gpu = detect_gpu()
    log.info("GPU: %s", f"{gpu.name} ({gpu.total_bytes / 2**30:.1f} GiB)" if gpu else "no GPU (CPU only)")
    unavailable: dict[str, str] = {}
    if not models_dir.is_dir() and not allow_download:
        # One line instead of one "missing" line per preset: the cause is the folder, not the presets.
        log.warning(
            "models dir %s does not exist: no preset's weights are here (point --models-dir or WAN_MODELS_DIR at "
            "the folder holding the model folders, or pass --allow-download)",
            models_dir.resolve(),
            extra={"event": "models_dir_missing"},
        )
        return {key: "missing" for key in presets}
    for key in presets:
        report = model_report(presets.get(key), models_dir, gpu)
        fetch = " (will be downloaded on first use)" if allow_download and report.check.downloads else ""
        level = logging.INFO if report.check.status == "present" or fetch else logging.WARNING
        log.log(level, "model %s%s", report.line(), fetch, extra={"model": key})
        if level == logging.WARNING:
            unavailable[key] = report.check.status
    return unavailable


def _start_live_server(
    queue: HeadlessTaskQueue, address: tuple[str, int], token: str | None, unavailable: dict[str, str]
) -> Any:
    """`--http`: the queue's live sink publishes events for the server (worker.live.http_server)."""
    from functools import partial

    from worker.live.http_server import LiveServer
    from worker.tasks.validation import validate_task

    events = queue.use_live_events(publish=True)
    server = LiveServer(
        queue.repository,
        events,
        *address,
        token=token,
        outputs_dir=queue.settings.outputs_dir,
        worker_id=queue.settings.worker_id,
        resident_model=queue.resident_model,
        presets=queue.presets,
        # POST /tasks validates as the runner does (the same function, presets and models dir).
        validate_task=partial(validate_task, presets=queue.presets, models_dir=queue.settings.models_dir),
        loop_alive=lambda: not queue.stop_requested,  # /healthz, wan_worker_up
        loop_activity=queue.seconds_since_loop_activity,
    )
    server.start()
    events.models_unavailable(unavailable)
    return server


class _DatabaseFileWatch:
    """A daemon thread that notices the SQLite file replaced or removed (`worker.store.file_identity`).

    The engine keeps the inode it opened, so without this a restored backup (`mv backup.db tasks.db`)
    would be ignored silently. On a change it logs one error line and abandons the current task at its next
    step: its outcome could only reach the old file, and the old connection's WAL (named after the path)
    must not be written into the new file any longer than needed. `_serve` then returns
    `DATABASE_REPLACED_EXIT`, and a restarted worker serves the new file."""

    def __init__(self, identity: FileIdentity, queue: HeadlessTaskQueue, worker_id: str) -> None:
        self.identity = identity
        self.queue = queue
        self.worker_id = worker_id
        self.replaced = threading.Event()  # set once the watch has stopped the worker for a change
        self.finished = threading.Event()  # set by `_serve` when serving ends: the thread exits

    @classmethod
    def start(cls, settings: WorkerSettings, queue: HeadlessTaskQueue) -> _DatabaseFileWatch | None:
        """Watch the database file of a SQLite URL (None for Postgres or a database without a file)."""
        path = sqlite_file(settings.db_url)
        if path is None:
            return None
        try:
            identity = FileIdentity.record(path)  # after the queue migrated it: the file exists
        except OSError as exc:
            log.warning("cannot watch the database file %s: %s", path, exc, extra={"worker_id": settings.worker_id})
            return None
        watch = cls(identity, queue, settings.worker_id)
        threading.Thread(target=watch._run, name="wan-db-file-watch", daemon=True).start()
        return watch

    def _run(self) -> None:
        while not self.finished.wait(DB_FILE_POLL_S):
            change = self.identity.changed()
            if change is None:
                continue
            log.error(
                "database file %s: %s; this worker still has the old file open, so it abandons the current "
                "task and exits %d for a restart on the new file",
                self.identity.path,
                change,
                DATABASE_REPLACED_EXIT,
                extra={"worker_id": self.worker_id},
            )
            self.replaced.set()
            if not self.queue.stop_requested:
                self.queue.request_stop()
            self.queue.request_stop()  # the second request: abandon the task now
            return


def _serve(
    settings: WorkerSettings, group: Any, address: tuple[str, int] | None, token: str | None, stops: StopSignals
) -> int:
    """Run the queue in this process (a group's rank 0 drives its followers); 1: a group rank fell out of
    step (the group restarts); 3 (`DATABASE_REPLACED_EXIT`): the SQLite file was replaced or removed (a
    supervisor restarts the worker on the new file); else 0."""
    from headless_model_management import HeadlessTaskQueue

    orchestrator = None
    if group is not None:
        from worker.processes.group_ranks import group_leader_proxy

        orchestrator = group_leader_proxy(settings, group, _group_orchestrator)
    queue = HeadlessTaskQueue(settings=settings, orchestrator=orchestrator)
    if orchestrator is not None:
        orchestrator.on_out_of_step = queue.request_stop  # finish recording the task, then exit 1: group restarts
    unavailable = _log_model_reports(queue.presets, settings.models_dir, settings.allow_download)
    queue.prepare()  # the process warm-up runs here, before the HTTP server's threads start importing
    server = _start_live_server(queue, address, token, unavailable) if address else None
    stops.attach(queue)  # stops that came during start-up reach the queue now
    file_watch = _DatabaseFileWatch.start(settings, queue)
    try:
        queue.run_forever()
    finally:
        if file_watch is not None:
            file_watch.finished.set()
        stops.ignore_from_now()
        if server is not None:
            server.stop()
        if file_watch is not None and file_watch.replaced.is_set():
            truncate_wal(queue.engine)  # else the old file's WAL would be replayed into the new file
        queue.dispose()
        if orchestrator is not None:
            orchestrator.close()  # the followers exit with this rank
            orchestrator.leave_group()
    if file_watch is not None and file_watch.replaced.is_set():
        return DATABASE_REPLACED_EXIT
    return 1 if orchestrator is not None and orchestrator.out_of_step else 0


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: serve tasks until SIGTERM/SIGINT (or hand over to the supervisor / group launcher)."""
    _apply_engine_switches(args)
    args.http_token = _http_token(args)  # once, before --gpus: the supervisor checks it too
    delegated = _delegate_processes(args)
    if delegated is not None:
        return delegated
    settings = _settings(args)
    leader = os.environ.get("RANK", "0") == "0"  # group ranks > 0 touch neither the database nor HTTP
    # Before anything heavy loads: a stop during start-up is remembered, not lost (ranks > 0 keep the default
    # actions: rank 0 and the group launcher end them).
    stops = StopSignals(settings.worker_id).install() if leader else StopSignals(settings.worker_id)
    import headless_model_management  # noqa: F401  # the engine stack loads here, before the progress-bar switch

    quiet_progress_bars()
    address = _http_address(args) if leader else None
    if leader and not _wait_for_database(settings.db_url, args.db_wait_seconds, stops.requested):
        return 0  # stopped (SIGTERM/SIGINT/SIGHUP) while waiting for the database
    if stops.requests:
        log.warning("stopped during start-up; no task was claimed", extra={"worker_id": settings.worker_id})
        return 0
    group = None
    if settings.parallel > 1:
        from worker.processes.group_ranks import join_group, run_follower

        group = join_group(settings)
        if not group.is_leader:
            _exit_group_rank(run_follower(settings, group, _group_orchestrator))  # no database, no HTTP
    log.info("starting worker on %s", redact_url(settings.db_url), extra={"worker_id": settings.worker_id})
    code = _serve(settings, group, address, args.http_token, stops)
    if group is not None:
        _exit_group_rank(code)
    return code


def _exit_group_rank(code: int) -> NoReturn:
    """End a group rank without the interpreter's teardown. Everything is done by now (rows written, the HTTP
    server and database closed, the followers stopped, the process group left); what remains is C++ static
    destruction, where torch's distributed state can abort a rank whose run went fine ("terminate called without
    an active exception", exit -6: about 1 in 7 group stops on a 2-core machine, with the code of this session
    and the one before), and the group launcher would then report a failed group."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
