"""The FastAPI application of `--http` (worker.live.api) against a real uvicorn server on a free port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import pytest
import sqlalchemy as sa
from websockets.sync.client import connect

from tests.support.db import migrated_engine
from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
from worker.live import http_server
from worker.live.events import LiveSink
from worker.live.http_server import LiveServer
from worker.store.repository import SqlTaskRepository
from worker.store.schema import tasks
from worker.task import NewTask
from worker.tasks.validation import validate_task

TOKEN = "api-t0ken"
TINY = {"model": "tiny_t2v", "prompt": "a cat", "num_inference_steps": 4}


def call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def detail(body: bytes) -> str:
    return str(json.loads(body)["detail"])


@pytest.fixture
def repo(tmp_path: Path) -> SqlTaskRepository:
    return SqlTaskRepository(migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}"))


@pytest.fixture
def presets() -> Any:
    return load_presets(BUILTIN_PRESETS_DIR, None)


@pytest.fixture
def server(repo: SqlTaskRepository, presets: Any, tmp_path: Path) -> Iterator[LiveServer]:
    (tmp_path / "outputs").mkdir()
    live = LiveServer(
        repo,
        LiveSink(outbox_size=1000),
        "127.0.0.1",
        0,
        token=TOKEN,
        outputs_dir=tmp_path / "outputs",
        presets=presets,
        validate_task=partial(validate_task, presets=presets),
    )
    live.start()
    yield live
    live.stop()


def complete(repo: SqlTaskRepository, task_id: str, output: Path) -> None:
    """What a worker's mark_complete leaves on the row (written as SQL, as tests of readers may)."""
    with repo.engine.begin() as conn:
        conn.execute(
            tasks.update()
            .where(tasks.c.id == task_id)
            .values(status="Complete", output_location=str(output), result_data=json.dumps({"seed": 7}))
        )


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or stops sending for the timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def write_video(path: Path, frames: int = 24) -> Path:
    with imageio.get_writer(path, fps=8, codec="libx264", macro_block_size=16) as writer:
        for i in range(frames):
            writer.append_data(np.full((64, 64, 3), i * 10 % 255, dtype=np.uint8))
    return path


# ---- submit, read, list ----------------------------------------------------------------------------------


def test_submit_returns_201_with_the_id_and_validated_params(server: LiveServer, repo: SqlTaskRepository) -> None:
    status, body, headers = call(server.port, "POST", "/tasks", {"params": TINY, "priority": 2})
    assert status == 201, body
    created = json.loads(body)
    assert created["task_type"] == "t2v" and created["status"] == "Queued"  # the type from the preset
    assert created["params"]["num_inference_steps"] == 4 and created["params"]["seed"] == -1
    assert headers["location"] == f"/tasks/{created['id']}"
    row = repo.get(created["id"])
    assert row is not None and row.priority == 2 and json.loads(row.params_text) == TINY
    status, body, _ = call(server.port, "GET", f"/tasks/{created['id']}")
    assert status == 200 and json.loads(body)["params"] == TINY and json.loads(body)["model"] == "tiny_t2v"


def test_a_refused_task_gets_the_message_its_sql_row_would_get(server: LiveServer, presets: Any) -> None:
    bad = {**TINY, "num_inference_steps": "four"}
    with pytest.raises(ValueError) as worker_says:
        validate_task("t2v", bad, presets)
    status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "t2v", "params": bad})
    assert status == 400 and detail(body) == str(worker_says.value)
    status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "travel_segment", "params": TINY})
    assert status == 400 and "created by a travel_orchestrator" in detail(body)
    status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "nope", "params": TINY})
    assert status == 400 and "unknown task_type 'nope'" in detail(body)
    status, body, _ = call(server.port, "POST", "/tasks", {"params": TINY, "priority": 10**9})
    assert status == 400 and "priority" in detail(body)
    status, body, _ = call(server.port, "POST", "/tasks", {"params": TINY, "dependant_on": "missing-id"})
    assert status == 400 and "no such task" in detail(body)


def test_travel_is_submitted_with_its_own_schema(server: LiveServer, tmp_path: Path) -> None:
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        imageio.imwrite(image, np.zeros((32, 32, 3), dtype=np.uint8))
    travel = {"model": "tiny_vace", "input_images": [str(i) for i in images], "base_prompts": "a walk"}
    status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "travel_orchestrator", "params": travel})
    if status == 400:  # no tiny VACE preset here: the refusal is still the travel schema's, not a crash
        assert "model" in detail(body) or "vace" in detail(body).lower(), body
        travel["model"] = "vace_14B_cocktail_2_2"
        status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "travel_orchestrator", "params": travel})
    assert status == 201, body
    assert json.loads(body)["task_type"] == "travel_orchestrator"
    status, body, _ = call(server.port, "POST", "/tasks", {"task_type": "travel_orchestrator", "params": {}})
    assert status == 400 and "input_images" in detail(body)


def test_envelope_errors_are_422_without_a_traceback(server: LiveServer) -> None:
    for payload in ({"params": TINY, "extra": 1}, {"task_type": "t2v"}, {"params": "text"}, [1, 2]):
        status, body, _ = call(server.port, "POST", "/tasks", payload)
        assert status == 422, (payload, body)
        assert "Traceback" not in body.decode() and isinstance(detail(body), str)
    status, body, _ = call(server.port, "POST", "/tasks", b"{not json")
    assert status == 422 and "Traceback" not in body.decode()
    status, body, _ = call(server.port, "POST", "/tasks", {"params": TINY, "id": "../../etc"})
    assert status == 422


def test_request_bodies_are_capped(server: LiveServer) -> None:
    # A declared length over the cap is refused before any of the body is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        head = (
            f"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {http_server.MAX_BODY_BYTES + 1}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\r\n"
        )
        sock.sendall(head.encode())
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413") and b"request body over" in reply, reply[:300]
    # Chunked (no Content-Length): counted as it arrives.
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        head = (
            "POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"x" * 65536
        try:
            for _ in range(http_server.MAX_BODY_BYTES // len(chunk) + 4):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_list_filters_by_status_and_model(server: LiveServer, repo: SqlTaskRepository) -> None:
    first = repo.insert(NewTask("t2v", TINY))
    repo.insert(NewTask("t2v", {**TINY, "model": "other_model"}))
    repo.cancel(first)
    status, body, _ = call(server.port, "GET", "/tasks?status=Cancelled")
    assert status == 200 and [t["id"] for t in json.loads(body)["tasks"]] == [first]
    status, body, _ = call(server.port, "GET", "/tasks?model=other_model&limit=5")
    assert [t["model"] for t in json.loads(body)["tasks"]] == ["other_model"]
    assert len(json.loads(call(server.port, "GET", "/tasks?limit=1")[1])["tasks"]) == 1
    status, body, _ = call(server.port, "GET", "/tasks?status=Done")
    assert status == 400 and "'Done' is not one of Queued" in detail(body)
    assert call(server.port, "GET", "/tasks?limit=0")[0] == 422
    assert call(server.port, "GET", "/tasks/no-such-task")[0] == 404


# ---- cancel, retry ----------------------------------------------------------------------------------------


def test_cancel_and_retry(server: LiveServer, repo: SqlTaskRepository) -> None:
    task_id = repo.insert(NewTask("t2v", TINY))
    status, body, _ = call(server.port, "POST", f"/tasks/{task_id}/retry")
    assert status == 409 and "only Failed or Cancelled tasks retry" in detail(body)
    status, body, _ = call(server.port, "POST", f"/tasks/{task_id}/cancel")
    assert status == 200 and json.loads(body)["status"] == "Cancelled"
    status, body, _ = call(server.port, "POST", f"/tasks/{task_id}/cancel")
    assert status == 409 and "is Cancelled" in detail(body)
    status, body, _ = call(server.port, "POST", f"/tasks/{task_id}/retry")
    retried = json.loads(body)
    assert status == 200 and retried["status"] == "Queued" and retried["attempts"] == 0
    assert retried["result_data"]["retried"]["previous_status"] == "Cancelled"
    assert call(server.port, "POST", "/tasks/nope/cancel")[0] == 404


# ---- files ------------------------------------------------------------------------------------------------


def test_output_is_served_with_ranges_and_a_thumbnail_for_any_id(
    server: LiveServer, repo: SqlTaskRepository, tmp_path: Path
) -> None:
    video = write_video(tmp_path / "outputs" / "clip.mp4")
    task_id = repo.insert(NewTask("travel_segment", TINY, id="travel-0001-seg-2"))  # an id with '-'
    assert call(server.port, "GET", f"/tasks/{task_id}/output")[0] == 404  # not complete yet
    complete(repo, task_id, video)
    status, body, headers = call(server.port, "GET", f"/tasks/{task_id}/output")
    assert status == 200 and body == video.read_bytes() and headers["content-type"] == "video/mp4"
    assert headers.get("accept-ranges") == "bytes"
    status, body, headers = call(server.port, "GET", f"/tasks/{task_id}/output", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == video.read_bytes()[10:20]
    assert headers["content-range"] == f"bytes 10-19/{video.stat().st_size}"
    status, body, headers = call(server.port, "GET", f"/tasks/{task_id}/thumbnail")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert call(server.port, "GET", f"/thumb/{task_id}.jpg")[0] == 200  # the old address still works


def test_only_files_recorded_inside_the_outputs_dir_are_served(
    server: LiveServer, repo: SqlTaskRepository, tmp_path: Path
) -> None:
    outside = write_video(tmp_path / "secret.mp4")
    task_id = repo.insert(NewTask("t2v", TINY))
    complete(repo, task_id, outside)
    assert call(server.port, "GET", f"/tasks/{task_id}/output")[0] == 404
    assert call(server.port, "GET", f"/tasks/{task_id}/thumbnail")[0] == 404
    for path in ("/tasks/..%2F..%2Fsecret.mp4/output", "/static/..%2Fapi.py", "/tasks/%2Fetc%2Fpasswd/output"):
        assert call(server.port, "GET", path)[0] == 404, path


# ---- auth, errors, health, docs ------------------------------------------------------------------------------


def test_every_route_needs_the_token_the_docs_included(server: LiveServer) -> None:
    for path in ("/tasks", "/docs", "/openapi.json", "/healthz", "/metrics", "/tasks/x/output"):
        status, body, _ = call(server.port, "GET", path, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and TOKEN not in body.decode(), path
    status, body, _ = call(server.port, "GET", "/openapi.json")
    paths = json.loads(body)["paths"]
    assert {"/tasks", "/tasks/{task_id}", "/tasks/{task_id}/retry", "/tasks/{task_id}/output"} <= set(paths)
    assert call(server.port, "GET", "/docs")[0] == 200


def test_healthz_reports_database_loop_and_model(repo: SqlTaskRepository, tmp_path: Path) -> None:
    from worker.live.http_server import LOOP_STALL_S

    alive: dict[str, Any] = {"loop": True, "silent": 2.0}
    live = LiveServer(
        repo,
        LiveSink(outbox_size=10),
        "127.0.0.1",
        0,
        loop_alive=lambda: alive["loop"],
        loop_activity=lambda: alive["silent"],
    )
    live.sink.unavailable["big_model"] = "missing"
    live.start()
    try:
        status, body, _ = call(live.port, "GET", "/healthz")
        health = json.loads(body)
        assert status == 200 and health["ok"] and health["model"]["unavailable"][0]["model"] == "big_model"
        assert health["worker_loop"]["seconds_since_activity"] == 2.0
        alive["silent"] = LOOP_STALL_S + 1  # running, but silent past the limit: a hung call
        status, body, _ = call(live.port, "GET", "/healthz")
        loop = json.loads(body)["worker_loop"]
        assert status == 503 and loop["ok"] is False and loop["running"] is True
        assert 'wan_worker_up{worker_id=""} 0.0' in call(live.port, "GET", "/metrics")[1].decode()
        alive.update(loop=False, silent=1.0)
        status, body, _ = call(live.port, "GET", "/healthz")
        loop = json.loads(body)["worker_loop"]
        assert status == 503 and loop["ok"] is False and loop["running"] is False
        with repo.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE tasks"))
        alive["loop"] = True
        status, body, _ = call(live.port, "GET", "/healthz")
        assert status == 503 and json.loads(body)["database"]["ok"] is False
        status, body, _ = call(live.port, "GET", "/tasks")  # a database error: 500, no traceback, no SQL
        assert status == 500 and detail(body) == "internal error"
    finally:
        live.stop()


def test_without_presets_submitting_is_503(repo: SqlTaskRepository) -> None:
    live = LiveServer(repo, LiveSink(outbox_size=10), "127.0.0.1", 0)
    live.start()
    try:
        assert call(live.port, "POST", "/tasks", {"params": TINY})[0] == 503
    finally:
        live.stop()


# ---- many clients do not stall the worker --------------------------------------------------------------------


def test_flooding_and_stalled_clients_never_block_the_publisher(server: LiveServer) -> None:
    """40 WebSocket clients that never read, 40 idle sockets and 20 concurrent API readers: the worker
    loop's side (sink.publish) stays non-blocking and the API keeps answering."""
    opened = ExitStack()
    stalled = [  # held open, never read: the hub drops them when their queue fills
        opened.enter_context(connect(f"ws://127.0.0.1:{server.port}/ws?token={TOKEN}", open_timeout=20))
        for _ in range(20)
    ]
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    answers: list[int] = []
    readers = [
        threading.Thread(target=lambda: answers.append(call(server.port, "GET", "/api/status")[0])) for _ in range(20)
    ]
    try:
        for reader in readers:
            reader.start()
        started = time.perf_counter()
        for i in range(3000):
            server.sink.publish("progress", None, step=i, total_steps=3000, text="x" * 200)
        assert time.perf_counter() - started < 1.0  # non-blocking on the worker's side
        for reader in readers:
            reader.join(30)
        assert answers.count(200) + answers.count(503) == 20 and 200 in answers
        time.sleep(server.open_timeout_s + 1)  # idle sockets are dropped, freeing the slots
        assert call(server.port, "GET", "/healthz")[0] == 200
    finally:
        assert len(stalled) == 20
        opened.close()
        for sock in idle:
            sock.close()
