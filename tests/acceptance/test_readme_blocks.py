"""Acceptance: the README's code blocks run as written (issue 17: "a sample that no longer works is a bug").

Every ```bash / ```python / ```sql block of README.md is extracted (indented ones in list items too) and run
on tiny models, substituting only what a CPU cannot run at full size: the model keys (`t2v_1.3B` ->
`tiny_t2v`, ...) and sizes. A block that cannot run here says why, on the line before it:
`<!-- readme-test: skip: <reason> -->` (real weights, several GPUs, a remote server); the test checks every
skip has a reason, and that the blocks that matter most (the first hour, the Python and SQL samples, the
CLI reference) are among those run.

- The "First hour on a CPU" section runs as one bash session in an empty directory, its blocks in order (a
  worker started with `&` in one block serves the next ones, as in a terminal).
- Every other bash block runs in its own session in a directory holding tiny models under `models/`, a
  migrated `tasks.db` and the input files the samples name (`a.png`, `b.png`, `c.png`, `pose.mp4`).
- Python blocks run the same way with this interpreter; SQL blocks run against that SQLite database.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.media import noise_image, noise_video

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"
FIRST_HOUR = "First hour on a CPU"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
RUN_LANGS = ("bash", "python", "sql")
BLOCK_TIMEOUT_S = 300

# Full-size model keys -> the tiny model of the same architecture (longest first: t2v_2_2 before t2v).
MODEL_KEYS = {
    "vace_14B_cocktail_2_2": "tiny_vace_2_2",
    "t2v_2_2": "tiny_t2v_2_2",
    "i2v_2_2": "tiny_i2v_2_2",
    "ti2v_2_2": "tiny_ti2v",
    "flf2v_14B": "tiny_flf2v",
    "vace_1.3B": "tiny_vace",
    "vace_14B": "tiny_vace",
    "t2v_1.3B": "tiny_t2v",
    "i2v_14B": "tiny_i2v",
    "t2v": "tiny_t2v",
}
SIZES = {"832x480": "64x48", "segment_frames=81": "segment_frames=13", "--segment-frames 81": "--segment-frames 13"}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    section: str
    line: int
    skip: str | None


def readme_blocks(path: Path = README) -> list[Block]:
    """The fenced code blocks of `path`, dedented, with their section and skip reason."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = FENCE.match(line)
        if fence is None:
            i += 1
            continue
        start, indent = i, fence.group("indent")
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        blocks.append(
            Block(fence.group("lang"), textwrap.dedent("\n".join(body)), section, start + 1, skip and skip["reason"])
        )
        i += 1
    return blocks


def tiny(text: str) -> str:
    """The block with full-size model keys and sizes swapped for tiny ones (only in model positions)."""
    for key, small in MODEL_KEYS.items():
        pattern = rf'(--model\s+|"model":\s*"|model=")({re.escape(key)})(?![\w.])'  # model="..." covers preload_model
        text = re.sub(pattern, rf"\g<1>{small}", text)
    for big, small in SIZES.items():
        text = text.replace(big, small)
    return text


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("WAN_DB_URL", None)
    env["PYTHONPATH"] = str(README.parent)
    return env


def run_bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash (errexit, pipefail); background workers it leaves are stopped at its end
    (SIGTERM: they finish their task and exit). Output goes to files, so a timeout still shows it."""
    wrapped = f"set -euo pipefail\n{script}\njobs -p | xargs -r kill 2>/dev/null || true\nwait || true\n"
    out, err = cwd / ".readme-stdout.txt", cwd / ".readme-stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(["bash", "-c", wrapped], cwd=cwd, env=environment(), stdout=stdout, stderr=stderr,
                                   start_new_session=True)  # fmt: skip
        try:
            code = process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = -9
        finally:
            _stop_group(process)
    return subprocess.CompletedProcess(["bash"], code, out.read_text(), err.read_text())


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop whatever the block left running (a worker started with `&` when the block failed early):
    SIGTERM to its process group, SIGKILL after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(process.pid, grace):
            break
    if process.poll() is None:
        process.wait()


def _group_gone(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def check(result: subprocess.CompletedProcess[str], block: Block) -> None:
    assert result.returncode == 0, (
        f"README block at line {block.line} ({block.section}) failed with exit {result.returncode}\n"
        f"--- block ---\n{block.text}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )


@pytest.fixture
def sample_dir(tmp_path: Path, tiny_models_dir: Path) -> Path:
    """A directory as the README's samples assume it: models, a migrated tasks.db and the input files."""
    shutil.copytree(tiny_models_dir, tmp_path / "models", symlinks=True)
    for name in ("a.png", "b.png", "c.png", "r.png"):
        noise_image(tmp_path / name, 64, 48, seed=len(name))
    noise_video(tmp_path / "pose.mp4", 9, 64, 48)
    noise_video(tmp_path / "m.mp4", 9, 64, 48)
    result = subprocess.run(
        ["wan-worker", "init-db", "--db", "sqlite:///tasks.db"], cwd=tmp_path, env=environment(), capture_output=True
    )
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_every_block_runs_or_says_why_not() -> None:
    blocks = [b for b in readme_blocks() if b.lang in RUN_LANGS]
    assert blocks, "no code blocks found in the README"
    for block in blocks:
        if block.skip is not None:
            assert len(block.skip) >= 10, f"README block at line {block.line}: a skip needs a reason"
    run = [b for b in blocks if b.skip is None]
    assert any(b.section == FIRST_HOUR for b in run)
    assert any(b.lang == "python" for b in run) and any(b.lang == "sql" for b in run)


def test_the_first_hour_runs_as_one_session(tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks() if b.section == FIRST_HOUR and b.lang == "bash" and b.skip is None]
    script = "\n".join(tiny(block.text) for block in blocks)
    whole = Block("bash", script, FIRST_HOUR, blocks[0].line, None)
    check(run_bash(script, tmp_path), whole)
    assert list((tmp_path / "outputs").glob("*.mp4")), "the first hour wrote no video"


@pytest.mark.parametrize(
    "block",
    [b for b in readme_blocks() if b.lang == "bash" and b.section != FIRST_HOUR and b.skip is None],
    ids=lambda b: f"line{b.line}",
)
def test_bash_block_runs(block: Block, sample_dir: Path) -> None:
    check(run_bash(tiny(block.text), sample_dir), block)


@pytest.mark.parametrize(
    "block", [b for b in readme_blocks() if b.lang == "python" and b.skip is None], ids=lambda b: f"line{b.line}"
)
def test_python_block_runs(block: Block, sample_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", tiny(block.text)],
        cwd=sample_dir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    check(result, block)


@pytest.mark.parametrize(
    "block", [b for b in readme_blocks() if b.lang == "sql" and b.skip is None], ids=lambda b: f"line{b.line}"
)
def test_sql_block_runs(block: Block, sample_dir: Path) -> None:
    with sqlite3.connect(sample_dir / "tasks.db") as conn:
        conn.executescript(tiny(block.text))
