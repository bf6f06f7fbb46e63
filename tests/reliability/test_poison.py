"""Poison task: a task that kills its worker every time ends `Failed` after max_attempts; the queue flows on.

Two real workers share a SQLite queue of good tasks and one high-priority "poison" task. The harness plays
the poison: whenever that row is `In Progress`, the worker holding it is SIGKILLed (and replaced by a fresh
one, as a supervisor would). Its lease expires, a surviving worker re-queues it, and so on until the
attempts reach max_attempts (the default, 3): then the sweep fails it with a message saying why.
Meanwhile the good tasks keep completing on the other worker.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.figures import Figures, sized
from tests.reliability.harness import all_files, insert_many, read_rows, start_worker, wait_all_final
from tests.support.processes import Stack, WorkerProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

GOOD = sized(6, 30)
LEASE_S = 5.0
MAX_ATTEMPTS = 3  # the column default: what a raw INSERT gets
GOOD_PARAMS = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 9, "num_inference_steps": 4}
POISON_PARAMS = {**GOOD_PARAMS, "num_inference_steps": 200, "prompt": "poison"}
TIMEOUT_S = 420.0


def test_a_task_that_kills_its_worker_fails_after_max_attempts(sqlite_stack: Stack, figures: Figures) -> None:
    stack = sqlite_stack
    good = insert_many(
        stack, [{"task_type": "t2v", "params": {**GOOD_PARAMS, "prompt": f"good {n}"}} for n in range(GOOD)]
    )
    (poison,) = insert_many(stack, [{"task_type": "t2v", "params": POISON_PARAMS, "priority": 5}])
    workers: dict[str, WorkerProcess] = {}
    started = time.monotonic()
    for name in ("poison-a-0", "poison-b-0"):
        workers[name] = start_worker(stack, name, lease_s=LEASE_S)

    kills: list[tuple[str, int]] = []  # (worker, attempt it died on)
    good_done_at_first_kill: int | None = None
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        rows = read_rows(stack)
        row = rows[poison]
        if row["status"] == "Failed":
            break
        assert row["status"] in ("Queued", "In Progress"), row
        holder = workers.get(row["worker_id"] or "")
        if row["status"] == "In Progress" and holder is not None and not holder.killed:
            holder.kill9()
            kills.append((row["worker_id"], row["attempts"]))
            if good_done_at_first_kill is None:
                good_done_at_first_kill = sum(rows[t]["status"] == "Complete" for t in good)
            family, _, number = row["worker_id"].rpartition("-")
            replacement = f"{family}-{int(number) + 1}"
            workers[replacement] = start_worker(stack, replacement, lease_s=LEASE_S)
        for name, worker in workers.items():
            assert worker.killed or worker.process is None or worker.process.poll() is None, f"{name} died on its own"
        assert time.monotonic() < deadline, f"the poison task is still {row['status']} after {TIMEOUT_S}s"
        time.sleep(0.05)
    good_done_at_poison_end = sum(r["status"] == "Complete" for t, r in read_rows(stack, good).items())
    wait_all_final(stack, good, timeout=300, what="the good tasks")
    elapsed = time.monotonic() - started

    row = read_rows(stack, [poison])[poison]
    assert row["attempts"] == MAX_ATTEMPTS == row["max_attempts"]
    message = row["error_message"] or ""
    assert "stopped responding (lease expired)" in message, message
    assert f"{MAX_ATTEMPTS} of max_attempts {MAX_ATTEMPTS}" in message, message
    assert [attempt for _, attempt in kills] == list(range(1, MAX_ATTEMPTS + 1)), kills
    assert row["output_location"] is None
    assert not [p for p in all_files(stack.outputs_dir) if p.name.startswith(poison)], "the poison left an output"

    rows = read_rows(stack, good)
    assert all(r["status"] == "Complete" and r["attempts"] in (1, 2) for r in rows.values()), rows
    # Each kill -9 may also catch the one good task whose output the killed worker was still writing (the
    # output finisher overlaps it with the next task): that task is re-run once, nothing else is touched.
    rerun = [t for t, r in rows.items() if r["attempts"] == 2]
    assert len(rerun) <= len(kills), (rerun, kills)
    assert good_done_at_first_kill is not None
    assert good_done_at_poison_end > good_done_at_first_kill, "no good task completed while the poison was retried"
    survivors = [name for name, worker in workers.items() if not worker.killed]
    assert all(workers[name].process.poll() is None for name in survivors)  # type: ignore[union-attr]
    figures.record(
        "poison[sqlite]",
        good_tasks=GOOD,
        poison_kills=len(kills),
        poison_attempts=row["attempts"],
        poison_status=row["status"],
        good_completed_while_poison_retried=good_done_at_poison_end - good_done_at_first_kill,
        good_lost=sum(r["status"] != "Complete" for r in rows.values()),
        seconds=round(elapsed, 1),
    )
