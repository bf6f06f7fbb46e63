"""Reliability fixtures: the `figures` recorder and its terminal summary, and worker stacks per backend.

Sizes and figures live in tests.reliability.figures (WAN_RELIABILITY_SCALE=ci|full); the harness in
tests.reliability.harness and tests.support.processes; `sqlite_stack` comes from tests/conftest.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.figures import FIGURES, FIGURES_ENV, SCALE, Figures, sized
from tests.support.processes import Stack, running_stack


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section(f"reliability figures (scale {SCALE})")
    for suite, values in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{suite}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    target = os.environ.get(FIGURES_ENV)
    if target:
        Path(target).write_text(json.dumps({"scale": SCALE, "suites": FIGURES}, indent=2, default=str) + "\n")


@pytest.fixture
def postgres_stack(postgres_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """Real `wan-worker run` processes on a private schema of the local Postgres, tiny real models."""
    with running_stack(postgres_url, tmp_path, tiny_models_dir) as built:
        yield built


@pytest.fixture(params=sized(["sqlite"], ["sqlite", "postgres"]))
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """SQLite at CI size; SQLite and Postgres at full size."""
    return request.getfixturevalue(f"{request.param}_stack")
