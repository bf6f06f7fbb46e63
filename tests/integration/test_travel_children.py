"""Travel orchestration against the real repository (SQLite + Postgres): child rows, idempotent re-runs,
waiting on the stitch, completion and failure naming the child. Segment generation is not called here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy.engine import Engine

from worker.store.repository import SqlTaskRepository
from worker.task import NewTask, Task, TaskDeferred, TaskOutcome
from worker.tasks.params import InvalidTaskError
from worker.tasks.travel import TravelCoordinator


@pytest.fixture
def setup(engine: Engine, tmp_path: Path) -> tuple[SqlTaskRepository, TravelCoordinator, list[str]]:
    repository = SqlTaskRepository(engine)
    images = []
    for index in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 * index, np.uint8)).save(tmp_path / f"k{index}.png")
        images.append(f"k{index}.png")
    coordinator = TravelCoordinator(
        store=repository,
        outputs_dir=tmp_path / "outputs",
        input_roots=[tmp_path],
        resolution_for=lambda _model, _resolution: (64, 48),
    )
    return repository, coordinator, images


def _claim(repository: SqlTaskRepository, task_id: str) -> Task:
    task = repository.claim_next("w", 30, lambda cands: next((c for c in cands if c.id == task_id), None))
    assert task is not None
    return task


def _get(repository: SqlTaskRepository, task_id: str) -> Task:
    task = repository.get(task_id)
    assert task is not None
    return task


def test_children_are_created_once_and_the_orchestrator_waits_on_the_stitch(
    setup: tuple[SqlTaskRepository, TravelCoordinator, list[str]],
) -> None:
    repository, coordinator, images = setup
    params = {
        "input_images": images,
        "base_prompts": "p",
        "segment_frames": [64, 81],
        "frame_overlap": [9],
        "seed_base": 3,
        "model": "tiny_vace",
    }
    parent = repository.insert(NewTask("travel_orchestrator", params, priority=4))
    task = _claim(repository, parent)
    outcome = coordinator.run_orchestrator(task)
    assert isinstance(outcome, TaskDeferred) and outcome.wait_for == f"{parent}-stitch"
    assert repository.defer(parent, "w", outcome.wait_for, outcome.progress)

    rows = repository.children_of(parent)
    assert [r.id for r in rows] == [f"{parent}-seg000", f"{parent}-seg001", f"{parent}-stitch"]
    assert [r.dependant_on for r in rows] == [None, f"{parent}-seg000", f"{parent}-seg001"]
    assert all(r.priority == 4 and r.parent_task_id == parent for r in rows)
    segment_params = [json.loads(r.params_text) for r in rows[:2]]
    assert [p["frames"] for p in segment_params] == [65, 89]
    assert [p["overlap_in"] for p in segment_params] == [0, 8]
    assert segment_params[0]["start_image"].endswith("k0.png") and segment_params[1]["start_image"] is None
    assert json.loads(rows[2].params_text)["overlaps"] == [8]

    # A second run (a crash before the deferral was recorded) adds nothing.
    again = coordinator.run_orchestrator(_get(repository, parent))
    assert isinstance(again, TaskDeferred)
    assert len(repository.children_of(parent)) == 3
    parent_row = repository.get(parent)
    assert parent_row is not None and parent_row.dependant_on == f"{parent}-stitch" and parent_row.attempts == 0


def test_orchestrator_completes_with_the_stitch_output_and_fails_naming_a_child(
    setup: tuple[SqlTaskRepository, TravelCoordinator, list[str]],
) -> None:
    repository, coordinator, images = setup
    params = {
        "input_images": images,
        "base_prompts": ["a", "b"],
        "segment_frames": 9,
        "frame_overlap": 2,
        "model": "tiny_vace",
    }
    parent = repository.insert(NewTask("travel_orchestrator", params))
    coordinator.run_orchestrator(_claim(repository, parent))
    for child in repository.children_of(parent):
        claimed = _claim(repository, child.id)
        repository.mark_complete(claimed.id, "w", f"/out/{child.id}.mp4", {"seed": 1, "frames": 9})
    outcome = coordinator.run_orchestrator(_get(repository, parent))
    assert isinstance(outcome, TaskOutcome) and outcome.output_location == f"/out/{parent}-stitch.mp4"
    assert [s["id"] for s in outcome.result_data["segments"]] == [f"{parent}-seg000", f"{parent}-seg001"]

    failing = repository.insert(NewTask("travel_orchestrator", params))
    coordinator.run_orchestrator(_claim(repository, failing))
    first = _claim(repository, f"{failing}-seg000")
    repository.mark_failed(first.id, "w", "out of memory on segment 1")
    with pytest.raises(InvalidTaskError, match=f"{failing}-seg000.*out of memory"):
        coordinator.run_orchestrator(_get(repository, failing))


def test_dependency_sweep_names_the_failing_segment_in_the_orchestrator_message(
    setup: tuple[SqlTaskRepository, TravelCoordinator, list[str]],
) -> None:
    repository, coordinator, images = setup
    params = {"input_images": images, "base_prompts": "p", "segment_frames": 9, "frame_overlap": 2, "model": "m"}
    parent = repository.insert(NewTask("travel_orchestrator", params))
    outcome = coordinator.run_orchestrator(_claim(repository, parent))
    assert isinstance(outcome, TaskDeferred)
    repository.defer(parent, "w", outcome.wait_for, outcome.progress)
    first = _claim(repository, f"{parent}-seg000")
    repository.mark_failed(first.id, "w", "segment exploded")
    for _ in range(3):  # seg001, then the stitch, then the orchestrator
        repository.fail_blocked()
    row = repository.get(parent)
    assert row is not None and row.status.value == "Failed"
    assert f"{parent}-seg000" in str(row.error_message) and "segment exploded" in str(row.error_message)


def test_a_stitch_rerun_removes_what_a_killed_attempt_left_half_written(
    setup: tuple[SqlTaskRepository, TravelCoordinator, list[str]], tmp_path: Path
) -> None:
    from wan_engine.video_io import read_video_info, write_video

    repository, coordinator, images = setup
    params = {"input_images": images, "base_prompts": "p", "segment_frames": 9, "frame_overlap": 2, "model": "m"}
    parent = repository.insert(NewTask("travel_orchestrator", params))
    coordinator.run_orchestrator(_claim(repository, parent))
    for index, child in enumerate(c for c in repository.children_of(parent) if c.task_type == "travel_segment"):
        video = write_video(np.full((9, 48, 64, 3), 40 * index, np.uint8), tmp_path / f"seg{index}.mp4", 16)
        repository.mark_complete(_claim(repository, child.id).id, "w", str(video), {"frames": 9})
    outputs = coordinator.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    leftover = outputs / f".{parent}.999999.partial.mp4"  # the temp name of a stitch killed mid-write
    leftover.write_bytes(b"half a video")
    outcome = coordinator.run_stitch(_claim(repository, f"{parent}-stitch"), lambda *_: None)
    assert not leftover.exists()
    assert read_video_info(Path(outcome.output_location)).frames == 16  # 9 + 9 - 2 cross-faded
