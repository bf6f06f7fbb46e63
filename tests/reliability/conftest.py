"""Reliability suites: sizes (WAN_RELIABILITY_SCALE), the figures they report, and worker stacks.

`WAN_RELIABILITY_SCALE=ci` (the default) runs every suite at a reduced size that fits CI; `full` runs the
sizes documented in docs/RELIABILITY.md. Each suite records its figures with the `figures` fixture; they are
printed at the end of the run and, when `WAN_RELIABILITY_FIGURES=<file>` is set, written there as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.acceptance.conftest import Stack, _make_stack

T = TypeVar("T")

SCALE_ENV = "WAN_RELIABILITY_SCALE"
FIGURES_ENV = "WAN_RELIABILITY_FIGURES"
SCALES = ("ci", "full")
SCALE = os.environ.get(SCALE_ENV, "ci").strip().lower() or "ci"
if SCALE not in SCALES:
    raise pytest.UsageError(f"{SCALE_ENV}={SCALE!r}: use one of {', '.join(SCALES)}")

_FIGURES: dict[str, dict[str, Any]] = {}


def sized(ci: T, full: T) -> T:
    """The CI-size value, or the full-size one under WAN_RELIABILITY_SCALE=full."""
    return full if SCALE == "full" else ci


class Figures:
    """Records one suite's figures (printed in the terminal summary, optionally written as JSON)."""

    def record(self, suite: str, **values: Any) -> None:
        _FIGURES.setdefault(suite, {}).update(values)
        print(f"[reliability] {suite}: {json.dumps(values, default=str)}")


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section(f"reliability figures (scale {SCALE})")
    for suite, values in sorted(_FIGURES.items()):
        terminalreporter.write_line(f"{suite}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    target = os.environ.get(FIGURES_ENV)
    if target:
        Path(target).write_text(json.dumps({"scale": SCALE, "suites": _FIGURES}, indent=2, default=str) + "\n")


def _stack(db_url: str, root: Path, models_dir: Path) -> Iterator[Stack]:
    built = _make_stack(db_url, root, models_dir)
    try:
        yield built
    finally:
        for worker in built.workers:
            worker.stop()
        built.engine.dispose()


@pytest.fixture
def sqlite_stack(sqlite_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """Real `wan-worker run` processes on a SQLite file, tiny real models."""
    yield from _stack(sqlite_url, tmp_path, tiny_models_dir)


@pytest.fixture
def postgres_stack(postgres_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """Real `wan-worker run` processes on a private schema of the local Postgres, tiny real models."""
    yield from _stack(postgres_url, tmp_path, tiny_models_dir)


@pytest.fixture(params=sized(["sqlite"], ["sqlite", "postgres"]))
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """SQLite at CI size; SQLite and Postgres at full size."""
    return request.getfixturevalue(f"{request.param}_stack")
