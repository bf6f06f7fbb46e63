"""Acceptance: the status page driven in headless Chromium (DevTools protocol) against a real
`wan-worker run --http` process on tiny real models.

A task is submitted through the API (POST /tasks); the running card is watched advancing; the finished
result is clicked with a real (synthesized) mouse click, and the video element of the result view
plays: its currentTime advances and frames are decoded. A second task is cancelled and retried with
the page's own buttons.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.support.db import IN_CI
from tests.support.processes import Stack, build_stack

pytestmark = pytest.mark.acceptance

STEPS = 40  # enough steps for the running card to be seen at two points (63 ms a step on an idle CPU)
LONG = {"resolution": "256x256", "video_length": 33, "num_inference_steps": 300}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def api(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


class Browser:
    """One headless Chromium page over the DevTools protocol (Runtime.evaluate, Input.dispatchMouseEvent)."""

    def __init__(self, profile: Path) -> None:
        exe = chromium()
        assert exe is not None
        command = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--window-size=1200,1000",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self._exit = ExitStack()
        self.ws: ClientConnection = self._exit.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        )
        self._id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self._id:
                assert "error" not in message, message
                return message["result"]  # type: ignore[no-any-return]

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {expression}")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (not element.click())."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        self._exit.close()
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[tuple[Stack, str, Browser]]:
    if chromium() is None:
        if IN_CI:
            pytest.fail("CI=true needs chromium (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install -y chromium): no browser test")
    root = tmp_path_factory.mktemp("live_browser")
    stack = build_stack(f"sqlite:///{root / 'tasks.db'}", root, tiny_models_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    browser: Browser | None = None
    try:
        stack.start_worker("--http", f"127.0.0.1:{port}")
        stack.wait_for(lambda: _up(base), 90, "the live server")
        browser = Browser(root / "profile")
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"{base}/")
        browser.wait("document.getElementById('live')?.textContent === 'live'", 30, "the page's event stream")
        yield stack, base, browser
    finally:
        if browser is not None:
            browser.close()
        stack.close()


def _up(base: str) -> bool:
    try:
        return api(base, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def _percent(browser: Browser, task_id: str) -> float | None:
    value = browser.eval(
        f"(() => {{ const c = document.getElementById('current');"
        f" return c.dataset.taskId === {json.dumps(task_id)} ? Number(c.dataset.percent) : null; }})()"
    )
    return None if value is None else float(value)


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_watch_the_card_advance_then_play_the_result(page: tuple[Stack, str, Browser]) -> None:
    stack, base, browser = page
    status, created = api(
        base, "POST", "/tasks", {"params": {"model": "tiny_t2v", "prompt": "a red fox", "num_inference_steps": STEPS}}
    )
    assert status == 201, created
    task_id = created["id"]

    # The running card advances: two different percentages of this task, the later one larger.
    seen: list[float] = []

    def advanced() -> bool:
        percent = _percent(browser, task_id)
        if percent is not None and percent > 0 and (not seen or percent != seen[-1]):
            seen.append(percent)
        return len(seen) >= 2

    _until(advanced, 120, f"the running card of {task_id} to advance")
    assert seen[1] > seen[0], seen
    # A live preview (latents projected to RGB, no VAE) in the running card, every few steps.
    preview = browser.wait(
        f"(() => {{ const p = document.querySelector('#current[data-task-id=\"{task_id}\"] #preview');"
        " return p && p.complete && p.naturalWidth > 0 ? Number(p.dataset.step) : null; })()",
        60,
        "a live preview in the running card",
    )
    assert preview % 4 == 0 or preview == STEPS, preview

    # Finished: the result card, with its thumbnail loaded; progress never entered the event list.
    card = f'.result[data-task-id="{task_id}"][data-status="Complete"]'
    browser.wait(f"document.querySelector('{card} img.loaded') !== null", 120, "the result card's thumbnail")
    listed = browser.eval("[...document.querySelectorAll('#events li')].map(li => li.dataset.event)")
    assert "generation_completed" in listed and "progress" not in listed, listed

    # Click it: the view shows the prompt, the seed, and a video that plays.
    browser.click(card)
    browser.wait("document.getElementById('detail').open", 20, "the result view")
    facts = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#detail-facts dd')]"
        ".map(d => [d.dataset.fact, d.textContent]))"
    )
    assert facts["prompt"] == "a red fox" and facts["seed"].lstrip("-").isdigit(), facts
    row = stack.row(task_id)["result_data"]
    assert facts["memory profile"] == row["memory_profile"] and "RSS" in facts["peak memory"], facts
    assert "total" in facts and "mean step" in facts, facts
    # The model-problems banner: one line per model, "model: detail", the detail in full.
    banner = browser.eval("[...document.querySelectorAll('#models-banner li')].map(li => li.textContent)")
    unavailable = api(base, "GET", "/api/status")[1]["models_unavailable"]
    assert banner == [f"{m['model']}: {m['detail']}" for m in unavailable], (banner, unavailable)
    browser.wait("document.getElementById('detail-video')?.readyState >= 2", 30, "the video to load")
    start = browser.eval("document.getElementById('detail-video').currentTime")
    times = []
    for _ in range(10):
        time.sleep(0.2)
        times.append(browser.eval("document.getElementById('detail-video').currentTime"))
    video = browser.eval(
        "(() => { const v = document.getElementById('detail-video');"
        " return {paused: v.paused, error: v.error && v.error.code, width: v.videoWidth, duration: v.duration,"
        " frames: v.getVideoPlaybackQuality().totalVideoFrames}; })()"
    )
    assert video["error"] is None and not video["paused"], video
    assert len({start, *times}) > 3, (start, times)  # currentTime moves (it loops, so not always upwards)
    assert video["frames"] > 0 and video["width"] > 0, video
    browser.click("#detail-close")
    browser.wait("!document.getElementById('detail').open", 10, "the view to close")


def test_cancel_and_retry_from_the_page(page: tuple[Stack, str, Browser]) -> None:
    stack, base, browser = page
    status, created = api(base, "POST", "/tasks", {"params": {"model": "tiny_t2v", "prompt": "a slow dog", **LONG}})
    assert status == 201, created
    task_id = created["id"]
    _until(lambda: (_percent(browser, task_id) or 0) > 0, 120, "the long task to run")
    browser.click(f'#current .action-cancel[data-task-id="{task_id}"]')
    stack.wait_status(task_id, ("Cancelled",), timeout=30)
    retry = f'.result[data-task-id="{task_id}"][data-status="Cancelled"] .action-retry'
    browser.wait(f"document.querySelector('{retry}') !== null", 30, "the retry button on the cancelled card")
    browser.click(retry)
    row = _until(lambda: (r := stack.row(task_id))["status"] in ("Queued", "In Progress") and r, 30, "the retry")
    assert row["result_data"]["retried"]["previous_status"] == "Cancelled"
    assert api(base, "POST", f"/tasks/{task_id}/cancel", None)[0] == 200  # end it for the next test's sake


def test_api_docs_render_without_internet(page: tuple[Stack, str, Browser]) -> None:
    """/docs draws every route from files the worker serves itself (a GPU box often has no internet)."""
    _stack, base, browser = page
    browser.send("Page.navigate", url=f"{base}/docs")
    try:
        count = browser.wait("document.querySelectorAll('.opblock').length", 60, "Swagger UI's route list")
        sources = browser.eval(
            "[...document.querySelectorAll('script[src], link[rel=stylesheet]')].map(e => e.src || e.href)"
        )
        assert sources and all(s.startswith(base) for s in sources), sources
        paths = browser.eval("[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)")
        assert count >= 8 and "/tasks/{task_id}/output" in "".join(paths).replace("\u200b", ""), paths
    finally:
        browser.send("Page.navigate", url=f"{base}/")
        browser.wait("document.getElementById('live')?.textContent === 'live'", 30, "the status page again")
