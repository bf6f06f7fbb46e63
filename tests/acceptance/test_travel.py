"""Acceptance: travel between images through the real worker process on tiny VACE models.

One inserted `travel_orchestrator` row becomes segment rows and a stitch row; the stitched MP4 has the
planned length; a kill -9 during segment 2 does not regenerate segment 1; cancelling the orchestrator
cancels its open children.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import travel_between_images as travel
from tests.support.processes import Stack
from wan_engine.video_io import read_video_info

pytestmark = pytest.mark.acceptance

COLOURS = [(220, 40, 40), (40, 200, 60), (30, 60, 220)]


def key_images(directory: Path, count: int = 3) -> list[str]:
    """Solid-colour key images with a gradient, at a size the worker must fit (80x60 -> 64x48)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index, colour in enumerate(COLOURS[:count]):
        ramp = np.linspace(0.6, 1.0, 80)[None, :, None]
        pixels = (np.array(colour)[None, None, :] * ramp * np.ones((60, 1, 1))).astype(np.uint8)
        name = f"key{index}.png"
        Image.fromarray(pixels).save(directory / name)
        names.append(name)
    return names


def travel_params(images: list[str], **overrides: object) -> dict[str, object]:
    return {
        "model": "tiny_vace",
        "input_images": images,
        "base_prompts": ["red to green", "green to blue"],
        "segment_frames": [13, 13],
        "frame_overlap": 4,
        "seed_base": 5,
        "num_inference_steps": 3,
        **overrides,
    }


def children(stack: Stack, parent: str) -> list[dict[str, object]]:
    with stack.engine.begin() as conn:
        ids = [row[0] for row in conn.exec_driver_sql(f"SELECT id FROM tasks WHERE parent_task_id = '{parent}'")]
    return [stack.row(child) for child in sorted(ids)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_orchestrator_row_becomes_segments_and_a_stitched_video(stack: Stack) -> None:
    images = key_images(stack.root / "inputs")
    parent = stack.insert("travel_orchestrator", travel_params(images))
    stack.start_worker("--input-roots", str(stack.root / "inputs"))
    row = stack.wait_status(parent, ("Complete", "Failed"), timeout=240)
    assert row["status"] == "Complete", row["error_message"]

    rows = children(stack, parent)
    assert [r["task_type"] for r in rows] == ["travel_segment", "travel_segment", "travel_stitch"]
    assert all(r["status"] == "Complete" for r in rows)
    plan = travel.plan_travel(3, [13, 13], 4, ["a", "b"], 5)
    info = read_video_info(Path(row["output_location"]))
    assert (info.frames, info.width, info.height) == (plan.total_frames, 64, 48)
    assert info.frames == sum(s.frames for s in plan.segments) - sum(plan.overlaps)
    segment_seeds = [r["result_data"]["seed"] for r in rows[:2]]
    assert segment_seeds == [s.seed for s in plan.segments] and len(set(segment_seeds)) == 2
    assert [r["result_data"]["frames"] for r in rows[:2]] == [s.frames for s in plan.segments]
    assert row["result_data"]["frames"] == plan.total_frames
    # The daemon stitched on its output finisher thread (the stitch needs no GPU: the loop went on meanwhile).
    stitch = rows[2]["result_data"]
    assert stitch["write_overlapped"] is True and stitch["write_queued_s"] >= 0
    assert stitch["frames"] == plan.total_frames and stitch["stitch_seconds"] > 0


def test_kill_9_during_segment_2_does_not_regenerate_segment_1(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    images = key_images(stack.root / "inputs")
    roots = ("--input-roots", str(stack.root / "inputs"))
    parent = stack.insert("travel_orchestrator", travel_params(images, num_inference_steps=300))
    first = stack.start_worker(*roots, name="doomed", lease_s=4)
    segment_2 = f"{parent}-seg001"
    segment_1 = f"{parent}-seg000"

    def segment_2_denoising() -> bool:
        with stack.engine.begin() as conn:
            exists = conn.exec_driver_sql(f"SELECT count(*) FROM tasks WHERE id = '{segment_2}'").scalar()
        progress = (stack.row(segment_2)["progress"] or {}) if exists else {}
        return progress.get("stage") == "denoising" and progress.get("step", 0) >= 1

    stack.wait_for(segment_2_denoising, 240, "segment 2 denoising")
    parent_progress = stack.row(parent)["progress"]
    assert parent_progress["stage"].startswith("segment 2/2") and 50 <= parent_progress["percent"] < 100
    segment_1_row = stack.row(segment_1)
    segment_1_file = Path(segment_1_row["output_location"])
    digest = sha256(segment_1_file)
    first.kill9()

    stack.start_worker(*roots, name="rescuer", lease_s=4)
    row = stack.wait_status(parent, ("Complete", "Failed"), timeout=300)
    assert row["status"] == "Complete", row["error_message"]
    assert sha256(segment_1_file) == digest
    after = stack.row(segment_1)
    assert after["attempts"] == 1 and after["worker_id"] == "doomed"
    assert after["generation_processed_at"] == segment_1_row["generation_processed_at"]
    assert stack.row(segment_2)["attempts"] == 2
    assert len(children(stack, parent)) == 3


def test_cancelling_the_orchestrator_cancels_its_open_children(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    images = key_images(stack.root / "inputs")
    parent = stack.insert("travel_orchestrator", travel_params(images, num_inference_steps=300, resolution="128x96"))
    stack.start_worker("--input-roots", str(stack.root / "inputs"))
    first_segment = f"{parent}-seg000"
    stack.wait_for(
        lambda: len(children(stack, parent)) == 3 and (stack.row(first_segment)["progress"] or {}).get("step", 0) >= 1,
        240,
        "first segment running",
    )
    stack.execute("UPDATE tasks SET status = 'Cancelled' WHERE id = :id", id=parent)
    stack.wait_for(lambda: all(r["status"] == "Cancelled" for r in children(stack, parent)), 60, "children cancelled")
    assert all(f"parent task {parent} was cancelled" in str(r["error_message"]) for r in children(stack, parent))
    assert not list((stack.outputs_dir).glob(f"{parent}*"))


def test_a_failing_segment_fails_the_travel_naming_it(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    images = key_images(stack.root / "inputs")
    (stack.root / "inputs" / images[2]).write_bytes(b"not an image")
    parent = stack.insert("travel_orchestrator", travel_params(images))
    stack.start_worker("--input-roots", str(stack.root / "inputs"))
    row = stack.wait_status(parent, ("Complete", "Failed"), timeout=240)
    assert row["status"] == "Failed"
    assert f"{parent}-seg001" in row["error_message"] and "not a readable image" in row["error_message"]


def test_bad_travel_params_fail_at_once(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    images = key_images(stack.root / "inputs")
    stack.start_worker("--input-roots", str(stack.root / "inputs"))
    one_image = stack.insert("travel_orchestrator", travel_params(images[:1]))
    outside = stack.insert("travel_orchestrator", travel_params(["../../etc/passwd", images[1]]))
    prompts = stack.insert("travel_orchestrator", travel_params(images, base_prompts=["a", "b", "c"]))
    for task_id, expected in [
        (one_image, "input_images"),
        (outside, "../../etc/passwd"),
        (prompts, "base_prompts"),
    ]:
        row = stack.wait_status(task_id, ("Failed", "Complete"))
        assert row["status"] == "Failed" and expected in row["error_message"], row["error_message"]
        assert children(stack, task_id) == []
    assert json.loads(stack.row(prompts)["params"])["base_prompts"] == ["a", "b", "c"]
