"""Acceptance: VACE, image-to-video / first-last-frame and two-expert VACE through the real `wan-worker run`.

Rows are inserted with raw SQL whose params point at files under an input root given with
--input-roots; the outputs are read back from disk. A path outside the roots fails with a message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.media import half_mask, noise_image, noise_video
from tests.support.processes import Stack
from wan_engine.video_io import read_video_info

pytestmark = pytest.mark.acceptance

PROMPT = "a windmill at dusk"


def _inputs(root: Path) -> Path:
    folder = root / "inputs"
    (folder / "shots").mkdir(parents=True)
    noise_video(folder / "shots" / "guide.mp4", 5, seed=1)
    half_mask(folder / "mask.png")
    noise_image(folder / "ref.png", 40, 40, seed=2)
    noise_image(folder / "start.png", seed=3)
    noise_image(folder / "end.jpg", seed=4)
    noise_image(root / "secret.png", seed=5)  # beside the input root, not inside it
    return folder


def _complete(stack: Stack, task_id: str, frames: int, width: int = 64, height: int = 48) -> dict:
    row = stack.wait_status(task_id, ("Complete", "Failed"))
    assert row["status"] == "Complete", row["error_message"]
    info = read_video_info(Path(row["output_location"]))
    assert (info.frames, info.width, info.height) == (frames, width, height)
    data = row["result_data"]
    assert (data["frames"], data["resolution"]) == (frames, f"{width}x{height}")
    return data


def test_modes_through_the_daemon(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    inputs = _inputs(stack.root)
    vace = stack.insert(
        "vace",
        {
            "model": "tiny_vace",
            "prompt": PROMPT,
            "video_guide": "shots/guide.mp4",  # relative: looked up inside the input roots
            "video_mask": str(inputs / "mask.png"),
            "image_refs": [str(inputs / "ref.png")],
            "control_scale": 0.8,
            "seed": 1,
        },
    )
    flf2v = stack.insert(
        "flf2v", {"model": "tiny_flf2v", "prompt": PROMPT, "image_start": "start.png", "image_end": "end.jpg"}
    )
    i2v_22 = stack.insert(
        "i2v_22", {"model": "tiny_i2v_2_2", "prompt": PROMPT, "image_start": "start.png", "image_end": "end.jpg"}
    )
    dual_vace = stack.insert(
        "vace_22", {"model": "tiny_vace_2_2", "prompt": PROMPT, "video_guide": "shots/guide.mp4", "video_length": 5}
    )
    outside = stack.insert(
        "i2v", {"model": "tiny_i2v", "prompt": PROMPT, "image_start": str(stack.root / "secret.png")}
    )
    traversal = stack.insert("vace", {"model": "tiny_vace", "prompt": PROMPT, "video_guide": "../secret.png"})
    no_guide = stack.insert("vace", {"model": "tiny_vace", "prompt": PROMPT})
    stack.start_worker("--input-roots", str(inputs))

    data = _complete(stack, vace, 9)
    assert data["mode"] == "vace" and data["inputs"]["control_scale"] == 0.8
    assert data["inputs"]["video_guide"]["resize"] == "resized 80x60 -> 64x48 (cover + center-crop)"
    assert data["inputs"]["video_guide"]["frames"] == "padded 5 -> 9 frames with 4 neutral grey frames"
    assert "video_mask" in data["inputs"] and len(data["inputs"]["image_refs"]) == 1

    data = _complete(stack, flf2v, 9)
    assert data["mode"] == "flf2v" and set(data["inputs"]) == {"image_start", "image_end"}

    data = _complete(stack, i2v_22, 9)
    assert data["mode"] == "flf2v" and set(data["experts_used"]) == {"high", "low"}
    assert data["switch_threshold"] == 900

    data = _complete(stack, dual_vace, 5)
    assert data["mode"] == "vace" and data["experts_used"] == ["high", "high", "high", "low"]
    assert (data["guidance_scale"], data["guidance2_scale"], data["flow_shift"]) == (4.0, 3.0, 12.0)

    for task_id, key in [(outside, "image_start"), (traversal, "video_guide")]:
        row = stack.wait_status(task_id, ("Complete", "Failed"))
        assert row["status"] == "Failed" and row["attempts"] == 1, row
        assert key in row["error_message"] and "not a readable file inside the input roots" in row["error_message"]
        assert str(inputs.resolve()) in row["error_message"]
        assert row["output_location"] is None
    row = stack.wait_status(no_guide, ("Complete", "Failed"))
    assert row["status"] == "Failed" and "missing required key 'video_guide'" in row["error_message"]
