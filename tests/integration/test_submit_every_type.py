"""Submitting every task type (issue 17): travel from Python and the CLI, mode flags, a dead worker thread.

Real database (SQLite file; Postgres through `db_url` where it costs little), real tiny diffusers models, the real
`wan-worker` process for the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

import travel_between_images as travel
from headless_model_management import GenerationTask, HeadlessTaskQueue
from tests.support.processes import wan_worker_command
from wan_engine.video_io import read_video_info
from worker.config import WorkerSettings
from worker.task import TaskStatus
from worker.tasks.params import parse_params_text
from worker.tasks.travel import DEFAULT_TRAVEL_MODEL, TravelOrchestratorParams
from worker.tasks.validation import validate_task

TRAVEL_SETTINGS = {"num_inference_steps": 3}


def key_images(directory: Path, count: int = 2) -> list[str]:
    """Solid-colour key images (80x60: the worker fits them to 64x48)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, colour in enumerate([(220, 40, 40), (40, 200, 60), (30, 60, 220)][:count]):
        path = directory / f"key{index}.png"
        Image.fromarray(np.full((60, 80, 3), colour, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def make_queue(db_url: str, tmp_path: Path, models_dir: Path) -> HeadlessTaskQueue:
    settings = WorkerSettings(
        db_url=db_url,
        models_dir=models_dir,
        outputs_dir=tmp_path / "outputs",
        input_roots=(tmp_path,),
        worker_id="submit-worker",
        poll_interval_s=0.05,
        heartbeat_interval_s=0.2,
        lease_s=5,
    )
    return HeadlessTaskQueue(settings=settings)


@pytest.fixture
def queue(db_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[HeadlessTaskQueue]:
    with make_queue(db_url, tmp_path, tiny_models_dir) as built:
        yield built


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wan_worker_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ}
    )


def stored(queue: HeadlessTaskQueue, task_id: str) -> tuple[str, dict[str, object]]:
    task = queue.repository.get(task_id)
    assert task is not None
    return task.task_type, parse_params_text(task.params_text)


# ---- Python: submit_task / submit_travel ----------------------------------------------------------------


def test_submit_task_and_submit_travel_queue_rows_the_worker_accepts(queue: HeadlessTaskQueue, tmp_path: Path) -> None:
    images = key_images(tmp_path / "inputs", 3)
    by_task = queue.submit_task(
        GenerationTask(
            task_type="travel_orchestrator",
            model="tiny_vace",
            prompt="",
            parameters={
                "input_images": images,
                "base_prompts": ["red to green", "green to blue"],
                "segment_frames": 13,
            },
        )
    )
    by_helper = queue.submit_travel(images[:2], "red to green", model="tiny_vace", segment_frames=13, frame_overlap=4)
    default_model = queue.submit_travel(images[:2], ["one"], resolution="832x480", seed_base=7, fps=8)
    for task_id in (by_task, by_helper, default_model):
        task_type, params = stored(queue, task_id)
        assert task_type == "travel_orchestrator"
        # The worker's own validation of the stored row (schema, VACE model, resolution, plan).
        assert isinstance(validate_task(task_type, params, queue.presets), TravelOrchestratorParams)
    assert stored(queue, by_helper)[1]["base_prompts"] == "red to green"
    assert stored(queue, default_model)[1] == {
        "model": DEFAULT_TRAVEL_MODEL,
        "input_images": images[:2],
        "base_prompts": ["one"],
        "segment_frames": 81,
        "frame_overlap": 8,
        "seed_base": 7,
        "fps": 8,
        "resolution": "832x480",
    }
    # A prompt standing for base_prompts when the parameters have none.
    by_prompt = queue.submit_task(
        GenerationTask(
            task_type="travel_orchestrator", model="tiny_vace", prompt="x", parameters={"input_images": images}
        )
    )
    assert stored(queue, by_prompt)[1]["base_prompts"] == "x"
    assert queue.get_queue_status()["pending"] == 4


def test_travel_submissions_are_refused_with_the_travel_schemas_message(
    queue: HeadlessTaskQueue, tmp_path: Path
) -> None:
    images = key_images(tmp_path / "inputs")
    with pytest.raises(ValueError, match=r"unknown key 'colour'.*allowed keys: model, resolution.*input_images") as bad:
        queue.submit_travel(images, "x", model="tiny_vace", colour="red")
    assert "video_length" not in str(bad.value)  # the travel keys, not the generation keys
    with pytest.raises(ValueError, match="travel needs a VACE model; 'tiny_t2v'"):
        queue.submit_travel(images, "x", model="tiny_t2v")
    with pytest.raises(ValueError, match="input_images"):
        queue.submit_travel(images[:1], "x", model="tiny_vace")
    with pytest.raises(ValueError, match=r"base_prompts|prompt"):
        queue.submit_travel(images, ["a", "b", "c"], model="tiny_vace")  # 3 prompts for 1 segment
    for internal in ("travel_segment", "travel_stitch"):
        with pytest.raises(ValueError, match="created by a travel_orchestrator"):
            queue.submit_task(GenerationTask(task_type=internal, model="tiny_vace", prompt="x"))
    assert queue.get_queue_status()["pending"] == 0


def test_a_tiny_travel_submitted_from_python_runs_to_completion(
    sqlite_url: str, tmp_path: Path, tiny_models_dir: Path
) -> None:
    images = key_images(tmp_path / "inputs", 3)
    with make_queue(sqlite_url, tmp_path, tiny_models_dir) as queue:
        task_id = queue.submit_travel(
            images,
            ["red to green", "green to blue"],
            model="tiny_vace",
            segment_frames=13,
            frame_overlap=4,
            seed_base=5,
            **TRAVEL_SETTINGS,
        )
        queue.start()
        info = queue.wait_for_completion(task_id, timeout=300)
        assert info.status is TaskStatus.COMPLETE, info.error_message
    plan = travel.plan_travel(3, 13, 4, ["a", "b"], 5)
    video = read_video_info(Path(info.output_location or ""))
    assert (video.frames, video.width, video.height) == (plan.total_frames, 64, 48)


# ---- the worker thread: death, context manager --------------------------------------------------------------


def test_wait_for_completion_raises_when_the_worker_thread_died(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty_models = tmp_path / "no-models"
    empty_models.mkdir()
    with make_queue(sqlite_url, tmp_path, empty_models) as queue:
        task_id = queue.submit_task(GenerationTask(model="tiny_t2v", prompt="a cat"))
        started = time.monotonic()
        queue.start(preload_model="tiny_t2v")  # no weights here: the preload fails
        with pytest.raises(RuntimeError, match="worker thread died") as raised:
            queue.wait_for_completion(task_id, timeout=600)
        assert time.monotonic() - started < 60  # at once, not after the timeout
        assert raised.value.__cause__ is queue.worker_error and queue.worker_error is not None
        assert "tiny_t2v" in str(raised.value)
        assert queue.get_task_status(task_id).status is TaskStatus.QUEUED  # type: ignore[union-attr]
    assert [r for r in caplog.records if "worker thread stopped" in r.getMessage()]


def test_the_queue_is_a_context_manager_that_closes(sqlite_url: str, tmp_path: Path, tiny_models_dir: Path) -> None:
    with make_queue(sqlite_url, tmp_path, tiny_models_dir) as queue:
        queue.start()
        thread = queue._thread
        assert thread is not None and thread.is_alive()
    assert not thread.is_alive() and queue.worker_error is None
    assert queue.engine.pool.checkedout() == 0


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli_submits_travel_and_mode_flags(db_url: str, tmp_path: Path, tiny_models_dir: Path) -> None:
    images = key_images(tmp_path / "inputs")
    travel_run = cli(
        "submit", "--db", db_url, "--task-type", "travel_orchestrator", "--image", images[0], "--image", images[1],
        "--prompt", "red to green", "--segment-frames", "13", "--frame-overlap", "4", "--resolution", "64x48",
        "--seed", "3", "--model", "tiny_vace", "--params", '{"num_inference_steps": 3, "seed_base": 9}',
        cwd=tmp_path,
    )  # fmt: skip
    assert travel_run.returncode == 0, travel_run.stderr
    default_travel = cli(
        "submit", "--db", db_url, "--task-type", "travel_orchestrator", "--image", images[0], "--image", images[1],
        "--prompt", "a", "--prompt", "b", "--segment-frames", "13,17", cwd=tmp_path,
    )  # fmt: skip
    # Two prompts for one segment: refused by the travel plan, one line, exit 2.
    assert default_travel.returncode == 2 and default_travel.stderr.strip().splitlines()[-1].startswith("error:")
    vace = cli(
        "submit", "--db", db_url, "--model", "tiny_vace", "--prompt", "x", "--video-guide", "guide.mp4",
        "--video-mask", "mask.mp4", "--image-ref", "r1.png", "--image-ref", "r2.png", "--seed", "4", cwd=tmp_path,
    )  # fmt: skip
    i2v = cli(
        "submit", "--db", db_url, "--model", "tiny_i2v_2_2", "--prompt", "x", "--image-start", "s.png",
        "--image-end", "e.png", "--params", '{"image_start": "old.png"}', cwd=tmp_path,
    )  # fmt: skip
    assert vace.returncode == 0 and i2v.returncode == 0, vace.stderr + i2v.stderr

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = {
            row.id: (row.task_type, json.loads(row.params))
            for row in conn.execute(sa.text("SELECT id, task_type, params FROM tasks"))
        }
    engine.dispose()
    assert len(rows) == 3
    assert rows[travel_run.stdout.strip()] == (
        "travel_orchestrator",
        {
            "model": "tiny_vace",
            "num_inference_steps": 3,
            "seed_base": 3,  # the flag overrides --params
            "input_images": images,
            "base_prompts": "red to green",
            "segment_frames": 13,
            "frame_overlap": 4,
            "resolution": "64x48",
        },
    )
    assert rows[vace.stdout.strip()][1] == {
        "model": "tiny_vace",
        "prompt": "x",
        "video_guide": "guide.mp4",
        "video_mask": "mask.mp4",
        "image_refs": ["r1.png", "r2.png"],
        "seed": 4,
    }
    assert rows[i2v.stdout.strip()][1]["image_start"] == "s.png" and rows[i2v.stdout.strip()][1]["image_end"] == "e.png"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "tiny_t2v", "--prompt", "x", "--video-guide", "g.mp4"], "--video-guide is not for t2v tasks"),
        (["--model", "tiny_i2v", "--prompt", "x", "--video-mask", "m.mp4"], "i2v takes --image-start, --image-end"),
        (["--model", "tiny_t2v", "--prompt", "x", "--image", "a.png"], "--image is only for --task-type travel"),
        (["--model", "tiny_t2v", "--prompt", "a", "--prompt", "b"], "--prompt given 2 times"),
        (["--task-type", "travel_orchestrator", "--image", "a.png", "--prompt", "x"], "a travel needs 2 or more"),
        (
            ["--task-type", "travel_orchestrator", "--image", "a", "--image", "b", "--prompt", "x", "--image-end", "e"],
            "--image-end is not for travel_orchestrator tasks",
        ),
        (["--task-type", "travel_segment", "--prompt", "x"], "created by a travel_orchestrator"),
        (["--prompt", "x"], "--model is required"),
    ],
)
def test_cli_refuses_a_bad_combination_in_one_line(
    sqlite_url: str, tmp_path: Path, args: list[str], expected: str
) -> None:
    result = cli("submit", "--db", sqlite_url, *args, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr
