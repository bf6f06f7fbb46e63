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

from worker.config import ENV_PREFIX, EnvironmentSettings, environment_settings, parse_dirs
from worker.store.schema import DEFAULT_DB_URL
from worker.task import TaskStatus

if TYPE_CHECKING:
    from typing import TypeAlias

    _Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers returns


def _optional_path(value: str | None) -> Path | None:
    """A path from an optional setting ('' and None: no path)."""
    return Path(value) if value else None


class _DirsAction(argparse.Action):
    """A repeatable folder option: the first use replaces the environment's list, later uses add to it;
    one value may hold several folders separated by os.pathsep, as the environment variable does."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        given = f"_{self.dest}_given"
        items = list(getattr(namespace, self.dest) or ()) if getattr(namespace, given, False) else []
        items += parse_dirs(str(values))
        setattr(namespace, self.dest, tuple(items))
        setattr(namespace, given, True)


def _env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _add_dirs(parser: argparse.ArgumentParser, env: EnvironmentSettings, flag: str, setting: str, what: str) -> None:
    parser.add_argument(
        flag,
        action=_DirsAction,
        default=parse_dirs(getattr(env, setting)) or None,
        metavar="DIR",
        help=f"{what}; repeatable, looked in in order (env {_env_name(setting)}, '{os.pathsep}'-separated)",
    )


# ---- option groups shared by several subcommands ----------------------------------------------------


def _add_db(parser: argparse.ArgumentParser, env: EnvironmentSettings | None = None) -> None:
    # SUPPRESS: absent here, `--db` given before the subcommand (or the default) stays; see WanWorkerParser.
    env = env or environment_settings()
    parser.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help="any SQLAlchemy URL, e.g. sqlite:///tasks.db; postgresql://... uses psycopg 3 "
        f"(env {_env_name('db_url')}; default {DEFAULT_DB_URL})",
    )
    parser.set_defaults(_db_default=env.db_url)


def _add_global_options(parser: argparse.ArgumentParser, env: EnvironmentSettings, *, top_level: bool) -> None:
    """`--log-level` and `--log-json`, accepted before the subcommand (top level, with the defaults) and
    after it (SUPPRESS: a subcommand that was not given them keeps the top-level value)."""
    parser.add_argument(
        "--log-level",
        default=env.log_level if top_level else argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"debug, info, warning, error or critical, in any case (env {_env_name('log_level')}; default info)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=env.log_json if top_level else argparse.SUPPRESS,
        help=f"one JSON object per log line (env {_env_name('log_json')})",
    )


def _add_model_dirs(parser: argparse.ArgumentParser, env: EnvironmentSettings | None = None) -> None:
    env = env or environment_settings()
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=env.models_dir,
        help=f"where model folders are looked up (env {_env_name('models_dir')}; default models)",
    )
    _add_dirs(
        parser,
        env,
        "--presets-dir",
        "presets_dir",
        "extra/overriding preset JSON files, e.g. Wan2GP's defaults/ or finetunes/ (a later folder overrides)",
    )


def _add_allow_download(parser: argparse.ArgumentParser, env: EnvironmentSettings | None = None) -> None:
    env = env or environment_settings()
    parser.add_argument(
        "--allow-download",
        action="store_true",
        default=env.allow_download,
        help=f"download missing weights from the Hugging Face Hub (env {_env_name('allow_download')}; default: never)",
    )


# ---- `run` option groups ------------------------------------------------------------------------------


def _add_run_paths(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    """Where videos go and where inputs may come from."""
    run.add_argument(
        "--outputs-dir",
        type=Path,
        default=env.outputs_dir,
        help=f"videos are written here, named <task id>.mp4 (.png for 1 frame) (env {_env_name('outputs_dir')}; "
        "default outputs)",
    )
    run.add_argument(
        "--input-roots",
        default=env.input_roots,
        help="the only directories input files may be read from (':' or ',' separated), besides the outputs dir "
        f"(env {_env_name('input_roots')}; default: the working directory)",
    )
    _add_dirs(
        run,
        env,
        "--loras-dir",
        "loras_dir",
        "LoRA folders (their wan/, wan2_2/ and Wan2GP subfolders first): a Wan2GP loras/ or a ComfyUI "
        "models/loras serves as it is (default: the worker's own loras/)",
    )


def _add_run_worker(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    """The worker loop: start-up wait, lease, identity, preload."""
    run.add_argument(
        "--db-wait-seconds",
        type=float,
        default=env.db_startup_wait_seconds,
        help="at start-up, wait this long (retrying with back-off) for a database that is not up yet, then exit 2 "
        f"naming it; a stop signal ends the wait (env {_env_name('db_startup_wait_seconds')}; default 120; SQLite "
        "is not waited for)",
    )
    run.add_argument(
        "--lease-seconds",
        type=float,
        default=env.lease_seconds,
        help=f"a task whose worker is silent this long is re-queued (env {_env_name('lease_seconds')}; default 60)",
    )
    run.add_argument(
        "--worker-id",
        default=env.worker_id,
        help=f"shown in tasks.worker_id and the workers table (env {_env_name('worker_id')}; default host-pid-random)",
    )
    run.add_argument(
        "--preload-model",
        default=env.preload_model,
        help=f"load this model before the first task (env {_env_name('preload_model')})",
    )


def _add_run_fallbacks(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    run.add_argument(
        "--allow-fallbacks",
        action="store_true",
        default=env.allow_fallbacks,
        help=f"when a preset's weights are unavailable, run its `fallbacks` presets instead (recorded in "
        f"result_data; env {_env_name('allow_fallbacks')}; default: off)",
    )


def _add_run_http(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    """The live server (worker.live)."""
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=env.http,
        help="serve the HTTP API (submit, follow, cancel, retry, download), WebSocket events, the status page, "
        "/metrics and /healthz here, e.g. 127.0.0.1:8765; at most 64 connections at once, 5 s to send a "
        "request's headers, 1 MiB per request body, 4 KiB per incoming WebSocket message "
        f"(env {_env_name('http')}; default: off)",
    )
    # No environment defaults here: `wan-worker run` reads WAN_HTTP_TOKEN / WAN_HTTP_TOKEN_FILE itself
    # (worker.cli.run._http_token), so it can tell a token on the command line (visible in ps) from the others.
    run.add_argument(
        "--http-token",
        default=None,
        metavar="TOKEN",
        help="required from --http clients; the server refuses to start on a non-loopback address without one. "
        "On the command line the token shows in ps (a warning is logged): set WAN_HTTP_TOKEN or use "
        "--http-token-file instead (env WAN_HTTP_TOKEN)",
    )
    run.add_argument(
        "--http-token-file",
        default=None,
        metavar="PATH",
        help="read the token from this file once at start-up (whitespace stripped; a missing, unreadable or empty "
        "file exits 2 naming it); keeps the token out of ps (env WAN_HTTP_TOKEN_FILE)",
    )


def _add_run_gpus(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    """Process layout: one worker per GPU, and GPU groups per generation."""
    run.add_argument(
        "--gpus",
        default=env.gpus,
        help=f"one worker process per GPU, e.g. 0,1 or all (env {_env_name('gpus')}; default: one worker, this "
        "process)",
    )
    run.add_argument(
        "--parallel",
        type=int,
        default=env.parallel,
        metavar="N",
        help=f"run every generation on a group of N GPUs (context parallelism; with --gpus, one group per N of "
        f"them); claims tasks asking for parallel <= N (env {_env_name('parallel')}; default 1)",
    )


def _add_run_engine(run: argparse.ArgumentParser, env: EnvironmentSettings) -> None:
    """Engine switches (cmd_run passes them on as environment variables)."""
    run.add_argument(
        "--fp8",
        action="store_true",
        default=env.fp8,
        help="fp8 weights and matmuls in the transformer blocks: faster and half the VRAM, but lossy; LoRA "
        "tasks fail on such a worker (env WAN_FP8; default: off)",
    )
    run.add_argument(
        "--vram-limit-gb",
        type=float,
        default=env.vram_limit_gb,
        metavar="GIB",
        help="use at most this much of each GPU (models that do not fit are offloaded; env WAN_VRAM_LIMIT_GB)",
    )


# ---- subcommands --------------------------------------------------------------------------------------


def _add_run(commands: _Commands, env: EnvironmentSettings) -> None:
    run = commands.add_parser("run", help="serve tasks from the table until SIGTERM/SIGINT")
    _add_db(run, env)
    _add_model_dirs(run, env)
    _add_run_paths(run, env)
    _add_run_worker(run, env)
    _add_allow_download(run, env)
    _add_run_fallbacks(run, env)
    _add_run_http(run, env)
    _add_run_gpus(run, env)
    _add_run_engine(run, env)


def _add_init_db(commands: _Commands, env: EnvironmentSettings) -> None:
    init_db = commands.add_parser("init-db", help="create or upgrade the database schema")
    _add_db(init_db, env)


def _add_submit(commands: _Commands, env: EnvironmentSettings) -> None:
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
    _add_db(submit, env)
    _add_dirs(submit, env, "--presets-dir", "presets_dir", "extra/overriding preset JSON files")
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


def _add_status(commands: _Commands, env: EnvironmentSettings) -> None:
    status = commands.add_parser("status", help="print a task's row as JSON")
    _add_db(status, env)
    status.add_argument("task_id")
    status.add_argument("--follow", action="store_true", help="draw a progress bar until the task ends (0: Complete)")


def _add_list(commands: _Commands, env: EnvironmentSettings) -> None:
    listing = commands.add_parser("list", help="list recent tasks")
    _add_db(listing, env)
    listing.add_argument("--status", choices=[s.value for s in TaskStatus])
    listing.add_argument("--model", default=None, help="only rows for this model key (params' model, else the type's)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print a JSON array of rows (as `status` prints them)")


def _add_cancel(commands: _Commands, env: EnvironmentSettings) -> None:
    cancel = commands.add_parser("cancel", help="cancel a queued or running task")
    _add_db(cancel, env)
    cancel.add_argument("task_id")


def _add_retry(commands: _Commands, env: EnvironmentSettings) -> None:
    retry = commands.add_parser("retry", help="put a Failed or Cancelled task back to Queued (attempts reset)")
    _add_db(retry, env)
    retry.add_argument("task_id")


def _add_purge(commands: _Commands, env: EnvironmentSettings) -> None:
    purge = commands.add_parser("purge", help="delete rows (and, with --outputs, their videos) that ended long ago")
    _add_db(purge, env)
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
        default=env.outputs_dir,
        help=f"the only directory --outputs deletes files in (env {_env_name('outputs_dir')}; default outputs)",
    )
    purge.add_argument("--dry-run", action="store_true", help="report what would be removed; change nothing")


def _add_models(commands: _Commands, env: EnvironmentSettings) -> None:
    models = commands.add_parser("models", help="list presets and whether their weights are present")
    _add_model_dirs(models, env)
    models.add_argument("keys", nargs="*", help="preset keys to report (default: all)")
    models.add_argument("--json", action="store_true")
    models.add_argument("--resolution", default=None, help="WxH for the VRAM estimate (default: the preset's)")
    models.add_argument("--frames", type=int, default=None, help="frames for the VRAM estimate (default: the preset's)")
    _add_allow_download(models, env)


def _add_make_tiny_models(commands: _Commands, env: EnvironmentSettings) -> None:
    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight Wan models (tests, demo)")
    tiny.add_argument("directory", type=Path)


def _add_demo(commands: _Commands, env: EnvironmentSettings) -> None:
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
    env = environment_settings()  # ConfigError (one line) for a bad WAN_* value
    parser = WanWorkerParser(prog="wan-worker", description="Headless Wan video-generation worker.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_options(parser, env, top_level=True)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL, for the commands that use the database")
    # Plain parsers below: only the top level resolves --db (WanWorkerParser.parse_known_args).
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(commands, env)
    for subcommand in commands.choices.values():
        _add_global_options(subcommand, env, top_level=False)
    return parser


def _version() -> str:
    """The installed distribution's version (`unknown` when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wan-worker")
    except PackageNotFoundError:
        return "unknown"
