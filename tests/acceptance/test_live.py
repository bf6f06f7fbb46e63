"""Acceptance: live progress from a real `wan-worker run --http` process on tiny real models.

One scenario (module fixture), several checks: a WebSocket client records the events of a task inserted
with raw SQL; a second, long task is screenshotted mid-run in headless Chromium and then cancelled with
SQL; `wan-worker status ID --follow` draws both; /metrics is compared with the table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.db import IN_CI
from tests.support.processes import Stack, build_stack, wan_worker_command

pytestmark = pytest.mark.acceptance

A_STEPS = 8
# B: about a minute of steps on this CPU (63 ms each when idle), cancelled a few seconds in: it must
# outlast a Chromium screenshot and `status --follow` starting, on a loaded machine too.
B_PARAMS = {"resolution": "256x256", "video_length": 33, "num_inference_steps": 300}
BAR_RGB = (46, 160, 67)  # --bar in worker/live/static/style.css
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1100,1000",
    "--virtual-time-budget=3000",
]


@dataclass
class Page:
    png: Path
    dom: str


@dataclass
class Scenario:
    stack: Stack
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)
    task_a: str = ""
    task_b: str = ""
    task_c: str = ""
    running: Page | None = None
    done: Page | None = None
    b_running_after_shot: bool = False
    follow_a: tuple[int, str] = (0, "")
    follow_b: tuple[int, str] = (0, "")
    metrics: str = ""

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("task_id") == task_id]

    def wait_event(self, what: str, predicate: Any, timeout: float = 120.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in list(self.events) if predicate(e)]
            return bool(found)

        self.stack.wait_for(seen, timeout, what)
        return found[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def capture(url: str, png: Path) -> Page:
    """Screenshot and DOM (after scripts ran) of a page, in one headless Chromium run."""
    exe = chromium()
    assert exe is not None
    profile = png.with_suffix(".profile")
    command = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert png.is_file(), f"no screenshot: {done.stderr[-2000:]}"
    return Page(png, done.stdout)


class Follow:
    """`wan-worker status ID --follow` in the background, its output collected as it comes."""

    def __init__(self, stack: Stack, task_id: str) -> None:
        command = [*wan_worker_command(), "status", task_id, "--follow", "--db", stack.db_url]
        env = {**os.environ, "WAN_PRESETS_DIR": str(stack.presets_dir), "WAN_MODELS_DIR": str(stack.models_dir)}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(4096):  # type: ignore[attr-defined]
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def result(self) -> tuple[int, str]:
        code = self.process.wait(60)
        self._reader.join(10)
        return code, self.text


def record(url: str, events: list[dict[str, Any]], ready: threading.Event, stop: threading.Event) -> None:
    with connect(url, open_timeout=30) as ws:
        while not stop.is_set():
            try:
                message = ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed:  # the worker shut down (end of the scenario): nothing more to record
                return
            event = json.loads(message)
            if event["event"] == "hello":
                ready.set()
            events.append(event)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("live")
    stack = build_stack(f"sqlite:///{root / 'tasks.db'}", root, tiny_models_dir)
    port = free_port()
    run = Scenario(stack, port)
    base = f"http://127.0.0.1:{port}"
    stop, ready = threading.Event(), threading.Event()
    try:
        stack.start_worker("--http", f"127.0.0.1:{port}")
        stack.wait_for(lambda: _get(f"{base}/api/status") is not None, 90, "the live server")
        recorder = threading.Thread(target=record, args=(f"ws://127.0.0.1:{port}/ws", run.events, ready, stop))
        recorder.start()
        assert ready.wait(30), "no hello from /ws"

        # A: a short task, inserted the way other programs do.
        run.task_a = stack.insert("t2v", {"model": "tiny_t2v", "prompt": "a cat", "num_inference_steps": A_STEPS})
        run.wait_event("A completed", lambda e: e["event"] == "generation_completed")
        # B: long, screenshotted mid-run with C queued behind it, then both cancelled with SQL.
        run.task_b = stack.insert("t2v", {"model": "tiny_t2v", "prompt": "a dog", **B_PARAMS})
        run.task_c = stack.insert("t2v", {"model": "tiny_t2v", "prompt": "a cow", "num_inference_steps": A_STEPS})
        follow_b = Follow(stack, run.task_b)
        run.wait_event(
            "B at 5%", lambda e: e.get("task_id") == run.task_b and e.get("stage") == "denoising" and e["percent"] >= 5
        )
        stack.wait_for(lambda: "denoising" in follow_b.text, 60, "status --follow drawing B")
        if chromium():
            run.running = capture(f"{base}/", root / "running.png")
        run.b_running_after_shot = stack.row(run.task_b)["status"] == "In Progress"
        stack.execute("UPDATE tasks SET status = 'Cancelled' WHERE id IN (:b, :c)", b=run.task_b, c=run.task_c)
        run.wait_event("B cancelled", lambda e: e["event"] == "task_cancelled" and e["task_id"] == run.task_b, 30)
        run.follow_b = follow_b.result()
        run.follow_a = Follow(stack, run.task_a).result()
        stack.wait_for(lambda: stack.row(run.task_b)["worker_id"] is None or _idle(base), 30, "worker idle")
        run.metrics = _get(f"{base}/metrics") or ""
        if chromium():
            run.done = capture(f"{base}/", root / "done.png")
        yield run
    finally:
        stop.set()
        stack.close()


def _get(url: str) -> str | None:
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _idle(base: str) -> bool:
    status = _get(f"{base}/api/status")
    return status is not None and json.loads(status)["current"] is None


# ---- the checks ---------------------------------------------------------------------------------------


def test_websocket_records_queued_started_each_step_and_completed_in_order(scenario: Scenario) -> None:
    events = scenario.of(scenario.task_a)
    names = [e["event"] for e in events]
    assert names[:2] == ["task_queued", "generation_started"], names
    assert names[-1] == "generation_completed", names
    # Between them: every step's progress, and a live preview every 4th step (wan_engine.latent_preview).
    assert "progress" in names and set(names[2:-1]) <= {"progress", "preview"}, names
    previews = [e for e in events if e["event"] == "preview"]
    assert all(e["step"] % 4 == 0 and e["image"].startswith("data:image/png;base64,") for e in previews), previews
    progress = [e for e in events[2:-1] if e["event"] == "progress"]
    stages = [e["stage"] for e in progress]
    assert stages[0] == "loading_model" and stages[-2:] == ["decoding", "writing_video"], stages
    steps = [e["step"] for e in progress if e["stage"] == "denoising"]
    assert steps == list(range(A_STEPS + 1)), steps  # one event per denoising step, in order
    assert all(isinstance(e["eta_seconds"], float) for e in progress if e["stage"] == "denoising")
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    completed = events[-1]
    assert completed["output_location"].endswith(".mp4") and len(completed["step_times"]) == A_STEPS
    assert events[1]["eta_basis"] == "static"  # nothing learned yet on a fresh database


def test_table_changes_from_other_programs_reach_the_stream(scenario: Scenario) -> None:
    events = scenario.of(scenario.task_b)
    names = [e["event"] for e in events]
    assert names[:2] == ["task_queued", "generation_started"], names
    assert names.count("task_cancelled") == 1, names
    assert names[-1] == "task_cancelled"
    started = events[1]
    # A new shape: from FLOPs, or carried over from A's learned times when A's completion came first.
    assert started["eta_basis"] in ("static", "learned (scaled from 64x48x9)") and started["eta_seconds"] > 0
    # C was queued behind B and cancelled before it ran: both changes came from the table alone.
    assert [(e["event"], e.get("by")) for e in scenario.of(scenario.task_c)] == [
        ("task_queued", None),
        ("task_cancelled", "table"),
    ]


def test_result_data_and_progress_carry_monitoring_and_eta(scenario: Scenario) -> None:
    row = scenario.stack.row(scenario.task_a)
    assert row["status"] == "Complete"
    monitor = row["result_data"]["monitor"]
    assert monitor["samples"] >= 2 and monitor["rss_peak_gb"] > 0 and monitor["rss_mean_gb"] > 0
    assert "vram_peak_gb" in monitor and "vram_mean_gb" in monitor  # None on a machine without a GPU
    assert "eta_seconds" in row["progress"] and "vram_gb" in row["progress"]


def test_metrics_parse_and_match_the_table(scenario: Scenario) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scenario.metrics)}
    with scenario.stack.engine.begin() as conn:
        counts = dict(conn.exec_driver_sql("SELECT status, count(*) FROM tasks GROUP BY status").all())
    tasks = {s.labels["status"]: s.value for s in families["wan_table_tasks"].samples}
    assert tasks == {status: counts.get(status, 0) for status in tasks}
    assert tasks["Complete"] == 1 and tasks["Cancelled"] == 2
    assert families["wan_table_queue_depth"].samples[0].value == counts.get("Queued", 0)
    worker_ids = {s.labels.get("worker_id") for s in families["wan_worker_tasks"].samples}
    assert len(worker_ids) == 1 and None not in worker_ids  # per-worker series carry the worker's id
    outcomes = {s.labels["outcome"]: s.value for s in families["wan_worker_tasks"].samples if s.name.endswith("_total")}
    assert outcomes == {"completed": 1, "failed": 0, "cancelled": 1}
    steps = {s.name: s.value for s in families["wan_step_seconds"].samples if "le" not in s.labels}
    assert steps["wan_step_seconds_count"] == A_STEPS  # observed from the completed task's step times
    assert families["wan_process_resident_memory_bytes"].samples[0].value > 0


def test_status_follow_draws_a_bar_and_exits_with_the_outcome(scenario: Scenario) -> None:
    code_b, out_b = scenario.follow_b
    assert code_b == 1, out_b  # cancelled
    assert "denoising" in out_b and "ETA" in out_b and "Cancelled" in out_b, out_b
    code_a, out_a = scenario.follow_a
    assert code_a == 0, out_a
    assert "Complete" in out_a and "100%" in out_a, out_a


def _bar_run(png: Path) -> int:
    """Longest horizontal run of the progress-bar colour in the screenshot."""
    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    best = 0
    for y in range(0, height, 2):
        run = 0
        for x in range(width):
            r, g, b = pixels[x, y]
            if abs(r - BAR_RGB[0]) < 8 and abs(g - BAR_RGB[1]) < 8 and abs(b - BAR_RGB[2]) < 8:
                run += 1
                best = max(best, run)
            else:
                run = 0
    return best


def test_status_page_in_chromium_shows_progress_then_the_result(scenario: Scenario) -> None:
    if chromium() is None:
        if IN_CI:
            pytest.fail("CI=true needs chromium (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install -y chromium): no screenshot test")
    assert scenario.running is not None and scenario.done is not None
    assert scenario.b_running_after_shot, "task B ended before the screenshot: give it more steps"
    running = scenario.running.dom
    current = re.search(r'<div id="current"[^>]*data-task-id="(\w+)"[^>]*data-percent="([\d.]+)"', running)
    assert current is not None, running[:3000]
    assert current.group(1) == scenario.task_b and float(current.group(2)) >= 5
    assert re.search(r'id="stage">denoising<', running) and re.search(r'id="eta"[^>]*>ETA \d', running)
    assert _bar_run(scenario.running.png) >= 40  # the bar, drawn (the badge and the live dot are narrower)
    # The queued task behind it, with a start and end time counting the running task.
    queued = re.search(rf'<tr data-task-id="{scenario.task_c}">(.*?)</tr>', running)
    assert queued is not None and len(re.findall(r"<td>\d+ (?:s|min)", queued.group(1))) == 2, running[:3000]

    done = scenario.done.dom
    card = rf'data-task-id="{scenario.task_a}" data-status="Complete"[^>]*><img[^>]*class="loaded"'
    assert re.search(card, done), done[:3000]  # the result, with its first-frame thumbnail loaded
    assert re.search(rf'data-task-id="{scenario.task_b}" data-status="Cancelled"', done)
    assert 'id="current" class="card">' in done or "idle" in done
