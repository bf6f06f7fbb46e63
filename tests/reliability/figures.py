"""Reliability sizes (WAN_RELIABILITY_SCALE) and the figures the suites report.

`WAN_RELIABILITY_SCALE=ci` (the default) runs every suite at a reduced size that fits CI; `full` runs the
sizes documented in docs/RELIABILITY.md. Each suite records its figures with the `figures` fixture
(tests/reliability/conftest.py); they are printed at the end of the run and, when
`WAN_RELIABILITY_FIGURES=<file>` is set, written there as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

SCALE_ENV = "WAN_RELIABILITY_SCALE"
FIGURES_ENV = "WAN_RELIABILITY_FIGURES"
SCALES = ("ci", "full")
SCALE = os.environ.get(SCALE_ENV, "ci").strip().lower() or "ci"
if SCALE not in SCALES:
    raise pytest.UsageError(f"{SCALE_ENV}={SCALE!r}: use one of {', '.join(SCALES)}")

FIGURES: dict[str, dict[str, Any]] = {}  # suite -> figures, for the terminal summary


def sized(ci: T, full: T) -> T:
    """The CI-size value, or the full-size one under WAN_RELIABILITY_SCALE=full."""
    return full if SCALE == "full" else ci


class Figures:
    """Records one suite's figures (printed in the terminal summary, optionally written as JSON)."""

    def record(self, suite: str, **values: Any) -> None:
        FIGURES.setdefault(suite, {}).update(values)
        print(f"[reliability] {suite}: {json.dumps(values, default=str)}")
