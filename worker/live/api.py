"""The HTTP API of `wan-worker run --http` (FastAPI): tasks, files, events, status page, metrics, health.

    POST /tasks                    queue a task of any type (validated as the worker validates a SQL row) -> 201
    GET  /tasks?status=&model=&limit=   the newest tasks
    GET  /tasks/{id}               one task (params, result_data, progress as JSON objects)
    POST /tasks/{id}/cancel        cancel a Queued or In Progress task (and its open children)
    POST /tasks/{id}/retry         a Failed or Cancelled task back to Queued, attempts reset (recorded)
    GET  /tasks/{id}/output        the output file (HTTP range requests: a browser can seek)
    GET  /tasks/{id}/thumbnail     a JPEG of its first frame (also /thumb/{id}.jpg, the old address)
    GET  /ws                       the WebSocket event stream (worker.live.hub)
    GET  /metrics                  Prometheus text format (worker.live.metrics)
    GET  /healthz                  database reachable, worker loop alive, model state (503 when not healthy)
    GET  /, /static/NAME, /api/status   the status page, its files and its data
    GET  /docs, /openapi.json      the API's documentation (FastAPI; Swagger UI's files served locally)

Every route, the docs included, sits behind the token rule (worker.live.http_server). Errors are JSON
`{"detail": message}`: a refused task gets the message the worker would write on its row; nothing
else of an exception (no traceback) reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import queue
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.live import http_server
from worker.task import NewTask, Task, TaskStatus
from worker.tasks.params import model_key_for, params_or_none, validate_priority

log = logging.getLogger(__name__)

STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
LIST_LIMIT_MAX = 1000
MAX_ID_CHARS = 128
STATUSES = [s.value for s in TaskStatus]
DOCS_STATIC_URL = "/docs-static"  # Swagger UI's script and stylesheet (fastapi_offline)


class TaskSubmission(BaseModel):
    """A task as a SQL user would insert its row: `task_type` and `params` (the params JSON), and optionally
    `priority`, `dependant_on` and `id`. `task_type` may be left out when `params.model` names a preset."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task_type: str | None = Field(default=None, max_length=64, examples=["t2v"])
    params: dict[str, Any] = Field(examples=[{"model": "tiny_t2v", "prompt": "a cat", "num_inference_steps": 4}])
    priority: int = 0
    dependant_on: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9_.:-]+$")


# ---- token, Host and body bounds: one ASGI middleware over every route --------------------------------------


class Guard:
    """The token rule for HTTP and WebSocket alike, the loopback Host check without a token, the WebSocket
    Origin check, and the request-body cap (413), before any route runs."""

    def __init__(self, app: ASGIApp, server: Any) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            if scope["type"] == "websocket":
                # Refused before the handshake completes: the client sees the HTTP status.
                await send({"type": "websocket.http.response.start", "status": status, "headers": _plain_headers()})
                await send({"type": "websocket.http.response.body", "body": message.encode() + b"\n"})
                return
            await JSONResponse({"detail": message}, status)(scope, receive, send)
            return
        if scope["type"] == "http":
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > http_server.MAX_BODY_BYTES):
                await _body_too_large(scope, receive, send)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                messages, too_large = await _read_capped(receive)
                if too_large:
                    await _body_too_large(scope, receive, send)
                    return
                receive = _replay(messages, receive)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        server = self.server
        if server.token:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[0]
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not given:
                given = _cookie(headers.get("cookie", ""), "wan_token")
            if not server.token_ok(given):
                return 401, "token required"
        elif not http_server.loopback_host(headers.get("host", "")):
            return 403, "Host must be a loopback address"
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin and urlsplit(origin).netloc != headers.get("host"):
                return 403, "cross-origin WebSocket refused"
        return None


async def _read_capped(receive: Receive) -> tuple[list[Message], bool]:
    """The request's body messages, read up front; (messages, True) once the body passes MAX_BODY_BYTES
    (a chunked body has no Content-Length to refuse it by)."""
    messages: list[Message] = []
    seen = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        seen += len(message.get("body", b""))
        if seen > http_server.MAX_BODY_BYTES:
            return messages, True
        if not message.get("more_body"):
            return messages, False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _body_too_large(scope: Scope, receive: Receive, send: Send) -> None:
    detail = f"request body over {http_server.MAX_BODY_BYTES} bytes"
    await JSONResponse({"detail": detail}, 413, headers={"Connection": "close"})(scope, receive, send)


def _cookie(header: str, name: str) -> str:
    try:
        cookie = SimpleCookie(header)
    except CookieError:
        return ""
    return cookie[name].value if name in cookie else ""


def _plain_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]


# ---- the application -------------------------------------------------------------------------------------


def build_app(server: Any) -> ASGIApp:
    """The FastAPI application over a LiveServer (its repository, hub, sink, presets, metrics)."""
    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from the installed package, not from a CDN, so the
    # page works on a GPU box without internet access.
    app = FastAPIOffline(
        title="wan-worker",
        summary="Queue Wan video generations and follow them",
        version="1",
        docs_url="/docs",
        redoc_url=None,
        static_url=DOCS_STATIC_URL,
    )
    _add_error_handlers(app)
    _add_task_routes(app, server)
    _add_page_routes(app, server)
    return Guard(app, server)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Pydantic's messages with where they apply; never the input echoed back (it may be large).
        errors = [
            f"{'.'.join(str(p) for p in error.get('loc', ()) if p != 'body') or 'body'}: {error.get('msg')}"
            for error in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(errors) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.warning("live request %s failed: %s: %s", request.url.path, exc.__class__.__name__, exc)
        return JSONResponse({"detail": "internal error"}, 500)


def task_json(task: Task) -> dict[str, Any]:
    """A task as JSON: params, result_data and progress as objects (text a hostile row stored: as it is)."""
    data = dict(task.__dict__)
    data["status"] = task.status.value
    params_text = data.pop("params_text")
    decoded = params_or_none(params_text) if isinstance(params_text, str) else params_text
    data["params"] = params_text if decoded is None else decoded
    data["model"] = model_key_for(task.task_type, task.params_text)
    for key, value in list(data.items()):
        if hasattr(value, "isoformat"):
            data[key] = value.isoformat()
    complete = task.status is TaskStatus.COMPLETE and bool(task.output_location)
    data["links"] = {
        "self": f"/tasks/{task.id}",
        "output": f"/tasks/{task.id}/output" if complete else None,
        "thumbnail": f"/tasks/{task.id}/thumbnail" if complete else None,
    }
    return data


def _task_or_404(server: Any, task_id: str) -> Task:
    task = server.repository.get(task_id) if len(task_id) <= MAX_ID_CHARS else None
    if task is None:
        raise HTTPException(404, f"no task {task_id!r}")
    return task


def _validate_submission(server: Any, body: TaskSubmission) -> tuple[str, dict[str, Any], Any]:
    """(task_type, params to store, validated params); ValueError with the worker's message."""
    params = dict(body.params)
    task_type = body.task_type
    if task_type is None:
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("task_type is required (or params.model naming a preset, whose architecture is the type)")
        task_type = server.presets.get(model).model.architecture
    validated = server.validate_task(task_type, params)
    validate_priority(body.priority)
    if body.dependant_on is not None and server.repository.get_status(body.dependant_on) is None:
        raise ValueError(f"dependant_on {body.dependant_on!r}: no such task")
    return task_type, params, validated


def _add_task_routes(app: FastAPI, server: Any) -> None:
    @app.post("/tasks", status_code=201, tags=["tasks"])
    def submit_task(body: TaskSubmission) -> JSONResponse:
        """Queue a task; 201 with its id and the validated params (400: the message its row would get)."""
        if server.presets is None or server.validate_task is None:
            raise HTTPException(503, "this server has no model presets to validate tasks against")
        try:
            task_type, params, validated = _validate_submission(server, body)
        except ValueError as exc:  # InvalidTaskError, UnknownModelError, ...: the row's message
            raise HTTPException(400, str(exc)) from None
        new = NewTask(
            task_type=task_type, params=params, id=body.id, priority=body.priority, dependant_on=body.dependant_on
        )
        try:
            task_id = server.repository.insert(new)
        except IntegrityError:
            raise HTTPException(409, f"a task with id {body.id!r} exists already") from None
        resolved = validated.model_dump(mode="json", exclude_none=True)
        payload = {"id": task_id, "task_type": task_type, "status": TaskStatus.QUEUED.value, "params": resolved}
        return JSONResponse(payload, 201, headers={"Location": f"/tasks/{task_id}"})

    @app.get("/tasks", tags=["tasks"])
    def list_tasks(
        status: str | None = Query(None, description=f"one of {', '.join(STATUSES)}"),
        model: str | None = Query(None, max_length=200),
        limit: int = Query(50, ge=1, le=LIST_LIMIT_MAX),
    ) -> dict[str, Any]:
        """The newest tasks, newest first (optionally of one status and/or one model)."""
        if status is not None and status not in STATUSES:
            raise HTTPException(400, f"status {status!r} is not one of {', '.join(STATUSES)}")
        rows = server.repository.list_tasks(status, LIST_LIMIT_MAX if model else limit)
        if model:
            rows = [task for task in rows if model_key_for(task.task_type, task.params_text) == model]
        return {"tasks": [task_json(task) for task in rows[:limit]]}

    @app.get("/tasks/{task_id}", tags=["tasks"])
    def get_task(task_id: str) -> dict[str, Any]:
        return task_json(_task_or_404(server, task_id))

    @app.post("/tasks/{task_id}/cancel", tags=["tasks"])
    def cancel_task(task_id: str) -> dict[str, Any]:
        """Cancel a Queued or In Progress task (the worker stops a running one at its next step)."""
        task = _task_or_404(server, task_id)
        if not server.repository.cancel(task_id):
            raise HTTPException(
                409, f"task {task_id!r} is {task.status.value}: only Queued or In Progress tasks cancel"
            )
        return task_json(_task_or_404(server, task_id))

    @app.post("/tasks/{task_id}/retry", tags=["tasks"])
    def retry_task(task_id: str) -> dict[str, Any]:
        """A Failed or Cancelled task back to Queued with fresh attempts (result_data.retried records it)."""
        task = _task_or_404(server, task_id)
        if not server.repository.retry(task_id):
            raise HTTPException(409, f"task {task_id!r} is {task.status.value}: only Failed or Cancelled tasks retry")
        return task_json(_task_or_404(server, task_id))

    @app.get("/tasks/{task_id}/output", tags=["files"], response_class=FileResponse)
    def task_output(task_id: str) -> FileResponse:
        """The output file of a completed task; Range requests are answered with 206 (seeking)."""
        path = server.output_file(_task_or_404(server, task_id))
        if path is None:
            raise HTTPException(404, f"task {task_id!r} has no output file")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-store"})

    def thumbnail(task_id: str) -> Response:
        _task_or_404(server, task_id)
        image = server.thumbnail(task_id)
        if image is None:
            raise HTTPException(404, f"task {task_id!r} has no thumbnail")
        return Response(image, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/tasks/{task_id}/thumbnail", tags=["files"], response_class=Response)
    def task_thumbnail(task_id: str) -> Response:
        """A JPEG of the first frame of a completed task's output."""
        return thumbnail(task_id)

    @app.get("/thumb/{name}", include_in_schema=False)
    def old_thumbnail(name: str) -> Response:
        if not name.endswith(".jpg"):
            raise HTTPException(404, "not found")
        return thumbnail(name[: -len(".jpg")])


def _add_page_routes(app: FastAPI, server: Any) -> None:
    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    def page() -> HTMLResponse:
        template = (http_server.STATIC_DIR / "index.html").read_text(encoding="utf-8")
        # The first state is in the page itself, so it renders before any request or WebSocket message.
        state = json.dumps(server.status(), default=str).replace("</", "<\\/")
        response = HTMLResponse(template.replace("__INITIAL_STATE__", state), headers={"Cache-Control": "no-store"})
        if server.token:
            response.set_cookie("wan_token", server.token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        file = http_server.STATIC_DIR / name
        if "/" in name or "\\" in name or file.suffix not in STATIC_TYPES or not file.is_file():
            raise HTTPException(404, "not found")
        return Response(file.read_bytes(), media_type=STATIC_TYPES[file.suffix], headers={"Cache-Control": "no-store"})

    @app.get("/api/status", tags=["status"])
    def api_status() -> Response:
        """The status page's data: counts, the current task, the queue with ETAs, recent results, GPU."""
        return Response(json.dumps(server.status(), default=str), media_type="application/json")

    @app.get("/metrics", tags=["status"], response_class=Response)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["status"])
    def healthz() -> JSONResponse:
        """200 when the database answers and the worker loop runs and is not stalled; 503 otherwise (the body
        says which)."""
        try:
            server.repository.counts_by_status()
            database: dict[str, Any] = {"ok": True}
        except Exception as exc:  # the class only: a driver's message may name hosts and users
            database = {"ok": False, "error": exc.__class__.__name__}
        loop = server.loop_health()
        body = {
            "ok": database["ok"] and loop["ok"],
            "database": database,
            "worker_loop": loop,
            "model": {
                "resident": server.resident_model(),
                "unavailable": [{"model": k, "detail": v} for k, v in server.sink.unavailable.items()],
            },
            "worker_id": server.worker_id,
        }
        return JSONResponse(body, 200 if body["ok"] else 503)

    @app.websocket("/ws")
    async def events(websocket: WebSocket) -> None:
        await stream_events(server, websocket)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A hub client queue that wakes the event loop's reader when the hub thread puts an event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, maxsize: int) -> None:
        super().__init__(maxsize)
        self._loop, self._wake = loop, wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutting down)
            self._loop.call_soon_threadsafe(self._wake.set)


async def stream_events(server: Any, websocket: WebSocket) -> None:
    """One WebSocket client: a hello with the current state, then every event as it happens. What the
    client sends is read and dropped (the stream is one-way); a slow client is dropped by the hub."""
    from worker.live.hub import CLIENT_QUEUE_SIZE

    await websocket.accept()
    loop, wake = asyncio.get_running_loop(), asyncio.Event()
    client = server.hub.register(_WakingQueue(loop, wake, CLIENT_QUEUE_SIZE))
    gone, left = asyncio.Event(), asyncio.Event()

    async def drain() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            left.set()
            gone.set()
            wake.set()

    reader = asyncio.ensure_future(drain())
    try:
        status = await asyncio.to_thread(server.status)
        await websocket.send_text(json.dumps({"event": "hello", "seq": server.hub.seq, "status": status}, default=str))
        while not gone.is_set():
            await wake.wait()
            wake.clear()
            while not gone.is_set():
                try:
                    message = client.get_nowait()
                except queue.Empty:
                    break
                if message is None:  # dropped by the hub (too slow) or the server stops
                    gone.set()
                    break
                await websocket.send_text(message)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        server.hub.unregister(client)
        reader.cancel()
        if not left.is_set():
            with contextlib.suppress(RuntimeError, OSError):
                await websocket.close()
