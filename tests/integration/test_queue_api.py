"""HeadlessTaskQueue, the Python API: submit, run in a background thread, wait, cancel, status.

Real database (SQLite file and Postgres), real tiny diffusers models, real MP4s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from headless_model_management import GenerationTask, HeadlessTaskQueue
from wan_engine.video_io import read_video_info
from worker.config import WorkerSettings
from worker.task import TaskStatus


@pytest.fixture
def queue(db_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[HeadlessTaskQueue]:
    settings = WorkerSettings(
        db_url=db_url,
        models_dir=tiny_models_dir,
        outputs_dir=tmp_path / "outputs",
        worker_id="api-worker",
        poll_interval_s=0.05,
        heartbeat_interval_s=0.2,
        lease_s=5,
    )
    built = HeadlessTaskQueue(settings=settings)
    yield built
    built.close()


def test_submit_run_wait_and_queue_status(queue: HeadlessTaskQueue) -> None:
    first = queue.submit_task(GenerationTask(model="tiny_t2v", prompt="a cat", parameters={"seed": 3}))
    second = queue.submit_task(
        GenerationTask(model="tiny_t2v_2_2", prompt="a dog", priority=2, parameters={"video_length": 5})
    )
    status = queue.get_queue_status()
    assert status["pending"] == 2 and status["pending_by_priority"] == {2: 1, 0: 1}

    queue.start()
    done_second = queue.wait_for_completion(second, timeout=120)
    done_first = queue.wait_for_completion(first, timeout=120)
    assert done_first.status is TaskStatus.COMPLETE and done_second.status is TaskStatus.COMPLETE
    assert done_first.result_data is not None and done_first.result_data["seed"] == 3
    assert read_video_info(Path(done_second.output_location or "")).frames == 5

    status = queue.get_queue_status()
    assert status["completed"] == 2 and status["pending"] == 0
    assert status["model_loads"] == 2 and status["model_switches"] == 1
    assert status["current_model"] == "tiny_t2v" and status["worker_id"] == "api-worker"
    assert status["memory"]["rss_gb"] > 0
    assert queue.stop(timeout=30)


def test_submit_validates_before_queueing(queue: HeadlessTaskQueue) -> None:
    with pytest.raises(ValueError, match="no_such_model"):
        queue.submit_task(GenerationTask(model="no_such_model", prompt="x"))
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        queue.submit_task(GenerationTask(model="tiny_t2v", prompt="x", parameters={"colour": "red"}))
    assert queue.get_queue_status()["pending"] == 0


def test_sql_and_api_users_share_one_queue(queue: HeadlessTaskQueue) -> None:
    with queue.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tasks (id, task_type, params, priority) VALUES ('from-sql', 't2v', :p, 1)"),
            {"p": json.dumps({"model": "tiny_t2v", "prompt": "sql"})},
        )
    api_id = queue.submit_task(GenerationTask(model="tiny_t2v", prompt="api"))
    queue.start()
    sql_done = queue.wait_for_completion("from-sql", timeout=120)
    api_done = queue.wait_for_completion(api_id, timeout=120)
    assert sql_done.status is TaskStatus.COMPLETE and api_done.status is TaskStatus.COMPLETE
    assert Path(sql_done.output_location or "").name == "from-sql.mp4"


def test_cancel_and_timeout(queue: HeadlessTaskQueue) -> None:
    task_id = queue.submit_task(GenerationTask(model="tiny_t2v", prompt="never", dependant_on=None))
    with pytest.raises(TimeoutError, match=task_id):
        queue.wait_for_completion(task_id, timeout=0.3)
    assert queue.cancel(task_id)
    assert not queue.cancel(task_id)
    assert queue.wait_for_completion(task_id, timeout=5).status is TaskStatus.CANCELLED
    with pytest.raises(KeyError):
        queue.wait_for_completion("missing", timeout=1)


def test_stop_twice_requeues_a_running_task(queue: HeadlessTaskQueue) -> None:
    task_id = queue.submit_task(
        GenerationTask(model="tiny_t2v", prompt="long", parameters={"num_inference_steps": 300, "resolution": "128x96"})
    )
    queue.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = queue.get_task_status(task_id)
        if info is not None and (info.progress or {}).get("stage") == "denoising":
            break
        time.sleep(0.05)
    assert queue.stop(timeout=0.5)
    info = queue.get_task_status(task_id)
    assert info is not None and info.status is TaskStatus.QUEUED and info.attempts == 0
