"""An older version of the package, taken from git, run as a real `wan-worker run` process beside this checkout.

Rolling-upgrade tests need two real versions on one database: `old_tree` extracts a commit's files with
`git archive` (the main checkout is not touched), and `start_old_worker` runs that tree's own CLI with the
tree first on `sys.path` and as the working directory, so its own code, presets and Alembic migrations are
used; its dependencies are the packages installed for this checkout.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.support.db import IN_CI
from tests.support.processes import Stack, WorkerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, timeout=120, check=False)


def old_tree(commit: str, destination: Path) -> Path:
    """Extract `commit` into `destination` (created) and return it.

    Skips the test, with the reason, when the repository lacks the commit (a shallow clone, an exported tree);
    under CI=true the clone is full, so that is a failure instead."""
    probe = _git("cat-file", "-e", f"{commit}^{{commit}}")
    if probe.returncode != 0:
        reason = (
            f"the repository at {REPO_ROOT} has no commit {commit} (a shallow clone or no git history?): "
            f"the old version cannot be prepared ({probe.stderr.decode(errors='replace').strip()[:200]})"
        )
        if IN_CI:
            pytest.fail(f"CI=true needs the full history: {reason}")
        pytest.skip(reason)
    archive = _git("archive", "--format=tar", commit)
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    destination.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return destination


def old_worker_command(tree: Path) -> list[str]:
    """`python -c ...` running the CLI of the package in `tree` (its directory first on `sys.path`)."""
    program = f"import sys; sys.path.insert(0, {str(tree)!r}); from worker.cli import main; sys.exit(main())"
    return [sys.executable, "-c", program]


class OldWorkerProcess(WorkerProcess):
    """A `WorkerProcess` running the old tree's CLI, in the old tree, with only that tree on PYTHONPATH."""

    tree: Path

    def start(self) -> OldWorkerProcess:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*old_worker_command(self.tree), *self.args],
            cwd=self.tree,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.tree), **self.env},
        )
        return self


def run_args(stack: Stack, name: str, lease_s: float, extra: Iterable[str] = ()) -> list[str]:
    """The `run` arguments `Stack.start_worker` passes, for a worker named `name` on the stack's database."""
    return [
        "run",
        "--db",
        stack.db_url,
        "--models-dir",
        str(stack.models_dir),
        "--outputs-dir",
        str(stack.outputs_dir),
        "--presets-dir",
        str(stack.presets_dir),
        "--lease-seconds",
        str(lease_s),
        "--worker-id",
        name,
        *extra,
    ]


def start_old_worker(
    stack: Stack, tree: Path, name: str, *, lease_s: float, env: Mapping[str, str] | None = None
) -> OldWorkerProcess:
    """Start the old tree's `wan-worker run` on the stack's database, logging to `<name>.log` in its root;
    the stack stops it on close."""
    worker = OldWorkerProcess(run_args(stack, name, lease_s), stack.root / f"{name}.log", tree, env=dict(env or {}))
    worker.tree = tree
    worker.start()
    stack.workers.append(worker)
    return worker
