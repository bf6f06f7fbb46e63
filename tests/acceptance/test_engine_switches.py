"""Acceptance: the engine switches of `wan-worker run` (--fp8, --vram-limit-gb) through the real process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.processes import Stack
from wan_engine.video_io import read_video_info

pytestmark = pytest.mark.acceptance


def test_fp8_worker_runs_tasks_with_fp8_blocks_and_refuses_loras(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    worker = stack.start_worker("--fp8", "--vram-limit-gb", "4")  # the cap is a no-op without a GPU
    plain = stack.insert("t2v", {"model": "tiny_t2v", "prompt": "a lighthouse", "seed": 2})
    lora = stack.insert("t2v", {"model": "tiny_t2v", "prompt": "a lighthouse", "lora_names": ["style"]})
    row = stack.wait_status(plain, ("Complete", "Failed"))
    assert row["status"] == "Complete", row["error_message"]
    assert read_video_info(Path(row["output_location"])).frames > 0
    assert row["result_data"]["extra"]["fp8"]["transformer"]["layers"] == 20
    failed = stack.wait_status(lora, ("Complete", "Failed"))
    assert failed["status"] == "Failed" and "WAN_FP8=on" in failed["error_message"]
    assert failed["attempts"] == 1, "a permanent error: no retry"
    worker.stop()


def test_a_bad_vram_limit_is_refused_at_start(sqlite_stack: Stack) -> None:
    worker = sqlite_stack.start_worker("--vram-limit-gb", "-3")
    assert worker.wait_exit(60) != 0
    assert "--vram-limit-gb -3.0: must be a positive number of GiB" in worker.log_text()
