"""Structured logs: every line about a task carries task_id, worker_id and model as key=value pairs."""

from __future__ import annotations

import json
import logging
import sys

CONTEXT_KEYS = ("worker_id", "task_id", "model", "attempt", "event")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_log_level(value: str | int) -> int:
    """A log level name in any case (`debug`, `INFO`, `Warning`) as its number; ValueError (one line,
    naming the value and the allowed names) for anything else. `warn` is accepted as `warning`."""
    if isinstance(value, int):
        return value
    name = value.strip().lower()
    name = "warning" if name == "warn" else name
    if name not in LOG_LEVELS:
        raise ValueError(f"--log-level {value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return int(getattr(logging, name.upper()))


class KeyValueFormatter(logging.Formatter):
    """`time level logger message key=value...`; with json_lines=True one JSON object per line."""

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        context = {key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None}
        if self.json_lines:
            payload = {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **context,
            }
            if record.exc_info:
                payload["exception"] = self.formatException(record.exc_info)
            return json.dumps(payload, default=str)
        line = super().format(record)
        suffix = " ".join(f"{key}={value}" for key, value in context.items())
        return f"{line} {suffix}" if suffix else line


def configure_logging(level: str | int = "INFO", json_lines: bool = False) -> None:
    """Install the formatter on the root logger (stderr); quiet chatty libraries. `level`: see `parse_log_level`."""
    numeric = parse_log_level(level)  # before touching the handlers: a bad level leaves logging as it was
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(json_lines=json_lines))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("httpx", "urllib3", "alembic", "diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
