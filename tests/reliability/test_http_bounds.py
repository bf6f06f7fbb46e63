"""Bounds of the `--http` live server: descriptors, incoming messages, and where the token comes from.

The real `wan-worker run --http` process (tiny real models) is started once with `--http-token-file` and its
open-files limit lowered to 256 (`prlimit` on its pid); in-process checks cover the accept loop's back-off, the
connection cap and the token precedence rules without a process start.
"""

from __future__ import annotations

import http.client
import logging
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.db import migrated_engine
from tests.support.processes import Stack, WorkerProcess, build_stack, wan_worker_command
from worker.cli import build_parser
from worker.cli.run import _http_token
from worker.live import http_server
from worker.live.events import LiveSink
from worker.live.http_server import OPEN_TIMEOUT_S, LiveServer, connection_cap, read_token_file
from worker.store.repository import SqlTaskRepository

TOKEN = "tok-bounds-6f1c2a9e"
NOFILE = 256  # well under systemd's default soft limit (1024), so a flood would exhaust it without the bounds
IDLE_SOCKETS = 400
TINY = {"model": "tiny_t2v", "prompt": "a cat", "num_inference_steps": 4}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET; (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def get_status_code(port: int, token: str | None) -> int | None:
    """/api/status's HTTP status, or None when the server does not answer."""
    try:
        return get(port, "/api/status", token, timeout=5)[0]
    except OSError:
        return None


def closed_by_server(sock: socket.socket) -> bool:
    """The peer closed (EOF or reset); False while it still holds the connection open."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# ---- the real process ---------------------------------------------------------------------------------------


@dataclass
class Bounded:
    stack: Stack
    worker: WorkerProcess
    port: int

    @property
    def pid(self) -> int:
        assert self.worker.process is not None
        return self.worker.process.pid


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Bounded]:
    root = tmp_path_factory.mktemp("http_bounds")
    token_file = root / "http.token"
    token_file.write_text(f"  {TOKEN}\n")  # whitespace around it is stripped
    stack = build_stack(f"sqlite:///{root / 'tasks.db'}", root, tiny_models_dir)
    port = free_port()
    try:
        worker = stack.start_worker("--http", f"127.0.0.1:{port}", "--http-token-file", str(token_file))
        assert worker.process is not None
        # What systemd-like limits do, lowered further: set at once, before the worker opened much.
        resource.prlimit(worker.process.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        stack.wait_for(lambda: get_status_code(port, TOKEN) == 200, 90, "the live server")
        yield Bounded(stack, worker, port)
    finally:
        stack.close()


@pytest.mark.acceptance
def test_token_file_is_accepted_and_kept_out_of_the_command_line(bounded: Bounded) -> None:
    assert get_status_code(bounded.port, TOKEN) == 200
    assert get_status_code(bounded.port, "not-the-token") == 401
    assert get_status_code(bounded.port, None) == 401
    cmdline = Path(f"/proc/{bounded.pid}/cmdline").read_bytes()
    assert b"--http-token-file" in cmdline and TOKEN.encode() not in cmdline
    assert TOKEN not in bounded.worker.log_text(), "the token was logged"
    assert "visible in ps" not in bounded.worker.log_text()  # no --http-token on this command line


@pytest.mark.acceptance
def test_big_websocket_messages_are_refused_without_growing_the_worker(bounded: Bounded) -> None:
    process = psutil.Process(bounded.pid)
    before = process.memory_info().rss
    sent, code = 0, None
    with connect(f"ws://127.0.0.1:{bounded.port}/ws?token={TOKEN}", open_timeout=30, close_timeout=5) as ws:
        assert '"hello"' in str(ws.recv(timeout=30))
        try:
            for _ in range(50):
                ws.send(b"x" * 1_000_000)
                sent += 1
            ws.recv(timeout=10)  # the close frame, if it has not come yet
            ws.recv(timeout=10)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
        except TimeoutError:
            pass
    time.sleep(1.0)
    grown = process.memory_info().rss - before
    assert code == 1009, f"expected the server to close with 1009 (message too big); got {code} after {sent} sent"
    assert grown < 50 * 2**20, f"the worker grew by {grown / 2**20:.0f} MiB"
    assert get_status_code(bounded.port, TOKEN) == 200


@pytest.mark.acceptance
def test_idle_connections_cannot_exhaust_descriptors(bounded: Bounded) -> None:
    process = psutil.Process(bounded.pid)
    assert process.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
    baseline = process.num_fds()
    idle: list[socket.socket] = []
    failed = 0
    peak = baseline
    try:
        for i in range(IDLE_SOCKETS):  # connect and send nothing
            try:
                idle.append(socket.create_connection(("127.0.0.1", bounded.port), timeout=5))
            except OSError:
                failed += 1
            if i % 20 == 0:
                peak = max(peak, process.num_fds())
        peak = max(peak, process.num_fds())
        # The server's share: a quarter of the limit (16 connections of 4 descriptors), plus one being closed.
        budget = baseline + NOFILE // http_server.FD_SHARE + 8
        assert peak <= budget, f"the worker held {peak} descriptors ({baseline} before)"

        time.sleep(OPEN_TIMEOUT_S + 3)  # every idle client is dropped by then
        still_open = sum(not closed_by_server(sock) for sock in idle)
        assert still_open == 0, f"{still_open} idle connections still held after {OPEN_TIMEOUT_S + 3:.0f}s"
        assert get_status_code(bounded.port, TOKEN) == 200, bounded.worker.log_text()[-3000:]

        task_id = bounded.stack.insert("t2v", TINY)
        row = bounded.stack.wait_status(task_id, ("Complete", "Failed"), timeout=180)
        assert row["status"] == "Complete", row["error_message"]
        assert get_status_code(bounded.port, TOKEN) == 200
        assert "live server stops accepting" not in bounded.worker.log_text()
    finally:
        for sock in idle:
            sock.close()
    assert failed < IDLE_SOCKETS  # the flood did reach the server


@pytest.mark.acceptance
def test_an_unreadable_token_file_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.token"
    empty = tmp_path / "empty.token"
    empty.write_text(" \n")
    command = [*wan_worker_command(), "run", "--db", f"sqlite:///{tmp_path / 'tasks.db'}", "--http", "127.0.0.1:0"]
    for path, why in ((missing, "cannot read it"), (empty, "empty")):
        done = subprocess.run(
            [*command, "--http-token-file", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and str(path) in lines[0] and why in lines[0], done.stderr
    assert not (tmp_path / "tasks.db").exists()  # refused before anything started


# ---- in-process: the accept loop and the cap ---------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    monkeypatch.setattr(http_server, "OPEN_TIMEOUT_S", 2.0)  # read when the server starts
    monkeypatch.setattr(http_server, "MAX_CONNECTIONS", 4)
    repository = SqlTaskRepository(migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}"))
    server = LiveServer(repository, LiveSink(outbox_size=10), "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def test_connections_beyond_the_cap_are_closed_and_idle_ones_dropped(live: LiveServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(10)]
    try:
        time.sleep(0.3)
        refused = sum(closed_by_server(sock) for sock in idle)
        assert live.refused == 6 and refused == 6  # 4 held (the cap), the others closed on accept
        assert get_status_code(live.port, None) is None  # full: this one is closed too
        time.sleep(2.5)  # past the (patched) open timeout
        assert all(closed_by_server(sock) for sock in idle)
        assert get_status_code(live.port, None) == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_websocket_client_that_talks_is_not_buffered(live: LiveServer) -> None:
    with connect(f"ws://127.0.0.1:{live.port}/ws", open_timeout=5) as ws:
        ws.recv(timeout=5)  # hello
        for _ in range(200):  # small messages, far more than the incoming queue holds: read and dropped
            ws.send("x" * 100)
        live.sink.publish("vram_warning", None, percent=91.0)
        assert '"vram_warning"' in str(ws.recv(timeout=10))  # the stream still flows
        with pytest.raises(ConnectionClosed) as closed:
            ws.send("x" * (http_server.MAX_MESSAGE_BYTES + 1))
            ws.recv(timeout=10)
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# ---- where the token comes from -------------------------------------------------------------------------------


def _run_args(*extra: str) -> Any:
    return build_parser().parse_args(["run", "--http", "127.0.0.1:0", *extra])


def test_token_sources_and_their_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WAN_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("WAN_HTTP_TOKEN_FILE", raising=False)
    file = tmp_path / "token"
    file.write_text("\tfrom-file \n")
    assert read_token_file(file) == "from-file"
    assert _http_token(_run_args()) is None
    assert _http_token(_run_args("--http-token-file", str(file))) == "from-file"
    monkeypatch.setenv("WAN_HTTP_TOKEN", "from-env")
    assert _http_token(_run_args()) == "from-env"
    assert _http_token(_run_args("--http-token-file", str(file))) == "from-file"  # a flag beats the environment
    monkeypatch.setenv("WAN_HTTP_TOKEN_FILE", str(file))
    with pytest.raises(ValueError, match="both set"):
        _http_token(_run_args())
    monkeypatch.delenv("WAN_HTTP_TOKEN")
    assert _http_token(_run_args()) == "from-file"
    with pytest.raises(ValueError, match="give one of them"):
        _http_token(_run_args("--http-token", "x", "--http-token-file", str(file)))
    assert not [r for r in caplog.records if "visible in ps" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="worker.cli"):
        assert _http_token(_run_args("--http-token", "on-the-cli")) == "on-the-cli"
    warned = [r.getMessage() for r in caplog.records if "visible in ps" in r.getMessage()]
    assert len(warned) == 1 and "on-the-cli" not in warned[0]
    assert _http_token(_run_args("--http-token", "")) is None  # given empty: no token (not the environment's)


def test_token_file_errors_name_the_path_not_the_contents(tmp_path: Path) -> None:
    cases = {
        "missing": (tmp_path / "missing", "cannot read it"),
        "empty": (tmp_path / "empty", "empty"),
        "lines": (tmp_path / "lines", "control characters"),
        "huge": (tmp_path / "huge", "longer than"),
    }
    cases["empty"][0].write_text("\n\n")
    cases["lines"][0].write_text("secret-one\nsecret-two\n")
    cases["huge"][0].write_text("s" * (http_server.TOKEN_FILE_MAX_BYTES + 1))
    for path, why in cases.values():
        with pytest.raises(ValueError, match=why) as raised:
            read_token_file(path)
        assert str(path) in str(raised.value) and "secret" not in str(raised.value)
        assert "\n" not in str(raised.value)


def test_the_server_thread_survives_a_flood_of_refusals(live: LiveServer) -> None:
    """Many connects at once: the cap closes most, and the accept thread is still there afterwards."""
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda: results.append(get_status_code(live.port, None))) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert live._thread is not None and live._thread.is_alive()
    assert get_status_code(live.port, None) == 200


def test_the_connection_cap_follows_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for soft, cap in ((1024, 64), (65536, 64), (256, 16), (32, 4), (resource.RLIM_INFINITY, 64)):
        monkeypatch.setattr(http_server.resource, "getrlimit", lambda _which, soft=soft: (soft, soft))
        assert connection_cap() == cap, soft
