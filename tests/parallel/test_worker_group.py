"""Acceptance: the real `wan-worker run --parallel 2` (a group of 2 ranks, gloo on the CPU) on a real table.

Rows are inserted with raw SQL. The group claims a `parallel: 2` row and a plain one and completes both
(outputs from rank 0 only); a single-GPU worker beside it never takes the `parallel: 2` row; a user's
cancel stops both ranks at the same denoising step; SIGTERM stops the whole group with exit code 0.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support.processes import Stack, output_files

pytestmark = [pytest.mark.acceptance, pytest.mark.parallel]

# Enough tiny denoising work that the task is still running when the test cancels it.
SLOW = {"num_inference_steps": 300, "resolution": "128x96", "video_length": 33}


def tiny(prompt: str, **params: object) -> dict[str, object]:
    return {"model": "tiny_t2v", "prompt": prompt, "resolution": "64x48", "video_length": 5, **params}


def test_a_group_of_two_runs_parallel_tasks_cancels_together_and_stops(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    wide = stack.insert("t2v", tiny("wide", parallel=2, seed=3), priority=5)
    single = stack.start_worker(name="single")
    stack.wait_for(lambda: "worker started" in single.log_text(), 90, "the single-GPU worker started")
    time.sleep(1.5)  # a few claim passes: the single worker must leave the wide row alone
    assert stack.row(wide)["status"] == "Queued"
    single.stop()

    group = stack.start_worker("--parallel", "2", name="group")
    row = stack.wait_status(wide, ("Complete", "Failed"), timeout=120)
    assert row["status"] == "Complete", row["error_message"]
    assert row["worker_id"] == "group"
    assert row["result_data"]["extra"]["parallel"] == {"ranks": 2, "ulysses_degree": 2, "backend": "gloo"}
    assert Path(row["output_location"]).is_file()

    victim = stack.insert("t2v", tiny("victim", parallel=2, **SLOW), priority=1)
    plain = stack.insert("t2v", tiny("plain"))  # parallel 1: a group runs it on both ranks too

    def denoising() -> bool:
        progress = stack.row(victim)["progress"] or {}
        return progress.get("stage") == "denoising" and progress.get("step", 0) >= 2

    stack.wait_for(denoising, 120, "the victim denoising")
    stack.execute("UPDATE tasks SET status='Cancelled' WHERE id=:id", id=victim)
    row = stack.wait_status(plain, ("Complete", "Failed"), timeout=120)
    assert row["status"] == "Complete", row["error_message"]
    assert row["result_data"]["extra"]["parallel"]["ranks"] == 2
    assert stack.row(victim)["status"] == "Cancelled" and stack.row(victim)["output_location"] is None
    log = group.log_text()
    leader_step = int(re.search(r"task cancelled; stopped at stage denoising step (\d+)/", log).group(1))
    follower_step = int(re.search(r"stopped with rank 0 at denoising step (\d+)/", log).group(1))
    assert leader_step == follower_step < SLOW["num_inference_steps"]
    outputs = sorted(Path(stack.row(t)["output_location"]) for t in (wide, plain))
    assert sorted(output_files(stack.outputs_dir)) == outputs

    assert group.process is not None
    ranks = psutil.Process(group.process.pid).children()
    assert len(ranks) == 2
    group.signal(signal.SIGTERM)
    assert group.wait_exit(90) == 0
    assert not any(rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE for rank in ranks)


def test_a_follower_killed_mid_task_ends_the_group_and_the_task_is_retried(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    task_id = stack.insert("t2v", tiny("victim", parallel=2, **SLOW))
    group = stack.start_worker("--parallel", "2", name="group")

    def denoising() -> bool:
        progress = stack.row(task_id)["progress"] or {}
        return progress.get("stage") == "denoising" and progress.get("step", 0) >= 2

    stack.wait_for(denoising, 120, "the task denoising")
    assert group.process is not None
    follower = next(p for p in psutil.Process(group.process.pid).children() if p.environ().get("RANK") == "1")
    group.killed = True  # its non-zero exit is the point of this test
    follower.kill()
    # Rank 0 sees the broken connection, records the failure (retried with back-off) and the group exits.
    assert group.wait_exit(90) != 0
    row = stack.row(task_id)
    assert row["status"] == "Queued" and row["attempts"] == 1, row
    assert "retrying" in row["error_message"]
    assert "rank 1 exited with code -9; ending the group" in group.log_text()

    stack.start_worker("--parallel", "2", name="restarted")  # what the --gpus supervisor does
    row = stack.wait_status(task_id, ("Complete", "Failed"), timeout=180)
    assert row["status"] == "Complete" and row["attempts"] == 2, row["error_message"]
