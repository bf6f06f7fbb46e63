"""`wan-worker run --http HOST:PORT`: the worker's HTTP API, event stream, status page and metrics.

One port, one ASGI application (worker.live.api, FastAPI) served by uvicorn in its own thread with its
own asyncio event loop, so no client (slow, idle or flooding) ever runs on the worker loop's thread.
Database reads and writes of a request run in the framework's thread pool; the WebSocket stream reads
the hub's per-client queues, woken by the hub thread (never polled by a thread per client).

Off by default. Bound to loopback unless told otherwise; any other address needs a token (`--http-token`,
`--http-token-file`, WAN_HTTP_TOKEN or WAN_HTTP_TOKEN_FILE), given as `Authorization: Bearer TOKEN`, a
`token` query parameter or a `wan_token` cookie, compared in constant time and never logged. Without a
token the Host header must name a loopback address (no DNS rebinding), and a browser may only open the
WebSocket from this server's own pages (Origin must match Host).

Bounds (the server shares the worker's file descriptors, so it must never take them all): a client has
OPEN_TIMEOUT_S to send its request line and headers; at most `connection_cap()` connections are served at
once (more are closed on accept: `refused` counts them); asyncio pauses accepting when accept() fails for
lack of descriptors and resumes by itself; a request body over MAX_BODY_BYTES is refused with 413; and
the one-way stream drops what clients send (a message over MAX_MESSAGE_BYTES closes it with 1009).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import resource
import socket
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.live.events import LiveSink
from worker.live.hub import LiveHub
from worker.live.metrics import Metrics
from worker.task import Task, TaskStatus
from worker.tasks.params import model_key_for, params_or_none

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_ENV = "WAN_HTTP_TOKEN"
TOKEN_FILE_ENV = "WAN_HTTP_TOKEN_FILE"
TOKEN_FILE_MAX_BYTES = 4096  # a token file is one short line; a bigger one (or /dev/zero) is a mistake
OPEN_TIMEOUT_S = 5.0  # a client that has not sent its request line and headers by then is dropped
MAX_CONNECTIONS = 64  # connections served at once (HTTP or WebSocket); more are closed on accept
FDS_PER_CONNECTION = 4  # kept from the threaded server: a generous per-connection share of descriptors
FD_SHARE = 4  # ...and all of them together hold at most 1/FD_SHARE of the open-files limit (the worker needs the rest)
MAX_MESSAGE_BYTES = 4096  # the stream is one-way: a client has nothing big to say (larger: closed, 1009)
ACCEPT_BATCH = 8  # connections accepted per event-loop wake-up (and the listen backlog)
MAX_BODY_BYTES = 1 << 20  # a task's JSON is small; a bigger request body is refused with 413
MAX_HEADER_BYTES = 16 * 1024  # request line + headers
QUEUE_SHOWN = 50
RECENT_SHOWN = 12
THUMB_WIDTH = 160
THUMB_CACHE = 256
FINAL = [s.value for s in TaskStatus if s.is_final]
STOP_TIMEOUT_S = 5.0
PREVIEW_EVERY = 4  # a live preview frame every N denoising steps (wan_engine.latent_preview)
# A loop silent this long (no iteration, no step, stage or written frame of its task) is reported stalled by
# /healthz: longer than any model load, compile or VAE decode we measured, even with offloading.
LOOP_STALL_S = 600.0
LINGER_S = 10.0  # after refusing a too-big WebSocket message: at most this long, what the client still sends is dropped


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


# ---- the connection bounds (a uvicorn protocol) -----------------------------------------------------


def _bounded_protocol(server: LiveServer) -> type:
    """uvicorn's h11 protocol with the bounds of the module docstring: a connection cap applied on accept
    (WebSockets included, which uvicorn's own `limit_concurrency` does not count before the upgrade) and
    a deadline for the first request's headers (uvicorn times out idle keep-alive connections only after
    a first response, so a client that never speaks would hold its descriptor for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _refused = False
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= server.max_connections:
                if not server.refused:
                    log.warning(
                        "live server: %d connections open (the most served at once); closing new ones",
                        len(self.connections),
                    )
                server.refused += 1
                self._refused = True
                self.transport = transport
                transport.abort()
                return
            super().connection_made(transport)
            self._deadline = asyncio.get_running_loop().call_later(server.open_timeout_s, self._first_request_late)

        def _first_request_late(self) -> None:
            # Still this protocol's transport (not upgraded to a WebSocket) and no request line + headers yet.
            if self.scope is None and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return BoundedH11Protocol


def _one_way_ws_protocol() -> type:
    """uvicorn's sans-I/O WebSocket protocol with a lingering close: a message over MAX_MESSAGE_BYTES gets
    the 1009 close frame and a half-close (FIN), then what the client still sends is dropped until it
    closes (or LINGER_S), instead of a close with unread data, which the kernel turns into a reset that
    loses the close frame."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class OneWayWebSocketProtocol(WebSocketsSansIOProtocol):
        _lingering = False

        def data_received(self, data: bytes) -> None:
            if not self._lingering:
                super().data_received(data)

        def handle_parser_exception(self) -> None:
            close = self.conn.close_sent
            code, reason = (close.code, close.reason) if close is not None else (1002, "")
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self._lingering = True
            if self.read_paused:  # paused until the app took the last message: keep reading (and dropping)
                self.read_paused = False
                self.transport.resume_reading()
            if self.transport.can_write_eof():  # the server's side of the TCP close, as RFC 6455 wants
                self.transport.write_eof()
            # As uvicorn's own close handshake does: the app's return leaves the closing to this timer.
            self.close_timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    return OneWayWebSocketProtocol


class _PreviewRelay:
    """Live previews (wan_engine.latent_preview) to `preview` events. The engine's step callback only stores
    the newest frame here; this thread encodes it (a PNG data URL, a few KB at latent resolution) and
    publishes it for the running task, so nothing but a hand-over happens in the denoising loop."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self._frame: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-preview", daemon=True)

    def start(self, every: int) -> None:
        from wan_engine import latent_preview

        latent_preview.subscribe(self.offer, every)
        self._thread.start()

    def stop(self) -> None:
        from wan_engine import latent_preview

        latent_preview.subscribe(None)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def offer(self, frame: Any) -> None:
        self._frame = frame  # the newest wins: an older frame not yet sent is dropped
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            frame, self._frame = self._frame, None
            if frame is not None:
                try:
                    self._publish(frame)
                except Exception as exc:  # a preview must never end the relay
                    log.debug("live preview failed: %s", exc)

    def _publish(self, frame: Any) -> None:
        import base64
        import io

        from PIL import Image

        current = self.server.hub.current
        if not current:
            return
        buffer = io.BytesIO()
        Image.fromarray(frame.rgb).save(buffer, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        height, width = frame.rgb.shape[:2]
        self.server.sink.publish(
            "preview",
            current["task_id"],
            step=frame.step,
            total_steps=frame.total_steps,
            width=width,
            height=height,
            image=image,
        )


# ---- the server ------------------------------------------------------------------------------------


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
        presets: Any = None,
        validate_task: Callable[[str, dict[str, Any]], Any] | None = None,
        loop_alive: Callable[[], bool] | None = None,
        loop_activity: Callable[[], float | None] | None = None,
        preview_every: int | None = PREVIEW_EVERY,
    ) -> None:
        check_bind(host, token)
        self.repository = repository
        self.sink = sink
        self.host, self.port = host, port
        self.token = token or None
        self.outputs_dir = Path(outputs_dir).resolve() if outputs_dir else None
        self.worker_id = worker_id
        self.resident_model = resident_model or (lambda: None)
        # POST /tasks: the runner's own check (worker.tasks.validation, given by the caller: this layer sits
        # below worker.tasks) and the presets that default a task_type. None: POST /tasks answers 503.
        self.presets = presets
        self.validate_task = validate_task
        self.loop_alive = loop_alive or (lambda: True)
        self.loop_activity = loop_activity or (lambda: None)  # seconds since the loop last showed life
        self.started_at = time.time()
        self.hub = LiveHub(repository, sink, poll_interval_s)
        self.metrics = Metrics(self, worker_id)
        self.hub.listeners.append(self.metrics.on_event)
        self._thumbs: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._uvicorn: Any = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0  # connections closed on accept because max_connections were being served
        self.max_connections = connection_cap()
        self.open_timeout_s = OPEN_TIMEOUT_S
        self.preview_every = preview_every  # None: no live previews
        self._previews: _PreviewRelay | None = None

    def start(self) -> tuple[str, int]:
        import uvicorn

        from worker.live.api import build_app

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(ACCEPT_BATCH)
        except OSError as exc:
            sock.close()
            raise ValueError(f"--http cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.open_timeout_s = OPEN_TIMEOUT_S  # read at start (tests lower it)
        self.max_connections = min(self.max_connections, MAX_CONNECTIONS)
        config = uvicorn.Config(
            build_app(self),
            http=_bounded_protocol(self),
            ws=_one_way_ws_protocol(),
            ws_max_size=MAX_MESSAGE_BYTES,
            ws_max_queue=4,
            ws_per_message_deflate=False,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            loop="none",
            # asyncio accepts up to `backlog` sockets per wake-up before any is refused: kept small, so a burst
            # of connects holds few descriptors beyond the cap.
            backlog=ACCEPT_BATCH,
        )
        self._uvicorn = uvicorn.Server(config)
        self.hub.start()
        if self.preview_every:
            self._previews = _PreviewRelay(self)
            self._previews.start(self.preview_every)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="live-http", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise ValueError(f"--http on {self.host}:{self.port}: the server did not start")
        log.info("live status on http://%s:%d/ (API docs: /docs, events: /ws, metrics: /metrics)", self.host, self.port)
        return self.host, self.port

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            task = asyncio.ensure_future(self._uvicorn.serve(sockets=[self._socket]))
            while not self._uvicorn.started and not task.done():
                await asyncio.sleep(0.01)
            ready.set()
            await task

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # the worker keeps running without its live server
            log.error("live server stopped: %s: %s", exc.__class__.__name__, exc)
        finally:
            ready.set()
            loop.close()

    def stop(self) -> None:
        if self._previews is not None:
            self._previews.stop()
        self.hub.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)

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
        recent = [self.recent_row(task) for task in self.repository.recently_updated(FINAL, RECENT_SHOWN)]
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
            "preview": self.hub.preview,
        }

    @staticmethod
    def recent_row(task: Task) -> dict[str, Any]:
        result = task.result_data or {}
        params = params_or_none(task.params_text) or {}
        prompt = params.get("prompt") if isinstance(params.get("prompt"), str) else None
        return {
            "id": task.id,
            "status": task.status.value,
            "task_type": task.task_type,
            "model": model_key_for(task.task_type, task.params_text),
            "prompt": prompt,
            "output_location": task.output_location,
            "error_message": task.error_message,
            "seconds": _r((result.get("timings") or {}).get("total")),
            "resolution": result.get("resolution"),
            "frames": result.get("frames"),
            "finished_at": task.generation_processed_at or task.updated_at,
            "thumb": f"/tasks/{task.id}/thumbnail" if task.status is TaskStatus.COMPLETE else None,
        }

    # ---- files recorded as a task's output ----

    def output_file(self, task: Task | None) -> Path | None:
        """The output file of a completed task (inside the outputs dir when one is set); None otherwise.
        The path comes from the row only: nothing a client sends reaches the filesystem."""
        # output_file: the absolute path also where output_location holds HW's `files/<name>` (worker.store.db).
        if task is None or task.status is not TaskStatus.COMPLETE or not task.output_file:
            return None
        path = Path(task.output_file).resolve()
        if self.outputs_dir is not None and not path.is_relative_to(self.outputs_dir):
            return None
        return path if path.is_file() else None

    def thumbnail(self, task_id: str) -> bytes | None:
        """JPEG of the first frame of a completed task's output, cached by (id, mtime)."""
        path = self.output_file(self.repository.get(task_id))
        if path is None:
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

    # ---- the token ----

    def loop_health(self) -> dict[str, Any]:
        """The worker loop's state for /healthz and `wan_worker_up`: running (no stop requested) and not
        silent for LOOP_STALL_S (a hung driver call, a deadlock)."""
        running = bool(self.loop_alive())
        silent = self.loop_activity()
        stalled = silent is not None and silent > LOOP_STALL_S
        return {
            "ok": running and not stalled,
            "running": running,
            "seconds_since_activity": None if silent is None else round(silent, 1),
            "stalled_after_s": LOOP_STALL_S,
        }

    def token_ok(self, given: str | None) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest((given or "").encode(), self.token.encode())


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


def loopback_host(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(host.strip("[]"))


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
