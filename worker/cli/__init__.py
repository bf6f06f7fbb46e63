"""The `wan-worker` command line: run the daemon, manage the table, list models, build tiny models, demo.

- worker.cli.parser: `build_parser`, one small function per subcommand and option group.
- worker.cli.run: `wan-worker run` (process layout, settings, live server, signals, serving).
- worker.cli.commands: the other subcommands.

`main` is the console script (`wan-worker = "worker.cli:main"`, and `python -m worker`). The names below
stay importable from `worker.cli` (tests and other callers use them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from worker.cli.commands import (
    _gib,
    _repository,
    _row,
    cmd_cancel,
    cmd_demo,
    cmd_init_db,
    cmd_list,
    cmd_make_tiny_models,
    cmd_models,
    cmd_purge,
    cmd_retry,
    cmd_status,
    cmd_submit,
)
from worker.cli.parser import _add_allow_download, _add_db, _add_model_dirs, _optional_path, build_parser
from worker.cli.run import (
    _group_orchestrator,
    _log_model_reports,
    _start_live_server,
    _wait_for_database,
    cmd_run,
)
from worker.config import ConfigError
from worker.logs import configure_logging
from worker.store.schema import DatabaseUnreachable, check_db_url

# The private helpers are re-exported for the tests and callers that imported them from worker.cli.
__all__ = [
    "_add_allow_download",
    "_add_db",
    "_add_model_dirs",
    "_gib",
    "_group_orchestrator",
    "_log_model_reports",
    "_optional_path",
    "_repository",
    "_row",
    "_start_live_server",
    "_wait_for_database",
    "build_parser",
    "cmd_cancel",
    "cmd_demo",
    "cmd_init_db",
    "cmd_list",
    "cmd_make_tiny_models",
    "cmd_models",
    "cmd_purge",
    "cmd_retry",
    "cmd_run",
    "cmd_status",
    "cmd_submit",
    "main",
]

log = logging.getLogger("worker.cli")

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "init-db": cmd_init_db,
    "submit": cmd_submit,
    "status": cmd_status,
    "list": cmd_list,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "purge": cmd_purge,
    "models": cmd_models,
    "make-tiny-models": cmd_make_tiny_models,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging and run one command; a bad flag, log level, database URL, preset or address
    exits 2 with one `error: ...` line."""
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:  # a bad WAN_* value: one line, before anything runs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `run --gpus` restarts this command per GPU
    handler = _COMMANDS[args.command]
    try:
        configure_logging(args.log_level, json_lines=args.log_json)
        if getattr(args, "db", None) is not None:
            check_db_url(args.db)  # `--db tasks.db` would otherwise end in a SQLAlchemy traceback
        return handler(args)
    except (ValueError, KeyError, DatabaseUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
