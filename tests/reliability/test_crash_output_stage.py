"""The output stage off the critical path (issue 15), on the real `wan-worker run`: kill -9 and stop signals
while a task's MP4 is being encoded on the finisher thread and the next task already runs.

The point is found deterministically, with the `WAN_TEST_PAUSE_IN_WRITE` hook (tests.reliability.harness
`pause_writes_env`): the first task's deferred write sends half its frames to ffmpeg, creates
`<stem>.paused` and waits; the test then also waits until the next task is In Progress on the same worker (the
overlap, in the real process) and until the first row's progress says `writing_video`.

- kill -9 there: after a restart both tasks are re-run and `Complete` (attempts 2 each: both were held), exactly
  one playable output per task, no staged or partial file left, no ffmpeg still writing, nothing lost.
- one SIGTERM there (the loop idle, only the output pending): the worker does not exit while the output is
  pending and claims nothing more; once the write goes on, the task completes and it exits 0.
- two SIGTERMs there: both tasks are given back (Queued, the attempt not counted), the half-written staged
  file is deleted, exit 0; a later worker completes them.

A `Complete` row never lacks its file: the staged file is renamed inside the guarded `Complete` transaction
(worker.store.repository.mark_complete), so a kill before the commit rolls the row back to In Progress. A kill
after the rename and before the commit is possible (the file is already at its final name while the row is
still In Progress): the re-run writes the same name again and replaces it, as test_crash_recovery's
`complete_write` kills check; it never yields a second file or a Complete row without one.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.reliability.harness import (
    all_files,
    claims_by_task,
    completions_by_task,
    partial_files,
    pause_writes_env,
    processes_writing_under,
    read_rows,
    resume_write,
    start_worker,
    wait_all_final,
    wait_until,
)
from tests.support.processes import Stack, WorkerProcess
from wan_engine.decode_overlap import OVERLAP_DECODE_ENV
from wan_engine.video_io import read_video_info

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

LEASE_S = 4.0
FIRST = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 17, "num_inference_steps": 4}
# Long enough to still be denoising when the first write pauses (and a stop finishes it either way).
SECOND = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 9, "num_inference_steps": 40}
PAUSE_TIMEOUT_S = 180.0


def _insert(stack: Stack, params: dict[str, object], seed: int) -> str:
    return stack.insert("t2v", {**params, "prompt": f"output stage {seed}", "seed": seed}, max_attempts=3)


def _wait_pending(stack: Stack, worker: WorkerProcess, pause_dir: Path, first: str, second: str | None) -> None:
    """Until the first output is paused half-written (and the second task runs on the same worker)."""
    name = worker.args[worker.args.index("--worker-id") + 1]

    def reached() -> bool:
        assert worker.process is not None
        if worker.process.poll() is not None:
            pytest.fail(f"worker exited with {worker.process.returncode}\n{worker.log_text()[-4000:]}")
        rows = read_rows(stack, [first] if second is None else [first, second])
        paused = (
            (pause_dir / f"{first}.paused").exists()
            and rows[first]["status"] == "In Progress"
            and (rows[first]["progress"] or {}).get("stage") == "writing_video"
        )
        if second is None:
            return paused
        return paused and rows[second]["status"] == "In Progress" and rows[second]["worker_id"] == name

    wait_until(reached, PAUSE_TIMEOUT_S, "a pending write (overlapping the next task)", interval=0.05)
    assert "output of t2v task handed to the finisher" in worker.log_text()
    staged = [p.name for p in partial_files(stack.outputs_dir)]
    assert any(n.startswith(f".{first}.") for n in staged), f"no half-written staged file of {first}: {staged}"
    assert not (stack.outputs_dir / f"{first}.mp4").exists(), "published before its Complete write"


def _check_outputs(stack: Stack, ids: list[str]) -> None:
    rows = read_rows(stack, ids)
    assert all(row["status"] == "Complete" for row in rows.values()), {
        task_id: (row["status"], row["error_message"]) for task_id, row in rows.items()
    }
    expected = sorted(Path(row["output_location"]) for row in rows.values())
    assert all_files(stack.outputs_dir) == expected, "exactly one output per task, no staged or partial file"
    for row in rows.values():
        info = read_video_info(Path(row["output_location"]))
        assert info.frames == json.loads(row["params"])["video_length"], f"{row['id']}: not a complete video"
        assert row["result_data"]["extra"]["write_overlapped"] is True
        assert row["result_data"]["timings"]["write"] > 0
    wait_until(lambda: not processes_writing_under(stack.outputs_dir), 30, "no process writing an output")


def test_sigkill_while_an_output_is_pending_loses_nothing(any_stack: Stack, tmp_path: Path) -> None:
    _kill_while_pending(any_stack, tmp_path, {})


def test_sigkill_while_an_overlapped_decode_output_is_pending_loses_nothing(
    sqlite_stack: Stack, tmp_path: Path
) -> None:
    """The same with the VAE decode on the finisher too (WAN_OVERLAP_DECODE=on; auto does that only on CUDA)."""
    rows = _kill_while_pending(sqlite_stack, tmp_path, {OVERLAP_DECODE_ENV: "on"})
    for row in rows.values():
        assert row["result_data"]["extra"]["decode_overlap"]["overlapped"] is True
        assert row["result_data"]["timings"]["decode"] > 0


def _kill_while_pending(stack: Stack, tmp_path: Path, env: dict[str, str]) -> dict[str, dict[str, object]]:
    first, second = _insert(stack, FIRST, 1), _insert(stack, SECOND, 2)
    pause_dir = tmp_path / "pause"
    worker = start_worker(stack, "pending-kill", lease_s=LEASE_S, env={**env, **pause_writes_env(pause_dir)})
    _wait_pending(stack, worker, pause_dir, first, second)
    worker.kill9()
    rows = read_rows(stack, [first, second])
    assert [rows[t]["status"] for t in (first, second)] == ["In Progress", "In Progress"]

    final = start_worker(stack, "pending-after", lease_s=LEASE_S, env=env)  # no pause hook: writes run through
    wait_all_final(stack, [first, second], timeout=240, what="both tasks after the kill")
    _check_outputs(stack, [first, second])
    rows = read_rows(stack, [first, second])
    logs = [worker.log_text(), final.log_text()]
    claims = claims_by_task(logs)
    for task_id in (first, second):
        assert rows[task_id]["attempts"] == 2 == claims[task_id], (task_id, rows[task_id]["attempts"], claims)
    assert max(completions_by_task(logs).values()) == 1
    return rows


def test_one_stop_signal_waits_for_the_pending_output(sqlite_stack: Stack, tmp_path: Path) -> None:
    stack = sqlite_stack
    first = _insert(stack, FIRST, 1)
    pause_dir = tmp_path / "pause"
    worker = start_worker(stack, "pending-stop", lease_s=LEASE_S, env=pause_writes_env(pause_dir))
    _wait_pending(stack, worker, pause_dir, first, None)  # the loop is idle: only the output is pending
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "stopping after the current task" in worker.log_text(), 30, "the stop to be logged")
    later = _insert(stack, SECOND, 2)  # a stopping worker claims nothing more
    with pytest.raises(subprocess.TimeoutExpired):
        worker.wait_exit(3)  # it waits for the pending output (paused until resumed below)
    assert read_rows(stack, [first])[first]["status"] == "In Progress"
    resume_write(pause_dir, first)
    assert worker.wait_exit(120) == 0, worker.log_text()[-4000:]
    _check_outputs(stack, [first])
    rows = read_rows(stack, [first, later])
    assert rows[first]["attempts"] == 1
    assert (rows[later]["status"], rows[later]["attempts"]) == ("Queued", 0)


def test_two_stop_signals_give_the_pending_task_back(sqlite_stack: Stack, tmp_path: Path) -> None:
    stack = sqlite_stack
    first, second = _insert(stack, FIRST, 1), _insert(stack, SECOND, 2)
    pause_dir = tmp_path / "pause"
    worker = start_worker(stack, "pending-abort", lease_s=LEASE_S, env=pause_writes_env(pause_dir))
    _wait_pending(stack, worker, pause_dir, first, second)
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "stopping after the current task" in worker.log_text(), 30, "the first stop to be logged")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.log_text()[-4000:]
    rows = read_rows(stack, [first, second])
    for task_id in (first, second):
        row = rows[task_id]
        assert (row["status"], row["attempts"], row["worker_id"]) == ("Queued", 0, None), (task_id, row)
    wait_until(lambda: not processes_writing_under(stack.outputs_dir), 30, "the aborted ffmpeg to exit")
    assert all_files(stack.outputs_dir) == [], "an abandoned output leaves no final and no staged file"

    start_worker(stack, "pending-resumed", lease_s=LEASE_S)
    wait_all_final(stack, [first, second], timeout=240, what="both tasks after the abort")
    _check_outputs(stack, [first, second])
