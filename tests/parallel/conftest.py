"""The acceptance harness's stacks (a database, dirs, real `wan-worker` processes) for the group tests."""

from __future__ import annotations

from tests.acceptance.conftest import sqlite_stack, stack

__all__ = ["sqlite_stack", "stack"]
