"""Database outage: Postgres backends of the workers are terminated mid-run, then their network goes away.

Two real `wan-worker run` processes connect through a local TCP relay with their own `application_name`.
While they work through the queue the harness
- terminates their backends about once a second (`pg_terminate_backend`, restricted to that
  application_name on this database: no other session is touched, the server is never restarted), and
- once a third of the queue is done, cuts the relay for a few seconds: every connection is reset and new
  ones are refused, so claims, heartbeats and result writes fail and the workers must back off and retry.

Afterwards every task must be `Complete` with one output file, both workers still running, and their logs
must show that they saw the outage (otherwise the test proved nothing).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.reliability.figures import Figures, sized
from tests.reliability.harness import (
    TcpRelay,
    all_files,
    backends_of,
    claims_by_task,
    insert_many,
    read_rows,
    start_worker,
    status_counts,
    terminate_backends,
    wait_all_final,
    with_port,
    with_query,
)
from tests.support.processes import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.slow]

TASKS = sized(10, 60)
WORKERS = 2
LEASE_S = 15.0
TERMINATE_EVERY_S = 1.0
OUTAGE_S = sized(5.0, 20.0)
PARAMS = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 9, "num_inference_steps": 6}
OUTAGE_SIGNS = ("claim failed", "heartbeat failed", "database write failed", "stale sweep failed")


class Saboteur(threading.Thread):
    """Terminates the workers' backends every TERMINATE_EVERY_S; cuts the relay once, when told to."""

    def __init__(self, stack: Stack, app: str, relay: TcpRelay, outage_after: int) -> None:
        super().__init__(name="saboteur", daemon=True)
        self.stack, self.app, self.relay, self.outage_after = stack, app, relay, outage_after
        self.stop = threading.Event()
        self.terminated = 0
        self.outage_started: float | None = None
        self.recovery_s: float | None = None  # from the end of the outage to the next task Complete
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(TERMINATE_EVERY_S):
                self.terminated += terminate_backends(self.stack.engine, self.app)
                complete = status_counts(self.stack)["Complete"]
                if self.outage_started is None and complete >= self.outage_after:
                    self.outage_started = time.monotonic()
                    self.relay.down()
                    self.stop.wait(OUTAGE_S)
                    self.relay.up()
                    self.recovery_s = self._time_to_next_completion(time.monotonic())
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _time_to_next_completion(self, since: float) -> float | None:
        before = status_counts(self.stack)["Complete"]
        while not self.stop.wait(0.2):
            if status_counts(self.stack)["Complete"] > before or not status_counts(self.stack)["Queued"]:
                return round(time.monotonic() - since, 1)
        return None


def test_workers_survive_terminated_backends_and_an_outage(
    postgres_stack: Stack, tmp_path: Path, figures: Figures
) -> None:
    stack = postgres_stack
    app = f"wanrel_{uuid.uuid4().hex[:10]}"
    server = urlsplit(stack.db_url)
    relay = TcpRelay(server.hostname or "127.0.0.1", server.port or 5432)
    worker_url = with_port(with_query(stack.db_url, application_name=app), "127.0.0.1", relay.port)
    ids = insert_many(
        stack, [{"task_type": "t2v", "params": {**PARAMS, "prompt": f"outage {n}", "seed": n}} for n in range(TASKS)]
    )
    saboteur = Saboteur(stack, app, relay, outage_after=TASKS // 3)
    try:
        workers = [start_worker(stack, f"outage-{n}", lease_s=LEASE_S, db_url=worker_url) for n in range(WORKERS)]
        stack.wait_for(lambda: backends_of(stack.engine, app) > 0, 120, "the workers to connect through the relay")
        started = time.monotonic()
        saboteur.start()
        wait_all_final(stack, ids, timeout=300 + 10 * TASKS, what="the queue to drain through the outages")
        elapsed = time.monotonic() - started
        saboteur.stop.set()
        saboteur.join(OUTAGE_S + 30)
        assert saboteur.error is None, repr(saboteur.error)
        rows = read_rows(stack, ids)
        alive = [w.process is not None and w.process.poll() is None for w in workers]
        logs = [w.log_text() for w in workers]
    finally:
        saboteur.stop.set()
        for worker in stack.workers:
            worker.stop()
        relay.close()

    failed = {task_id: row["error_message"] for task_id, row in rows.items() if row["status"] != "Complete"}
    assert not failed, f"tasks lost to the outage: {failed}"
    assert all(alive), "a worker died during the outage"
    outputs = all_files(stack.outputs_dir)
    assert outputs == sorted(Path(row["output_location"]) for row in rows.values()), "one output per task"
    claims = claims_by_task(logs)
    for task_id, row in rows.items():
        # A claim whose commit reply was lost is only seen through the expired lease: attempts >= logged claims.
        assert 1 <= claims[task_id] <= row["attempts"] <= row["max_attempts"], (task_id, claims[task_id], row)

    assert saboteur.outage_started is not None, "the queue drained before the outage: raise TASKS"
    assert saboteur.terminated > 0, "no backend of the workers was ever terminated"
    assert relay.refused > 0, "nobody tried to connect during the outage, so it was not felt"
    signs = {sign: sum(text.count(sign) for text in logs) for sign in OUTAGE_SIGNS}
    assert sum(signs.values()) > 0, f"the workers' logs show no database trouble: {signs}"
    assert "Traceback" not in "".join(logs), "an exception escaped to the log"
    figures.record(
        "db_outage[postgres]",
        workers=WORKERS,
        tasks=TASKS,
        backends_terminated=saboteur.terminated,
        outage_s=OUTAGE_S,
        connections_reset=relay.reset,
        connections_refused=relay.refused,
        tasks_lost=len(failed),
        extra_attempts=sum(row["attempts"] - 1 for row in rows.values()),
        log_signs=signs,
        recovery_after_outage_s=saboteur.recovery_s,
        seconds=round(elapsed, 1),
    )
