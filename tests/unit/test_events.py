"""Live events: the loop's sink hooks, the live sink, the resource monitor, the hub's ordering, and the
HTTP server's routes and guards (in process, on a real SQLite file)."""

from __future__ import annotations

import http.client
import json
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.db import migrated_engine
from tests.support.fakes import BaseFakeRunner
from worker.config import WorkerSettings
from worker.live.events import LiveSink
from worker.live.http_server import LiveServer, check_bind, parse_address
from worker.live.hub import LiveHub
from worker.live.monitor import GpuReading, NvmlProbe, ResourceMonitor
from worker.loop.events import NullSink
from worker.loop.worker import RunContext, Worker
from worker.store.migrate import upgrade_to_head
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask, Task, TaskOutcome, TaskStatus

GIB = 1024**3
PARAMS = {"model": "tiny_t2v", "prompt": "a cat"}


@pytest.fixture
def repo(tmp_path: Path) -> SqlTaskRepository:
    engine = migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    return SqlTaskRepository(engine)


def settings() -> WorkerSettings:
    return WorkerSettings(db_url="sqlite://", lease_s=3.0, heartbeat_interval_s=0.05, poll_interval_s=0.01)


class Recorder(NullSink):
    """Records every hook call; enriches progress like the live sink does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def started(self, task: Task, resident_model: str | None) -> None:
        self.calls.append(("started", resident_model))

    def progress(self, task: Task, progress: dict[str, Any]) -> None:
        progress["eta_seconds"] = 42.0
        self.calls.append(("progress", progress["step"]))

    def result_extras(self, task: Task) -> dict[str, Any]:
        self.calls.append(("result_extras", None))
        return {"monitor": {"samples": 3}}

    def completed(self, task: Task, output: str | None, result: dict[str, Any]) -> None:
        self.calls.append(("completed", result))

    def failed(self, task: Task, error: BaseException, message: str, retrying: bool) -> None:
        self.calls.append(("failed", (type(error).__name__, retrying)))

    def cancelled(self, task: Task) -> None:
        self.calls.append(("cancelled", None))


class Runner(BaseFakeRunner):
    """Runs `body` for each task, with tiny_t2v resident."""

    resident = "tiny_t2v"

    def __init__(self, body: Any) -> None:
        self.body = body

    def run(self, task: Task, context: RunContext) -> TaskOutcome:
        return self.body(task, context)


def test_the_loop_reports_claim_progress_and_completion_in_order(repo: SqlTaskRepository) -> None:
    task_id = repo.insert(NewTask("t2v", PARAMS))

    def body(task: Task, context: RunContext) -> TaskOutcome:
        for step in (1, 2):
            context.report("denoising", step, 2)
        return TaskOutcome(None, {"seed": 7})

    sink = Recorder()
    Worker(repo, Runner(body), settings(), events=sink).run_forever(until_idle=True)
    names = [name for name, _ in sink.calls]
    assert names == ["started", "progress", "progress", "result_extras", "completed"]
    assert sink.calls[0] == ("started", "tiny_t2v")
    row = repo.get(task_id)
    assert row is not None and row.status is TaskStatus.COMPLETE
    assert row.result_data == {"seed": 7, "monitor": {"samples": 3}}  # extras land in result_data
    assert row.progress is not None and row.progress["eta_seconds"] == 42.0  # enrichment reaches the row
    assert sink.calls[-1][1] == row.result_data


def test_the_loop_reports_failures_retries_and_cancels(repo: SqlTaskRepository) -> None:
    from wan_engine.errors import ModelUnavailableError

    failing = repo.insert(NewTask("t2v", PARAMS, max_attempts=1))
    sink = Recorder()

    def fail(task: Task, context: RunContext) -> TaskOutcome:
        raise ModelUnavailableError("weights for tiny_t2v are not in models/")

    Worker(repo, Runner(fail), settings(), events=sink).run_forever(until_idle=True)
    assert sink.calls[-1] == ("failed", ("ModelUnavailableError", False))
    assert repo.get_status(failing) is TaskStatus.FAILED

    cancelled = repo.insert(NewTask("t2v", PARAMS))

    def cancel_midway(task: Task, context: RunContext) -> TaskOutcome:
        repo.cancel(task.id)
        context.lease.flush()  # the heartbeat notices the cancel
        context.report("denoising", 1, 2)
        raise AssertionError("report() must raise once the task is cancelled")

    sink.calls.clear()
    Worker(repo, Runner(cancel_midway), settings(), events=sink).run_forever(until_idle=True)
    assert [name for name, _ in sink.calls] == ["started", "progress", "cancelled"]
    assert repo.get_status(cancelled) is TaskStatus.CANCELLED


# ---- the live sink ----------------------------------------------------------------------------------------


class FakeProbe:
    name = "Fake GPU"

    def __init__(self, total: int = 80 * GIB) -> None:
        self.total = total
        self.used = 10 * GIB

    def read(self) -> GpuReading:
        return GpuReading(self.used, self.total, 50.0, 60.0)


def test_live_sink_enriches_progress_and_publishes_without_blocking() -> None:
    task = Task("t1", "t2v", json.dumps(PARAMS), TaskStatus.IN_PROGRESS)
    monitor = ResourceMonitor(probe=FakeProbe())
    sink = LiveSink(None, monitor, outbox_size=3)
    sink.started(task, None)
    progress = {"stage": "denoising", "step": 1, "total_steps": 4}
    sink.progress(task, progress)
    assert progress["vram_gb"] == 10.0
    for _ in range(5):  # the outbox holds 3: the rest are dropped and counted, never waited for
        sink.progress(task, dict(progress))
    assert sink.dropped == 4
    assert sink.outbox is not None
    names = [sink.outbox.get_nowait()["event"] for _ in range(3)]
    assert names == ["generation_started", "progress", "progress"]
    extras = sink.result_extras(task)
    assert extras["monitor"]["vram_peak_gb"] == 10.0 and extras["monitor"]["samples"] >= 2


def test_a_missing_model_is_published_as_models_unavailable() -> None:
    from wan_engine.errors import ModelUnavailableError

    sink = LiveSink(outbox_size=10)
    task = Task("t1", "t2v", json.dumps(PARAMS), TaskStatus.IN_PROGRESS)
    sink.failed(task, ModelUnavailableError("no weights"), "no weights for tiny_t2v", retrying=False)
    assert sink.outbox is not None
    failed, unavailable = sink.outbox.get_nowait(), sink.outbox.get_nowait()
    assert (failed["event"], failed["retrying"]) == ("generation_failed", False)
    assert unavailable["event"] == "models_unavailable"
    assert unavailable["models"] == [{"model": "tiny_t2v", "detail": "no weights for tiny_t2v"}]
    assert sink.unavailable == {"tiny_t2v": "no weights for tiny_t2v"}


# ---- the resource monitor --------------------------------------------------------------------------------


def test_vram_warning_fires_once_past_90_percent_and_rearms_below_85() -> None:
    probe = FakeProbe(total=100 * GIB)
    warnings: list[dict[str, Any]] = []
    monitor = ResourceMonitor(probe=probe, on_warning=warnings.append)
    monitor.begin_task("t1")
    for used in (50, 91, 95, 88, 91, 80, 92):
        probe.used = used * GIB
        monitor.sample()
    assert [w["percent"] for w in warnings] == [91.0, 92.0]  # 95 and the 88 -> 91 wobble: no repeat
    assert warnings[0]["task_id"] == "t1" and warnings[0]["budget_gb"] == 100.0
    stats = monitor.end_task()
    assert stats["vram_peak_gb"] == 95.0 and stats["gpu_temperature_max_c"] == 60.0
    assert stats["samples"] == 9  # begin + 7 + end
    assert stats["vram_mean_gb"] == pytest.approx((10 + 50 + 91 + 95 + 88 + 91 + 80 + 92 + 92) / 9, abs=1e-3)


def test_no_gpu_is_handled_cleanly() -> None:
    probe = NvmlProbe()
    if probe.available:
        pytest.skip("this machine has a GPU")
    assert probe.read() is None
    monitor = ResourceMonitor(probe=probe).start()
    monitor.begin_task("t")
    stats = monitor.end_task()
    monitor.stop()
    assert stats["vram_peak_gb"] is None and stats["rss_peak_gb"] > 0
    assert monitor.vram_gb() is None and monitor.latest is not None and monitor.latest.gpu is None


# ---- the hub's ordering ---------------------------------------------------------------------------------


def hub_for(repo: SqlTaskRepository) -> tuple[LiveHub, LiveSink, list[dict[str, Any]]]:
    sink = LiveSink(outbox_size=100)
    hub = LiveHub(repo, sink)
    seen: list[dict[str, Any]] = []
    hub.listeners.append(seen.append)
    hub._first_look()  # the thread is not started: the test drives handle() and poll() itself
    return hub, sink, seen


def test_a_task_claimed_before_any_poll_is_still_announced_queued_first(repo: SqlTaskRepository) -> None:
    old = repo.insert(NewTask("t2v", PARAMS))
    hub, sink, seen = hub_for(repo)
    new = repo.insert(NewTask("t2v", PARAMS, priority=5))
    claimed = repo.claim_next("w", 30, lambda candidates: candidates[0])
    assert claimed is not None and claimed.id == new
    sink.started(claimed, None)
    assert sink.outbox is not None
    hub.handle(sink.outbox.get_nowait())
    assert [(e["event"], e["task_id"]) for e in seen] == [("task_queued", new), ("generation_started", new)]
    assert [e["seq"] for e in seen] == [1, 2]
    hub.poll()
    assert len(seen) == 2  # nothing new; the row queued before the hub started is not announced
    assert old not in [e["task_id"] for e in seen]


def test_cancel_from_the_table_is_announced_once(repo: SqlTaskRepository) -> None:
    hub, sink, seen = hub_for(repo)
    task_id = repo.insert(NewTask("t2v", PARAMS))
    hub.poll()
    repo.cancel(task_id)
    hub.poll()
    hub.poll()
    task = repo.get(task_id)
    assert task is not None
    sink.cancelled(task)  # the worker noticing the same cancel
    assert sink.outbox is not None
    hub.handle(sink.outbox.get_nowait())
    assert [(e["event"], e.get("by"), e.get("seq")) for e in seen] == [
        ("task_queued", None, 1),
        ("task_cancelled", "table", 2),
        ("task_cancelled", "worker", None),  # listeners (metrics) hear the worker; clients are not told twice
    ]


def test_a_raw_sql_cancel_reaches_the_hub_on_both_backends(db_url: str) -> None:
    """Other programs change `status` without touching `updated_at`: migration 0002's trigger stamps it,
    so the poll (rows changed since its last look) sees the cancel."""
    engine = migrated_engine(db_url)
    repo = SqlTaskRepository(engine)
    hub, _sink, seen = hub_for(repo)
    task_id = repo.insert(NewTask("t2v", PARAMS))
    hub.poll()
    before = repo.get(task_id)
    time.sleep(0.01)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'Cancelled' WHERE id = :id"), {"id": task_id})
    after = repo.get(task_id)
    assert before is not None and after is not None and after.updated_at > before.updated_at  # type: ignore[operator]
    hub.poll()
    assert [(e["event"], e["task_id"]) for e in seen] == [("task_queued", task_id), ("task_cancelled", task_id)]
    with engine.begin() as conn:  # a statement that sets updated_at itself keeps its value
        conn.execute(
            sa.text("UPDATE tasks SET status = 'Queued', updated_at = '2001-01-01 00:00:00' WHERE id = :id"),
            {"id": task_id},
        )
    kept = repo.get(task_id)
    assert kept is not None and kept.updated_at is not None and kept.updated_at.year == 2001
    engine.dispose()


def test_migration_0002_downgrades_and_upgrades_again(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from worker.store.migrate import MIGRATIONS_DIR

    engine = migrated_engine(db_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert "eta_stats" not in sa.inspect(engine).get_table_names()
    upgrade_to_head(engine)
    assert "eta_stats" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_a_bulk_insert_stamped_alike_is_paged_through(repo: SqlTaskRepository) -> None:
    hub, _sink, seen = hub_for(repo)
    hub.poll_limit = 3
    values = ", ".join(f"('t2v', '{json.dumps(PARAMS)}')" for _ in range(7))
    with repo.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO tasks (task_type, params) VALUES {values}")
    for _ in range(4):
        hub.poll()
    with repo.engine.begin() as conn:
        ids = set(conn.exec_driver_sql("SELECT id FROM tasks").scalars())
    assert [e["event"] for e in seen] == ["task_queued"] * 7
    assert {e["task_id"] for e in seen} == ids


def test_a_slow_client_is_cut_off_not_waited_for(repo: SqlTaskRepository) -> None:
    hub, _sink, _seen = hub_for(repo)
    client = hub.register()
    for _ in range(client.maxsize + 5):
        hub.broadcast({"event": "progress", "task_id": "x"})
    assert hub.client_count == 0
    items = [client.get_nowait() for _ in range(client.qsize())]
    assert items[-1] is None  # its handler sees the end marker and closes the connection


# ---- the HTTP server ------------------------------------------------------------------------------------


def test_addresses_and_the_token_rule() -> None:
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("localhost:http")
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ValueError, match="--http-token"):
        check_bind("0.0.0.0", None)


def test_cli_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    from worker.cli import build_parser, cmd_run

    db = f"sqlite:///{tmp_path / 'tasks.db'}"
    args = build_parser().parse_args(["run", "--db", db, "--http", "0.0.0.0:8765", "--http-token", ""])
    with pytest.raises(ValueError, match="needs a token"):  # main() prints it and exits 2
        cmd_run(args)
    assert not (tmp_path / "tasks.db").exists()  # refused before anything started


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body, response.getheader("Content-Type") or ""


@pytest.fixture
def server(repo: SqlTaskRepository, tmp_path: Path) -> Any:
    sink = LiveSink(monitor=ResourceMonitor(probe=FakeProbe()), outbox_size=100)
    sink.monitor.sample()  # type: ignore[union-attr]
    live = LiveServer(repo, sink, "127.0.0.1", 0, token="s3cret", outputs_dir=tmp_path / "outputs")
    live.start()
    yield live
    live.stop()


def test_token_is_required_and_every_route_answers(server: LiveServer, repo: SqlTaskRepository) -> None:
    port = server.port
    assert get(port, "/api/status")[0] == 401
    assert get(port, "/api/status?token=wrong")[0] == 401
    status, body, kind = get(port, "/api/status", {"Authorization": "Bearer s3cret"})
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["gpu"]["vram_used_gb"] == 10.0
    status, body, kind = get(port, "/?token=s3cret")
    assert status == 200 and kind.startswith("text/html") and b'id="initial-state"' in body
    assert b"__INITIAL_STATE__" not in body
    assert get(port, "/static/app.js?token=s3cret")[0] == 200
    assert get(port, "/static/..%2Fhttp_server.py?token=s3cret")[0] == 404
    assert get(port, "/thumb/nope.jpg?token=s3cret")[0] == 404
    repo.insert(NewTask("t2v", PARAMS))
    status, body, kind = get(port, "/metrics", {"Cookie": "wan_token=s3cret"})
    assert status == 200 and kind.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    tasks = {s.labels["status"]: s.value for s in families["wan_table_tasks"].samples}
    assert "worker_id" not in families["wan_table_tasks"].samples[0].labels  # table-wide: one series per table
    assert tasks == {"Queued": 1, "In Progress": 0, "Complete": 0, "Failed": 0, "Cancelled": 0}
    assert families["wan_gpu_memory_used_bytes"].samples[0].value == 10 * GIB


def test_websocket_needs_the_token_and_a_matching_origin(server: LiveServer) -> None:
    url = f"ws://127.0.0.1:{server.port}/ws"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=5)
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as cross:
        connect(f"{url}?token=s3cret", origin="http://evil.example", open_timeout=5)  # type: ignore[arg-type]
    assert cross.value.response.status_code == 403
    with connect(f"{url}?token=s3cret", open_timeout=5) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["event"] == "hello" and "queue" in hello["status"]
        server.sink.publish("vram_warning", None, percent=93.0)
        event = json.loads(ws.recv(timeout=5))
        assert (event["event"], event["percent"]) == ("vram_warning", 93.0)


def test_without_a_token_only_loopback_host_names_are_served(repo: SqlTaskRepository) -> None:
    live = LiveServer(repo, LiveSink(outbox_size=10), "127.0.0.1", 0)
    live.start()
    try:
        assert get(live.port, "/api/status")[0] == 200
        assert get(live.port, "/api/status", {"Host": f"localhost:{live.port}"})[0] == 200
        assert get(live.port, "/api/status", {"Host": "attacker.example"})[0] == 403  # DNS rebinding
    finally:
        live.stop()


def test_outbox_overflow_is_counted_by_the_sink() -> None:
    sink = LiveSink(outbox_size=1)
    sink.publish("progress")
    sink.publish("progress")
    assert sink.dropped == 1
    assert isinstance(sink.outbox, queue.Queue)
