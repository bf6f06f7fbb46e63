"""The README's table of `wan-worker run` flags, generated from the parser and `EnvironmentSettings`.

`python -m worker.cli.flag_table` prints it; tests/unit/test_flag_table.py fails when the README's copy
(between `<!-- run-flags:start -->` and `<!-- run-flags:end -->`) differs, so the table cannot drift from
the flags, their environment variables or their defaults.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from worker.cli.parser import build_parser
from worker.config import ENV_ONLY, ENV_PREFIX, EnvironmentSettings

START, END = "<!-- run-flags:start -->", "<!-- run-flags:end -->"
# Parser destinations whose setting has another name.
DEST_FIELDS = {"db": "db_url", "db_wait_seconds": "db_startup_wait_seconds"}
_PARENTHESES = re.compile(r"\s*\(([^()]*)\)")


def _field(dest: str) -> str | None:
    name = DEST_FIELDS.get(dest, dest)
    return name if name in EnvironmentSettings.model_fields else None


def _default(name: str | None) -> str:
    if name is None:
        return ""
    value: Any = EnvironmentSettings.model_fields[name].default
    if value is None:
        return ""
    if value is False:
        return "off"
    if value is True:
        return "on"
    return f"`{value}`" if not isinstance(value, float) else f"`{value:g}`"


def _meaning(help_text: str | None) -> tuple[str, str]:
    """The help text without its `env ...` and `default ...` notes (the table has columns for them), and the
    default note it had (`default: the working directory`), for settings whose default is no value."""
    notes: list[str] = []

    def keep(match: re.Match[str]) -> str:
        parts = match.group(1).split("; ")
        notes.extend(p.removeprefix("default").lstrip(": ") for p in parts if p.startswith("default"))
        kept = [p for p in parts if not p.startswith(("env ", "default"))]
        return f" ({'; '.join(kept)})" if kept else ""

    meaning = _PARENTHESES.sub(keep, help_text or "").replace("|", "\\|").strip()
    return meaning, (notes[0] if notes else "")


def _flag(action: argparse.Action) -> str:
    flag = max(action.option_strings, key=len)
    if action.nargs == 0:
        return f"`{flag}`"
    return f"`{flag} {action.metavar or action.dest.upper()}`"


def _run_actions() -> list[argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = commands.choices["run"]
    return [a for a in run._actions if a.option_strings and a.dest != "help"]


def flag_rows() -> list[tuple[str, str, str, str]]:
    """(flag, environment variable, default, meaning) for every `run` option, then the variables without a flag."""
    rows = []
    for action in _run_actions():
        name = _field(action.dest)
        env = f"`{ENV_PREFIX}{name.upper()}`" if name else ""
        meaning, noted_default = _meaning(action.help)
        rows.append((_flag(action), env, _default(name) or noted_default, meaning))
    for name, meaning in ENV_ONLY.items():
        rows.append(("", f"`{ENV_PREFIX}{name.upper()}`", _default(name), meaning))
    return rows


def flag_table() -> str:
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in flag_rows()]
    return "\n".join(lines)


def readme_table(readme: Path) -> str:
    """The table the README holds between the markers."""
    text = readme.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


if __name__ == "__main__":
    print(flag_table())
