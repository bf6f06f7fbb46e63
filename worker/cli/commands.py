"""The table and model subcommands: init-db, submit, status, list, cancel, retry, purge, models,
make-tiny-models, demo.

`run` lives in worker.cli.run. Heavy imports (engine, torch, the queue) stay inside the commands, so
`wan-worker list` and friends start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wan_engine.progress_bars import quiet_progress_bars
from worker.config import environment_settings
from worker.store.schema import create_db_engine, redact_url, sqlite_file
from worker.task import TaskStatus

# ---- the tasks table ----------------------------------------------------------------------------------


def cmd_init_db(args: argparse.Namespace) -> int:
    """`init-db`: create or upgrade the schema."""
    from worker.store.migrate import upgrade_to_head

    engine = create_db_engine(args.db)
    upgrade_to_head(engine)
    engine.dispose()
    print(f"database ready: {redact_url(args.db)}")
    return 0


def _repository(db_url: str) -> Any:
    """A repository on an up-to-date schema (the read/cancel commands need no queue).

    These commands never create a database: a SQLite file that does not exist is a ValueError (`error: no
    database at PATH`, exit 2) rather than a new, empty, migrated tasks.db left in the working directory.
    """
    from worker.store.migrate import upgrade_to_head
    from worker.store.repository import SqlTaskRepository

    path = sqlite_file(db_url)
    if path is not None and not path.exists():
        raise ValueError(f"no database at {path} (run wan-worker init-db or wan-worker run first)")
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    return SqlTaskRepository(engine)


def _json_object(value: Any) -> Any:
    """A JSON column as an object: text holding a JSON object is decoded (bounded, never raising);
    anything else (a hostile row's non-JSON params) is printed as it is stored."""
    from worker.tasks.params import params_or_none

    if isinstance(value, str):
        decoded = params_or_none(value)
        return value if decoded is None else decoded
    return value


def _row(task: Any) -> dict[str, Any]:
    """A task as the JSON that `status`, `list --json` and `submit --wait` print: params, result_data and
    progress as JSON objects, not JSON text inside a string."""
    data = dict(task.__dict__)
    data["status"] = task.status.value
    data["params"] = _json_object(data.pop("params_text"))
    for key in ("result_data", "progress"):
        data[key] = _json_object(data[key])
    return data


def cmd_submit(args: argparse.Namespace) -> int:
    """`submit`: validate and queue a task of any type through the Python API; prints its id.

    The mode inputs come as flags (`--image`, `--video-guide`, ...) mapped onto params, over `--params`. A flag
    the task type does not take is a one-line error naming it and what the type takes (exit 2).
    """
    from headless_model_management import GenerationTask, HeadlessTaskQueue
    from worker.tasks.params import TASK_TYPE_DEFAULT_MODELS, TASK_TYPE_MODES, parse_params_text
    from worker.tasks.travel import DEFAULT_TRAVEL_MODEL

    parameters = parse_params_text(args.params)
    prompts: list[str] = args.prompt or []
    with HeadlessTaskQueue(args.db, presets_dir=args.presets_dir) as queue:
        model = args.model or parameters.pop("model", None)
        task_type = args.task_type
        if task_type == "travel_orchestrator":
            _reject_flags(args, _MODE_FLAGS, f"is not for travel_orchestrator tasks; travel takes {_TRAVEL_FLAGS}")
            model = model or DEFAULT_TRAVEL_MODEL  # the worker's default for a row without a model
            if args.image is not None:
                if len(args.image) < 2:
                    raise ValueError(f"--image given {len(args.image)} time(s): a travel needs 2 or more images")
                parameters["input_images"] = args.image
            if prompts:
                parameters["base_prompts"] = prompts[0] if len(prompts) == 1 else prompts
            flags = {"segment_frames": args.segment_frames, "frame_overlap": args.frame_overlap}
            flags |= {"resolution": args.resolution, "seed_base": args.seed}
            prompt = ""
        else:
            _reject_flags(args, _TRAVEL_ONLY_FLAGS, f"is only for --task-type travel_orchestrator ({_I2V_HINT})")
            if len(prompts) > 1:
                raise ValueError(
                    f"--prompt given {len(prompts)} times: only --task-type travel_orchestrator takes one per segment"
                )
            if task_type in ("travel_segment", "travel_stitch"):
                model = model or ""  # refused by the validation, which says the orchestrator creates them
            if model is None:
                if task_type not in TASK_TYPE_DEFAULT_MODELS:
                    raise ValueError("--model is required (or a --task-type with a default model)")
                model = TASK_TYPE_DEFAULT_MODELS[task_type]
            prompt = prompts[0] if prompts else parameters.pop("prompt", None)
            if prompt is None:
                raise ValueError("--prompt is required (except for --task-type travel_orchestrator)")
            parameters.pop("prompt", None)
            mode = (
                TASK_TYPE_MODES.get(task_type)
                if task_type
                else TASK_TYPE_MODES.get(queue.presets.get(model).model.architecture)
            )
            if mode is not None:  # an unknown task_type is refused by the validation, listing the known ones
                allowed = [flag for flag in _MODE_FLAGS if _FLAG_KEYS[flag] in _MODE_KEYS[mode]]
                refused = tuple(flag for flag in _MODE_FLAGS if flag not in allowed)
                _reject_flags(
                    args, refused, f"is not for {mode} tasks; {mode} takes {', '.join(allowed) or 'no mode flags'}"
                )
            flags = {key: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, key in _FLAG_KEYS.items()}
            flags |= {"resolution": args.resolution, "seed": args.seed}
        parameters |= {key: value for key, value in flags.items() if value is not None}
        task = GenerationTask(
            model=model,
            prompt=prompt,
            parameters=parameters,
            task_type=task_type,
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


# `submit`'s mode flags and the params keys they set; which keys each mode takes (worker.tasks.params).
_FLAG_KEYS = {
    "--video-guide": "video_guide",
    "--video-mask": "video_mask",
    "--image-ref": "image_refs",
    "--image-start": "image_start",
    "--image-end": "image_end",
}
_MODE_FLAGS = tuple(_FLAG_KEYS)
_MODE_KEYS: dict[str, tuple[str, ...]] = {
    "t2v": (),
    "vace": ("video_guide", "video_mask", "image_refs"),
    "i2v": ("image_start", "image_end"),
    "flf2v": ("image_start", "image_end"),
    "ti2v": ("image_start",),
}
_TRAVEL_ONLY_FLAGS = ("--image", "--segment-frames", "--frame-overlap")
_TRAVEL_FLAGS = "--image, --prompt, --segment-frames, --frame-overlap, --resolution, --seed"
_I2V_HINT = "for i2v, flf2v and ti2v use --image-start, --image-end"


def _reject_flags(args: argparse.Namespace, flags: tuple[str, ...], reason: str) -> None:
    """ValueError (one line: exit 2) naming the first of `flags` that was given, then `reason`."""
    for flag in flags:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            raise ValueError(f"{flag} {reason}")


def cmd_status(args: argparse.Namespace) -> int:
    """`status`: print a task's row (or, with --follow, draw its progress until it ends)."""
    if args.follow:
        return _follow(args)
    task = _repository(args.db).get(args.task_id)
    if task is None:
        print(f"error: no task with id {args.task_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(_row(task), indent=2, default=str))
    return 0


def _follow(args: argparse.Namespace) -> int:
    """`status --follow`: a progress bar with this device's ETA estimate."""
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
    from worker.live.eta import EtaEstimator, PresetShapes, decode_overlaps_here, detect_device
    from worker.live.eta_static import StaticCostModel
    from worker.live.follow import follow_task

    repository = _repository(args.db)
    env = environment_settings()
    presets = load_presets(BUILTIN_PRESETS_DIR, env.presets_dir)
    device = detect_device()
    models_dir = env.models_dir
    profile = "cpu" if device == "cpu" else "gpu"
    static = StaticCostModel(presets, models_dir, device)
    overlaps = decode_overlaps_here(device, profile)
    estimator = EtaEstimator(repository, PresetShapes(presets, profile), device, static, decode_overlaps=overlaps)
    return follow_task(repository, args.task_id, estimator)


def cmd_list(args: argparse.Namespace) -> int:
    """`list`: recent tasks, one line each (`--json`: a JSON array of rows; `--model`: one model's rows)."""
    repository = _repository(args.db)
    if args.model is None:
        rows = repository.list_tasks(args.status, args.limit)
    else:
        from worker.store.db import Db
        from worker.store.queries import list_tasks_matching
        from worker.tasks.params import model_key_for

        def for_model(task: Any) -> bool:
            return model_key_for(task.task_type, task.params_text) == args.model

        rows = list_tasks_matching(Db(repository.engine), for_model, args.status, args.limit)
    if args.json:
        print(json.dumps([_row(task) for task in rows], indent=2, default=str))
        return 0
    print(f"{'id':34} {'status':12} {'pri':>4} {'type':10} {'att':>3}  output / error")
    for task in rows:
        detail = task.output_location or task.error_message or ""
        print(
            f"{task.id:34} {task.status.value:12} {task.priority:>4} {task.task_type:10} {task.attempts:>3}  "
            f"{detail[:100]}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """`cancel`: cancel a queued or running task (1 when it had ended or does not exist)."""
    repository = _repository(args.db)
    if repository.cancel(args.task_id):
        print(f"cancelled {args.task_id}")
        return 0
    task = repository.get(args.task_id)
    state = f"already {task.status.value}" if task else "not found"
    print(f"error: task {args.task_id} not cancelled ({state})", file=sys.stderr)
    return 1


def cmd_retry(args: argparse.Namespace) -> int:
    """`retry`: a Failed or Cancelled task back to Queued (1 when it is in another status or does not exist)."""
    repository = _repository(args.db)
    if repository.retry(args.task_id):
        print(f"queued {args.task_id} again")
        return 0
    task = repository.get(args.task_id)
    state = f"it is {task.status.value}; only Failed or Cancelled tasks are retried" if task else "not found"
    print(f"error: task {args.task_id} not retried ({state})", file=sys.stderr)
    return 1


_AGE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str) -> float:
    """`30m`, `12h`, `7d`, `2w` as seconds; ValueError (one line, naming the value and the forms) otherwise."""
    text = value.strip().lower()
    number, unit = text[:-1], text[-1:]
    if unit in _AGE_UNITS and number.isdigit() and int(number) > 0:
        return float(int(number) * _AGE_UNITS[unit])
    raise ValueError(
        f"--older-than {value!r} is not an age; use a whole number and a unit: 30m (minutes), 12h (hours), "
        "7d (days) or 2w (weeks)"
    )


def _output_file(location: str, outputs_root: Path) -> Path | None:
    """The file `location` names when it is a regular file directly named inside the outputs dir; None
    otherwise (outside it, through a symlink, missing, a directory): such a file is never deleted."""
    path = Path(location)
    if not path.is_absolute():
        path = Path.cwd() / path
    # Resolve the directory, never the file: a symlink named as the output is not followed anywhere.
    try:
        parent = path.parent.resolve(strict=True)
    except OSError:
        return None
    candidate = parent / path.name
    if not candidate.is_relative_to(outputs_root) or candidate == outputs_root:
        return None
    if candidate.is_symlink() or not candidate.is_file():
        return None
    return candidate


def _plan_outputs(rows: list[Any], outputs_dir: Path, still_referenced: set[str]) -> tuple[list[Path], dict[str, int]]:
    """The files `purge --outputs` removes for these rows, and how many recorded outputs it keeps, by why."""
    kept = {"outside the outputs dir or not a plain file": 0, "still recorded by another row": 0}
    try:
        root = outputs_dir.resolve(strict=True)
    except OSError:
        root = None  # no outputs dir: nothing may be deleted
    files: list[Path] = []
    for row in rows:
        if not row.output_location:
            continue
        if row.output_location in still_referenced:
            kept["still recorded by another row"] += 1
            continue
        path = _output_file(row.output_location, root) if root is not None else None
        if path is None:
            kept["outside the outputs dir or not a plain file"] += 1
        elif path not in files:
            files.append(path)
    return files, kept


def cmd_purge(args: argparse.Namespace) -> int:
    """`purge`: delete rows that ended longer ago than --older-than (and with --outputs their files)."""
    from collections import Counter

    from worker.store import purge
    from worker.store.db import Db

    age_s = parse_age(args.older_than)
    db = Db(_repository(args.db).engine)
    statuses = list(dict.fromkeys(args.status))
    kept_rows = purge.count_kept_for_open_rows(db, age_s, statuses)
    select_or_delete = purge.select_purgeable if args.dry_run else purge.delete_purgeable
    rows = select_or_delete(db, age_s, statuses)
    locations = [row.output_location for row in rows if row.output_location]
    # A file another (kept) row records stays, e.g. a row a client pointed at an existing video.
    others = purge.referenced_outputs(db, locations, excluding=[row.id for row in rows]) if args.outputs else set()
    by_status = Counter(row.status for row in rows)
    counts = ", ".join(f"{status} {by_status[status]}" for status in statuses if by_status[status])
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(rows)} rows older than {args.older_than}" + (f" ({counts})" if counts else ""))
    if kept_rows:
        print(f"kept {kept_rows} rows that open tasks still depend on")
    if not args.outputs:
        return 0
    files, kept = _plan_outputs(rows, args.outputs_dir, others)
    removed_bytes = 0
    removed = 0
    for path in files:
        try:
            size = path.lstat().st_size
            if not args.dry_run:
                path.unlink()
        except FileNotFoundError:
            continue  # gone meanwhile: nothing to remove
        except OSError as exc:
            print(f"warning: could not remove {path}: {exc}", file=sys.stderr)
            continue
        removed += 1
        removed_bytes += size
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} output files ({removed_bytes} bytes) in {args.outputs_dir}")
    for why, count in kept.items():
        if count:
            print(f"kept {count} recorded outputs: {why}")
    return 0


# ---- models -------------------------------------------------------------------------------------------


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _download_models(presets: Any, keys: list[str], models_dir: Path) -> None:
    """`models KEY... --allow-download`: fetch each preset's weights; a failure is printed, not raised."""
    from wan_engine.errors import ModelUnavailableError
    from wan_engine.model_sources import resolve_model

    for key in keys:
        try:
            resolve_model(presets.get(key), models_dir, allow_download=True)
        except ModelUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)


def _print_model_table(reports: list[Any], gpu: Any, resolution: str | None, frames: int | None) -> None:
    """The `models` table: status and VRAM estimate per memory profile, and the best profile here."""
    from wan_engine.model_sources import summary
    from wan_engine.vram import PROFILES

    print(f"GPU: {gpu.name} ({gpu.total_bytes / 2**30:.1f} GiB)" if gpu else "GPU: no GPU (estimates are for a GPU)")
    at = f"{resolution or 'the preset resolution'} x {frames or 'the preset frames'}"
    print(f"VRAM estimates in GiB at {at}; best = the fastest profile that fits this GPU")
    header = " ".join(f"{name:>13}" for name in PROFILES[:-1])
    print(f"{'model':24} {'arch':6} {'status':9} {header} {'best':13} detail")
    for report in reports:
        profiles = report.vram.profiles if report.vram else {}
        sizes = " ".join(f"{_gib(profiles.get(name)):>13}" for name in PROFILES[:-1])
        model = f"{report.preset.key:24} {report.preset.model.architecture:6} {report.check.status:9}"
        print(f"{model} {sizes} {report.recommended_profile or '-':13} {summary(report.check)}")


def cmd_models(args: argparse.Namespace) -> int:
    """`models`: presets, whether their weights are present, and VRAM estimates (1: a named key is not)."""
    from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
    from wan_engine.vram import detect_gpu, model_report

    presets = load_presets(BUILTIN_PRESETS_DIR, args.presets_dir)
    if not presets:
        # No presets at all is a broken installation (or a wrong --presets-dir), not an empty table.
        looked_in = str(BUILTIN_PRESETS_DIR) + (f" and {args.presets_dir}" if args.presets_dir else "")
        print(f"error: no model presets found (looked in {looked_in})", file=sys.stderr)
        return 2
    keys = args.keys or list(presets)
    for key in keys:
        presets.get(key)  # UnknownModelError (a ValueError) lists the known keys
    if args.allow_download:
        if not args.keys:
            print("error: --allow-download needs the keys of the presets to fetch (never all of them)", file=sys.stderr)
            return 2
        _download_models(presets, keys, args.models_dir)
    width = height = None
    if args.resolution:
        width, height = (int(x) for x in args.resolution.lower().split("x"))
    gpu = detect_gpu()
    if not args.models_dir.is_dir():
        print(
            f"note: models dir {args.models_dir.resolve()} does not exist, so every preset below is missing "
            "(point --models-dir or WAN_MODELS_DIR at the folder holding the model folders)",
            file=sys.stderr,
        )
    size = {"width": width, "height": height, "frames": args.frames}
    reports = [model_report(presets.get(key), args.models_dir, gpu, **size) for key in keys]
    failed = bool(args.keys) and any(r.check.status != "present" for r in reports)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        _print_model_table(reports, gpu, args.resolution, args.frames)
    return 1 if failed else 0


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    """`make-tiny-models`: tiny random-weight Wan models (tests, demo), a tiny LoRA and a single-file preset."""
    from wan_engine.tiny_models import build_tiny_extras, build_tiny_models

    for name, folder in build_tiny_models(args.directory).items():
        print(f"{name:16} {folder}")
    extras = build_tiny_extras(args.directory)
    print(f"{'lora':16} {extras['lora']}  (original Wan lora_down/lora_up/alpha keys, for tiny_t2v)")
    print(f"{'single file':16} {extras['single_file']}  (tiny_t2v's transformer, original Wan keys)")
    print(f"{'preset':16} {extras['preset']}  (key tiny_t2v_single: --presets-dir {extras['preset'].parent})")
    print(f"to use the LoRA: wan-worker run ... --loras-dir {extras['lora'].parent}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`demo`: tiny models, a few tasks, a worker, the results (worker.demo)."""
    from worker.demo import run_demo

    quiet_progress_bars()
    return run_demo(args.dir)
