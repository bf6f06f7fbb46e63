"""Start-up without a database: `wan-worker run` waits for Postgres (a reboot, a restart), and gives up clearly.

The worker's connections go through a local TCP relay that refuses them until the test brings it up.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.reliability.harness import TcpRelay, start_worker, with_port
from tests.support.processes import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres]

PARAMS = {"model": "tiny_t2v", "prompt": "a harbour at night", "resolution": "64x48", "video_length": 5}


def _relay(stack: Stack) -> tuple[TcpRelay, str]:
    server = urlsplit(stack.db_url)
    relay = TcpRelay(server.hostname or "127.0.0.1", server.port or 5432)
    relay.down()  # the database "is not up yet"
    return relay, with_port(stack.db_url, "127.0.0.1", relay.port)


def test_worker_waits_for_the_database_then_serves(postgres_stack: Stack, tmp_path: Path) -> None:
    stack = postgres_stack
    task = stack.insert("t2v", PARAMS)
    relay, url = _relay(stack)
    try:
        worker = start_worker(stack, "late-db", lease_s=30, db_url=url)
        stack.wait_for(lambda: "unreachable" in worker.log_text(), 60, "the worker to report the missing database")
        time.sleep(2)
        assert worker.process is not None and worker.process.poll() is None, "still waiting, not exited"
        assert stack.row(task)["status"] == "Queued"
        relay.up()
        row = stack.wait_status(task, ("Complete", "Failed"), timeout=120)
        assert row["status"] == "Complete", row["error_message"]
        assert relay.refused > 0, "the worker really tried while the database was away"
    finally:
        for worker in stack.workers:
            worker.stop()
        relay.close()


def test_worker_gives_up_after_the_wait_naming_the_database(postgres_stack: Stack) -> None:
    relay, url = _relay(postgres_stack)
    try:
        worker = start_worker(postgres_stack, "no-db", lease_s=30, db_url=url, extra=["--db-wait-seconds", "3"])
        assert worker.wait_exit(60) == 2
        log = worker.log_text()
        assert f"127.0.0.1:{relay.port}" in log and "unreachable (waited 3s)" in log
    finally:
        relay.close()


def test_a_stop_signal_ends_the_wait(postgres_stack: Stack) -> None:
    relay, url = _relay(postgres_stack)
    try:
        worker = start_worker(postgres_stack, "stopped", lease_s=30, db_url=url)
        postgres_stack.wait_for(lambda: "unreachable" in worker.log_text(), 60, "the worker to start waiting")
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit(30) == 0
        assert time.monotonic() - started < 10
    finally:
        relay.close()
