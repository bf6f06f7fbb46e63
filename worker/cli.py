"""The `wan-worker` command line: run the daemon, manage the table, list models, build tiny models, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.config import (
    DB_STARTUP_WAIT_S,
    ENV_VARS,
    LEASE_S,
    WorkerSettings,
    default_worker_id,
    env_default,
    parse_input_roots,
)
from worker.logs import configure_logging, quiet_progress_bars
from worker.store.schema import DEFAULT_DB_URL, DatabaseUnreachable, create_db_engine, redact_url, wait_for_database
from worker.task import TaskStatus

log = logging.getLogger("worker.cli")


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=env_default("db_url", DEFAULT_DB_URL),
        help=f"SQLAlchemy URL (env {ENV_VARS['db_url']}; default {DEFAULT_DB_URL})",
    )


def _add_model_dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(env_default("models_dir", "models") or "models"),
        help=f"where model folders live (env {ENV_VARS['models_dir']})",
    )
    parser.add_argument(
        "--presets-dir",
        type=Path,
        default=_optional_path(env_default("presets_dir")),
        help=f"extra/overriding preset JSON files (env {ENV_VARS['presets_dir']})",
    )


def _add_allow_download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-download",
        action="store_true",
        default=(env_default("allow_download") or "").lower() in ("1", "true", "yes"),
        help=f"download missing weights from the Hugging Face Hub (env {ENV_VARS['allow_download']}; default: never)",
    )


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-worker", description="Headless Wan video-generation worker.")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve tasks from the table until SIGTERM/SIGINT")
    _add_db(run)
    _add_model_dirs(run)
    run.add_argument(
        "--outputs-dir",
        type=Path,
        default=Path(env_default("outputs_dir", "outputs") or "outputs"),
        help=f"where videos are written (env {ENV_VARS['outputs_dir']})",
    )
    run.add_argument(
        "--input-roots",
        default=env_default("input_roots"),
        help=f"directories inputs may be read from, ':' or ',' separated (env {ENV_VARS['input_roots']};"
        " default: the working directory)",
    )
    run.add_argument(
        "--db-wait-seconds",
        type=float,
        default=float(os.environ.get("WAN_DB_STARTUP_WAIT_SECONDS") or DB_STARTUP_WAIT_S),
        help=f"at start-up, wait this long for an unreachable database, retrying with back-off (env "
        f"WAN_DB_STARTUP_WAIT_SECONDS; default {DB_STARTUP_WAIT_S:.0f}; SQLite is not waited for)",
    )
    run.add_argument("--lease-seconds", type=float, default=float(env_default("lease_s", str(LEASE_S)) or LEASE_S))
    run.add_argument("--worker-id", default=env_default("worker_id"))
    run.add_argument("--preload-model", default=env_default("preload_model"))
    _add_allow_download(run)
    run.add_argument(
        "--allow-fallbacks",
        action="store_true",
        default=(env_default("allow_fallbacks") or "").lower() in ("1", "true", "yes"),
        help=f"when a preset's weights are unavailable, run its `fallbacks` presets instead (recorded in "
        f"result_data; env {ENV_VARS['allow_fallbacks']}; default: off)",
    )
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve live events (/ws), a status page (/) and /metrics here, e.g. 127.0.0.1:8765 (default: off)",
    )
    run.add_argument(
        "--http-token",
        default=os.environ.get("WAN_HTTP_TOKEN"),
        help="token the --http clients must send (env WAN_HTTP_TOKEN; required on a non-loopback address)",
    )
    run.add_argument(
        "--gpus",
        default=env_default("gpus"),
        help=f"one worker process per GPU, e.g. 0,1 or all (env {ENV_VARS['gpus']}; default: one worker, this process)",
    )
    run.add_argument(
        "--parallel",
        type=int,
        default=int(env_default("parallel", "1") or 1),
        metavar="N",
        help=f"run every generation on a group of N GPUs (context parallelism; with --gpus, one group per N of "
        f"them); claims tasks asking for parallel <= N (env {ENV_VARS['parallel']}; default 1)",
    )
    run.add_argument(
        "--fp8",
        action="store_true",
        default=(os.environ.get("WAN_FP8") or "").lower() in ("1", "on", "true", "yes"),
        help="fp8 weights and matmuls in the transformer blocks: faster and half the VRAM, but lossy; LoRA "
        "tasks fail on such a worker (env WAN_FP8; default: off)",
    )
    run.add_argument(
        "--vram-limit-gb",
        type=float,
        default=None,
        metavar="GIB",
        help="use at most this much of each GPU (models that do not fit are offloaded; env WAN_VRAM_LIMIT_GB)",
    )

    init_db = commands.add_parser("init-db", help="create or upgrade the database schema")
    _add_db(init_db)

    submit = commands.add_parser("submit", help="queue a task; prints its id")
    _add_db(submit)
    submit.add_argument("--presets-dir", type=Path, default=_optional_path(env_default("presets_dir")))
    submit.add_argument("--model", required=True)
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--task-type", default=None, help="default: the model's architecture")
    submit.add_argument("--params", default="{}", help="extra parameters as a JSON object")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--dependant-on", default=None)
    submit.add_argument("--wait", action="store_true", help="wait until the task ends and print its row")

    status = commands.add_parser("status", help="print a task's row as JSON")
    _add_db(status)
    status.add_argument("task_id")
    status.add_argument("--follow", action="store_true", help="draw a progress bar until the task ends (0: Complete)")

    listing = commands.add_parser("list", help="list recent tasks")
    _add_db(listing)
    listing.add_argument("--status", choices=[s.value for s in TaskStatus])
    listing.add_argument("--limit", type=int, default=50)

    cancel = commands.add_parser("cancel", help="cancel a queued or running task")
    _add_db(cancel)
    cancel.add_argument("task_id")

    models = commands.add_parser("models", help="list presets and whether their weights are present")
    _add_model_dirs(models)
    models.add_argument("keys", nargs="*", help="preset keys to report (default: all)")
    models.add_argument("--json", action="store_true")
    models.add_argument("--resolution", default=None, help="WxH for the VRAM estimate (default: the preset's)")
    models.add_argument("--frames", type=int, default=None, help="frames for the VRAM estimate (default: the preset's)")
    _add_allow_download(models)

    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight Wan models (tests, demo)")
    tiny.add_argument("directory", type=Path)

    demo = commands.add_parser("demo", help="build tiny models, queue tasks, run a worker, print the results")
    demo.add_argument("--dir", type=Path, default=Path("demo_run"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `run --gpus` restarts this command per GPU
    configure_logging(args.log_level, json_lines=args.log_json)
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except (ValueError, KeyError, DatabaseUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---- commands ------------------------------------------------------------------------------------


def _wait_for_database(url: str, timeout_s: float) -> bool:
    """Wait for the database at start-up (a stop signal ends the wait: False)."""
    import threading

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return wait_for_database(url, timeout_s, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_run(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel}: must be at least 1")
    # Engine switches travel as environment variables, so per-GPU workers and group ranks inherit them.
    if args.fp8:
        os.environ["WAN_FP8"] = "on"
    if args.vram_limit_gb is not None:
        if args.vram_limit_gb <= 0:
            raise ValueError(f"--vram-limit-gb {args.vram_limit_gb}: must be a positive number of GiB")
        os.environ["WAN_VRAM_LIMIT_GB"] = str(args.vram_limit_gb)
    if args.gpus:
        from worker.processes.supervisor import run_supervisor

        return run_supervisor(args, args.worker_id or default_worker_id())  # before torch/diffusers load
    if args.parallel > 1 and "RANK" not in os.environ:
        from worker.processes.group_launch import launch_group

        return launch_group(args.argv, args.parallel)  # N ranks of this same command (torchrun's contract)
    from headless_model_management import HeadlessTaskQueue

    quiet_progress_bars()
    settings = WorkerSettings(
        db_url=args.db,
        models_dir=args.models_dir,
        outputs_dir=args.outputs_dir,
        presets_dir=args.presets_dir,
        input_roots=parse_input_roots(args.input_roots),
        lease_s=args.lease_seconds,
        worker_id=args.worker_id or default_worker_id(),
        preload_model=args.preload_model,
        allow_download=args.allow_download,
        allow_fallbacks=args.allow_fallbacks,
        parallel=args.parallel,
    )
    leader = os.environ.get("RANK", "0") == "0"  # group ranks > 0 touch neither the database nor HTTP
    address = None
    if args.http and leader:
        from worker.live.http_server import check_bind, parse_address

        address = parse_address(args.http)
        check_bind(address[0], args.http_token)  # before anything starts: a refusal is immediate
    if leader and not _wait_for_database(settings.db_url, args.db_wait_seconds):
        return 0  # stopped (SIGTERM/SIGINT) while waiting for the database
    group = None
    if settings.parallel > 1:
        from worker.processes.group_ranks import join_group, run_follower

        group = join_group(settings)
        if not group.is_leader:
            return run_follower(settings, group, _group_orchestrator)  # no database, no HTTP: rank 0 sends every call
    log.info("starting worker on %s", redact_url(settings.db_url), extra={"worker_id": settings.worker_id})
    orchestrator = None
    if group is not None:
        from worker.processes.group_ranks import group_leader_proxy

        orchestrator = group_leader_proxy(settings, group, _group_orchestrator)
    queue = HeadlessTaskQueue(settings=settings, orchestrator=orchestrator)
    if orchestrator is not None:
        orchestrator.on_out_of_step = queue.request_stop  # finish recording the task, then exit 1: group restarts
    unavailable = _log_model_reports(queue.presets, settings.models_dir, settings.allow_download)
    server = _start_live_server(queue, address, args.http_token, unavailable) if address else None

    def on_signal(signum: int, _frame: object) -> None:
        # Only sets events: safe inside a signal handler. First = finish the task, second = re-queue it.
        aborting = queue.worker is not None and queue.worker.stop_requested.is_set()
        log.warning(
            "%s: %s",
            signal.Signals(signum).name,
            "aborting the current task" if aborting else "stopping after the current task (send again to abort it)",
            extra={"worker_id": settings.worker_id},
        )
        queue.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        queue.run_forever()
    finally:
        if server is not None:
            server.stop()
        queue.engine.dispose()
        if orchestrator is not None:
            orchestrator.close()  # the followers exit with this rank
    return 1 if orchestrator is not None and orchestrator.out_of_step else 0


def _group_orchestrator(settings: WorkerSettings, device: str, allow_download: bool) -> Any:
    """One rank's orchestrator on its device (`--parallel N`)."""
    from headless_wgp import WanOrchestrator
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets

    presets = load_presets(BUILTIN_PRESETS_DIR, settings.presets_dir)
    return WanOrchestrator(settings.models_dir, presets, device=device, allow_download=allow_download)


def _start_live_server(queue: Any, address: tuple[str, int], token: str | None, unavailable: dict[str, str]) -> Any:
    """`--http`: the live sink publishes events for the server (worker.live.http_server)."""
    from worker.live.events import live_sink
    from worker.live.http_server import LiveServer

    queue.events = live_sink(queue.repository, queue.presets, queue.settings.models_dir, publish=True)
    server = LiveServer(
        queue.repository,
        queue.events,
        *address,
        token=token,
        outputs_dir=queue.settings.outputs_dir,
        worker_id=queue.settings.worker_id,
        resident_model=lambda: queue.runner.resident_model() if queue.runner else None,
    )
    server.start()
    queue.events.models_unavailable(unavailable)
    return server


def cmd_init_db(args: argparse.Namespace) -> int:
    from worker.store.migrate import upgrade_to_head

    engine = create_db_engine(args.db)
    upgrade_to_head(engine)
    engine.dispose()
    print(f"database ready: {redact_url(args.db)}")
    return 0


def _repository(db_url: str) -> Any:
    from worker.store.migrate import upgrade_to_head
    from worker.store.repository import SqlTaskRepository

    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    return SqlTaskRepository(engine)


def cmd_submit(args: argparse.Namespace) -> int:
    from headless_model_management import GenerationTask, HeadlessTaskQueue
    from worker.tasks.params import parse_params_text

    queue = HeadlessTaskQueue(args.db, presets_dir=args.presets_dir)
    task = GenerationTask(
        model=args.model,
        prompt=args.prompt,
        parameters=parse_params_text(args.params),
        task_type=args.task_type,
        priority=args.priority,
        dependant_on=args.dependant_on,
    )
    task_id = queue.submit_task(task)
    print(task_id)
    if args.wait:
        info = queue.wait_for_completion(task_id)
        print(json.dumps(_row(queue.repository.get(task_id)), indent=2, default=str))
        return 0 if info.status is TaskStatus.COMPLETE else 1
    return 0


def _row(task: Any) -> dict[str, Any]:
    data = dict(task.__dict__)
    data["status"] = task.status.value
    data["params"] = data.pop("params_text")
    return data


def cmd_status(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(args)
    task = _repository(args.db).get(args.task_id)
    if task is None:
        print(f"error: no task with id {args.task_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(_row(task), indent=2, default=str))
    return 0


def _follow(args: argparse.Namespace) -> int:
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
    from worker.live.eta import EtaEstimator, PresetShapes, detect_device
    from worker.live.eta_static import StaticCostModel
    from worker.live.follow import follow_task

    repository = _repository(args.db)
    presets = load_presets(BUILTIN_PRESETS_DIR, _optional_path(env_default("presets_dir")))
    device = detect_device()
    models_dir = Path(env_default("models_dir", "models") or "models")
    shapes = PresetShapes(presets, "cpu" if device == "cpu" else "gpu")
    estimator = EtaEstimator(repository, shapes, device, StaticCostModel(presets, models_dir, device))
    return follow_task(repository, args.task_id, estimator)


def cmd_list(args: argparse.Namespace) -> int:
    rows = _repository(args.db).list_tasks(args.status, args.limit)
    print(f"{'id':34} {'status':12} {'pri':>4} {'type':10} {'att':>3}  output / error")
    for task in rows:
        detail = task.output_location or task.error_message or ""
        print(
            f"{task.id:34} {task.status.value:12} {task.priority:>4} {task.task_type:10} {task.attempts:>3}  "
            f"{detail[:100]}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    repository = _repository(args.db)
    if repository.cancel(args.task_id):
        print(f"cancelled {args.task_id}")
        return 0
    task = repository.get(args.task_id)
    state = f"already {task.status.value}" if task else "not found"
    print(f"error: task {args.task_id} not cancelled ({state})", file=sys.stderr)
    return 1


def _log_model_reports(presets: Any, models_dir: Path, allow_download: bool) -> dict[str, str]:
    """Start-up report: one line per preset (present / missing / corrupted, VRAM, GPU fit); returns the
    presets that cannot run here (key -> why), for the live status page."""
    from wan_engine.vram import detect_gpu, model_report

    gpu = detect_gpu()
    log.info("GPU: %s", f"{gpu.name} ({gpu.total_bytes / 2**30:.1f} GiB)" if gpu else "no GPU (CPU only)")
    unavailable: dict[str, str] = {}
    for key in presets:
        report = model_report(presets.get(key), models_dir, gpu)
        fetch = " (will be downloaded on first use)" if allow_download and report.check.downloads else ""
        level = logging.INFO if report.check.status == "present" or fetch else logging.WARNING
        log.log(level, "model %s%s", report.line(), fetch, extra={"model": key})
        if level == logging.WARNING:
            unavailable[key] = report.check.status
    return unavailable


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def cmd_models(args: argparse.Namespace) -> int:
    from wan_engine.errors import ModelUnavailableError
    from wan_engine.model_sources import resolve_model, summary
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
    from wan_engine.vram import PROFILES, detect_gpu, model_report

    presets = load_presets(BUILTIN_PRESETS_DIR, args.presets_dir)
    keys = args.keys or list(presets)
    for key in keys:
        presets.get(key)  # UnknownModelError (a ValueError) lists the known keys
    if args.allow_download:
        if not args.keys:
            print("error: --allow-download needs the keys of the presets to fetch (never all of them)", file=sys.stderr)
            return 2
        for key in keys:
            try:
                resolve_model(presets.get(key), args.models_dir, allow_download=True)
            except ModelUnavailableError as exc:
                print(f"error: {exc}", file=sys.stderr)
    width = height = None
    if args.resolution:
        width, height = (int(x) for x in args.resolution.lower().split("x"))
    gpu = detect_gpu()
    size = {"width": width, "height": height, "frames": args.frames}
    reports = [model_report(presets.get(key), args.models_dir, gpu, **size) for key in keys]
    failed = bool(args.keys) and any(r.check.status != "present" for r in reports)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return 1 if failed else 0
    print(f"GPU: {gpu.name} ({gpu.total_bytes / 2**30:.1f} GiB)" if gpu else "GPU: no GPU (estimates are for a GPU)")
    at = f"{args.resolution or 'the preset resolution'} x {args.frames or 'the preset frames'}"
    print(f"VRAM estimates in GiB at {at}; best = the fastest profile that fits this GPU")
    header = " ".join(f"{name:>13}" for name in PROFILES[:-1])
    print(f"{'model':24} {'arch':6} {'status':9} {header} {'best':13} detail")
    for report in reports:
        profiles = report.vram.profiles if report.vram else {}
        sizes = " ".join(f"{_gib(profiles.get(name)):>13}" for name in PROFILES[:-1])
        model = f"{report.preset.key:24} {report.preset.model.architecture:6} {report.check.status:9}"
        print(f"{model} {sizes} {report.recommended_profile or '-':13} {summary(report.check)}")
    return 1 if failed else 0


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from wan_engine.tiny_models import build_tiny_models

    for name, folder in build_tiny_models(args.directory).items():
        print(f"{name:16} {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    quiet_progress_bars()
    return run_demo(args.dir)


_COMMANDS = {
    "run": cmd_run,
    "init-db": cmd_init_db,
    "submit": cmd_submit,
    "status": cmd_status,
    "list": cmd_list,
    "cancel": cmd_cancel,
    "models": cmd_models,
    "make-tiny-models": cmd_make_tiny_models,
    "demo": cmd_demo,
}
