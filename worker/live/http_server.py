"""`wan-worker run --http HOST:PORT`: a WebSocket event stream, a status page and Prometheus metrics.

One port, one small server (the `websockets` library's threaded sync server): `/ws` upgrades to a
WebSocket that streams the hub's JSON events; plain GETs are answered from `process_request`:

    /               the status page (worker/live/static: queue, current task, recent results, GPU memory)
    /static/NAME    its script and style sheet
    /api/status     the page's data as JSON
    /thumb/ID.jpg   the first frame of a task's output (ffmpeg from imageio-ffmpeg), cached
    /metrics        Prometheus text format

Off by default. Bound to loopback unless told otherwise; any other address needs a token (`--http-token`,
`--http-token-file`, WAN_HTTP_TOKEN or WAN_HTTP_TOKEN_FILE), given as `Authorization: Bearer TOKEN`, a
`token` query parameter or a `wan_token` cookie. Without a token the Host header must name a loopback
address (no DNS rebinding), and a browser may only open the WebSocket from this server's own pages (Origin
must match Host).

Bounds (the server shares the worker's file descriptors, so it must never take them all): a client has
OPEN_TIMEOUT_S to send its request; at most MAX_CONNECTIONS are served at once (fewer under a low
open-files limit, see connection_cap; more are closed on accept); an accept() that fails for lack of
descriptors is retried with back-off instead of ending the server; and the one-way stream drops what
clients send as it arrives (a message over MAX_MESSAGE_BYTES closes the connection with 1009).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import queue
import resource
import selectors
import socket
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, Frame
from websockets.http11 import Request, Response
from websockets.protocol import Event, State
from websockets.sync.server import Server, ServerConnection, serve

from worker.live.events import LiveSink
from worker.live.hub import LiveHub
from worker.task import TaskStatus
from worker.tasks.params import model_key_for

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
TOKEN_ENV = "WAN_HTTP_TOKEN"
TOKEN_FILE_ENV = "WAN_HTTP_TOKEN_FILE"
TOKEN_FILE_MAX_BYTES = 4096  # a token file is one short line; a bigger one (or /dev/zero) is a mistake
OPEN_TIMEOUT_S = 5.0  # a client that has not sent its request (and finished the handshake) by then is dropped
MAX_CONNECTIONS = 64  # connections served at once (handshaking, HTTP or WebSocket); more are closed on accept
FDS_PER_CONNECTION = 4  # websockets' sync connection: its socket, a wake-up socket pair and an epoll selector
FD_SHARE = 4  # ...and all of them together hold at most 1/FD_SHARE of the open-files limit (the worker needs the rest)
MAX_MESSAGE_BYTES = 4096  # the stream is one-way: a client has nothing big to say (larger: closed, 1009)
MAX_QUEUE = 4  # incoming frames buffered per connection before reading pauses (none are: _OneWayConnection)
ACCEPT_BACKOFF_S = (0.05, 1.0)  # first and longest pause after accept() fails for lack of descriptors
# accept() errors that mean "no descriptors or memory right now", not "the socket is gone".
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY_ACCEPT = {errno.ECONNABORTED, errno.EAGAIN, errno.EINTR, errno.EPROTO}
QUEUE_SHOWN = 50
RECENT_SHOWN = 12
THUMB_WIDTH = 160
THUMB_CACHE = 256
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
FINAL = [s.value for s in TaskStatus if s.is_final]
# The library logs every connection at INFO; keep its warnings only.
_QUIET_LOG = logging.getLogger("worker.live.http_server.websockets")
_QUIET_LOG.setLevel(logging.WARNING)


# ---- address and token --------------------------------------------------------------------------------


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or a bare `PORT` (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token (ValueError names the fix)."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"--http on {host} (not a loopback address) needs a token: pass --http-token-file or set {TOKEN_ENV}"
            f" or {TOKEN_FILE_ENV} (--http-token also works, but shows the token in ps)"
        )


def read_token_file(path: str | Path, source: str = "--http-token-file") -> str:
    """The token in a file (surrounding whitespace stripped). ValueError names `source` and the path, never
    the contents: a missing, unreadable, empty, oversized or multi-line file is a configuration error."""
    try:
        with open(path, "rb") as file:
            raw = file.read(TOKEN_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{source} {path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    if len(raw) > TOKEN_FILE_MAX_BYTES:
        raise ValueError(f"{source} {path}: longer than {TOKEN_FILE_MAX_BYTES} bytes (expected one token)")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{source} {path}: not UTF-8 text") from None
    if not token:
        raise ValueError(f"{source} {path}: the file is empty")
    if not token.isprintable():  # a newline or control character cannot travel in a header or cookie
        raise ValueError(f"{source} {path}: expected one line (the token), found control characters")
    return token


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer under a low open-files limit: the server's descriptors stay within a share
    of it (systemd's default soft limit, 1024, allows the full 64; a limit of 256 allows 16)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft // (FD_SHARE * FDS_PER_CONNECTION)))


# ---- metrics ---------------------------------------------------------------------------------------


class _TableCollector:
    """Metrics read at scrape time: tasks by status (the table), queue depth, GPU and process memory."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server

    def collect(self) -> Any:
        counts = self.server.repository.counts_by_status()
        tasks = GaugeMetricFamily("wan_tasks", "Rows of the tasks table by status", labels=["status"])
        for status in TaskStatus:
            tasks.add_metric([status.value], counts.get(status.value, 0))
        yield tasks
        yield GaugeMetricFamily("wan_queue_depth", "Queued tasks", value=counts.get(TaskStatus.QUEUED.value, 0))
        sample = self.server.sink.monitor.latest if self.server.sink.monitor else None
        if sample is not None:
            yield GaugeMetricFamily("wan_process_resident_memory_bytes", "Worker RSS", value=sample.rss_bytes)
            if sample.gpu is not None:
                gpu = sample.gpu
                yield GaugeMetricFamily("wan_gpu_memory_used_bytes", "GPU memory in use", value=gpu.used_bytes)
                yield GaugeMetricFamily("wan_gpu_memory_total_bytes", "GPU memory", value=gpu.total_bytes)
                if gpu.utilization_percent is not None:
                    yield GaugeMetricFamily("wan_gpu_utilization_percent", "GPU busy", value=gpu.utilization_percent)
                if gpu.temperature_c is not None:
                    yield GaugeMetricFamily("wan_gpu_temperature_celsius", "GPU temperature", value=gpu.temperature_c)
        progress = (self.server.hub.current or {}).get("progress") or {}
        if progress.get("eta_seconds") is not None:
            yield GaugeMetricFamily("wan_current_task_eta_seconds", "Seconds left", value=progress["eta_seconds"])
        yield GaugeMetricFamily("wan_live_clients", "WebSocket clients", value=self.server.hub.client_count)
        yield GaugeMetricFamily("wan_events_dropped", "Events the live server missed", value=self.server.sink.dropped)


class Metrics:
    """The registry behind /metrics; step times and outcomes are counted from the event stream."""

    def __init__(self, server: LiveServer) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_TableCollector(server))  # type: ignore[arg-type]
        self.steps = Histogram("wan_step_seconds", "Denoising step time", buckets=STEP_BUCKETS, registry=self.registry)
        self.outcomes = Counter(
            "wan_worker_tasks", "Tasks this worker process finished", ["outcome"], registry=self.registry
        )
        for outcome in ("completed", "failed", "cancelled"):
            self.outcomes.labels(outcome)

    def on_event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if name == "generation_completed":
            self.outcomes.labels("completed").inc()
            for seconds in event.get("step_times") or []:
                self.steps.observe(seconds)
        elif name == "generation_failed" and not event.get("retrying"):
            self.outcomes.labels("failed").inc()
        elif name == "task_cancelled" and event.get("by") == "worker":
            self.outcomes.labels("cancelled").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ---- the server ------------------------------------------------------------------------------------


class _OneWayConnection(ServerConnection):
    """A WebSocket connection whose client's messages are dropped as they arrive: the stream is one-way, so
    nothing a client sends is buffered (control frames, pings and the close handshake, are still handled;
    a message over MAX_MESSAGE_BYTES still closes the connection with 1009)."""

    def process_event(self, event: Event) -> None:
        if self.request is not None and isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            return
        super().process_event(event)


class LiveServer:
    """The HTTP/WebSocket server and its hub; `start()` binds and returns (host, port)."""

    def __init__(
        self,
        repository: Any,
        sink: LiveSink,
        host: str,
        port: int,
        *,
        token: str | None = None,
        outputs_dir: Path | None = None,
        worker_id: str | None = None,
        resident_model: Callable[[], str | None] | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        check_bind(host, token)
        self.repository = repository
        self.sink = sink
        self.host, self.port = host, port
        self.token = token or None
        self.outputs_dir = Path(outputs_dir).resolve() if outputs_dir else None
        self.worker_id = worker_id
        self.resident_model = resident_model or (lambda: None)
        self.hub = LiveHub(repository, sink, poll_interval_s)
        self.metrics = Metrics(self)
        self.hub.listeners.append(self.metrics.on_event)
        self._thumbs: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.refused = 0  # connections closed on accept because max_connections were being served
        self.max_connections = connection_cap()

    def start(self) -> tuple[str, int]:
        try:
            self._server = serve(
                self._connection,
                self.host,
                self.port,
                process_request=self._process_request,
                server_header=None,
                compression=None,
                logger=_QUIET_LOG,
                open_timeout=OPEN_TIMEOUT_S,
                max_size=MAX_MESSAGE_BYTES,
                max_queue=MAX_QUEUE,
                create_connection=_OneWayConnection,
            )
        except OSError as exc:
            raise ValueError(f"--http cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._server.socket.getsockname()[1]
        self.hub.start()
        self._thread = threading.Thread(target=self._accept_loop, args=(self._server,), name="live-http", daemon=True)
        self._thread.start()
        log.info("live status on http://%s:%d/ (events: /ws, metrics: /metrics)", self.host, self.port)
        return self.host, self.port

    def stop(self) -> None:
        self.hub.stop()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept_loop(self, server: Server) -> None:
        """`Server.serve_forever`, bounded: at most MAX_CONNECTIONS handler threads, and an accept() that
        fails for lack of descriptors pauses (logged once per episode) instead of ending the server for good
        (the library's loop breaks on any OSError). It keeps that loop's contract with `Server.shutdown`:
        handler threads are registered before they start, and `socket_closed` is set on the way out."""
        if not all(hasattr(server, name) for name in ("handler_threads", "socket_closed", "shutdown_watcher")):
            log.warning("live server: unexpected websockets Server internals; serving without the accept bounds")
            server.serve_forever()
            return
        poller = selectors.DefaultSelector()
        poller.register(server.shutdown_watcher, selectors.EVENT_READ)  # shutdown() wakes the select
        try:
            try:
                poller.register(server.socket, selectors.EVENT_READ)
            except (OSError, ValueError):
                return  # shutdown() came first
            backoff = 0.0
            while True:
                poller.select()
                try:
                    sock, addr = server.socket.accept()
                except OSError as exc:
                    if server.socket.fileno() == -1:
                        break  # shutdown() closed the socket
                    if exc.errno in _RETRY_ACCEPT:
                        continue
                    if exc.errno not in _TRANSIENT_ACCEPT:
                        log.error("live server stops accepting: %s", exc)
                        break
                    if not backoff:
                        log.warning("live server: accept() failed (%s); retrying with back-off", exc.strerror or exc)
                    backoff = min(ACCEPT_BACKOFF_S[1], backoff * 2 or ACCEPT_BACKOFF_S[0])
                    time.sleep(backoff)  # the pending connection stays in the backlog until a descriptor frees
                    continue
                if backoff:
                    log.info("live server: accepting connections again")
                    backoff = 0.0
                self._dispatch(server, sock, addr)
        finally:
            poller.close()
            server.socket_closed.set()
            server.shutdown_watcher.close()

    def _dispatch(self, server: Server, sock: socket.socket, addr: Any) -> None:
        """One accepted socket: a handler thread, or closed at once when max_connections are being served."""
        with server.lock:
            busy = len(server.handler_threads)
        if busy >= self.max_connections:
            if not self.refused:
                log.warning("live server: %d connections open (the most served at once); closing new ones", busy)
            self.refused += 1
            sock.close()
            return
        # Not a daemon thread: Server.shutdown() joins the handlers (as the library's own loop does).
        thread = threading.Thread(target=server.handler, args=(sock, addr), name="live-http-conn")
        with server.lock:
            server.handler_threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread could be started (memory): drop this client, keep serving
            with server.lock:
                server.handler_threads.discard(thread)
            sock.close()

    # ---- requests ----

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if not self._authorized(request, query):
            return _response(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain; charset=utf-8")
        if not self.token and not _loopback_host(request.headers.get("Host", "")):
            return _response(HTTPStatus.FORBIDDEN, b"Host must be a loopback address\n", "text/plain")
        path = url.path
        if path == "/ws":
            origin = request.headers.get("Origin")
            if origin and urlsplit(origin).netloc != request.headers.get("Host"):
                return _response(HTTPStatus.FORBIDDEN, b"cross-origin WebSocket refused\n", "text/plain")
            return None  # go on with the WebSocket handshake
        try:
            return self._route(path, query)
        except Exception as exc:
            log.warning("live request %s failed: %s: %s", path, exc.__class__.__name__, exc)
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain")

    def _authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        if not self.token:
            return True
        given = (query.get("token") or [""])[0]
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        cookie = SimpleCookie(request.headers.get("Cookie", ""))
        if not given and "wan_token" in cookie:
            given = cookie["wan_token"].value
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _route(self, path: str, query: dict[str, list[str]]) -> Response:
        if path in ("/", "/index.html"):
            return self._page()
        if path == "/api/status":
            return _response(HTTPStatus.OK, json.dumps(self.status(), default=str).encode(), "application/json")
        if path == "/metrics":
            return _response(HTTPStatus.OK, self.metrics.text(), CONTENT_TYPE_LATEST)
        if path.startswith("/thumb/") and path.endswith(".jpg"):
            image = self.thumbnail(path[len("/thumb/") : -len(".jpg")])
            if image is None:
                return _response(HTTPStatus.NOT_FOUND, b"no thumbnail\n", "text/plain")
            return _response(HTTPStatus.OK, image, "image/jpeg")
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            file = STATIC_DIR / name
            if "/" not in name and file.suffix in STATIC_TYPES and file.is_file():
                return _response(HTTPStatus.OK, file.read_bytes(), STATIC_TYPES[file.suffix])
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _page(self) -> Response:
        template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        # The first state is in the page itself, so it renders before any request or WebSocket message.
        state = json.dumps(self.status(), default=str).replace("</", "<\\/")
        body = template.replace("__INITIAL_STATE__", state).encode()
        response = _response(HTTPStatus.OK, body, "text/html; charset=utf-8")
        if self.token:
            response.headers["Set-Cookie"] = f"wan_token={self.token}; HttpOnly; SameSite=Strict; Path=/"
        return response

    def _connection(self, connection: ServerConnection) -> None:
        """One WebSocket client: a hello with the current state, then every event as it happens."""
        client = self.hub.register()
        try:
            connection.send(json.dumps({"event": "hello", "seq": self.hub.seq, "status": self.status()}, default=str))
            while True:
                try:
                    message = client.get(timeout=1.0)
                except queue.Empty:
                    if connection.state is not State.OPEN:  # the client left while nothing happened
                        break
                    continue
                if message is None:
                    break
                connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.hub.unregister(client)

    # ---- the page's data ----

    def status(self) -> dict[str, Any]:
        """Queue (with ETAs), the current task, recent results, GPU memory."""
        counts = self.repository.counts_by_status()
        current = dict(self.hub.current) if self.hub.current else None
        estimator = self.sink.estimator
        queued = self.repository.queued_in_order(QUEUE_SHOWN)
        remaining = 0.0  # idle; while a task runs, its latest ETA (None: unknown, and so is every start)
        if current is not None:
            remaining = (current.get("progress") or {}).get("eta_seconds") or current.get("eta_seconds")
        etas = estimator.queue_etas(remaining, self.resident_model(), queued) if estimator else {}
        queue = [
            {
                "id": task.id,
                "task_type": task.task_type,
                "model": model_key_for(task.task_type, task.params_text),
                "priority": task.priority,
                "created_at": task.created_at,
                "starts_in": _r(etas[task.id].start_in) if task.id in etas else None,
                "done_in": _r(etas[task.id].finish_in) if task.id in etas else None,
            }
            for task in queued
        ]
        recent = [
            {
                "id": task.id,
                "status": task.status.value,
                "task_type": task.task_type,
                "model": model_key_for(task.task_type, task.params_text),
                "output_location": task.output_location,
                "error_message": task.error_message,
                "seconds": _r(((task.result_data or {}).get("timings") or {}).get("total")),
                "resolution": (task.result_data or {}).get("resolution"),
                "frames": (task.result_data or {}).get("frames"),
                "finished_at": task.generation_processed_at or task.updated_at,
                "thumb": f"/thumb/{task.id}.jpg" if task.status is TaskStatus.COMPLETE else None,
            }
            for task in self.repository.recently_updated(FINAL, RECENT_SHOWN)
        ]
        monitor = self.sink.monitor
        return {
            "worker_id": self.worker_id,
            "now": time.time(),
            "counts": {s.value: counts.get(s.value, 0) for s in TaskStatus},
            "current": current,
            "resident_model": self.resident_model(),
            "queue": queue,
            "recent": recent,
            "gpu": monitor.latest.to_dict() if monitor and monitor.latest else None,
            "gpu_name": monitor.gpu_name if monitor else None,
            "models_unavailable": [{"model": k, "detail": v} for k, v in self.sink.unavailable.items()],
            "events_dropped": self.sink.dropped,
        }

    def thumbnail(self, task_id: str) -> bytes | None:
        """JPEG of the first frame of a completed task's output (only files inside the outputs dir)."""
        task = self.repository.get(task_id) if task_id.isalnum() else None
        if task is None or task.status is not TaskStatus.COMPLETE or not task.output_location:
            return None
        path = Path(task.output_location).resolve()
        if self.outputs_dir is not None and not path.is_relative_to(self.outputs_dir):
            return None
        if not path.is_file():
            return None
        mtime = path.stat().st_mtime
        with self._thumb_lock:
            cached = self._thumbs.get(task_id)
            if cached and cached[0] == mtime:
                return cached[1]
        image = first_frame_jpeg(path)
        if image is not None:
            with self._thumb_lock:
                self._thumbs[task_id] = (mtime, image)
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return image


def first_frame_jpeg(path: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """The first frame of a video (or an image) as a JPEG `width` pixels wide, via imageio-ffmpeg's ffmpeg."""
    import imageio_ffmpeg

    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-v", "error", "-i", str(path), "-frames:v", "1", "-vf", f"scale={width}:-2"),
        *("-f", "image2pipe", "-c:v", "mjpeg", "-"),
    ]
    try:
        done = subprocess.run(command, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("thumbnail of %s failed: %s", path.name, exc)
        return None
    return done.stdout if done.returncode == 0 and done.stdout else None


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _loopback_host(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(host.strip("[]"))


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
