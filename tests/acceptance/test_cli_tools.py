"""Acceptance: the table tools of a user's first hour (retry, purge, list --json --model, status objects,
--version, read-only commands that create no database, one-line errors), as real `wan-worker` processes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.db import migrated_engine
from tests.support.processes import Stack, insert_statement, wan_worker_command

pytestmark = pytest.mark.acceptance


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAN_")}  # no ambient settings
    return subprocess.run(
        [*wan_worker_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny(prompt: str = "a cat", model: str = "tiny_t2v", **params: object) -> dict[str, object]:
    return {"model": model, "prompt": prompt, **params}


def insert(engine: sa.Engine, task_type: str, params: dict[str, Any] | str, **columns: Any) -> str:
    """A row the way another program writes it (raw SQL, database defaults for the rest)."""
    values = {"task_type": task_type, "params": params if isinstance(params, str) else json.dumps(params), **columns}
    with engine.begin() as conn:
        return str(conn.execute(insert_statement(values), values).scalar_one())


def age(engine: sa.Engine, task_id: str, days: int) -> None:
    """Make a row look last updated `days` ago (database clock, as purge compares)."""
    if engine.dialect.name == "sqlite":
        stamp = f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '-{days} days')"
    else:
        stamp = f"timezone('utc', clock_timestamp()) - interval '{days} days'"
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE tasks SET updated_at = {stamp} WHERE id = :id"), {"id": task_id})


def ids(engine: sa.Engine) -> set[str]:
    with engine.begin() as conn:
        return set(conn.execute(sa.text("SELECT id FROM tasks")).scalars())


# ---- retry ----------------------------------------------------------------------------------------------


def test_retry_a_failed_row_then_a_worker_completes_it(stack: Stack) -> None:
    failed = stack.insert(
        "t2v", tiny(video_length=5), status="Failed", attempts=3, error_message="boom", worker_id="old-worker"
    )
    done = stack.insert("t2v", tiny(), status="Complete")

    refused = cli("retry", "--db", stack.db_url, done, cwd=stack.root)
    assert refused.returncode == 1 and "Complete" in refused.stderr and "not retried" in refused.stderr
    assert stack.row(done)["status"] == "Complete"
    missing = cli("retry", "--db", stack.db_url, "no-such-id", cwd=stack.root)
    assert missing.returncode == 1 and "not found" in missing.stderr

    retried = cli("retry", "--db", stack.db_url, failed, cwd=stack.root)
    assert retried.returncode == 0, retried.stderr
    row = stack.row(failed)
    assert row["status"] == "Queued" and row["attempts"] == 0
    assert row["error_message"] is None and row["run_after"] is None
    assert row["worker_id"] is None and row["lease_expires_at"] is None
    record = row["result_data"]["retried"]
    assert record["previous_status"] == "Failed" and record["previous_error"] == "boom"
    assert record["previous_attempts"] == 3 and record["at"]
    again = cli("retry", "--db", stack.db_url, failed, cwd=stack.root)
    assert again.returncode == 1 and "Queued" in again.stderr

    stack.start_worker()
    assert stack.wait_status(failed, ("Complete", "Failed"), timeout=180)["status"] == "Complete"


# ---- purge ----------------------------------------------------------------------------------------------


def test_purge_keeps_open_rows_and_removes_only_recorded_outputs_inside_the_outputs_dir(stack: Stack) -> None:
    outputs = stack.outputs_dir
    outputs.mkdir(exist_ok=True)
    elsewhere = stack.root / "elsewhere"
    elsewhere.mkdir()
    inside = outputs / "inside.mp4"
    inside.write_bytes(b"x" * 1234)
    unrecorded = outputs / "unrecorded.mp4"  # no row names it: never touched
    unrecorded.write_bytes(b"u")
    outside = elsewhere / "outside.mp4"
    outside.write_bytes(b"o")
    escaping = elsewhere / "escaping.mp4"
    escaping.write_bytes(b"e")
    target = elsewhere / "target.mp4"
    target.write_bytes(b"t")
    link = outputs / "link.mp4"
    link.symlink_to(target)

    engine = stack.engine
    rows = {
        "queued": insert(engine, "t2v", tiny()),
        "running": insert(engine, "t2v", tiny(), status="In Progress", worker_id="w", output_location=str(inside)),
        "inside": insert(engine, "t2v", tiny(), status="Complete", output_location=str(inside)),
        "outside": insert(engine, "t2v", tiny(), status="Complete", output_location=str(outside)),
        "escaping": insert(
            engine, "t2v", tiny(), status="Complete", output_location=str(outputs / ".." / "elsewhere" / escaping.name)
        ),
        "link": insert(engine, "t2v", tiny(), status="Complete", output_location=str(link)),
        "failed": insert(engine, "t2v", tiny(), status="Failed", error_message="boom"),
        "prerequisite": insert(engine, "t2v", tiny(), status="Complete"),
        "recent": insert(engine, "t2v", tiny(), status="Cancelled"),
    }
    rows["dependant"] = insert(engine, "t2v", tiny(), dependant_on=rows["prerequisite"])
    for name, task_id in rows.items():
        if name != "recent":
            age(engine, task_id, 10)
    before = ids(engine)
    purge = ["purge", "--db", stack.db_url, "--older-than", "7d", "--outputs", "--outputs-dir", str(outputs)]

    dry = cli(*purge, "--dry-run", cwd=stack.root)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 5 rows" in dry.stdout and "would remove 0 output files (0 bytes)" in dry.stdout
    assert "kept 3 recorded outputs: outside the outputs dir" in dry.stdout
    assert ids(engine) == before
    assert all(path.exists() for path in (inside, outside, escaping, target, link, unrecorded))

    # The In Progress row records inside.mp4 too: the file stays while any row names it.
    result = cli(*purge, cwd=stack.root)
    assert result.returncode == 0, result.stderr
    assert "deleted 5 rows" in result.stdout and "kept 1 rows that open tasks still depend on" in result.stdout
    assert "removed 0 output files" in result.stdout and inside.exists()
    gone = {rows[name] for name in ("inside", "outside", "escaping", "link", "failed")}
    assert ids(engine) == before - gone
    assert all(path.exists() for path in (outside, escaping, target, link, unrecorded))

    # Once no row records it, a later purge's row takes its file with it.
    done = insert(engine, "t2v", tiny(), status="Complete", output_location=str(inside))
    age(engine, done, 10)
    stack.execute("DELETE FROM tasks WHERE id = :id", id=rows["running"])
    dry = cli(*purge, "--status", "Complete", "--dry-run", cwd=stack.root)
    assert "would delete 1 rows" in dry.stdout and "would remove 1 output files (1234 bytes)" in dry.stdout
    assert inside.exists() and done in ids(engine)
    again = cli(*purge, "--status", "Complete", cwd=stack.root)
    assert again.returncode == 0, again.stderr
    assert "deleted 1 rows" in again.stdout and "removed 1 output files (1234 bytes)" in again.stdout
    assert not inside.exists() and unrecorded.exists()
    assert {rows["queued"], rows["prerequisite"], rows["recent"], rows["dependant"]} <= ids(engine)


def test_purge_refuses_open_statuses_and_bad_ages(sqlite_url: str, tmp_path: Path) -> None:
    migrated_engine(sqlite_url).dispose()
    queued = cli("purge", "--db", sqlite_url, "--older-than", "1d", "--status", "Queued", cwd=tmp_path)
    assert queued.returncode == 2 and "Queued" in queued.stderr
    for bad in ("7", "7x", "-1d", "1.5h"):
        result = cli("purge", "--db", sqlite_url, f"--older-than={bad}", cwd=tmp_path)
        assert result.returncode == 2, bad
        assert result.stderr.strip().count("\n") == 0 and repr(bad) in result.stderr and "30m" in result.stderr


# ---- list, status, --version ------------------------------------------------------------------------------


def test_list_json_filters_by_model_and_status_prints_objects(sqlite_url: str, tmp_path: Path) -> None:
    engine = migrated_engine(sqlite_url)
    cat = insert(engine, "t2v", tiny("a cat", seed=3))
    insert(engine, "t2v", tiny("a dog", model="tiny_vace"))
    failed = insert(engine, "t2v", tiny("a failed cat"), status="Failed", result_data=json.dumps({"why": "x"}))
    engine.dispose()

    listing = cli("list", "--db", sqlite_url, "--json", "--model", "tiny_t2v", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert {row["id"] for row in rows} == {cat, failed}
    assert all(row["params"]["model"] == "tiny_t2v" for row in rows)
    only_failed = json.loads(
        cli("list", "--db", sqlite_url, "--json", "--model", "tiny_t2v", "--status", "Failed", cwd=tmp_path).stdout
    )
    assert [row["id"] for row in only_failed] == [failed] and only_failed[0]["result_data"] == {"why": "x"}
    assert len(json.loads(cli("--db", sqlite_url, "list", "--json", "--limit", "1", cwd=tmp_path).stdout)) == 1

    status = cli("status", "--db", sqlite_url, cat, cwd=tmp_path)
    assert json.loads(status.stdout)["params"] == {"model": "tiny_t2v", "prompt": "a cat", "seed": 3}


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    result = cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"wan-worker {importlib.metadata.version('wan-worker')}"


# ---- no database, bad options -------------------------------------------------------------------------------


def test_read_only_commands_in_an_empty_directory_create_no_database(tmp_path: Path) -> None:
    for args in (["list"], ["status", "abc"], ["cancel", "abc"], ["retry", "abc"], ["purge", "--older-than", "1d"]):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert (
            result.stderr.strip() == "error: no database at tasks.db (run wan-worker init-db or wan-worker run first)"
        )
    assert list(tmp_path.iterdir()) == []


def test_db_must_be_a_url_and_log_levels_are_case_insensitive(sqlite_url: str, tmp_path: Path) -> None:
    bare = cli("list", "--db", "tasks.db", cwd=tmp_path)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert bare.stderr.strip().count("\n") == 0 and "sqlite:///tasks.db" in bare.stderr

    migrated_engine(sqlite_url).dispose()
    for args in (
        ["--log-level", "debug", "list", "--db", sqlite_url],
        ["list", "--db", sqlite_url, "--log-level", "Warning", "--log-json"],
    ):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
    loud = cli("--log-level", "loud", "list", "--db", sqlite_url, cwd=tmp_path)
    assert loud.returncode == 2 and loud.stderr.strip().count("\n") == 0
    assert all(level in loud.stderr for level in ("debug", "info", "warning", "error", "critical"))
