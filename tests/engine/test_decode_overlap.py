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
    assert overlap_setting({OVERLAP_DECODE_ENV: "Off"}) == "off"
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
    """Hold the resident model's VAE gate (as an overlapped decode does) on another thread while `work` runs on
    this one; returns whether `work` finished while the gate was held and how long it waited."""
    loaded = orchestrator._loaded
    assert loaded is not None
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with loaded.vae_gate:
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
    # So does a t2v task on a VACE model: its pipeline encodes a blank guide.
    t2v_on_vace = lambda: results.append(  # noqa: E731
        orchestrator.generate_t2v("a cat", output_path=tmp_path / "tv.mp4", **PARAMS)
    )
    finished, _ = _blocked_while_vae_is_held(orchestrator, t2v_on_vace)
    assert not finished and results[-1].mode == "t2v"


# ---- through the worker loop: the next task starts while the first one's decode is still to run ----------------


def test_the_loop_starts_the_next_task_before_the_overlapped_decode_ends(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Worker, GenerationRunner, orchestrator and SQLite store. The first task's overlapped decode is held
    until the second task's generation has begun on the loop: with the decode on the loop's thread (the rule
    broken) the second task could never begin first and the wait would time out."""
    from tests.support.db import open_engine
    from tests.unit.test_loop import settings
    from wan_engine import decode_overlap
    from worker.loop.worker import Worker
    from worker.store.repository import SqlTaskRepository
    from worker.task import NewTask, TaskStatus
    from worker.tasks.runner import GenerationRunner

    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    second_began = threading.Event()
    decode_order: list[str] = []
    real_run = decode_overlap.OverlappedDecode.run

    def gated_run(self: decode_overlap.OverlappedDecode) -> np.ndarray:
        decode_order.append("waiting" if not second_began.is_set() else "late")
        assert second_began.wait(WAIT_S), "the second task never began while the first decode was pending"
        return real_run(self)

    monkeypatch.setattr(decode_overlap.OverlappedDecode, "run", gated_run)
    orchestrator = WanOrchestrator(tiny_models_dir)
    real_generate = orchestrator.generate_t2v

    def generate_t2v(prompt: str, **kwargs: Any) -> Any:
        if prompt == "second":
            second_began.set()
        return real_generate(prompt, **kwargs)

    monkeypatch.setattr(orchestrator, "generate_t2v", generate_t2v)
    outputs = tmp_path / "outputs"
    params = {"model": "tiny_t2v", "resolution": "64x48", "video_length": 9, "num_inference_steps": 2}
    with open_engine(f"sqlite:///{tmp_path / 'tasks.db'}") as engine:
        repo = SqlTaskRepository(engine)
        first = repo.insert(NewTask("t2v", {**params, "prompt": "first", "seed": 1}, priority=2))
        second = repo.insert(NewTask("t2v", {**params, "prompt": "second", "seed": 2}, priority=1))
        Worker(repo, GenerationRunner(orchestrator, outputs), settings()).run_forever(until_idle=True)
        rows = [repo.get(first), repo.get(second)]
    orchestrator.unload_model()
    assert [row.status for row in rows] == [TaskStatus.COMPLETE, TaskStatus.COMPLETE], [r.error_message for r in rows]
    assert decode_order[0] == "waiting", "the first decode was pending when the second task began"
    for row in rows:
        assert read_video_info(Path(str(row.output_location))).frames == 9
        assert row.result_data["extra"]["decode_overlap"]["overlapped"] is True
        assert row.result_data["timings"]["decode"] > 0


def test_a_decode_that_would_not_fit_beside_the_next_task_is_not_overlapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VRAM rule on CUDA (its memory calls stubbed with an H200's and a 24 GiB card's numbers): the full Wan 2.1
    VAE decoding 832x480x81 needs ~8.9 GiB (wan_engine.vram) beside what is in use and the next task's steps."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKLWan

    from wan_engine import decode_overlap

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # the real config, no memory
    pipe = SimpleNamespace(
        vae=SimpleNamespace(config=vae.config, dtype=torch.float32, use_tiling=False),
        vae_scale_factor_temporal=4,
        vae_scale_factor_spatial=8,
    )
    loaded = SimpleNamespace(pipe=pipe)
    latents = SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 16, 21, 60, 104))
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 15 * gib)  # weights, text encoder
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 17 * gib)  # + this task's steps
    monkeypatch.setattr(decode_overlap, "device_budget_bytes", lambda device: 139 * gib)
    assert decode_overlap.no_room_for_overlap(loaded, latents, 0, 0.9) is None  # type: ignore[arg-type]

    monkeypatch.setattr(decode_overlap, "device_budget_bytes", lambda device: 24 * gib)
    reason = decode_overlap.no_room_for_overlap(loaded, latents, 0, 0.9)  # type: ignore[arg-type]
    assert reason is not None
    assert "15.0 GiB in use + ~2.0 GiB for its steps + 8.9 GiB for the decode > 21.6 GiB budget" in reason
    pipe.vae.dtype = torch.float16  # WAN_VAE_PRECISION=16: half the decode's memory, so it fits
    assert decode_overlap.no_room_for_overlap(loaded, latents, 0, 0.9) is None  # type: ignore[arg-type]
    cpu = SimpleNamespace(device=torch.device("cpu"), shape=latents.shape)
    assert decode_overlap.no_room_for_overlap(loaded, cpu, 0, 0.001) is None  # type: ignore[arg-type]


# ---- the gate: a handed-off decode the loop needs the VAE before ---------------------------------------------


def _reference_frames(orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "off")
    pending = orchestrator.generate_t2v("a cat", output_path=tmp_path / "ref.mp4", deferred_write=True, **PARAMS)
    assert isinstance(pending, PendingWrite) and pending.frames is not None
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    return pending.frames


def test_a_switch_runs_a_handed_off_decode_first_on_its_own_thread(
    orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finisher has not started the decode when the loop switches models (the race a bare lock loses: the
    park would move the VAE the decode needs): the switch decodes it first, then `finish` writes those frames."""
    reference = _reference_frames(orchestrator, tmp_path, monkeypatch)
    pending = orchestrator.generate_t2v("a cat", output_path=tmp_path / "a.mp4", deferred_write=True, **PARAMS)
    assert isinstance(pending, PendingWrite) and pending.decode is not None and pending.frames is None
    t2v = orchestrator._loaded
    assert t2v is not None and t2v.vae_gate.pending() == [pending.decode]
    orchestrator.load_model("tiny_vace")  # parks tiny_t2v: its gate runs the pending decode here first
    assert t2v.vae_gate.pending() == []
    assert pending.decode.thread == threading.current_thread().name
    result = _finish_on_thread(pending)
    np.testing.assert_array_equal(pending.frames, reference)
    assert read_video_info(tmp_path / "a.mp4").frames == 9
    assert result.extra["decode_overlap"]["thread"] == threading.current_thread().name


def test_one_thread_holding_a_pending_write_can_generate_again(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct API user: a deferred VACE generation left pending, then another VACE call on the same thread.
    The second call needs the VAE: it runs the pending decode itself instead of waiting for a thread that will
    never come; the first `finish` afterwards writes the right frames."""
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_vace")
    guide = np.full((9, 48, 64, 3), 90, dtype=np.uint8)
    first = orchestrator.generate_vace(
        "a", video_guide=guide, output_path=tmp_path / "1.mp4", deferred_write=True, **PARAMS
    )
    assert isinstance(first, PendingWrite) and first.decode is not None
    second = orchestrator.generate_vace("b", video_guide=guide, output_path=tmp_path / "2.mp4", **PARAMS)
    assert second.frames == 9 and first.decode.frames is not None, "the second call ran the first decode"
    monkeypatch.setenv(OVERLAP_DECODE_ENV, "off")
    again = orchestrator.generate_vace(
        "a", video_guide=guide, output_path=tmp_path / "3.mp4", deferred_write=True, **PARAMS
    )
    assert isinstance(again, PendingWrite)
    first.finish()
    np.testing.assert_array_equal(first.frames, again.frames)
    orchestrator.unload_model()


def test_a_decode_failure_is_its_own_tasks_and_a_dropped_pending_write_leaves_nothing(
    orchestrator: WanOrchestrator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_engine import decode_overlap

    monkeypatch.setenv(OVERLAP_DECODE_ENV, "on")
    real = decode_overlap.decode_latents
    calls: list[int] = []

    def broken_once(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the VAE broke on this latent")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_overlap, "decode_latents", broken_once)
    failing = orchestrator.generate_t2v("a cat", output_path=tmp_path / "f.mp4", deferred_write=True, **PARAMS)
    assert isinstance(failing, PendingWrite)
    loaded = orchestrator._loaded
    assert loaded is not None
    with loaded.vae_gate:  # a loop-side user runs the failing decode: the error is not its own
        pass
    with pytest.raises(RuntimeError, match="the VAE broke on this latent"):
        _finish_on_thread(failing)
    assert not (tmp_path / "f.mp4").exists()

    dropped = orchestrator.generate_t2v("a cat", output_path=tmp_path / "d.mp4", deferred_write=True, **PARAMS)
    assert isinstance(dropped, PendingWrite) and len(loaded.vae_gate.pending()) == 1
    del dropped
    assert loaded.vae_gate.pending() == [], "a PendingWrite dropped without finish leaves no decode to run"
    assert len(calls) == 1
