"""The SqlTaskRepository contract, run on a SQLite file and on the real Postgres (fixture `db_url`).

Rows are also written with raw SQL, as users do: the schema (Alembic head) must accept the minimal
insert of docs/DESIGN.md and a user's raw `UPDATE ... SET status='Cancelled'` must never be overwritten.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from worker.store.migrate import MIGRATIONS_DIR, upgrade_to_head
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask, Task, TaskStatus

MINIMAL_INSERT = """INSERT INTO tasks (task_type, params) VALUES ('t2v', '{"model": "t2v_1.3B", "prompt": "a cat"}')"""
LONG_AGO = "2000-01-01 00:00:00"


def first(candidates: list[Task]) -> Task | None:
    return candidates[0] if candidates else None


@pytest.fixture
def repo(engine: Engine) -> SqlTaskRepository:
    return SqlTaskRepository(engine)


def raw(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def column(engine: Engine, task_id: str, name: str) -> Any:
    with engine.begin() as conn:
        return conn.execute(sa.text(f"SELECT {name} FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one()


def add(repo: SqlTaskRepository, **fields: Any) -> str:
    params = fields.pop("params", {"model": "t2v_1.3B", "prompt": "a cat"})
    return repo.insert(NewTask(task_type="t2v", params=params, **fields))


def claim(repo: SqlTaskRepository, worker_id: str = "w1", lease_s: float = 60.0) -> Task | None:
    return repo.claim_next(worker_id, lease_s, first)


def claimed(repo: SqlTaskRepository, worker_id: str = "w1", lease_s: float = 60.0) -> Task:
    task = claim(repo, worker_id, lease_s)
    assert task is not None
    return task


# ---- schema -------------------------------------------------------------------------------------


def test_migrations_are_idempotent(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    upgrade_to_head(engine)
    upgrade_to_head(engine)
    with engine.begin() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert versions == [head]
    assert set(sa.inspect(engine).get_table_names()) >= {"tasks", "workers", "alembic_version"}
    assert repo.get(task_id) is not None, "re-running migrations must keep the data"


def test_minimal_raw_insert_of_design_md(engine: Engine, repo: SqlTaskRepository) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(MINIMAL_INSERT)
    with engine.begin() as conn:
        row = conn.execute(sa.text("SELECT * FROM tasks")).mappings().one()
    assert re.fullmatch(r"[0-9a-f]{32}", row["id"]), row["id"]
    assert row["status"] == "Queued"
    assert row["priority"] == 0
    assert row["attempts"] == 0
    assert row["max_attempts"] == 3
    assert row["created_at"] is not None
    assert row["updated_at"] is not None
    for empty in ("dependant_on", "worker_id", "lease_expires_at", "run_after", "output_location", "error_message"):
        assert row[empty] is None, empty

    task = claimed(repo)
    assert task.id == row["id"]
    assert json.loads(task.params_text) == {"model": "t2v_1.3B", "prompt": "a cat"}
    assert task.attempts == 1


def test_raw_inserts_get_distinct_ids(engine: Engine) -> None:
    with engine.begin() as conn:
        for _ in range(5):
            conn.exec_driver_sql(MINIMAL_INSERT)
    with engine.begin() as conn:
        ids = conn.execute(sa.text("SELECT id FROM tasks")).scalars().all()
    assert len(set(ids)) == 5


def test_status_check_constraint_rejects_bogus_status(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    with pytest.raises(sa.exc.IntegrityError):
        raw(engine, "UPDATE tasks SET status = 'Done' WHERE id = :id", id=task_id)
    with pytest.raises(sa.exc.IntegrityError):
        raw(engine, "INSERT INTO tasks (task_type, params, status) VALUES ('t2v', '{}', 'queued')")
    assert repo.get_status(task_id) is TaskStatus.QUEUED


def test_malformed_params_text_is_stored_and_read_back_raw(engine: Engine, repo: SqlTaskRepository) -> None:
    raw(engine, "INSERT INTO tasks (id, task_type, params) VALUES ('bad', 't2v', '{not json')")
    task = claimed(repo)
    assert task.id == "bad"
    assert task.params_text == "{not json"


# ---- insert / get -------------------------------------------------------------------------------


def test_insert_get_round_trip(repo: SqlTaskRepository) -> None:
    params = {"model": "t2v_2_2", "prompt": "un chat sur la lune, 月の猫", "seed": 7, "resolution": "832x480"}
    task_id = repo.insert(
        NewTask(task_type="t2v_22", params=params, id="my-id", priority=4, parent_task_id="orch-1", max_attempts=5)
    )
    assert task_id == "my-id"
    task = repo.get(task_id)
    assert task is not None
    assert task.task_type == "t2v_22"
    assert json.loads(task.params_text) == params
    assert task.status is TaskStatus.QUEUED
    assert task.priority == 4
    assert task.parent_task_id == "orch-1"
    assert task.max_attempts == 5
    assert task.attempts == 0
    assert task.created_at is not None and task.updated_at is not None
    assert repo.get("no-such-id") is None
    assert repo.get_status("no-such-id") is None


def test_insert_generates_an_id(repo: SqlTaskRepository) -> None:
    first_id, second_id = add(repo), add(repo)
    assert re.fullmatch(r"[0-9a-f]{32}", first_id)
    assert first_id != second_id


# ---- claiming -------------------------------------------------------------------------------------


def test_claim_order_priority_desc_then_fifo(repo: SqlTaskRepository) -> None:
    low = add(repo, priority=0)
    high_old = add(repo, priority=5)
    high_new = add(repo, priority=5)
    order = [claimed(repo).id for _ in range(3)]
    assert order == [high_old, high_new, low]
    assert claim(repo) is None


def test_fifo_for_many_rows_inserted_quickly(repo: SqlTaskRepository) -> None:
    ids = [add(repo) for _ in range(20)]
    assert [claimed(repo).id for _ in range(20)] == ids


def test_claim_sets_lease_worker_attempts_and_start_time(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    task = claimed(repo, worker_id="gpu-box-1", lease_s=120.0)
    assert task.id == task_id
    assert task.status is TaskStatus.IN_PROGRESS
    assert task.worker_id == "gpu-box-1"
    assert task.attempts == 1
    assert task.generation_started_at is not None
    assert task.lease_expires_at is not None
    lease = task.lease_expires_at - task.generation_started_at
    assert timedelta(seconds=119) <= lease <= timedelta(seconds=121)
    stored = repo.get(task_id)
    assert stored is not None
    assert (stored.status, stored.worker_id, stored.attempts) == (TaskStatus.IN_PROGRESS, "gpu-box-1", 1)


def test_chooser_sees_candidates_in_order_and_may_pick_any(repo: SqlTaskRepository) -> None:
    ids = [add(repo, priority=p) for p in (1, 3, 2)]
    seen: list[list[str]] = []

    def pick_last(candidates: list[Task]) -> Task | None:
        seen.append([task.id for task in candidates])
        return candidates[-1]

    task = repo.claim_next("w1", 60, pick_last)
    assert seen == [[ids[1], ids[2], ids[0]]]
    assert task is not None and task.id == ids[0]
    assert repo.claim_next("w1", 60, lambda candidates: None) is None
    assert repo.get_status(ids[1]) is TaskStatus.QUEUED


def test_run_after_in_the_future_is_not_claimable(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    assert repo.retry_later(task_id, "w1", "attempt 1 failed, retrying in 3600s", delay_s=3600)
    task = repo.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.QUEUED
    assert task.run_after is not None
    assert task.worker_id is None
    assert task.error_message == "attempt 1 failed, retrying in 3600s"
    assert claim(repo) is None

    raw(engine, "UPDATE tasks SET run_after = :t WHERE id = :id", t=LONG_AGO, id=task_id)
    again = claimed(repo)
    assert again.id == task_id
    assert again.attempts == 2
    assert again.run_after is None


def test_retry_with_zero_delay_is_claimable_at_once(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    assert repo.retry_later(task_id, "w1", "retrying", delay_s=0)
    time.sleep(0.01)
    assert claimed(repo).id == task_id


def test_dependant_held_until_prerequisite_complete(repo: SqlTaskRepository) -> None:
    prerequisite = add(repo, priority=0)
    dependant = add(repo, priority=10, dependant_on=prerequisite)
    assert claimed(repo).id == prerequisite
    assert claim(repo) is None, "the dependant must wait while its prerequisite runs"
    assert repo.mark_complete(prerequisite, "w1", None, {})
    assert claimed(repo).id == dependant


def test_dependant_of_failed_prerequisite_is_never_claimed(repo: SqlTaskRepository) -> None:
    prerequisite = add(repo)
    add(repo, dependant_on=prerequisite)
    claimed(repo)
    assert repo.mark_failed(prerequisite, "w1", "bad input")
    assert claim(repo) is None


# ---- fail_blocked -----------------------------------------------------------------------------------


def test_fail_blocked(engine: Engine, repo: SqlTaskRepository) -> None:
    failed = add(repo)
    claimed(repo)
    repo.mark_failed(failed, "w1", "boom")
    cancelled = add(repo)
    repo.cancel(cancelled)
    running = add(repo)
    claimed(repo)
    queued = add(repo, priority=-1)

    on_failed = add(repo, dependant_on=failed)
    on_cancelled = add(repo, dependant_on=cancelled)
    on_missing = add(repo, dependant_on="ghost-task")
    on_running = add(repo, dependant_on=running)
    on_queued = add(repo, dependant_on=queued)

    ended = repo.fail_blocked()
    assert sorted(ended) == sorted([on_failed, on_cancelled, on_missing])

    for task_id, prerequisite, status in ((on_failed, failed, "Failed"), (on_cancelled, cancelled, "Cancelled")):
        task = repo.get(task_id)
        assert task is not None
        assert task.status is TaskStatus.FAILED
        assert prerequisite in (task.error_message or "")
        assert status in (task.error_message or "")
    missing = repo.get(on_missing)
    assert missing is not None and missing.status is TaskStatus.FAILED
    assert "ghost-task" in (missing.error_message or "")
    assert "does not exist" in (missing.error_message or "")

    assert repo.get_status(on_running) is TaskStatus.QUEUED
    assert repo.get_status(on_queued) is TaskStatus.QUEUED
    assert repo.fail_blocked() == []


# ---- guarded writes ---------------------------------------------------------------------------------


def test_users_cancel_is_never_overwritten(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    raw(engine, "UPDATE tasks SET status = 'Cancelled' WHERE id = :id", id=task_id)

    assert repo.heartbeat(task_id, "w1", 60, {"stage": "denoise", "step": 3}) is False
    assert repo.mark_complete(task_id, "w1", "/outputs/x.mp4", {"seed": 1}) is False
    assert repo.mark_failed(task_id, "w1", "boom") is False
    assert repo.retry_later(task_id, "w1", "retry", 1) is False
    assert repo.release(task_id, "w1") is False

    task = repo.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.CANCELLED
    assert task.output_location is None
    assert task.result_data is None
    assert task.error_message is None
    assert task.progress is None
    assert task.attempts == 1


def test_another_workers_writes_are_refused(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo, worker_id="w1")
    assert repo.heartbeat(task_id, "w2", 60, None) is False
    assert repo.mark_complete(task_id, "w2", "/x.mp4", {}) is False
    assert repo.mark_failed(task_id, "w2", "boom") is False
    assert repo.release(task_id, "w2") is False
    task = repo.get(task_id)
    assert task is not None
    assert (task.status, task.worker_id, task.output_location) == (TaskStatus.IN_PROGRESS, "w1", None)


def test_heartbeat_renews_lease_and_stores_progress(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    task = claimed(repo, lease_s=5)
    progress = {"stage": "denoise", "step": 3, "total_steps": 10, "percent": 30.0, "eta_seconds": 7.5}
    assert repo.heartbeat(task_id, "w1", 600, progress)
    renewed = repo.get(task_id)
    assert renewed is not None and renewed.lease_expires_at is not None and task.lease_expires_at is not None
    assert renewed.lease_expires_at - task.lease_expires_at > timedelta(seconds=500)
    assert renewed.progress == progress
    assert repo.heartbeat(task_id, "w1", 600, None)
    kept = repo.get(task_id)
    assert kept is not None and kept.progress == progress, "a heartbeat without progress keeps the last one"


def test_mark_complete_records_output_and_result(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    result = {"seed": 42, "frames": 81, "fps": 16, "resolution": "832x480", "timings": {"total_s": 1.5}}
    assert repo.mark_complete(task_id, "w1", "/outputs/abc.mp4", result)
    task = repo.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.COMPLETE
    assert task.output_location == "/outputs/abc.mp4"
    assert task.result_data == result
    assert task.lease_expires_at is None
    assert task.generation_processed_at is not None
    assert task.generation_started_at is not None
    assert task.generation_processed_at >= task.generation_started_at
    assert repo.mark_complete(task_id, "w1", "/outputs/other.mp4", {}) is False, "Complete is final"


def test_mark_failed_records_message(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    assert repo.mark_failed(task_id, "w1", "resolution '1x1' is not allowed", {"peak_vram_gb": 1.0})
    task = repo.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.error_message == "resolution '1x1' is not allowed"
    assert task.result_data == {"peak_vram_gb": 1.0}


# ---- stale leases, release, cancel --------------------------------------------------------------------


def test_requeue_stale(engine: Engine, repo: SqlTaskRepository) -> None:
    retryable = add(repo, max_attempts=3)
    exhausted = add(repo, max_attempts=1)
    healthy = add(repo)
    for worker_id in ("dead-1", "dead-2", "alive"):
        claimed(repo, worker_id=worker_id)
    raw(engine, "UPDATE tasks SET lease_expires_at = :t WHERE worker_id LIKE 'dead-%'", t=LONG_AGO)

    recovered = repo.requeue_stale()
    assert recovered.requeued == [retryable]
    assert recovered.failed == [exhausted]

    requeued = repo.get(retryable)
    assert requeued is not None
    assert (requeued.status, requeued.worker_id, requeued.attempts) == (TaskStatus.QUEUED, None, 1)
    assert "dead-1" in (requeued.error_message or "")

    failed = repo.get(exhausted)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    message = failed.error_message or ""
    assert "lease expired" in message and "max_attempts 1" in message and "dead-2" in message

    assert repo.get_status(healthy) is TaskStatus.IN_PROGRESS
    assert repo.requeue_stale().requeued == []

    again = claimed(repo, worker_id="w2")
    assert again.id == retryable and again.attempts == 2


def test_stale_row_cannot_be_written_by_its_old_worker(engine: Engine, repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo, worker_id="slow")
    raw(engine, "UPDATE tasks SET lease_expires_at = :t WHERE id = :id", t=LONG_AGO, id=task_id)
    repo.requeue_stale()
    claimed(repo, worker_id="fast")
    assert repo.mark_complete(task_id, "slow", "/slow.mp4", {}) is False
    assert repo.mark_complete(task_id, "fast", "/fast.mp4", {})
    task = repo.get(task_id)
    assert task is not None and task.output_location == "/fast.mp4"


def test_release_gives_the_attempt_back(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    assert repo.heartbeat(task_id, "w1", 60, {"stage": "denoise", "step": 1})
    assert repo.release(task_id, "w1")
    task = repo.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.QUEUED
    assert task.attempts == 0
    assert task.worker_id is None
    assert task.lease_expires_at is None
    assert task.progress is None
    assert claimed(repo).attempts == 1


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("queued", True), ("running", True), ("complete", False), ("failed", False), ("cancelled", False)],
)
def test_cancel_only_queued_or_running(repo: SqlTaskRepository, setup: str, expected: bool) -> None:
    task_id = add(repo)
    if setup != "queued":
        claimed(repo)
    if setup == "complete":
        repo.mark_complete(task_id, "w1", "/x.mp4", {})
    elif setup == "failed":
        repo.mark_failed(task_id, "w1", "boom")
    elif setup == "cancelled":
        repo.cancel(task_id)
    before = repo.get_status(task_id)

    assert repo.cancel(task_id) is expected
    after = repo.get_status(task_id)
    if expected:
        assert after is TaskStatus.CANCELLED
        task = repo.get(task_id)
        assert task is not None and "cancel" in (task.error_message or "")
    else:
        assert after is before


def test_cancel_unknown_id(repo: SqlTaskRepository) -> None:
    assert repo.cancel("no-such-id") is False


def test_cancelled_running_task_is_not_reclaimed(repo: SqlTaskRepository) -> None:
    task_id = add(repo)
    claimed(repo)
    assert repo.cancel(task_id)
    assert claim(repo) is None
    assert repo.heartbeat(task_id, "w1", 60, None) is False


# ---- reporting --------------------------------------------------------------------------------------


def test_counts_queued_by_priority_and_list(repo: SqlTaskRepository) -> None:
    ids = []
    for priority in (0, 0, 2, 5, 5, 5):
        ids.append(add(repo, priority=priority))
        time.sleep(0.003)  # distinct created_at even at SQLite's millisecond resolution
    claimed(repo)  # one priority-5 task
    done = claimed(repo)
    repo.mark_complete(done.id, "w1", None, {})
    repo.cancel(ids[0])

    assert repo.counts_by_status() == {"Queued": 3, "In Progress": 1, "Complete": 1, "Cancelled": 1}
    assert repo.queued_by_priority() == {5: 1, 2: 1, 0: 1}
    assert list(repo.queued_by_priority()) == [5, 2, 0]

    listed = repo.list_tasks()
    assert [task.id for task in listed] == list(reversed(ids)), "newest first"
    assert [task.id for task in repo.list_tasks(limit=2)] == list(reversed(ids))[:2]
    assert [task.id for task in repo.list_tasks(status="Cancelled")] == [ids[0]]
    assert {task.id for task in repo.list_tasks(status="Queued")} == {ids[1], ids[2], ids[5]}


def test_counts_on_an_empty_table(repo: SqlTaskRepository) -> None:
    assert repo.counts_by_status() == {}
    assert repo.queued_by_priority() == {}
    assert repo.list_tasks() == []


# ---- workers table ----------------------------------------------------------------------------------


def test_workers_register_and_update(repo: SqlTaskRepository) -> None:
    repo.register_worker("gpu-1", "NVIDIA H100")
    repo.register_worker("gpu-2", None)
    workers = {row["id"]: row for row in repo.list_workers()}
    assert set(workers) == {"gpu-1", "gpu-2"}
    first_row = workers["gpu-1"]
    assert first_row["host"] == socket.gethostname()
    assert first_row["pid"] == os.getpid()
    assert first_row["gpu"] == "NVIDIA H100"
    assert first_row["status"] == "idle"
    assert first_row["last_heartbeat"] is not None and first_row["started_at"] is not None

    repo.update_worker("gpu-1", "busy", "t2v_1.3B")
    updated = {row["id"]: row for row in repo.list_workers()}["gpu-1"]
    assert (updated["status"], updated["current_model"]) == ("busy", "t2v_1.3B")
    assert updated["last_heartbeat"] >= first_row["last_heartbeat"]

    repo.register_worker("gpu-1", "NVIDIA H100")  # a restart with the same id replaces the row
    rows = [row for row in repo.list_workers() if row["id"] == "gpu-1"]
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["current_model"]) == ("idle", None)

    repo.update_worker("never-registered", "busy", None)  # no row, no error
    assert len(repo.list_workers()) == 2
