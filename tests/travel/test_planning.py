"""Travel planning: 4N+1 frame counts, even/capped overlaps, prompts, seeds, validation messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from travel_between_images import SegmentPlan, TravelPlanError, plan_travel

ROOT = Path(__file__).resolve().parents[2]


def test_issue_example_quantises_frames_and_overlap() -> None:
    plan = plan_travel(3, [64, 81], [9], "a dog runs", seed_base=42)

    first, second = plan.segments
    assert (first.own_frames, second.own_frames) == (65, 81)
    assert plan.overlaps == (8,)
    assert (first.frames, first.overlap_in) == (65, 0)
    # The chained segment regenerates the 8 shared frames on top of its own 81.
    assert (second.frames, second.overlap_in) == (89, 8)
    assert plan.total_frames == 146 == 65 + 89 - 8
    assert (first.start_image_index, first.end_image_index) == (0, 1)
    assert (second.start_image_index, second.end_image_index) == (1, 2)
    assert any("64 -> 65" in note for note in plan.notes)
    assert any("9 -> 8" in note for note in plan.notes)


def test_request_is_realigned_when_overlap_is_not_a_multiple_of_four() -> None:
    plan = plan_travel(3, 81, 6, "p", seed_base=0)

    second = plan.segments[1]
    assert second.frames == 89  # 81 + 6 = 87 -> next 4N+1
    assert (second.frames - 1) % 4 == 0
    assert second.own_frames == 83
    assert plan.total_frames == sum(s.frames for s in plan.segments) - sum(plan.overlaps) == 81 + 83


@pytest.mark.parametrize(
    ("frames", "expected"), [(5, 5), (6, 5), (62, 61), (63, 65), (64, 65), (80, 81), (81, 81), (1001, 1001)]
)
def test_segment_frames_round_to_nearest_4n_plus_1(frames: int, expected: int) -> None:
    assert plan_travel(2, frames, 0, "p", seed_base=0).segments[0].frames == expected


def test_overlap_is_capped_by_the_shorter_neighbour() -> None:
    plan = plan_travel(4, [9, 81, 81], 40, "p", seed_base=0)

    assert plan.overlaps == (8, 40)  # join 0 touches the 9-frame segment: each side keeps >= 1 own frame
    assert all(o % 2 == 0 for o in plan.overlaps)
    assert any("capped" in note for note in plan.notes)
    assert [s.overlap_in for s in plan.segments] == [0, 8, 40]
    for seg in plan.segments:
        assert (seg.frames - 1) % 4 == 0
        assert seg.own_frames == seg.frames - seg.overlap_in
    assert plan.total_frames == sum(s.own_frames for s in plan.segments)


def test_per_segment_lists_prompts_and_seeds() -> None:
    plan = plan_travel(4, [17, 33, 49], [4, 8], ["one", "two", "three"], seed_base=1000, negative_prompts="blurry")

    assert [s.own_frames for s in plan.segments] == [17, 33, 49]
    assert plan.overlaps == (4, 8)
    assert [s.frames for s in plan.segments] == [17, 37, 57]
    assert [s.prompt for s in plan.segments] == ["one", "two", "three"]
    assert {s.negative_prompt for s in plan.segments} == {"blurry"}
    seeds = [s.seed for s in plan.segments]
    assert len(set(seeds)) == 3
    assert seeds[0] == 1000
    assert plan == plan_travel(4, [17, 33, 49], [4, 8], ["one", "two", "three"], 1000, negative_prompts="blurry")
    assert [s.seed for s in plan_travel(4, 17, 4, "x", seed_base=1001).segments] != seeds


def test_single_segment_has_no_joins() -> None:
    plan = plan_travel(2, 81, 8, "p", seed_base=3)

    assert plan.overlaps == ()
    assert plan.total_frames == 81
    assert plan.segments == (
        SegmentPlan(
            index=0,
            start_image_index=0,
            end_image_index=1,
            frames=81,
            own_frames=81,
            overlap_in=0,
            prompt="p",
            negative_prompt="",
            seed=3,
        ),
    )


def test_zero_overlap_chains_nothing() -> None:
    plan = plan_travel(3, 17, 0, "p", seed_base=0)
    assert plan.overlaps == (0,)
    assert [s.frames for s in plan.segments] == [17, 17]
    assert plan.total_frames == 34


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"num_images": 1}, ["num_images", "1", ">= 2"]),
        ({"segment_frames": [17, 17]}, ["segment_frames", "2 entries", "1 or 3"]),
        ({"segment_frames": 4}, ["segment_frames[0]", "4", "[5, 1001]"]),
        ({"segment_frames": 1002}, ["segment_frames[0]", "1002", "[5, 1001]"]),
        ({"segment_frames": 1001}, ["segment_frames[1]", "1009", "at most 1001"]),
        ({"segment_frames": 17.0}, ["segment_frames[0]", "17.0", "integer"]),
        ({"frame_overlap": -2}, ["frame_overlap[0]", "-2", ">= 0"]),
        ({"frame_overlap": [2, 2, 2]}, ["frame_overlap", "3 entries", "1 or 2"]),
        ({"base_prompts": ["a", "b"]}, ["base_prompts", "2 entries", "1 or 3"]),
        ({"base_prompts": []}, ["base_prompts", "0 entries"]),
        ({"base_prompts": ["a", 3, "c"]}, ["base_prompts[1]", "3", "string"]),
        ({"negative_prompts": ["a", "b"]}, ["negative_prompts", "2 entries"]),
        ({"seed_base": -1}, ["seed_base", "-1"]),
        ({"seed_base": True}, ["seed_base", "True"]),
    ],
)
def test_validation_names_parameter_value_and_allowed(kwargs: dict, fragments: list[str]) -> None:
    args = {"num_images": 4, "segment_frames": 17, "frame_overlap": 8, "base_prompts": "p", "seed_base": 0}
    args.update(kwargs)
    with pytest.raises(TravelPlanError) as info:
        plan_travel(**args)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_module_stays_pure() -> None:
    """No torch, no SQL: the worker does generation and persistence."""
    code = (
        "import sys, travel_between_images; "
        "bad = sorted(m for m in ('torch', 'sqlalchemy', 'sqlite3', 'psycopg') if m in sys.modules); "
        "sys.exit(', '.join(bad) or None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
