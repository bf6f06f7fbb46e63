"""Rolling upgrade: an old and a new version of the package serving one Postgres queue while the schema migrates.

The OLD version is commit `cca76bc` (migrations 0001-0002), extracted with `git archive` and run as a real
`wan-worker run` process from its own tree (tests.support.old_version); the NEW version is this checkout's
console script (head 0003, which adds the nullable `claim_token`). On one private Postgres schema:

1. the old worker creates the schema (at 0002) and serves a queue of tiny t2v tasks;
2. while it serves, the new worker starts, migrates to 0003 under the old worker's feet, and serves too; the
   queue is kept topped up until both have run tasks after the migration;
3. once the queue is empty: every task is Complete exactly once (one attempt, one output file, the output's
   owner in `result_data.worker_id` is the row's `worker_id`), nothing is stuck In Progress, neither log holds
   a traceback;
4. the old version is started again on the migrated database: it may serve, or stop naming the revision it
   does not know (`cca76bc` cannot be changed; what it does is recorded in the figures).

The reverse direction, with this checkout's code: a database stamped with a newer revision (`9999_future`,
its columns a superset of ours) is refused with one line naming the revision, exit 2, nothing changed.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.reliability.figures import Figures
from tests.reliability.harness import insert_many
from tests.support.db import migrated_engine
from tests.support.old_version import old_tree, start_old_worker
from tests.support.processes import Stack, decode_row, output_files, wan_worker_command
from worker.store.schema import create_db_engine

pytestmark = [pytest.mark.acceptance, pytest.mark.slow, pytest.mark.postgres]

OLD_COMMIT = "cca76bc"
OLD_HEAD = "0002"
NEW_HEAD = "0003"
FUTURE = "9999_future"
PARAMS = {"model": "tiny_t2v", "resolution": "32x32", "video_length": 5, "num_inference_steps": 2}
LEASE_S = 20.0
FIRST_BATCH = 8
TOP_UP = 6  # queued rows kept ready while the fleet is mixed, so neither worker runs dry
MIN_AFTER_MIGRATION = 3  # tasks each version must claim after the migration before the feed stops
MAX_TASKS = 300
PHASE_TIMEOUT_S = 90.0


@pytest.fixture
def pg_stack(postgres_url: str, tmp_path: Path, tiny_models_dir: Path) -> Iterator[Stack]:
    """A stack on a private Postgres schema left EMPTY (no migration): the old worker creates the schema."""
    presets_dir = tmp_path / "presets"
    presets_dir.mkdir()
    built = Stack(
        postgres_url, tmp_path, tiny_models_dir, tmp_path / "outputs", presets_dir, create_db_engine(postgres_url)
    )
    try:
        yield built
    finally:
        built.close()


def _revision(stack: Stack) -> str | None:
    """The revision in `alembic_version`, None while there is none (or no table yet)."""
    with stack.engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _rows(stack: Stack) -> list[dict[str, Any]]:
    """Every `tasks` row, JSON columns decoded."""
    with stack.engine.begin() as conn:
        return [decode_row(row) for row in conn.execute(sa.text("SELECT * FROM tasks")).mappings()]


def _db_now(stack: Stack) -> Any:
    """The database clock, naive UTC like the table's timestamps."""
    with stack.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT timezone('utc', clock_timestamp())").scalar()


def _queue(stack: Stack, count: int, start: int) -> list[str]:
    """Queue `count` tiny t2v tasks (numbered from `start`); returns their ids."""
    params = [{**PARAMS, "prompt": f"rolling {n}", "seed": n} for n in range(start, start + count)]
    return insert_many(stack, [{"task_type": "t2v", "params": p} for p in params])


def _claimed_since(rows: list[dict[str, Any]], worker: str, since: Any) -> int:
    """How many rows `worker` claimed after `since` (database clock)."""
    return sum(
        1
        for row in rows
        if row["worker_id"] == worker
        and row["generation_started_at"] is not None
        and row["generation_started_at"] > since
    )


def _failed_exit(stack: Stack, what: str) -> None:
    """Fail when a worker still expected to serve has exited."""
    for worker in stack.workers:
        if worker.process is not None and worker.process.poll() is not None:
            pytest.fail(
                f"{what}: {worker.log_path.name} exited with {worker.process.returncode}\n{worker.log_text()[-4000:]}"
            )


def _old_on_newer_schema(stack: Stack, tree: Path) -> str:
    """Start the old version on the migrated database; return what it did ('serves' or 'exits: <line>')."""
    [task_id] = insert_many(stack, [{"task_type": "t2v", "params": {**PARAMS, "prompt": "after the upgrade"}}])
    again = start_old_worker(stack, tree, "old-again", lease_s=LEASE_S)
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        assert again.process is not None
        if again.process.poll() is not None:
            log = again.log_text()
            assert again.process.returncode != 0, f"the old worker exited 0 without serving:\n{log[-3000:]}"
            assert NEW_HEAD in log, f"the old worker's exit names no revision {NEW_HEAD!r}:\n{log[-3000:]}"
            assert stack.row(task_id)["status"] == "Queued", "an exiting old worker left the task untouched"
            last = [line for line in log.splitlines() if line.strip()][-1]
            kind = "traceback" if "Traceback" in log else "one line"
            return f"exits {again.process.returncode} ({kind}): {last.strip()[:200]}"
        row = stack.row(task_id)
        if row["status"] == "Complete":
            assert row["worker_id"] == "old-again" and row["attempts"] == 1
            return "serves"
        time.sleep(0.2)
    pytest.fail(f"the old worker neither served nor exited in {PHASE_TIMEOUT_S}s\n{again.log_text()[-3000:]}")


@pytest.mark.timeout(300)
def test_old_and_new_versions_share_a_migrating_queue(pg_stack: Stack, tmp_path: Path, figures: Figures) -> None:
    stack = pg_stack
    tree = old_tree(OLD_COMMIT, tmp_path / "old-version")
    started = time.monotonic()

    # 1. The old version creates the schema (its head, 0002) and serves.
    old = start_old_worker(stack, tree, "old", lease_s=LEASE_S)
    stack.wait_for(lambda: _revision(stack) == OLD_HEAD, PHASE_TIMEOUT_S, f"the old worker to migrate to {OLD_HEAD}")
    with stack.engine.connect() as conn:
        columns = {column["name"] for column in sa.inspect(conn).get_columns("tasks")}
    assert "claim_token" not in columns, "the old version's schema has no claim_token"
    expected = _queue(stack, FIRST_BATCH, 0)
    stack.wait_for(
        lambda: sum(row["status"] == "Complete" for row in _rows(stack)) >= 2,
        PHASE_TIMEOUT_S,
        "the old worker to serve",
    )

    # 2. The new version starts while the old one serves: it migrates to 0003 and serves too.
    new = stack.start_worker(name="new", lease_s=LEASE_S)
    stack.wait_for(lambda: _revision(stack) == NEW_HEAD, PHASE_TIMEOUT_S, f"the new worker to migrate to {NEW_HEAD}")
    migrated_at = _db_now(stack)
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while True:
        _failed_exit(stack, "while the fleet is mixed")
        rows = _rows(stack)
        claims = {name: _claimed_since(rows, name, migrated_at) for name in ("old", "new")}
        if min(claims.values()) >= MIN_AFTER_MIGRATION:
            break
        assert time.monotonic() < deadline, f"both versions did not serve after the migration: {claims}"
        queued = sum(row["status"] == "Queued" for row in rows)
        if queued < TOP_UP and len(expected) < MAX_TASKS:
            expected += _queue(stack, TOP_UP - queued, len(expected))
        time.sleep(0.2)

    # 3. Both run until the queue is empty.
    stack.wait_for(
        lambda: all(row["status"] not in ("Queued", "In Progress") for row in _rows(stack)),
        PHASE_TIMEOUT_S,
        "the queue to drain",
    )
    for worker in (old, new):
        worker.stop()
        assert worker.process is not None and worker.process.returncode == 0, worker.log_text()[-3000:]
        assert "Traceback" not in worker.log_text(), worker.log_text()[-4000:]
    rows = _rows(stack)
    by_id = {row["id"]: row for row in rows}
    lost = sorted(set(expected) - {row["id"] for row in rows if row["status"] == "Complete"})
    assert Counter(row["status"] for row in rows) == {"Complete": len(expected)}, [
        (row["id"], row["status"], row["error_message"]) for row in rows if row["status"] != "Complete"
    ]
    assert not lost
    assert all(row["attempts"] == 1 for row in rows), [(r["id"], r["attempts"]) for r in rows if r["attempts"] != 1]
    for row in rows:
        assert row["worker_id"] in ("old", "new"), row
        assert row["result_data"]["worker_id"] == row["worker_id"], "the output's owner is the row's worker"
        # Old claims write no token (the old code does not know the column); new claims always do.
        assert (row["claim_token"] is None) == (row["worker_id"] == "old"), (row["id"], row["worker_id"])
    outputs = [Path(by_id[task_id]["output_location"]) for task_id in expected]
    assert len(set(outputs)) == len(expected), "two tasks share an output"
    assert all(path.is_file() for path in outputs)
    files = output_files(stack.outputs_dir)
    assert sorted(files) == sorted(outputs), f"outputs dir holds other files: {set(files) - set(outputs)}"
    served = Counter(row["worker_id"] for row in rows)
    mixed = {name: _claimed_since(rows, name, migrated_at) for name in ("old", "new")}

    # 4. The old version started again against the migrated database.
    outcome = _old_on_newer_schema(stack, tree)
    figures.record(
        "rolling_upgrade[postgres]",
        tasks=len(expected),
        workers=f"old {OLD_COMMIT} (schema {OLD_HEAD}) + new (schema {NEW_HEAD})",
        per_worker=dict(served),
        claimed_after_migration=mixed,
        duplicates=len(rows) - len({row["output_location"] for row in rows}) + sum(r["attempts"] - 1 for r in rows),
        lost=len(lost),
        output_files=len(files),
        old_version_restarted_on_new_schema=outcome,
        wall_s=round(time.monotonic() - started, 1),
    )


def test_a_newer_superset_schema_stops_the_current_worker_with_one_line(postgres_url: str, tmp_path: Path) -> None:
    engine = migrated_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN future_note text")
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE})
            task_id = conn.execute(
                sa.text("INSERT INTO tasks (task_type, params) VALUES ('t2v', :p) RETURNING id"),
                {"p": json.dumps({**PARAMS, "prompt": "from the future"})},
            ).scalar_one()
        command = [
            *wan_worker_command(), "run", "--db", postgres_url, "--models-dir", str(tmp_path / "models"),
            "--outputs-dir", str(tmp_path / "out"), "--worker-id", "current",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.stderr[-3000:]
        assert repr(FUTURE) in errors[0] and "newer wan-worker" in errors[0] and NEW_HEAD in errors[0], errors[0]
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [FUTURE]
            row = conn.execute(sa.text("SELECT status, attempts, worker_id FROM tasks WHERE id = :id"), {"id": task_id})
            assert row.one() == ("Queued", 0, None), "the refused worker claimed nothing"
    finally:
        engine.dispose()


OLD_CLAIM_SQL = (  # what cca76bc's claim writes: no claim_token (it does not know the column)
    "UPDATE tasks SET status = 'In Progress', worker_id = :worker, attempts = attempts + 1, "
    "lease_expires_at = timezone('utc', clock_timestamp()) + interval '30 seconds', "
    "generation_started_at = timezone('utc', clock_timestamp()), updated_at = timezone('utc', clock_timestamp()) "
    "WHERE id = :id AND status = 'Queued'"
)


def test_a_row_the_new_sweep_requeued_is_not_writable_by_its_stalled_holder_after_an_old_claim(
    postgres_url: str,
) -> None:
    """A new process stalls past its lease; the new sweep re-queues the row; an OLD process sharing its worker
    id (WAN_WORKER_ID set fleet-wide) claims it, writing no token. The stalled process must not complete it."""
    from worker.store.repository import SqlTaskRepository
    from worker.task import NewTask

    engine = migrated_engine(postgres_url)
    try:
        stalled, sweeper = SqlTaskRepository(engine), SqlTaskRepository(engine)
        task_id = stalled.insert(NewTask(task_type="t2v", params={**PARAMS, "prompt": "stall"}))
        assert stalled.claim_next("shared", 30.0, lambda candidates: candidates[0]) is not None
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE tasks SET lease_expires_at = created_at WHERE id = :id"), {"id": task_id})
        assert sweeper.requeue_stale().requeued == [task_id]
        with engine.begin() as conn:
            assert conn.execute(sa.text(OLD_CLAIM_SQL), {"worker": "shared", "id": task_id}).rowcount == 1
        assert not stalled.heartbeat(task_id, "shared", 30.0, None), "the stalled process renewed a row it lost"
        assert not stalled.mark_complete(task_id, "shared", "/tmp/x.mp4", {}), "the stalled process completed it"
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status, worker_id, attempts FROM tasks WHERE id = :id"), {"id": task_id})
            assert row.one() == ("In Progress", "shared", 2), "the old process still holds the row"
    finally:
        engine.dispose()
