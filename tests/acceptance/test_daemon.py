"""Acceptance: the real `wan-worker run` process on a real database and tiny real Wan models.

Rows are inserted the way other programs do (raw SQL, the sqlite3 / psql command-line clients for the
docs/DESIGN.md insert), signals are real, and the table is read back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.support.processes import Stack, output_files
from wan_engine.video_io import read_video_info

pytestmark = pytest.mark.acceptance

DESIGN_INSERT = """INSERT INTO tasks (task_type, params) VALUES ('t2v', '{"model": "t2v_1.3B", "prompt": "a cat"}');"""
# Enough tiny denoising work (~5-10 s on a quiet CPU) that a task is still running when the test acts on it
# (300 steps: UniPC at flow_shift 3 takes at most 333 distinct timesteps).
LONG_STEPS = 300
SLOW = {"num_inference_steps": LONG_STEPS, "resolution": "128x96", "video_length": 33}


def run_cli_sql(stack: Stack, sql: str) -> None:
    """Run SQL with the database's own command-line client, as a user at a terminal would."""
    if stack.db_url.startswith("sqlite"):
        path = stack.db_url.removeprefix("sqlite:///")
        if shutil.which("sqlite3"):
            subprocess.run(["sqlite3", path, sql], check=True, timeout=30)
        else:  # same library, no CLI installed
            with sqlite3.connect(path) as conn:
                conn.execute(sql)
        return
    url = urlparse(stack.db_url.replace("+psycopg", ""))
    schema = parse_qs(url.query)["options"][0].split("=", 1)[1]
    env = {**os.environ, "PGOPTIONS": f"-csearch_path={schema}"}
    dsn = f"postgresql://{url.netloc}{url.path}"
    subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True, env=env, timeout=30)


def tiny_preset_override(stack: Stack, key: str, **settings: object) -> None:
    """Point a real preset key at the tiny weights (property-by-property override in --presets-dir)."""
    body = {
        "model": {"URLs": "tiny-wan2.1-t2v"},
        "resolution": "64x48",
        "video_length": 9,
        "num_inference_steps": 3,
        **settings,
    }
    (stack.presets_dir / f"{key}.json").write_text(json.dumps(body))


def tiny(prompt: str = "a cat", model: str = "tiny_t2v", **params: object) -> dict[str, object]:
    return {"model": model, "prompt": prompt, **params}


def wait_denoising(stack: Stack, task_id: str, min_step: int = 1) -> None:
    def denoising() -> bool:
        progress = stack.row(task_id)["progress"] or {}
        return progress.get("stage") == "denoising" and progress.get("step", 0) >= min_step

    stack.wait_for(denoising, 120, f"task {task_id} denoising")


def test_design_raw_insert_completes_with_playable_mp4(stack: Stack) -> None:
    tiny_preset_override(stack, "t2v_1.3B")
    stack.start_worker()
    run_cli_sql(stack, DESIGN_INSERT)
    with stack.engine.begin() as conn:
        task_id = conn.exec_driver_sql("SELECT id FROM tasks").scalar_one()
    row = stack.wait_status(task_id, ("Complete", "Failed"))
    assert row["status"] == "Complete", row["error_message"]
    assert row["attempts"] == 1
    output = Path(row["output_location"])
    assert output.suffix == ".mp4" and output.parent == stack.outputs_dir.resolve()
    info = read_video_info(output)
    assert (info.frames, info.width, info.height) == (9, 64, 48)
    assert row["result_data"]["frames"] == 9 and row["result_data"]["seed"] >= 0
    assert row["generation_started_at"] and row["generation_processed_at"]
    assert output_files(stack.outputs_dir) == [output]


def test_missing_weights_fail_with_a_report_and_the_worker_keeps_serving(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    stack.start_worker()
    missing = stack.insert("t2v", tiny(model="t2v_1.3B"))
    good = stack.insert("t2v", tiny())
    row = stack.wait_status(missing, ("Failed", "Complete"))
    assert row["status"] == "Failed"
    assert "t2v_1.3B" in row["error_message"] and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in row["error_message"]
    assert row["attempts"] == 1, "a missing model is permanent: no retries"
    assert stack.wait_status(good, ("Complete", "Failed"))["status"] == "Complete"


def test_priority_order_and_model_switches(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    low = stack.insert("t2v", tiny("low"), priority=0)
    high_1 = stack.insert("t2v", tiny("high one"), priority=5)
    high_2 = stack.insert("t2v", tiny("high two"), priority=5)
    # Equal priority, alternating models, all queued before the worker starts.
    alternating = [
        stack.insert("t2v", tiny(f"alt {i}", model=model), priority=-1)
        for i, model in enumerate(["tiny_t2v_2_2", "tiny_t2v", "tiny_t2v_2_2", "tiny_t2v"])
    ]
    stack.start_worker()
    rows = [stack.wait_status(task_id, ("Complete", "Failed")) for task_id in [low, high_1, high_2, *alternating]]
    assert all(row["status"] == "Complete" for row in rows), [row["error_message"] for row in rows]
    started = sorted(rows, key=lambda row: row["generation_started_at"])
    assert [row["id"] for row in started[:3]] == [high_1, high_2, low]
    # The priority-0 tasks left tiny_t2v resident: its priority -1 twins run first, then tiny_t2v_2_2 once.
    alt_rows = started[3:]
    loads = [row["result_data"]["model_loaded"] for row in alt_rows]
    models = [json.loads(row["params"])["model"] for row in alt_rows]
    assert models == ["tiny_t2v", "tiny_t2v", "tiny_t2v_2_2", "tiny_t2v_2_2"]
    assert loads == [False, False, True, False], "M,N,M,N must cost one switch, not four loads"


def test_alternating_models_queued_before_start_cost_two_loads(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    ids = [stack.insert("t2v", tiny(f"alt {i}", model=m)) for i, m in enumerate(["tiny_t2v", "tiny_t2v_2_2"] * 2)]
    stack.start_worker()
    rows = [stack.wait_status(task_id, ("Complete", "Failed")) for task_id in ids]
    assert all(row["status"] == "Complete" for row in rows)
    assert sum(row["result_data"]["model_loaded"] for row in rows) == 2
    started = [row["id"] for row in sorted(rows, key=lambda row: row["generation_started_at"])]
    assert started == [ids[0], ids[2], ids[1], ids[3]]


def test_dependencies_wait_for_and_fail_with_their_prerequisite(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    first = stack.insert("t2v", tiny("first"))
    second = stack.insert("t2v", tiny("second"), dependant_on=first, priority=9)
    doomed = stack.insert("t2v", tiny("bad", video_length=-3))
    orphan = stack.insert("t2v", tiny("orphan"), dependant_on=doomed, priority=9)
    cancelled = stack.insert("t2v", tiny("cancelled"))
    stack.execute("UPDATE tasks SET status='Cancelled' WHERE id=:id", id=cancelled)
    after_cancel = stack.insert("t2v", tiny("after cancel"), dependant_on=cancelled)
    stack.start_worker()
    first_row = stack.wait_status(first, ("Complete", "Failed"))
    second_row = stack.wait_status(second, ("Complete", "Failed"))
    assert second_row["status"] == "Complete"
    assert second_row["generation_started_at"] >= first_row["generation_processed_at"]
    for task_id, prerequisite, status in [(orphan, doomed, "Failed"), (after_cancel, cancelled, "Cancelled")]:
        row = stack.wait_status(task_id, ("Complete", "Failed"), timeout=60)
        assert row["status"] == "Failed"
        assert prerequisite in row["error_message"] and status in row["error_message"]


@pytest.mark.parametrize(
    ("params", "task_type", "expected"),
    [
        ('{"model": "tiny_t2v", "prompt": ', "t2v", "not valid JSON"),
        ('["tiny_t2v", "a cat"]', "t2v", "must be a JSON object"),
        (json.dumps(tiny(colour="red")), "t2v", "unknown key 'colour'"),
        (json.dumps(tiny(video_length="long")), "t2v", "video_length = 'long'"),
        (json.dumps(tiny(model="no_such_model")), "t2v", "no_such_model"),
        (json.dumps(tiny()), "teleport", "unknown task_type 'teleport'"),
        (json.dumps(tiny(resolution="100x100")), "t2v", "resolution = '100x100'"),
    ],
    ids=[
        "malformed-json",
        "not-object",
        "unknown-key",
        "wrong-type",
        "unknown-model",
        "unknown-type",
        "bad-res",
    ],
)
def test_bad_params_fail_with_a_message_naming_the_value(
    sqlite_stack: Stack, params: str, task_type: str, expected: str
) -> None:
    stack = sqlite_stack
    stack.start_worker()
    bad = stack.insert(task_type, params)
    good = stack.insert("t2v", tiny())
    row = stack.wait_status(bad, ("Failed", "Complete"))
    assert row["status"] == "Failed" and expected in row["error_message"], row["error_message"]
    assert row["attempts"] == 1
    assert stack.wait_status(good, ("Complete", "Failed"))["status"] == "Complete"


def test_kill_9_mid_denoising_is_recovered_after_the_lease(stack: Stack) -> None:
    task_id = stack.insert("t2v", tiny(**SLOW))
    first = stack.start_worker(name="doomed", lease_s=4)
    wait_denoising(stack, task_id)
    first.kill9()
    assert stack.row(task_id)["status"] == "In Progress"
    stack.start_worker(name="rescuer", lease_s=4)
    row = stack.wait_status(task_id, ("Complete", "Failed"), timeout=180)
    assert row["status"] == "Complete", row["error_message"]
    assert row["attempts"] == 2 and row["worker_id"] == "rescuer"
    assert output_files(stack.outputs_dir) == [Path(row["output_location"])], "exactly one output, no partials"


def test_user_cancel_stops_a_running_task_and_the_next_one_runs(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    victim = stack.insert("t2v", tiny("victim", **SLOW), priority=1)
    following = stack.insert("t2v", tiny("following"))
    worker = stack.start_worker()
    wait_denoising(stack, victim, min_step=2)
    cancelled_at = time.monotonic()
    stack.execute("UPDATE tasks SET status='Cancelled' WHERE id=:id", id=victim)
    row = stack.wait_status(following, ("Complete", "Failed"))
    assert row["status"] == "Complete"
    victim_row = stack.row(victim)
    assert victim_row["status"] == "Cancelled" and victim_row["output_location"] is None
    assert output_files(stack.outputs_dir) == [Path(row["output_location"])]
    log = worker.log_text()
    assert "task cancelled; stopped at stage denoising" in log
    stopped_step = int(log.split("task cancelled; stopped at stage denoising step ")[1].split("/")[0])
    assert stopped_step < LONG_STEPS
    assert time.monotonic() - cancelled_at < 60


def test_first_sigterm_finishes_the_task_and_exits_zero(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    task_id = stack.insert("t2v", tiny(**SLOW))
    waiting = stack.insert("t2v", tiny("not started"))
    worker = stack.start_worker()
    wait_denoising(stack, task_id)
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(600) == 0
    assert stack.row(task_id)["status"] == "Complete"
    assert stack.row(waiting)["status"] == "Queued", "no new task is claimed after the stop signal"


def test_second_sigterm_requeues_the_task_and_exits_zero(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    task_id = stack.insert("t2v", tiny(**SLOW))
    worker = stack.start_worker()
    wait_denoising(stack, task_id)
    worker.signal(signal.SIGTERM)
    time.sleep(0.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0
    row = stack.row(task_id)
    assert row["status"] == "Queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert output_files(stack.outputs_dir) == []
