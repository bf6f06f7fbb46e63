"""Helpers shared by the reliability suites: worker processes, reading the table and the logs, fault injection.

Workers are the real `wan-worker run` console script (tests.support.processes.WorkerProcess) on tiny real
models. Faults are injected from outside only: SIGKILL, `pg_terminate_backend` restricted to the workers'
own `application_name`, and a TCP relay in front of Postgres that can drop and refuse the workers'
connections (the shared Postgres server itself is never restarted or reconfigured).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import psutil
import pytest
import sqlalchemy as sa

from tests.support.processes import Stack, WorkerProcess, decode_row, insert_statement

FINAL = ("Complete", "Failed", "Cancelled")
_CLAIM = re.compile(r"claimed \S+ task \(priority -?\d+\) .*?task_id=(\S+)")
_COMPLETE = re.compile(r"task complete: .*?task_id=(\S+)")


def start_worker(
    stack: Stack,
    name: str,
    *,
    lease_s: float,
    extra: Iterable[str] = (),
    env: dict[str, str] | None = None,
    db_url: str | None = None,
    global_args: Iterable[str] = (),
) -> WorkerProcess:
    """Start `wan-worker [global_args] run` on the stack's database (or `db_url`), logging to `<name>.log`."""
    return stack.start_worker(*extra, name=name, lease_s=lease_s, env=env, db_url=db_url, global_args=global_args)


def insert_many(stack: Stack, rows: list[dict[str, Any]]) -> list[str]:
    """Insert rows in one transaction, the way another program would (raw SQL, DB defaults for the rest).

    Each row is a dict of columns; `params` may be a dict (JSON-encoded here) or raw text.
    """
    ids = []
    with stack.engine.begin() as conn:
        for row in rows:
            values = dict(row)
            if not isinstance(values["params"], str):
                values["params"] = json.dumps(values["params"])
            ids.append(str(conn.execute(insert_statement(values), values).scalar_one()))
    return ids


def read_rows(stack: Stack, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Rows by id (all rows when `ids` is None), JSON columns decoded."""
    with stack.engine.begin() as conn:
        found = conn.execute(sa.text("SELECT * FROM tasks")).mappings().all()
    wanted = None if ids is None else set(ids)
    rows = {}
    for row in found:
        if wanted is not None and row["id"] not in wanted:
            continue
        data = decode_row(row)
        rows[data["id"]] = data
    return rows


def status_counts(stack: Stack) -> Counter[str]:
    with stack.engine.begin() as conn:
        return Counter(dict(conn.execute(sa.text("SELECT status, count(*) FROM tasks GROUP BY status")).all()))


def wait_all_final(stack: Stack, ids: list[str], timeout: float, what: str = "all tasks final") -> None:
    """Wait until every task in `ids` is Complete, Failed or Cancelled (fails on a crashed worker)."""

    def done() -> bool:
        rows = read_rows(stack, ids)
        return len(rows) == len(ids) and all(row["status"] in FINAL for row in rows.values())

    stack.wait_for(done, timeout, what)


def claims_by_task(logs: Iterable[str]) -> Counter[str]:
    """How many times each task was claimed, from the workers' `claimed ... task_id=` log lines."""
    return Counter(match for text in logs for match in _CLAIM.findall(text))


def completions_by_task(logs: Iterable[str]) -> Counter[str]:
    """How many times each task was recorded Complete, from the `task complete:` log lines."""
    return Counter(match for text in logs for match in _COMPLETE.findall(text))


def all_files(directory: Path) -> list[Path]:
    """Every file under `directory`, hidden partial files included."""
    return sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink()) if directory.exists() else []


def partial_files(directory: Path) -> list[Path]:
    """Temporary `.<stem>.<pid>.partial<suffix>` files (an interrupted or in-flight write)."""
    return [p for p in all_files(directory) if ".partial" in p.name]


def processes_writing_under(directory: Path) -> list[psutil.Process]:
    """Live processes (ffmpeg children of killed workers, say) writing a partial file in `directory`."""
    found = []
    marker = str(directory)
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part and ".partial" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# ---- Postgres fault injection ------------------------------------------------------------------------


def with_query(url: str, **params: str) -> str:
    """`url` with extra query parameters (e.g. application_name), keeping the ones it has."""
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def with_port(url: str, host: str, port: int) -> str:
    """`url` pointing at host:port (the relay), user and password kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def terminate_backends(engine: sa.Engine, application_name: str) -> int:
    """Terminate this database's backends whose application_name is ours; never anyone else's session."""
    sql = sa.text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = :app"
    )
    with engine.begin() as conn:
        return sum(1 for (terminated,) in conn.execute(sql, {"app": application_name}) if terminated)


def backends_of(engine: sa.Engine, application_name: str) -> int:
    sql = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = :app"
    )
    with engine.begin() as conn:
        return int(conn.execute(sql, {"app": application_name}).scalar_one())


class TcpRelay:
    """A TCP relay to the database server for the workers' connections only.

    `down()` resets every relayed connection and refuses new ones (accept, then close at once) until
    `up()`: a network outage as the workers see it, while the server keeps serving everyone else.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.accepted = 0
        self.refused = 0
        self.reset = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-relay", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def down(self) -> int:
        """Cut every relayed connection and refuse new ones; returns how many connections were cut."""
        self._up.clear()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._drop(sock)
        self.reset += len(sockets) // 2
        return len(sockets) // 2

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()


# ---- the output stage (issue 15) ---------------------------------------------------------------------


def pause_writes_env(directory: Path) -> dict[str, str]:
    """The environment that makes a worker's deferred writes pause half-way (wan_engine.generation_run's
    `WAN_TEST_PAUSE_IN_WRITE` hook): `<directory>/<stem>.paused` appears, the write waits for `<stem>.resume`."""
    from wan_engine.generation_run import PAUSE_IN_WRITE_ENV

    directory.mkdir(parents=True, exist_ok=True)
    return {PAUSE_IN_WRITE_ENV: str(directory)}


def resume_write(directory: Path, stem: str) -> None:
    """Let the paused (or a future) deferred write of output `stem` go on."""
    (directory / f"{stem}.resume").touch()
