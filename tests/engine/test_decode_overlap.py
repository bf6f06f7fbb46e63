"""The VAE decode overlapped with the next task (issue 15, wan_engine.decode_overlap), on the tiny models.

On this CPU machine the decode overlaps only with WAN_OVERLAP_DECODE=on (auto keeps it on the loop's thread off
CUDA); the code path is the one a GPU runs, less the CUDA stream and event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headless_wgp import PendingWrite, WanOrchestrator
from wan_engine.decode_overlap import OVERLAP_DECODE_ENV, decode_overlaps, overlap_setting
from wan_engine.errors import InvalidRequestError
from wan_engine.video_io import read_video_info

PARAMS = {"resolution": "64x48", "video_length": 9, "num_inference_steps": 2, "seed": 5}
WAIT_S = 120


@pytest.fixture
def orchestrator(tiny_models_dir: Path) -> Iterator[WanOrchestrator]:
    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_t2v")
    yield orchestrator
    orchestrator.unload_model()


def test_setting_values_and_the_resident_rule() -> None:
    assert overlap_setting({}) == "auto" and overlap_setting({OVERLAP_DECODE_ENV: " ON "}) == "on"
    assert overlap_setting({OVERLAP_DECODE_ENV: "0"}) == "off" and overlap_setting({OVERLAP_DECODE_ENV: "true"}) == "on"
    with pytest.raises(InvalidRequestError, match=r"WAN_OVERLAP_DECODE='sometimes': allowed auto, on, off"):
        overlap_setting({OVERLAP_DECODE_ENV: "sometimes"})
    auto: dict[str, str] = {}
    assert decode_overlaps("cuda", "gpu", auto) and not decode_overlaps("cpu", "cpu", auto)
    assert not decode_overlaps("cuda", "model_offload", auto), "an offloaded VAE moves: never overlapped"
    on = {OVERLAP_DECODE_ENV: "on"}
    assert decode_overlaps("cpu", "cpu", on) and not decode_overlaps("cuda", "group_offload", on)
    assert not decode_overlaps("cuda", "gpu", {OVERLAP_DECODE_ENV: "off"})


def _finish_on_thread(pending: PendingWrite, **kwargs: Any) -> Any:
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(pending.finish(**kwargs))
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT_S)
    if errors:
        raise errors[0]
    return results[0]


def test_overlapped_decode_gives_the_same_frames_and_records_it(
    orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "off")
    in_run = orchestrator.generate_t2v("a cat", output_path=tmp_path / "in_run.mp4", deferred_write=True, **PARAMS)
    assert isinstance(in_run, PendingWrite) and in_run.decode is None and in_run.frames is not None

    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    stages: list[str] = []
    path = tmp_path / "overlapped.mp4"
    pending = orchestrator.generate_t2v(
        "a cat", output_path=path, progress=lambda e: stages.append(e.stage), deferred_write=True, **PARAMS
    )
    assert isinstance(pending, PendingWrite) and pending.decode is not None and pending.frames is None
    assert "decoding" not in stages, "the decode is left to the finisher"
    assert pending.result.timings["decode"] is None and pending.result.frames == 9
    assert (pending.result.width, pending.result.height) == (64, 48)

    result = _finish_on_thread(pending, progress=lambda e: stages.append(e.stage))
    assert stages[-2:] == ["decoding", "writing_video"]
    assert pending.frames is not None
    np.testing.assert_array_equal(pending.frames, in_run.frames)  # same latents, same VAE: the same frames
    assert read_video_info(path).frames == 9
    assert result.timings["decode"] > 0 and result.timings["write"] > 0
    assert result.timings["total"] >= result.timings["denoise"] + result.timings["decode"] + result.timings["write"]
    overlap = result.extra["decode_overlap"]
    assert overlap["overlapped"] is True and overlap["retried_tiled"] is False and overlap["vae_wait_s"] >= 0
    assert result.extra["video_encoding"] is not None and (result.frames, result.width, result.height) == (9, 64, 48)
    assert "decode_overlap" not in in_run.finish().extra


def test_a_cancel_before_the_overlapped_decode_writes_nothing(
    orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    pending = orchestrator.generate_t2v("a cat", output_path=tmp_path / "c.mp4", deferred_write=True, **PARAMS)
    assert isinstance(pending, PendingWrite)

    def cancelled() -> None:
        raise RuntimeError("task cancelled")

    with pytest.raises(RuntimeError, match="task cancelled"):
        _finish_on_thread(pending, check=cancelled)
    assert pending.frames is None and list(tmp_path.iterdir()) == []


def _blocked_while_vae_is_held(orchestrator: WanOrchestrator, work: Any) -> tuple[bool, float]:
    """Hold the resident model's VAE lock (as an overlapped decode does) on another thread while `work` runs on
    this one; returns whether `work` finished while the lock was held and how long it waited."""
    loaded = orchestrator._loaded
    assert loaded is not None
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with loaded.vae_lock:
            held.set()
            release.wait(WAIT_S)

    threading.Thread(target=holder, daemon=True).start()
    assert held.wait(WAIT_S)
    done = threading.Event()
    started = time.perf_counter()
    worker = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    worker.start()
    finished_while_held = done.wait(1.5)
    release.set()
    worker.join(WAIT_S)
    assert done.is_set(), "the work must go on once the VAE is free"
    return finished_while_held, time.perf_counter() - started


def test_t2v_denoises_beside_a_decode_but_vace_and_a_switch_wait(
    orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    # t2v's pipeline call never touches the VAE: it runs (and defers its own decode) while the VAE is busy.
    results: list[Any] = []
    t2v = lambda: results.append(  # noqa: E731
        orchestrator.generate_t2v("a cat", output_path=tmp_path / "t.mp4", deferred_write=True, **PARAMS)
    )
    finished, _ = _blocked_while_vae_is_held(orchestrator, t2v)
    assert finished and isinstance(results[0], PendingWrite) and results[0].decode is not None

    # Parking the model for a switch moves its VAE: it waits for the decode.
    finished, _ = _blocked_while_vae_is_held(orchestrator, lambda: orchestrator.load_model("tiny_vace"))
    assert not finished and orchestrator.current_model == "tiny_vace"

    # VACE encodes its guide with the VAE inside the pipeline call: it waits too.
    guide = np.full((9, 48, 64, 3), 128, dtype=np.uint8)
    vace = lambda: results.append(  # noqa: E731
        orchestrator.generate_vace("a cat", video_guide=guide, output_path=tmp_path / "v.mp4", **PARAMS)
    )
    finished, _ = _blocked_while_vae_is_held(orchestrator, vace)
    assert not finished and results[-1].frames == 9
