"""worker.live.eta with the VAE decode on the output finisher (wan_engine.decode_overlap), and the stitch's ETA.

Learned kinds with round numbers, on a CPU estimator (no compile, no new-shape cost, no park):

    A  tiny_t2v 64x48x9, 4 CFG steps:  encode 1 + denoise 4 x 1.0 + decode 3 + write 2  = 10 s
    B  tiny_t2v 32x32x1, no CFG:       encode 0.5 + 0.5 per step + decode 1 + write 0.5
    O  tiny_other, as A, loads in 2 s (a switch)

With the decode overlapped, A holds the loop 5 s (10 less its decode and write); its decode then runs 5-8 s
and its write 8-10 s on the finisher. A task of mode "vace" needs the VAE (after its 1 s encode); "t2v" does not,
so its steps run beside the pending decode and share the device (worker.live.eta.share_gpu, DECODE_SHARE 0.4):
both take longer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.db import migrated_engine
from worker.live.eta import (
    DECODE_SHARE,
    EtaEstimator,
    PresetShapes,
    StitchShape,
    TaskShape,
    pipeline_needs_vae,
    row_device,
    share_gpu,
)
from worker.live.eta_static import (
    STITCH_END_S,
    STITCH_FIXED_S,
    STITCH_START_S,
    static_stitch_s,
)
from worker.store.repository import SqlTaskRepository
from worker.task import Task, TaskStatus

A = TaskShape("tiny_t2v", 64, 48, 9, 4, "cpu")
B = TaskShape("tiny_t2v", 32, 32, 1, 1, "cpu", cfg=False)
OTHER = TaskShape("tiny_other", 64, 48, 9, 4, "cpu")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repository(tmp_path: Path) -> SqlTaskRepository:
    repository = SqlTaskRepository(migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}"))
    for shape, values in (
        (A, {"step_s": 0.5, "encode_s": 1.0, "decode_s": 3.0, "write_s": 2.0}),
        (B, {"step_s": 0.5, "encode_s": 0.5, "decode_s": 1.0, "write_s": 0.5}),
        (OTHER, {"step_s": 0.5, "encode_s": 1.0, "decode_s": 3.0, "write_s": 2.0, "load_s": 2.0}),
    ):
        key = {
            "model": shape.model,
            "resolution": shape.resolution,
            "frames": shape.frames,
            "memory_profile": "cpu",
            "device": row_device("cpu"),
        }
        repository.update_eta_stats(key, lambda _old, v=values: {"samples": 3, "other_s": 0.0, **v})
    return repository


def job(task_id: str, mode: str = "t2v", model: str = "tiny_t2v") -> Task:
    return Task(task_id, mode, json.dumps({"model": model, "prompt": "x"}), TaskStatus.QUEUED)


def estimator(
    repository: SqlTaskRepository, shapes: dict[str, TaskShape], decode: bool = True, clock: Clock | None = None
) -> EtaEstimator:
    """Each task's shape by its id's first letter; a task needs the VAE unless it is of type t2v."""
    eta = EtaEstimator(
        repository,
        lambda task: shapes[task.id[0]],
        "cpu",
        None,
        clock=clock or Clock(),
        decode_overlaps=decode,
        needs_vae=lambda task: task.task_type != "t2v",
    )
    eta.refresh()
    return eta


SHAPES = {"a": A, "b": B, "v": A, "o": OTHER, "c": A}


def spans(etas: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {task_id: (round(eta.start_in, 6), round(eta.finish_in, 6)) for task_id, eta in etas.items()}


# ---- one task: what it holds, what it completes ---------------------------------------------------------


def test_a_task_holds_the_worker_for_its_duration_less_its_decode_and_write(repository: SqlTaskRepository) -> None:
    def cost(eta: EtaEstimator, task: Task) -> tuple[float, float]:
        with eta._lock:
            learned, process = eta._learned, eta._process.copy()
        process.resident = "tiny_t2v"
        duration = eta._duration(task, process, learned)
        assert duration is not None
        return duration[0], duration[1]

    assert cost(estimator(repository, SHAPES), job("a")) == pytest.approx((5.0, 10.0))  # less decode 3, write 2
    assert cost(estimator(repository, SHAPES, decode=False), job("a")) == pytest.approx((8.0, 10.0))  # the write
    segment = Task("a-seg", "travel_segment", '{"model": "tiny_t2v"}', TaskStatus.QUEUED)
    assert cost(estimator(repository, SHAPES), segment) == pytest.approx((10.0, 10.0))  # writes on the loop
    no_finisher = EtaEstimator(repository, lambda _t: A, "cpu", None, write_overlaps=False, decode_overlaps=True)
    no_finisher.refresh()
    assert not no_finisher.decode_overlaps  # the decode moves to the finisher only with the write
    assert cost(no_finisher, job("a")) == pytest.approx((10.0, 10.0))


# ---- the queue walk -------------------------------------------------------------------------------------


def test_a_text_to_video_task_starts_at_the_hand_off(repository: SqlTaskRepository) -> None:
    etas = estimator(repository, SHAPES).queue_etas(0.0, "tiny_t2v", [job("a"), job("c")])
    # c is claimed at a's hand-off (5 s) and its steps start at 6 s beside the last 2 s of a's decode: they share
    # the device for 5 s (a's decode at 0.4 of its speed), so a's decode ends at 11 s (Complete 13 s) and c's 4 s
    # of steps take 6 s. c's hand-off (12 s) waits for a's output (13 s): Complete 5 s later.
    assert spans(etas) == {"a": (0.0, 13.0), "c": (5.0, 18.0)}
    before = estimator(repository, SHAPES, decode=False).queue_etas(0.0, "tiny_t2v", [job("a"), job("c")])
    assert spans(before) == {"a": (0.0, 10.0), "c": (8.0, 18.0)}  # only the write overlapped


def test_a_task_that_needs_the_vae_waits_for_the_pending_decode(repository: SqlTaskRepository) -> None:
    etas = estimator(repository, SHAPES).queue_etas(0.0, "tiny_t2v", [job("a"), job("v", "vace"), job("c")])
    # v is claimed at 5 s and encodes its prompt (1 s) beside a's decode, which ends at 8 s: its pipeline call
    # waits 2 s for the VAE (nothing shares the device), so it hands off at 5 + 1 + 2 + 4 = 12 s. c follows at
    # 12 s; its steps (from 13 s) share the device with the last 2 s of v's decode, which so ends at 18 s (v
    # Complete at 20 s), and take 2 s longer: c hands off at 20 s (v's output done), Complete at 25 s.
    assert spans(etas) == {"a": (0.0, 10.0), "v": (5.0, 20.0), "c": (12.0, 25.0)}


def test_a_switch_waits_for_the_pending_decode_from_its_start(repository: SqlTaskRepository) -> None:
    etas = estimator(repository, SHAPES).queue_etas(0.0, "tiny_t2v", [job("a"), job("o", model="tiny_other")])
    # o is text-to-video but loads another model (2 s): parking tiny_t2v waits for a's decode (8 s), then the
    # load, encode and steps (7 s): hand-off at 15 s, Complete at 20 s.
    assert spans(etas) == {"a": (0.0, 10.0), "o": (5.0, 20.0)}


def test_one_output_is_finished_at_a_time(repository: SqlTaskRepository) -> None:
    etas = estimator(repository, SHAPES).queue_etas(0.0, "tiny_t2v", [job("a"), job("b"), job("c")])
    # b holds the loop 1 s (5-6 s; its 0.5 s step beside a's decode takes 0.83 s and slows that decode by 0.5 s),
    # but its hand-off waits for a's decode and write (until 10.5 s): the loop is free again at 10.5 s, b's decode
    # and write (1.5 s) follow a's. c is claimed at 10.5 s (b's decode is over before c's steps start).
    assert spans(etas) == {"a": (0.0, 10.5), "b": (5.0, 12.0), "c": (10.5, 20.5)}


def test_a_queued_dependant_has_the_loop_finish_the_output_first(repository: SqlTaskRepository) -> None:
    """worker.loop.worker._finish_awaited_output: a task waiting for the pending output is served first."""
    after_a = Task("c", "t2v", '{"model": "tiny_t2v"}', TaskStatus.QUEUED, dependant_on="a")
    eta = estimator(repository, SHAPES)
    assert spans(eta.queue_etas(0.0, "tiny_t2v", [job("a"), after_a])) == {"a": (0.0, 10.0), "c": (10.0, 20.0)}
    # b is ready at a's hand-off (5 s), but the loop finishes a's output first (10 s) and claims the older c; b
    # follows at c's hand-off (15 s), its step beside c's decode (which so ends 0.5 s later: c Complete 20.5 s).
    etas = eta.queue_etas(0.0, "tiny_t2v", [job("a"), after_a, job("b")])
    assert spans(etas) == {"a": (0.0, 10.0), "c": (10.0, 20.5), "b": (15.0, 22.0)}
    eta.begin(job("a"), "tiny_t2v")
    left = eta.remaining("a", {"stage": "denoising", "step": 0, "total_steps": 4})
    assert spans(eta.queue_etas(left, "tiny_t2v", [after_a])) == {"c": (9.0, 19.0)}  # not at a's hand-off (4 s)
    # At a's hand-off (4 s), beside a's decode as in the first test: Complete 13 s later.
    assert spans(eta.queue_etas(left, "tiny_t2v", [job("c")])) == {"c": (4.0, 17.0)}


def test_the_running_task_holds_the_worker_until_its_hand_off(repository: SqlTaskRepository) -> None:
    clock = Clock()
    eta = estimator(repository, SHAPES, clock=clock)
    eta.begin(job("a"), "tiny_t2v")
    left = eta.remaining("a", {"stage": "denoising", "step": 0, "total_steps": 4})
    assert left == pytest.approx(9.0)  # 4 steps, decode 3, write 2
    assert spans(eta.queue_etas(left, "tiny_t2v", [job("c")])) == {"c": (4.0, 17.0)}  # beside a's decode
    clock.now += 4.0
    left = eta.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1})
    assert left == pytest.approx(5.0)
    # At "decoding" the loop is free (the finisher decodes): a VAE-free task starts now, its steps (from 1 s)
    # beside a's decode (2 s of it left): that decode ends at 6 s, c's steps 2 s later; its hand-off (7 s) waits for
    # a's output (8 s). A VACE task waits for the decode (3 s) after its 1 s encode: hand-off at 7 s.
    assert spans(eta.queue_etas(left, "tiny_t2v", [job("c")])) == {"c": (0.0, 13.0)}
    assert spans(eta.queue_etas(left, "tiny_t2v", [job("v", "vace")])) == {"v": (0.0, 12.0)}
    # Without the overlap the decode is on the loop: the next task starts after it.
    loop = estimator(repository, SHAPES, decode=False, clock=clock)
    loop.begin(job("a"), "tiny_t2v")
    left = loop.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1})
    assert spans(loop.queue_etas(left, "tiny_t2v", [job("c")])) == {"c": (3.0, 13.0)}


def test_a_kind_whose_decode_found_no_room_decodes_on_the_loop(repository: SqlTaskRepository) -> None:
    """wan_engine.decode_overlap.no_room_for_overlap: when the decode would not fit beside the next task's
    steps, it runs before the next task (result_data extra.decode_overlap.overlapped false)."""
    eta = estimator(repository, SHAPES)

    def ran(overlapped: bool) -> None:
        timings = {"step_times": [1.0] * 4, "encode": 1.0, "decode": 3.0, "write": 2.0}
        extra = {"decode_overlap": {"overlapped": overlapped}, "transformer_calls_per_step": [2] * 4}
        done = {"model": "tiny_t2v", "resolution": "64x48", "frames": 9, "memory_profile": "cpu"}
        eta.record(job("a"), {**done, "guidance_scale": 5.0, "timings": timings, "extra": extra})

    ran(overlapped=False)
    assert spans(eta.queue_etas(0.0, "tiny_t2v", [job("a"), job("c")])) == {"a": (0.0, 10.0), "c": (8.0, 18.0)}
    eta.begin(job("a"), "tiny_t2v")
    left = eta.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1})
    assert spans(eta.queue_etas(left, "tiny_t2v", [job("c")])) == {"c": (3.0, 13.0)}  # on the loop: 3 s more
    eta.finish("a")
    ran(overlapped=True)
    assert spans(eta.queue_etas(0.0, "tiny_t2v", [job("a"), job("c")])) == {"a": (0.0, 13.0), "c": (5.0, 18.0)}


def test_a_decode_beside_steps_shares_the_device_as_the_h200_measured() -> None:
    """bench/results/h200_worker_queue_run3.json / run4: an 81-frame decode takes 2.15-2.54 s alone and 5.9-6.25 s
    beside a 49-frame task's 10 s of steps, which take ~2 s longer meanwhile; the work is about conserved."""
    decode_s, longer = share_gpu(2.26, 10.0)
    assert decode_s == pytest.approx(2.26 / DECODE_SHARE)  # the steps outlast it: 5.65 s
    assert 5.5 < decode_s < 6.3 and longer == pytest.approx(2.26)
    # Steps shorter than the shared stretch (a 1-frame task's 1.6 s): the decode ends alone after them.
    decode_s, longer = share_gpu(1.37, 1.6)
    assert longer == pytest.approx(DECODE_SHARE * 1.6 / (1 - DECODE_SHARE))  # 1.07 s (run 3's w04: ~1.0 s)
    assert decode_s == pytest.approx(1.37 + 1.6)  # the device busy with both works, the decode last
    assert share_gpu(0.0, 5.0) == (0.0, 0.0) and share_gpu(2.0, 0.0) == (2.0, 0.0)


def test_a_decode_is_learned_as_it_runs_alone(repository: SqlTaskRepository) -> None:
    """A decode on the finisher while the next task's steps ran (their reports seen) is learned as the decode
    alone: its seconds less (1 - DECODE_SHARE) of the time shared. One with nothing beside it, as it ran."""
    clock = Clock()
    eta = estimator(repository, SHAPES, clock=clock)

    def done(task_id: str, decode: float) -> None:
        timings = {"step_times": [1.0] * 4, "encode": 1.0, "decode": decode, "write": 2.0}
        extra = {"decode_overlap": {"overlapped": True}, "transformer_calls_per_step": [2] * 4}
        result = {"model": "tiny_t2v", "resolution": "64x48", "frames": 9, "memory_profile": "cpu"}
        eta.record(job(task_id), {**result, "guidance_scale": 5.0, "timings": timings, "extra": extra})

    def decode_row() -> float:
        row = next(r for r in repository.eta_stats() if (r["resolution"], r["frames"]) == ("64x48", 9))
        return float(row["decode_s"])

    eta.begin(job("a-first"), "tiny_t2v")  # the kind ran in this process before: a and c are warm samples
    eta.finish("a-first")
    eta.begin(job("a"), "tiny_t2v")
    eta.remaining("a", {"stage": "denoising", "step": 0, "total_steps": 4})
    clock.now += 5.0
    eta.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1})  # the hand-off: decoded from here
    eta.begin(job("c"), "tiny_t2v")
    clock.now += 0.5
    eta.remaining("c", {"stage": "denoising", "step": 0, "total_steps": 4})  # beside a's decode from 0.5 s in
    clock.now += 7.5
    done("a", 6.0)  # decoded for 6 s, 5.5 of them beside c's steps: alone 6 - 0.6 x 5.5 = 2.7 s
    assert decode_row() == pytest.approx(3.0 + 0.5 * (6.0 - (1 - DECODE_SHARE) * 5.5 - 3.0))  # weight 0.5
    eta.remaining("c", {"stage": "decoding", "step": 0, "total_steps": 1})
    clock.now += 5.0
    before = decode_row()
    done("c", 3.0)  # nothing ran beside it
    assert decode_row() == pytest.approx(before + 0.5 * (3.0 - before))


# ---- a running task behind the finisher -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "mode", "expected", "later"),
    [
        # B (1 step): its own stages take 1.0 s before its decode and write (1.5 s), which wait for a's 5 s, and
        # 0.5 s more: its step beside a's decode (from 0.5 s, 2.5 s of it left) slows that decode so much (and
        # takes 0.33 s longer itself). 3 s on, at its first step, 0.5 s before its decode and write, a's write
        # has 2 s left.
        ("b", "t2v", 5.0 + 0.5 + 1.5, 2.0 + 1.5),
        # Ten steps of B (5 s) from 0.5 s: beside a's decode (2.5 s of it left) for 6.25 s, which so ends at
        # 6.75 s (a's output at 8.75 s) and slows the steps by 2.5 s; its decode and write after a's output.
        ("b10", "t2v", 8.75 + 1.0 + 0.5, 5.0 + 1.5),
        # The same needing the VAE: its encode (0.5 s) runs beside a's decode (3 s), then it waits 2.5 s.
        ("b10", "vace", 3.0 + 5.0 + 1.0 + 0.5, 5.0 + 1.5),
    ],
)
def test_a_running_task_waits_for_the_output_in_hand_and_the_vae(
    repository: SqlTaskRepository, second: str, mode: str, expected: float, later: float
) -> None:
    clock = Clock()
    shapes = {"a": A, "b": B if second == "b" else TaskShape(B.model, 32, 32, 1, 10, "cpu", cfg=False)}
    eta = estimator(repository, shapes, clock=clock)
    eta.begin(job("a"), "tiny_t2v")
    assert eta.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1}) == pytest.approx(5.0)
    eta.begin(job("b", mode), "tiny_t2v")  # the loop moved on: a decodes and writes on the finisher
    assert eta.remaining("b", {"stage": "encoding_prompt"}) == pytest.approx(expected)
    clock.now += 3.0  # a's decode is over, its write has 2 s left
    assert eta.remaining("a", {"stage": "writing_video", "step": 0, "total_steps": 1}) == pytest.approx(2.0)
    steps = 10 if second == "b10" else 1
    assert eta.remaining("b", {"stage": "denoising", "step": 0, "total_steps": steps}) == pytest.approx(later)


@pytest.mark.parametrize(
    ("second", "mode", "expected"),
    [
        ("v", "vace", 1.0 + 2.0 + 4.0 + 5.0),  # its encode beside a's decode, 2 s for the VAE, steps, its own
        # Its hold (its step beside a's decode: 0.33 s longer), then its hand-off waits for a's output, 0.5 s
        # later than alone (5.5 s).
        ("b", "t2v", 5.5 + 1.5),
        # Its steps from 1 s beside a's decode (2 s left): 2 s longer (hand-off 7 s), a's output 3 s later (8 s).
        ("c", "t2v", 8.0 + 5.0),
    ],
)
def test_a_task_claimed_beside_a_pending_decode_is_estimated_with_its_waits(
    repository: SqlTaskRepository, second: str, mode: str, expected: float
) -> None:
    eta = estimator(repository, SHAPES)
    eta.begin(job("a"), "tiny_t2v")
    assert eta.remaining("a", {"stage": "decoding", "step": 0, "total_steps": 1}) == pytest.approx(5.0)
    assert eta.begin(job(second, mode), "tiny_t2v") == pytest.approx(expected)


def test_which_tasks_need_the_vae(builtin_presets: Any) -> None:
    def kind(task_type: str, **params: Any) -> Task:
        return Task("t", task_type, json.dumps(params), TaskStatus.QUEUED)

    assert not pipeline_needs_vae(kind("t2v", model="t2v_1.3B"))
    assert not pipeline_needs_vae(kind("t2v_22"))
    assert not pipeline_needs_vae(kind("ti2v"))  # text only: generate_t2v
    assert pipeline_needs_vae(kind("ti2v", image_start="a.png"))
    for task_type in ("vace", "i2v", "flf2v", "travel_segment", "something_new"):
        assert pipeline_needs_vae(kind(task_type)), task_type
    assert not pipeline_needs_vae(kind("travel_stitch")) and not pipeline_needs_vae(kind("travel_orchestrator"))
    shapes = PresetShapes(builtin_presets, "gpu")
    assert not shapes.needs_vae(kind("t2v", model="t2v_1.3B"))
    assert shapes.needs_vae(kind("t2v", model="vace_1.3B"))  # a VACE pipeline encodes a blank guide
    assert not shapes.needs_vae(kind("t2v", model="no_such_model"))  # unknown: as the task type says


@pytest.fixture(scope="module")
def builtin_presets() -> Any:
    from wan_engine.presets import load_presets

    return load_presets()


def test_the_worker_builds_its_estimator_with_the_engines_setting(
    monkeypatch: pytest.MonkeyPatch, builtin_presets: Any, tmp_path: Path
) -> None:
    import worker.live.events as events

    def sink_overlaps(device: str, setting: str | None) -> bool:
        monkeypatch.setattr(events, "detect_device", lambda: device)
        if setting is None:
            monkeypatch.delenv("WAN_OVERLAP_DECODE", raising=False)
        else:
            monkeypatch.setenv("WAN_OVERLAP_DECODE", setting)
        sink = events.live_sink(None, builtin_presets, tmp_path)
        try:
            assert sink.estimator is not None
            return sink.estimator.decode_overlaps
        finally:
            sink.close()

    assert sink_overlaps("NVIDIA H200", None)  # auto: a resident model on CUDA
    assert not sink_overlaps("cpu", None)  # auto: off on a CPU
    assert sink_overlaps("cpu", "on")  # on: the CPU's resident profile too
    assert not sink_overlaps("NVIDIA H200", "off")
    assert not sink_overlaps("NVIDIA H200", "sometimes")  # refused by the engine: off here


# ---- the stitch (docs/BENCHMARKS.md "Run 2", bench/results/h200_worker_queue_run2.json) --------------------


RUN_2 = Path(__file__).resolve().parents[2] / "bench" / "results" / "h200_worker_queue_run2.json"
STITCH_ID = "q05-travel_3seg-stitch"


def run_2_stitch() -> tuple[float, list[tuple[float, int, int]], float]:
    """The stitch's claim, its progress reports (time, frame, frames) and its Complete, from the raw events."""
    events = [e for e in json.loads(RUN_2.read_text())["ours"]["events"] if e.get("task_id") == STITCH_ID]
    started = next(e["ts"] for e in events if e["event"] == "generation_started")
    reports = [(e["ts"], e["step"], e["total_steps"]) for e in events if e["event"] == "progress"]
    completed = next(e["ts"] for e in events if e["event"] == "generation_completed")
    return started, reports, completed


def test_the_static_stitch_is_the_h200_run_2_measurement() -> None:
    """q05-travel_3seg-stitch: 123 frames at 832x480, 1.02 s from its claim to Complete; its first report
    (frame 1) 0.149 s after the claim, its last (frame 123) 0.111 s before Complete."""
    started, reports, completed = run_2_stitch()
    assert reports[0][1:] == (1, 123) and reports[-1][1:] == (123, 123)
    assert static_stitch_s(123, 832, 480) == pytest.approx(completed - started, rel=0.03)
    assert pytest.approx(reports[0][0] - started, abs=0.01) == STITCH_START_S
    assert pytest.approx(completed - reports[-1][0], abs=0.01) == STITCH_END_S
    assert pytest.approx(STITCH_START_S + STITCH_END_S) == STITCH_FIXED_S


def _segment(task_id: str, frames: int) -> Task:
    params = {"model": "vace_1.3B", "resolution": "832x480", "frames": frames, "prompt": "x"}
    return Task(task_id, "travel_segment", json.dumps(params), TaskStatus.QUEUED, parent_task_id="q05")


def test_the_stitch_eta_at_its_start_and_first_report_as_run_2_measured(builtin_presets: Any) -> None:
    """Run 2 predicted 3.33 s at the start (the length of three 81-frame segments: its segments were never
    looked at) and 3.3 s at the first report, for 1.02 s and 0.87 s: +278%. The segments this process ran
    (41 + 41 + 57 frames, overlaps 8 + 8: 123 frames) give its length and size."""
    clock = Clock()
    eta = EtaEstimator(None, PresetShapes(builtin_presets, "gpu"), "NVIDIA H200", None, clock=clock)
    for index, frames in enumerate((41, 41, 57)):
        segment = _segment(f"q05-seg{index:03d}", frames)
        eta.begin(segment, "vace_1.3B")
        eta.finish(segment.id)
    params = {"orchestrator": "q05", "segments": ["q05-seg000", "q05-seg001", "q05-seg002"], "overlaps": [8, 8]}
    stitch = Task("q05-stitch", "travel_stitch", json.dumps(params), TaskStatus.QUEUED, parent_task_id="q05")
    claimed, reports, completed = run_2_stitch()
    clock.now = claimed
    started = eta.begin(stitch, "vace_1.3B")
    assert started == pytest.approx(static_stitch_s(123, 832, 480))
    assert started == pytest.approx(completed - claimed, rel=0.05)  # 1.02 s
    errors = []
    for ts, step, total in reports:  # frames 1 (0.872 s before Complete), 73 (0.366 s), 123 (0.111 s)
        clock.now = ts
        left = eta.remaining(stitch.id, {"stage": "stitching", "step": step, "total_steps": total})
        assert left is not None
        errors.append(left - (completed - ts))
    assert abs(errors[0]) / (completed - reports[0][0]) < 0.05  # the first report: run 2's +278% was 3.3 s
    assert all(abs(error) < 0.12 for error in errors), errors  # after it, the stitch's own rate


def test_a_stitch_of_unseen_segments_keeps_its_estimate(builtin_presets: Any) -> None:
    eta = EtaEstimator(None, PresetShapes(builtin_presets, "gpu"), "NVIDIA H200", None)
    params = {"orchestrator": "q", "segments": ["q-seg000", "q-seg001"], "overlaps": [8]}
    stitch = Task("q-stitch", "travel_stitch", json.dumps(params), TaskStatus.QUEUED)
    started = eta.begin(stitch, None)
    assert started == pytest.approx(static_stitch_s(81 * 3, 832, 480))  # the default: three 81-frame segments
    first = eta.remaining(stitch.id, {"stage": "stitching", "step": 1, "total_steps": 100})
    assert first == pytest.approx(started * 99 / 100)  # no size to re-estimate from: the frames left of it
    assert eta._stitch_shape(stitch) == StitchShape()
