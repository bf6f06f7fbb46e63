"""The live hub: one thread that turns the worker's events and the table's changes into one ordered stream.

Events come from two places. The worker loop publishes generation_started / progress / completed /
failed / task_cancelled / vram_warning on `LiveSink.outbox` as they happen. Rows queued or cancelled by
other programs are found by polling the table (about once a second). Before the hub forwards an event
about a task it has not seen yet it polls first, so a client always sees `task_queued` before that
task's `generation_started`. Each event gets a sequence number and is fanned out to every client's own
bounded queue (a slow client loses its connection, it never slows the worker).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime
from typing import Any

from worker.live.events import LiveSink, make_event
from worker.task import Task, TaskStatus
from worker.tasks.params import model_key_for

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
CLIENT_QUEUE_SIZE = 2048
RECENT_EVENTS = 200
POLL_LIMIT = 500  # rows read per poll; a larger burst is paged through on the next polls
KNOWN_TASKS = 20_000  # statuses remembered to tell a change from a repeat

_Q, _P, _X = TaskStatus.QUEUED.value, TaskStatus.IN_PROGRESS.value, TaskStatus.CANCELLED.value


class LiveHub:
    """Merges the sink's events with the table's changes; keeps the current task's live state."""

    def __init__(self, repository: Any, sink: LiveSink, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.repository = repository
        self.sink = sink
        self.poll_interval_s = poll_interval_s
        self.poll_limit = POLL_LIMIT
        self.seq = 0
        self.current: dict[str, Any] | None = None  # the task this worker runs: id, model, progress
        self.preview: dict[str, Any] | None = None  # the current task's latest preview event (a page opened later)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.listeners: list[Any] = []  # callables(event) run in the hub thread (metrics)
        self._known: OrderedDict[str, str] = OrderedDict()
        self._cursor: tuple[datetime, str] | None = None  # (updated_at, id) of the last row seen
        self._started_at: datetime | None = None
        self._clients: set[queue.Queue[str | None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-hub", daemon=True)

    # ---- life cycle ----

    def start(self) -> LiveHub:
        self._first_look()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for client in self._clients:
                _offer(client, None)

    def _first_look(self) -> None:
        """Remember the open rows without announcing them (nobody is listening yet)."""
        try:
            rows = self.repository.changed_since(None, limit=KNOWN_TASKS)
            latest = self.repository.latest_update()
        except Exception as exc:
            log.warning("live hub could not read the table: %s", exc.__class__.__name__)
            rows, latest = [], None
        for task in rows:
            self._remember(task.id, task.status.value)
        self._started_at = latest
        if latest is not None:  # rows stamped at `latest` are looked at again: known ones are skipped
            self._cursor = (latest, "")

    # ---- clients ----

    def register(self, client: queue.Queue[str | None] | None = None) -> queue.Queue[str | None]:
        """A new client's queue (or the one given: the HTTP server's, which wakes its event loop)."""
        client = client if client is not None else queue.Queue(CLIENT_QUEUE_SIZE)
        with self._lock:
            self._clients.add(client)
        return client

    def unregister(self, client: queue.Queue[str | None]) -> None:
        with self._lock:
            self._clients.discard(client)

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    # ---- the thread ----

    def _run(self) -> None:
        outbox = self.sink.outbox
        next_poll = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, next_poll - time.monotonic())
            try:
                event = outbox.get(timeout=min(timeout, 0.5)) if outbox is not None else None
            except queue.Empty:
                event = None
            if outbox is None:
                self._stop.wait(timeout)
            try:
                if event is not None:
                    self.handle(event)
                if time.monotonic() >= next_poll:
                    self.poll()
                    next_poll = time.monotonic() + self.poll_interval_s
            except Exception as exc:  # a database hiccup must not end the stream
                log.warning("live hub: %s: %s", exc.__class__.__name__, exc)
                next_poll = time.monotonic() + self.poll_interval_s

    def handle(self, event: dict[str, Any]) -> None:
        """Forward one worker event, polling first if it is about a task not seen yet."""
        task_id = event.get("task_id")
        if task_id and task_id not in self._known:
            self.poll()
        name = event["event"]
        if name == "generation_started":
            self.current = {
                "task_id": task_id,
                "model": event.get("model"),
                "task_type": event.get("task_type"),
                "started_ts": event["ts"],
                "eta_seconds": event.get("eta_seconds"),
                "progress": None,
            }
            self.preview = None
            self._remember(task_id, _P)
        elif name == "progress" and self._known.get(task_id) == _X:
            return  # cancelled in the table; the worker stops at its next heartbeat, clients already know
        elif name == "preview":
            if not (self.current and self.current["task_id"] == task_id):
                return  # a late frame of a task that has ended
            self.preview = event
        elif name == "progress" and self.current and self.current["task_id"] == task_id:
            keys = ("stage", "step", "total_steps", "percent", "eta_seconds", "vram_gb")
            self.current["progress"] = {k: event.get(k) for k in keys} | {"ts": event["ts"]}
        elif name in ("generation_completed", "generation_failed", "task_cancelled"):
            if self.current and self.current["task_id"] == task_id:
                self.current = None
                self.preview = None
            if name == "task_cancelled":
                if self._known.get(task_id) == _X:
                    self._notify(event)  # the poll already announced it: count it, do not repeat it
                    return
                self._remember(task_id, _X)
            elif not event.get("retrying"):  # a retried task is announced again when the poll sees it queued
                self._remember(task_id, "Complete" if name == "generation_completed" else "Failed")
        self.broadcast(event)

    def poll(self) -> None:
        """Announce rows that became Queued (new or re-queued) or Cancelled since the last look."""
        rows: list[Task] = self.repository.changed_since(self._cursor, self.poll_limit)
        for task in rows:
            status, previous = task.status.value, self._known.get(task.id)
            if task.updated_at is not None:
                self._cursor = (task.updated_at, task.id)
            if status == previous:
                continue
            new_row = previous is None and self._is_new(task)
            if status == _Q or (new_row and status != _X):
                # A row claimed (or even finished) between two looks was still queued once.
                self.broadcast(
                    make_event(
                        "task_queued",
                        task.id,
                        task_type=task.task_type,
                        model=model_key_for(task.task_type, task.params_text),
                        priority=task.priority,
                    )
                )
            if status == _X:
                if self.current and self.current["task_id"] == task.id:
                    self.current = None
                self.broadcast(make_event("task_cancelled", task.id, by="table"))
            # Worker-owned transitions (started, complete, failed) are announced by the worker's own events.
            self._remember(task.id, status)

    def _is_new(self, task: Task) -> bool:
        return self._started_at is None or (task.created_at is not None and task.created_at >= self._started_at)

    def _remember(self, task_id: str, status: str) -> None:
        self._known[task_id] = status
        self._known.move_to_end(task_id)
        while len(self._known) > KNOWN_TASKS:
            self._known.popitem(last=False)

    def broadcast(self, event: dict[str, Any]) -> None:
        """Number the event, keep it in the recent list, run listeners, and queue it for every client."""
        self.seq += 1
        event = {**event, "seq": self.seq}
        self.recent.append(event)
        self._notify(event)
        text = json.dumps(event, default=str)
        with self._lock:
            for client in list(self._clients):
                if not _offer(client, text):
                    self._clients.discard(client)  # too slow: its handler sees None and closes

    def _notify(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as exc:
                log.debug("live listener failed: %s", exc)


def _offer(client: queue.Queue[str | None], item: str | None) -> bool:
    try:
        client.put_nowait(item)
        return True
    except queue.Full:
        try:
            client.get_nowait()  # make room for the end marker
            client.put_nowait(None)
        except (queue.Empty, queue.Full):
            pass
        return False
