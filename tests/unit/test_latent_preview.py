"""Live previews: the linear latent-to-RGB projection (wan_engine.latent_preview) and its relay to a
`preview` event of the running task (worker.live.http_server)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from websockets.sync.client import connect

from tests.support.db import migrated_engine
from wan_engine import latent_preview
from worker.live.events import LiveSink
from worker.live.http_server import LiveServer
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask


@pytest.fixture(autouse=True)
def _unsubscribed() -> Any:
    yield
    latent_preview.subscribe(None)


def test_the_projection_uses_the_wan_factors_per_channel_count() -> None:
    assert len(latent_preview.WAN21_RGB_FACTORS) == 16 and len(latent_preview.WAN22_RGB_FACTORS) == 48
    generator = torch.Generator().manual_seed(0)
    for channels in (16, 48):
        latents = torch.randn(1, channels, 3, 6, 10, generator=generator)
        rgb = latent_preview.project(latents)
        assert rgb is not None and rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8
        np.testing.assert_allclose(rgb, latent_preview.project_numpy(latents[0, :, -1].numpy()), atol=1)
    # One channel's unit impulse gives that channel's factors plus the bias (mapped from [-1, 1] to 0..255).
    impulse = torch.zeros(1, 16, 1, 1, 1)
    impulse[0, 2] = 1.0
    expected = (np.add(latent_preview.WAN21_RGB_FACTORS[2], latent_preview.WAN21_RGB_BIAS) + 1) * 127.5
    np.testing.assert_allclose(latent_preview.project(impulse)[0, 0], expected, atol=1)  # type: ignore[index]
    assert latent_preview.project(torch.zeros(1, 12, 1, 4, 4)) is None  # no factors for this VAE


def test_on_step_hands_over_every_nth_step_only_when_subscribed() -> None:
    kwargs = {"latents": torch.zeros(1, 16, 2, 4, 4)}
    latent_preview.on_step(4, 10, kwargs)  # nobody listens: nothing happens
    frames: list[latent_preview.PreviewFrame] = []
    latent_preview.subscribe(frames.append, every=4)
    for step in range(1, 11):
        latent_preview.on_step(step, 10, kwargs)
    assert [f.step for f in frames] == [4, 8, 10]  # every 4th, and the last
    latent_preview.on_step(4, 10, {})  # no latents: skipped
    latent_preview.subscribe(lambda frame: 1 / 0)
    latent_preview.on_step(4, 10, kwargs)  # a failing subscriber never fails the step
    with pytest.raises(ValueError, match="every=0"):
        latent_preview.subscribe(frames.append, every=0)


def test_a_step_without_a_due_preview_costs_next_to_nothing() -> None:
    latent_preview.subscribe(lambda frame: None, every=1_000_000)
    kwargs = {"latents": torch.zeros(1, 16, 21, 60, 104)}
    started = time.perf_counter()
    for step in range(1, 10_001):
        latent_preview.on_step(step, 10**9, kwargs)
    assert (time.perf_counter() - started) / 10_000 < 50e-6  # per step: nothing next to a step of tens of ms


def test_the_live_server_publishes_previews_of_the_running_task(tmp_path: Path) -> None:
    repository = SqlTaskRepository(migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}"))
    task_id = repository.insert(NewTask("t2v", {"model": "tiny_t2v", "prompt": "a cat"}))
    live = LiveServer(repository, LiveSink(outbox_size=100), "127.0.0.1", 0, preview_every=2)
    live.start()
    try:
        with connect(f"ws://127.0.0.1:{live.port}/ws", open_timeout=10) as ws:
            ws.recv(timeout=10)  # hello
            live.sink.publish("generation_started", task_id, model="tiny_t2v", task_type="t2v")
            deadline = time.monotonic() + 10
            while live.hub.current is None and time.monotonic() < deadline:
                time.sleep(0.02)
            latent_preview.on_step(2, 8, {"latents": torch.randn(1, 16, 3, 8, 12)})
            while True:
                event = json.loads(ws.recv(timeout=10))
                if event["event"] == "preview":
                    break
        assert (event["task_id"], event["step"], event["total_steps"]) == (task_id, 2, 8)
        header, data = event["image"].split(",", 1)
        assert header == "data:image/png;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (12, 8)
        assert live.status()["preview"]["step"] == 2  # a page opened now shows it too
    finally:
        live.stop()
