"""Hostile rows: values other programs can write that once stopped the real `wan-worker run` process.

Each test queues the hostile rows together with good rows in one transaction, starts one real worker on tiny
models and reads the table back with raw SQL: the good rows complete, each hostile row ends Failed at once
with a message naming what is wrong (or is served with the bad value ignored), and the process is still
alive. Params nested 2000 levels deep, a row In Progress without a lease and a 20-link chain whose root fails
run on SQLite and Postgres; the values only SQLite accepts (`created_at = 'now'` or `unixepoch()`,
`progress = '50%'`, `result_data = ''`, params stored as a BLOB) run on SQLite.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.reliability.harness import insert_many, start_worker
from tests.support.processes import Stack, WorkerProcess
from worker.store.sweeps import ROOT_MESSAGE_CHARS
from worker.tasks.params import MAX_PARAMS_BYTES, MAX_PARAMS_DEPTH

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

T2V = {"model": "tiny_t2v", "prompt": "a cat", "resolution": "64x48", "video_length": 5, "num_inference_steps": 1}
DEEP_LEVELS = 2000
LEASE_S = 4.0  # sweeps run every LEASE_S / 2 seconds
FINAL = ("Complete", "Failed", "Cancelled")


def deep_params(levels: int = DEEP_LEVELS) -> str:
    """A params object nesting `levels` levels deep: about 20 KB, far under the size cap."""
    text = '{"model": "tiny_t2v", "prompt": "a cat", "x": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"
    assert len(text.encode()) < MAX_PARAMS_BYTES
    return text


def status_and_message(stack: Stack, task_id: str) -> tuple[str, str | None, int]:
    """(status, error_message, attempts) by raw SQL, without decoding the row's other (hostile) columns."""
    with stack.engine.begin() as conn:
        row = conn.execute(
            sa.text("SELECT status, error_message, attempts FROM tasks WHERE id = :id"), {"id": task_id}
        ).one()
    return str(row[0]), row[1], int(row[2])


def wait_final(stack: Stack, ids: list[str], timeout: float = 180.0) -> dict[str, tuple[str, str | None, int]]:
    """Wait until every row in `ids` is final (failing the test if a worker exits); their (status, message)."""
    stack.wait_for(lambda: all(status_and_message(stack, i)[0] in FINAL for i in ids), timeout, f"{ids} final")
    return {task_id: status_and_message(stack, task_id) for task_id in ids}


def assert_alive(worker: WorkerProcess) -> None:
    assert worker.process is not None and worker.process.poll() is None, worker.log_text()[-3000:]


def test_deep_params_and_a_leaseless_row_leave_the_worker_serving(stack: Stack) -> None:
    good_before, deep, good_after = insert_many(
        stack,
        [
            {"task_type": "t2v", "params": T2V, "priority": 10},
            {"task_type": "t2v", "params": deep_params(), "priority": 5},
            {"task_type": "t2v", "params": T2V, "priority": 0},
        ],
    )
    # "Retried" by a client script: In Progress, no lease, no live worker behind it.
    (leaseless,) = insert_many(
        stack, [{"task_type": "t2v", "params": T2V, "status": "In Progress", "worker_id": "gone"}]
    )
    worker = start_worker(stack, "hostile", lease_s=LEASE_S)

    rows = wait_final(stack, [good_before, deep, good_after, leaseless])
    assert rows[good_before][0] == rows[good_after][0] == rows[leaseless][0] == "Complete", rows
    status, message, attempts = rows[deep]
    assert status == "Failed" and attempts == 1, rows[deep]
    assert f"{DEEP_LEVELS} levels deep" in (message or "") and f"at most {MAX_PARAMS_DEPTH}" in (message or "")
    assert_alive(worker)
    assert "RecursionError" not in worker.log_text()


def test_a_chain_whose_root_fails_ends_in_one_sweep(stack: Stack) -> None:
    links = 20
    root = insert_many(stack, [{"task_type": "t2v", "params": {**T2V, "bogus_key": 1}}])[0]
    chain: list[str] = []
    on = root
    for _ in range(links):
        on = insert_many(stack, [{"task_type": "t2v", "params": T2V, "dependant_on": on}])[0]
        chain.append(on)
    (good,) = insert_many(stack, [{"task_type": "t2v", "params": T2V, "priority": -1}])
    worker = start_worker(stack, "chain", lease_s=LEASE_S)

    stack.wait_for(lambda: status_and_message(stack, root)[0] == "Failed", 120, "the root fails")
    root_failed_at = time.monotonic()
    rows = wait_final(stack, chain, timeout=LEASE_S / 2 + 5.0)  # link by link would take 20 sweeps (40 s)
    ended = time.monotonic() - root_failed_at
    assert ended < LEASE_S / 2 + 5.0
    previous = root
    for task_id in chain:
        status, message, attempts = rows[task_id]
        assert status == "Failed" and attempts == 0, rows[task_id]
        text = message or ""
        assert len(text) < 200 + ROOT_MESSAGE_CHARS and root in text and f"prerequisite task {previous}" in text, text
        previous = task_id
    lengths = {len(rows[task_id][1] or "") for task_id in chain[1:]}
    assert max(lengths) - min(lengths) < 10, "messages must not grow along the chain"
    assert "ended Failed, so this task cannot run (invalid params" in (rows[chain[0]][1] or "")
    assert wait_final(stack, [good])[good][0] == "Complete"
    assert_alive(worker)


def _insert_sql(stack: Stack, sql: str, **values: Any) -> str:
    with stack.engine.begin() as conn:
        return str(conn.execute(sa.text(sql + " RETURNING id"), values).scalar_one())


def test_sqlite_only_values_are_ignored_or_fail_their_row_alone(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    params = '{"model": "tiny_t2v", "prompt": "a cat", "resolution": "64x48", "video_length": 5, '
    params += '"num_inference_steps": 1}'
    base = "INSERT INTO tasks (task_type, params, {cols}) VALUES ('t2v', :params, {vals})"
    served = {
        "created-now": _insert_sql(stack, base.format(cols="created_at", vals="'now'"), params=params),
        "created-unixepoch": _insert_sql(stack, base.format(cols="created_at", vals="unixepoch()"), params=params),
        "progress-percent": _insert_sql(stack, base.format(cols="progress", vals="'50%'"), params=params),
        "result-empty": _insert_sql(stack, base.format(cols="result_data", vals="''"), params=params),
        "params-blob": _insert_sql(
            stack, "INSERT INTO tasks (task_type, params) VALUES ('t2v', :blob)", blob=params.encode()
        ),
    }
    bad_blob = _insert_sql(
        stack, "INSERT INTO tasks (task_type, params) VALUES ('t2v', :blob)", blob=b'{"prompt": "\xff\xfe"}'
    )
    (good,) = insert_many(stack, [{"task_type": "t2v", "params": T2V, "priority": -1}])
    worker = start_worker(stack, "sqlite-hostile", lease_s=LEASE_S)

    rows = wait_final(stack, [*served.values(), bad_blob, good])
    assert all(rows[task_id][0] == "Complete" for task_id in [*served.values(), good]), rows
    status, message, attempts = rows[bad_blob]
    assert status == "Failed" and attempts == 1 and "not valid UTF-8" in (message or ""), rows[bad_blob]
    assert_alive(worker)
    log_text = worker.log_text()
    assert f"task {served['created-now']}: ignoring unreadable created_at 'now'" in log_text
    assert "Traceback" not in log_text
