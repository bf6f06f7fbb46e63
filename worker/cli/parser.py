"""The `wan-worker` argument parser: one small function per subcommand and per option group.

Defaults are read from the environment when the parser is built (not at import), so a test or a
restarted per-GPU worker sees the environment of the moment. Options are added in the order the
help output lists them; argparse argument groups are not used, as they would change that output.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import DB_STARTUP_WAIT_S, ENV_VARS, LEASE_S, env_default
from worker.store.schema import DEFAULT_DB_URL
from worker.task import TaskStatus

if TYPE_CHECKING:
    from typing import TypeAlias

    _Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers returns


def _optional_path(value: str | None) -> Path | None:
    """A path from an optional setting ('' and None: no path)."""
    return Path(value) if value else None


# ---- option groups shared by several subcommands ----------------------------------------------------


def _add_db(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: absent here, `--db` given before the subcommand (or the default) stays; see WanWorkerParser.
    parser.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help=f"SQLAlchemy URL, e.g. sqlite:///tasks.db (env {ENV_VARS['db_url']}; default {DEFAULT_DB_URL})",
    )
    parser.set_defaults(_db_default=env_default("db_url", DEFAULT_DB_URL))


def _add_global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """`--log-level` and `--log-json`, accepted before the subcommand (top level, with the defaults) and
    after it (SUPPRESS: a subcommand that was not given them keeps the top-level value)."""
    parser.add_argument(
        "--log-level",
        default="INFO" if top_level else argparse.SUPPRESS,
        metavar="LEVEL",
        help="debug, info, warning, error or critical, in any case (default info)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="one JSON object per log line",
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


# ---- `run` option groups ------------------------------------------------------------------------------


def _add_run_paths(run: argparse.ArgumentParser) -> None:
    """Where videos go and where inputs may come from."""
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


def _add_run_worker(run: argparse.ArgumentParser) -> None:
    """The worker loop: start-up wait, lease, identity, preload."""
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


def _add_run_fallbacks(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--allow-fallbacks",
        action="store_true",
        default=(env_default("allow_fallbacks") or "").lower() in ("1", "true", "yes"),
        help=f"when a preset's weights are unavailable, run its `fallbacks` presets instead (recorded in "
        f"result_data; env {ENV_VARS['allow_fallbacks']}; default: off)",
    )


def _add_run_http(run: argparse.ArgumentParser) -> None:
    """The live server (worker.live.http_server)."""
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve live events (/ws), a status page (/) and /metrics here, e.g. 127.0.0.1:8765 (default: off)",
    )
    # No environment defaults here: `wan-worker run` reads WAN_HTTP_TOKEN / WAN_HTTP_TOKEN_FILE itself
    # (worker.cli.run._http_token), so it can tell a token on the command line (visible in ps) from the others.
    run.add_argument(
        "--http-token",
        default=None,
        help="token the --http clients must send (env WAN_HTTP_TOKEN; required on a non-loopback address); "
        "on the command line it shows in ps: prefer --http-token-file or the environment",
    )
    run.add_argument(
        "--http-token-file",
        default=None,
        metavar="PATH",
        help="read the --http token from this file, once at start-up (env WAN_HTTP_TOKEN_FILE)",
    )


def _add_run_gpus(run: argparse.ArgumentParser) -> None:
    """Process layout: one worker per GPU, and GPU groups per generation."""
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


def _add_run_engine(run: argparse.ArgumentParser) -> None:
    """Engine switches (cmd_run passes them on as environment variables)."""
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


# ---- subcommands --------------------------------------------------------------------------------------


def _add_run(commands: _Commands) -> None:
    run = commands.add_parser("run", help="serve tasks from the table until SIGTERM/SIGINT")
    _add_db(run)
    _add_model_dirs(run)
    _add_run_paths(run)
    _add_run_worker(run)
    _add_allow_download(run)
    _add_run_fallbacks(run)
    _add_run_http(run)
    _add_run_gpus(run)
    _add_run_engine(run)


def _add_init_db(commands: _Commands) -> None:
    init_db = commands.add_parser("init-db", help="create or upgrade the database schema")
    _add_db(init_db)


def _add_submit(commands: _Commands) -> None:
    def int_or_list(text: str) -> int | list[int]:
        """`81` or `81,49,81` (one value per segment)."""
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: an integer or comma-separated integers, e.g. 81 or 81,49"
            ) from None
        return values[0] if len(values) == 1 else values

    submit = commands.add_parser(
        "submit",
        help="queue a task of any type (travel_orchestrator included); prints its id",
        description="Queue a task. Flags override the same keys in --params. travel_orchestrator: --image (2 or "
        "more), --prompt (one, or one per segment), --segment-frames, --frame-overlap, --resolution, --seed. "
        "vace: --video-guide, --video-mask, --image-ref; i2v/flf2v/ti2v: --image-start, --image-end.",
    )
    _add_db(submit)
    submit.add_argument("--presets-dir", type=Path, default=_optional_path(env_default("presets_dir")))
    submit.add_argument(
        "--model", default=None, help="preset key (default: the task type's, as the worker does; travel: VACE)"
    )
    submit.add_argument(
        "--prompt", action="append", default=None, help="the prompt; travel: repeat for one per segment"
    )
    submit.add_argument("--task-type", default=None, help="default: the model's architecture")
    submit.add_argument("--params", default="{}", help="extra parameters as a JSON object (flags override it)")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--dependant-on", default=None)
    submit.add_argument("--wait", action="store_true", help="wait until the task ends and print its row")
    submit.add_argument("--resolution", default=None, metavar="WxH", help="e.g. 832x480")
    submit.add_argument("--seed", type=int, default=None, help="the seed (travel: seed_base; -1 = random)")
    travel = submit.add_argument_group("travel_orchestrator")
    travel.add_argument("--image", action="append", default=None, help="a key image (repeat: 2 or more, in order)")
    travel.add_argument(
        "--segment-frames", type=int_or_list, default=None, metavar="N[,N...]", help="frames per segment"
    )
    travel.add_argument(
        "--frame-overlap", type=int_or_list, default=None, metavar="N[,N...]", help="frames shared by neighbours"
    )
    modes = submit.add_argument_group("mode inputs (vace, i2v, flf2v, ti2v)")
    modes.add_argument("--video-guide", default=None, help="vace: the control video (video_guide)")
    modes.add_argument("--video-mask", default=None, help="vace: the mask video (video_mask)")
    modes.add_argument("--image-ref", action="append", default=None, help="vace: a reference image (repeatable)")
    modes.add_argument("--image-start", default=None, help="i2v/flf2v/ti2v: the first frame (image_start)")
    modes.add_argument("--image-end", default=None, help="i2v (Wan 2.2)/flf2v: the last frame (image_end)")


def _add_status(commands: _Commands) -> None:
    status = commands.add_parser("status", help="print a task's row as JSON")
    _add_db(status)
    status.add_argument("task_id")
    status.add_argument("--follow", action="store_true", help="draw a progress bar until the task ends (0: Complete)")


def _add_list(commands: _Commands) -> None:
    listing = commands.add_parser("list", help="list recent tasks")
    _add_db(listing)
    listing.add_argument("--status", choices=[s.value for s in TaskStatus])
    listing.add_argument("--model", default=None, help="only rows for this model key (params' model, else the type's)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print a JSON array of rows (as `status` prints them)")


def _add_cancel(commands: _Commands) -> None:
    cancel = commands.add_parser("cancel", help="cancel a queued or running task")
    _add_db(cancel)
    cancel.add_argument("task_id")


def _add_retry(commands: _Commands) -> None:
    retry = commands.add_parser("retry", help="put a Failed or Cancelled task back to Queued (attempts reset)")
    _add_db(retry)
    retry.add_argument("task_id")


def _add_purge(commands: _Commands) -> None:
    purge = commands.add_parser("purge", help="delete rows (and, with --outputs, their videos) that ended long ago")
    _add_db(purge)
    purge.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="only rows last updated longer ago than this: 30m, 12h, 7d or 2w",
    )
    ended = [s.value for s in TaskStatus if s.is_final]
    purge.add_argument(
        "--status",
        nargs="+",
        choices=ended,
        default=ended,
        metavar="STATUS",
        help=f"only rows in these statuses ({', '.join(ended)}; default: all three; never Queued or In Progress)",
    )
    purge.add_argument(
        "--outputs",
        action="store_true",
        help="also delete each purged row's output file, when it lies inside --outputs-dir",
    )
    purge.add_argument(
        "--outputs-dir",
        type=Path,
        default=Path(env_default("outputs_dir", "outputs") or "outputs"),
        help=f"the only directory --outputs deletes files in (env {ENV_VARS['outputs_dir']}; default outputs)",
    )
    purge.add_argument("--dry-run", action="store_true", help="report what would be removed; change nothing")


def _add_models(commands: _Commands) -> None:
    models = commands.add_parser("models", help="list presets and whether their weights are present")
    _add_model_dirs(models)
    models.add_argument("keys", nargs="*", help="preset keys to report (default: all)")
    models.add_argument("--json", action="store_true")
    models.add_argument("--resolution", default=None, help="WxH for the VRAM estimate (default: the preset's)")
    models.add_argument("--frames", type=int, default=None, help="frames for the VRAM estimate (default: the preset's)")
    _add_allow_download(models)


def _add_make_tiny_models(commands: _Commands) -> None:
    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight Wan models (tests, demo)")
    tiny.add_argument("directory", type=Path)


def _add_demo(commands: _Commands) -> None:
    demo = commands.add_parser("demo", help="build tiny models, queue tasks, run a worker, print the results")
    demo.add_argument("--dir", type=Path, default=Path("demo_run"))


_SUBCOMMANDS = (
    _add_run,
    _add_init_db,
    _add_submit,
    _add_status,
    _add_list,
    _add_cancel,
    _add_retry,
    _add_purge,
    _add_models,
    _add_make_tiny_models,
    _add_demo,
)  # the order `wan-worker --help` lists them in


class WanWorkerParser(argparse.ArgumentParser):
    """The top-level parser: after parsing, `args.db` is the subcommand's `--db`, else the one given before
    the subcommand, else the environment's or the built-in default (only for commands that take `--db`)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        default = vars(parsed).pop("_db_default", None)
        if default is not None and getattr(parsed, "db", None) is None:
            parsed.db = default
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    """The `wan-worker` parser: global options, then one subparser per command."""
    parser = WanWorkerParser(prog="wan-worker", description="Headless Wan video-generation worker.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_options(parser, top_level=True)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL, for the commands that use the database")
    # Plain parsers below: only the top level resolves --db (WanWorkerParser.parse_known_args).
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(commands)
    for subcommand in commands.choices.values():
        _add_global_options(subcommand, top_level=False)
    return parser


def _version() -> str:
    """The installed distribution's version (`unknown` when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wan-worker")
    except PackageNotFoundError:
        return "unknown"
