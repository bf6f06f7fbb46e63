"""Acceptance: a Headless-Wan2GP user points the real `wan-worker` at HW's own table (issue 13).

On each backend the table is created with HW's DDL (tests.support.hw_tables) and holds HW history (a Complete
and a Failed row in HW's formats, an In Progress row of a dead HW worker); rows are then inserted exactly as
HW's add-task code inserts them, in HW's task types and keys. The worker adopts the table (no row lost or
altered), runs every row it can serve, fails the one it cannot with a message naming the HW type, writes
failures where HW readers look (`output_location`), links travel children as HW does, carries `project_id`,
fetches an image given by URL (from an allow-listed host) and claims by time across HW's timestamp formats.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from tests.support.hw_tables import HW_PG_PROJECT, HW_PROJECT, create_hw_tables, hw_add_task, hw_rows, seconds_ago
from tests.support.processes import Stack
from wan_engine.video_io import read_video_info
from worker.store.schema import create_db_engine

pytestmark = pytest.mark.acceptance

FINAL = ("Complete", "Failed", "Cancelled")


@pytest.fixture
def hw_stack(db_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """A stack whose database holds HW's tables, not migrated: the worker must adopt them."""
    engine = create_db_engine(db_url)
    create_hw_tables(engine)
    presets = tmp_path / "presets"
    presets.mkdir()
    # HW's SQLite readers resolve `files/<name>` under <database folder>/public/.
    outputs = tmp_path / "public" / "files"
    built = Stack(db_url, tmp_path, tiny_models_dir, outputs, presets, engine)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on loopback serving tmp_path/served (stands in for HW's Supabase storage)."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def key_image(path: Path, colour: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.6, 1.0, 80)[None, :, None]
    Image.fromarray((np.array(colour)[None, None, :] * ramp * np.ones((60, 1, 1))).astype(np.uint8)).save(path)
    return path.name


def wait_adopted(stack: Stack) -> None:
    """Wait until the worker has migrated the table, then drop pooled connections: Postgres refuses a
    statement prepared before a table gained columns ("cached plan must not change result type")."""
    stack.wait_for(lambda: "alembic_version" in sa.inspect(stack.engine).get_table_names(), 90, "adoption")
    stack.wait_for(
        lambda: "claim_token" in {c["name"] for c in sa.inspect(stack.engine).get_columns("tasks")}, 30, "0003"
    )
    stack.engine.dispose()


def insert_history(stack: Stack) -> tuple[str, str, str]:
    """HW's own past: a Complete row, a Failed row (error text in output_location) and a row a dead HW
    worker left In Progress; written with HW's formats."""
    postgres = stack.engine.dialect.name == "postgresql"
    done = hw_add_task(stack.engine, "single_image", {"prompt": "old", "model": "tiny_t2v"})
    failed = hw_add_task(stack.engine, "generate_video", {"prompt": "old", "model": "tiny_t2v"})
    orphan = hw_add_task(stack.engine, "generate_video", {"prompt": "orphan", "model": "tiny_t2v", "steps": 2})
    stamp = "now()" if postgres else "'" + seconds_ago(600, iso=True) + "'"
    with stack.engine.begin() as conn:
        for task_id, status, location in (
            (done, "Complete", "files/single_image_old.png"),
            (failed, "Failed", "CUDA out of memory"),
            (orphan, "In Progress", None),
        ):
            conn.execute(
                sa.text(
                    f"UPDATE tasks SET status = :status, output_location = :loc, updated_at = {stamp} WHERE id = :id"
                ),
                {"status": status, "loc": location, "id": task_id},
            )
    return done, failed, orphan


def test_hw_rows_run_on_hws_own_table_and_nothing_of_it_is_lost(
    hw_stack: Stack, image_server: str, tmp_path: Path
) -> None:
    stack = hw_stack
    postgres = stack.engine.dialect.name == "postgresql"
    done, failed, orphan = insert_history(stack)
    inputs = tmp_path / "inputs"
    images = [key_image(inputs / f"key{i}.png", colour) for i, colour in enumerate([(220, 40, 40), (40, 200, 60)])]
    key_image(tmp_path / "served" / "key2.png", (30, 60, 220))

    single = hw_add_task(
        stack.engine,
        "single_image",
        {"prompt": "a red apple", "model": "tiny_t2v", "steps": 2, "seed": 3, "task_id": "single_1",
         "project_id": HW_PG_PROJECT if postgres else HW_PROJECT, "resolution": "70x50"},
    )  # fmt: skip
    video = hw_add_task(
        stack.engine,
        "generate_video",
        {"prompt": "a cat", "model": "tiny_t2v", "video_length": 9, "num_inference_steps": 2, "run_id": "r1",
         "video_prompt_type": "", "keep_frames_video_guide": "", "tea_cache_setting": 0, "seed": -1},
    )  # fmt: skip
    travel = hw_add_task(
        stack.engine,
        "travel_orchestrator",
        {
            "tool_type": "travel-between-images",
            "orchestrator_details": {
                "run_id": "20261201093000",
                "input_image_paths_resolved": [*images, f"{image_server}/key2.png"],
                "parsed_resolution_wh": "64x48",
                "model_name": "tiny_vace",
                "use_causvid_lora": False,
                "num_new_segments_to_generate": 2,
                "base_prompts_expanded": ["red to green", "green to blue"],
                "negative_prompts_expanded": ["", ""],
                "segment_frames_expanded": [9, 9],
                "frame_overlap_expanded": [4, 4],
                "fps_helpers": 16,
                "seed_base": 11,
                "steps": 2,
                "main_output_dir_for_run": "./outputs/default_travel_output",
                "debug_mode_enabled": False,
            },
        },
    )
    unserved = hw_add_task(stack.engine, "qwen_image_edit", {"prompt": "make it blue", "image": "x.png"})
    before = hw_rows(stack.engine)

    env = {"WAN_DOWNLOAD_HOSTS": "127.0.0.1"}
    stack.start_worker("--input-roots", str(inputs), env=env)
    wait_adopted(stack)
    # HW's clients keep inserting with their own column list after the adoption.
    late = hw_add_task(stack.engine, "wan_2_2_t2i", {"prompt": "late", "model": "tiny_t2v", "steps": 1})
    for task_id in (single, video, travel, unserved, orphan, late):
        stack.wait_status(task_id, FINAL, timeout=300)
    assert stack.row(late)["status"] == "Complete", stack.row(late)["error_message"]

    rows = {task_id: stack.row(task_id) for task_id in (single, video, travel, unserved, orphan, done, failed)}
    for task_id in (single, video, travel, orphan):
        assert rows[task_id]["status"] == "Complete", rows[task_id]["error_message"]

    # The row we cannot serve failed at once, naming the HW type; HW readers find the text in output_location.
    assert rows[unserved]["status"] == "Failed"
    assert "'qwen_image_edit' is not served" in rows[unserved]["error_message"]
    assert rows[unserved]["output_location"] == rows[unserved]["error_message"]

    # HW's history is untouched: every HW column of the Complete and Failed rows is as it was.
    after = hw_rows(stack.engine)
    for task_id in (done, failed):
        assert after[task_id] == before[task_id]
    assert set(before) <= set(after)  # no row lost; the new ones are the travel children
    for task_id, row in before.items():
        assert {k: after[task_id][k] for k in ("params", "created_at", "project_id", "task_type")} == {
            k: row[k] for k in ("params", "created_at", "project_id", "task_type")
        }

    # What HW's keys meant was applied, and recorded.
    record = rows[single]["result_data"]["headless_wan2gp"]
    assert record["task_type"] == "single_image" and record["ignored"]["task_id"] == "single_1"
    assert any("70x50 rounded down to 64x48" in change for change in record["changes"])
    assert rows[video]["result_data"]["headless_wan2gp"]["ignored"]["run_id"] == "r1"

    # Outputs: on SQLite in HW's `files/<name>` form under <db folder>/public/; the absolute path in result_data.
    for task_id in (single, video, travel):
        path = Path(rows[task_id]["result_data"].get("output_file") or rows[task_id]["output_location"])
        assert path.is_file()
        if not postgres:
            assert rows[task_id]["output_location"] == f"files/{path.name}"
            assert (tmp_path / "public" / rows[task_id]["output_location"]).resolve() == path.resolve()
    assert (
        read_video_info(Path(rows[video]["result_data"].get("output_file") or rows[video]["output_location"])).frames
        == 9
    )

    # Travel children: linked as HW links them, carrying the parent's project_id.
    with stack.engine.begin() as conn:
        kids = (
            conn.execute(
                sa.text("SELECT id, task_type, params, project_id FROM tasks WHERE parent_task_id = :p"), {"p": travel}
            )
            .mappings()
            .all()
        )
    assert sorted(k["task_type"] for k in kids) == ["travel_segment", "travel_segment", "travel_stitch"]
    for kid in kids:
        params = kid["params"] if isinstance(kid["params"], dict) else __import__("json").loads(kid["params"])
        assert params["orchestrator_task_id_ref"] == travel
        assert params["orchestrator_run_id"] == "20261201093000"
        assert str(kid["project_id"]) == str(after[travel]["project_id"])


def test_claims_follow_time_across_hws_timestamp_formats(
    sqlite_url: str, tmp_path: Path, tiny_models_dir: Path
) -> None:
    """HW clients write `2026-12-01 09:27:05` and `2026-12-01T09:27:05.589931Z`; as text the ISO form sorts
    after every plain one whatever the time. The worker claims by time."""
    engine = create_db_engine(sqlite_url)
    create_hw_tables(engine)
    presets = tmp_path / "presets"
    presets.mkdir()
    stack = Stack(sqlite_url, tmp_path, tiny_models_dir, tmp_path / "outputs", presets, engine)
    try:
        params = {"prompt": "p", "model": "tiny_t2v", "steps": 1, "video_length": 1}
        oldest_iso = hw_add_task(engine, "single_image", params, created_at=seconds_ago(30, iso=True))
        middle_plain = hw_add_task(engine, "single_image", params, created_at=seconds_ago(20, iso=False))
        newest_iso = hw_add_task(engine, "single_image", params, created_at=seconds_ago(10, iso=True))
        stack.start_worker()
        wait_adopted(stack)
        ids = (oldest_iso, middle_plain, newest_iso)
        for task_id in ids:
            assert stack.wait_status(task_id, FINAL, timeout=180)["status"] == "Complete"
        started = [stack.row(task_id)["generation_started_at"] for task_id in ids]
        assert started == sorted(started)
    finally:
        stack.close()
