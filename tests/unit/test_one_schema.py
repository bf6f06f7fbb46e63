"""One schema: `submit_task` refuses exactly what the worker would, and every bound is defined once.

The bounds live in `wan_engine.limits`; the worker's task schema (`worker.tasks.params`, travel), the
engine's resolver (`wan_engine.generation_params`) and the orchestrator read the same objects. The
one validation entry point, `worker.tasks.validation.validate_task`, is what the runner and
`HeadlessTaskQueue.submit_task` (so `wan-worker submit`) call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from headless_model_management import GenerationTask, HeadlessTaskQueue
from wan_engine import limits
from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import resolve_params
from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
from worker.config import WorkerSettings
from worker.loop.retry import describe
from worker.task import Task, TaskStatus
from worker.tasks.params import GenerationParams, InvalidTaskError, VaceParams, validate_params
from worker.tasks.runner import GenerationRunner
from worker.tasks.travel import TravelOrchestratorParams, TravelSegmentParams, TravelStitchParams

# The tiny presets' UniPC scheduler at flow_shift 3 has 333 distinct integer timesteps (the engine's
# own check, tests/engine/test_memory_profiles.py, names the same limit after loading the model).
STEPS_MESSAGE = (
    "num_inference_steps=1000 at flow_shift 3 repeats scheduler timesteps (UniPCMultistepScheduler); "
    "use at most 333 steps or a smaller flow_shift"
)


@pytest.fixture
def queue(tmp_path: Path, tiny_models_dir: Path) -> Iterator[HeadlessTaskQueue]:
    settings = WorkerSettings(
        db_url=f"sqlite:///{tmp_path / 'tasks.db'}", models_dir=tiny_models_dir, outputs_dir=tmp_path / "outputs"
    )
    built = HeadlessTaskQueue(settings=settings)
    yield built
    built.close()


def _worker_message(tiny_models_dir: Path, tmp_path: Path, task_type: str, params: dict[str, Any]) -> str:
    """The error_message the worker writes for this row (runner + retry policy; nothing is loaded)."""
    from headless_wgp import WanOrchestrator

    runner = GenerationRunner(WanOrchestrator(tiny_models_dir), tmp_path / "outputs")
    task = Task(id="row", task_type=task_type, params_text=json.dumps(params), status=TaskStatus.IN_PROGRESS)
    with pytest.raises(ValueError) as caught:
        runner.run(task, None)  # type: ignore[arg-type]  # refused before the context is used
    assert runner.model_loads == 0, "the row must be refused before any model loads"
    return describe(caught.value)


def test_submit_refuses_steps_the_scheduler_cannot_take_with_the_workers_message(
    queue: HeadlessTaskQueue, tiny_models_dir: Path, tmp_path: Path
) -> None:
    params = {"num_inference_steps": 1000}
    with pytest.raises(ValueError) as caught:
        queue.submit_task(GenerationTask(model="tiny_t2v", prompt="a cat", parameters=params))
    assert str(caught.value) == STEPS_MESSAGE
    assert queue.get_queue_status()["pending"] == 0, "nothing is queued"
    row = {"model": "tiny_t2v", "prompt": "a cat", **params}
    assert _worker_message(tiny_models_dir, tmp_path, "t2v", row) == STEPS_MESSAGE
    # The largest count that works is accepted.
    assert queue.submit_task(GenerationTask(model="tiny_t2v", prompt="a cat", parameters={"num_inference_steps": 333}))


def test_submit_refuses_a_t2v_model_for_an_i2v_task_naming_the_architectures(
    queue: HeadlessTaskQueue, tiny_models_dir: Path, tmp_path: Path
) -> None:
    expected = "model 'tiny_t2v' is a t2v model; i2v tasks need one of architecture i2v, flf2v, ti2v"
    task = GenerationTask(model="tiny_t2v", prompt="a cat", task_type="i2v", parameters={"image_start": "x.png"})
    with pytest.raises(InvalidTaskError) as caught:
        queue.submit_task(task)
    assert str(caught.value) == expected
    row = {"model": "tiny_t2v", "prompt": "a cat", "image_start": "x.png"}
    assert _worker_message(tiny_models_dir, tmp_path, "i2v", row) == expected


# (key, limit, a value just over it)
OVER_THE_LIMIT = [
    ("num_inference_steps", limits.MAX_STEPS, limits.MAX_STEPS + 1),
    ("guidance_scale", limits.MAX_GUIDANCE, limits.MAX_GUIDANCE + 0.5),
    ("guidance2_scale", limits.MAX_GUIDANCE, limits.MAX_GUIDANCE + 0.5),
    ("flow_shift", limits.MAX_FLOW_SHIFT, limits.MAX_FLOW_SHIFT + 0.5),
    ("switch_threshold", limits.MAX_SWITCH_THRESHOLD, limits.MAX_SWITCH_THRESHOLD + 0.5),
    ("video_length", limits.MAX_FRAMES, limits.MAX_FRAMES + 1),
    ("seed", limits.MAX_SEED, limits.MAX_SEED + 1),
    ("fps", limits.MAX_FPS, limits.MAX_FPS + 1),
]


@pytest.mark.parametrize(("key", "limit", "value"), OVER_THE_LIMIT, ids=[case[0] for case in OVER_THE_LIMIT])
def test_schema_and_engine_refuse_the_same_value_naming_the_same_limit(key: str, limit: float, value: float) -> None:
    named = f"{limit:g}" if isinstance(limit, float) else str(limit)
    with pytest.raises(InvalidTaskError, match=rf"{key} = .*less than or equal to {named}\b"):
        validate_params("t2v", {"prompt": "x", key: value})
    preset = load_presets(BUILTIN_PRESETS_DIR).get("tiny_t2v")
    with pytest.raises(InvalidRequestError, match=rf"Invalid {key}: .*{named}"):
        resolve_params(preset, "x", {key: value})
    # ...and the value at the limit passes the schema (the engine may still round video_length up).
    validate_params("t2v", {"prompt": "x", key: limit})


def _upper_bound(model: type[Any], key: str) -> Any:
    return next(m.le for m in model.model_fields[key].metadata if hasattr(m, "le"))


def test_the_schemas_read_the_limits_objects() -> None:
    for model in (GenerationParams, TravelOrchestratorParams, TravelSegmentParams):
        assert _upper_bound(model, "num_inference_steps") is limits.MAX_STEPS
        assert _upper_bound(model, "guidance_scale") is limits.MAX_GUIDANCE
        assert _upper_bound(model, "flow_shift") is limits.MAX_FLOW_SHIFT
        assert _upper_bound(model, "switch_threshold") is limits.MAX_SWITCH_THRESHOLD
        assert _upper_bound(model, "fps") is limits.MAX_FPS
    assert _upper_bound(TravelStitchParams, "fps") is limits.MAX_FPS
    assert _upper_bound(GenerationParams, "seed") is limits.MAX_SEED
    assert _upper_bound(TravelOrchestratorParams, "seed_base") is limits.MAX_SEED
    assert _upper_bound(VaceParams, "control_scale") is limits.MAX_CONTROL_SCALE

    import headless_wgp
    from wan_engine import generation_params

    assert generation_params.MAX_GUIDANCE is limits.MAX_GUIDANCE and generation_params.MAX_FPS is limits.MAX_FPS
    assert generation_params.BUILTIN_DEFAULTS["switch_threshold"] == limits.DEFAULT_SWITCH_THRESHOLD
    assert limits.DEFAULT_BOUNDARY_RATIO == limits.DEFAULT_SWITCH_THRESHOLD / limits.NUM_TRAIN_TIMESTEPS
    assert headless_wgp.MAX_IMAGE_REFS is limits.MAX_IMAGE_REFS
    assert headless_wgp.MAX_CONTROL_SCALE is limits.MAX_CONTROL_SCALE
    assert headless_wgp.I2V_ARCHITECTURES is limits.MODE_ARCHITECTURES["i2v"]
    assert set(headless_wgp.T2V_ARCHITECTURES) == {*limits.MODE_ARCHITECTURES["t2v"], "vace"}


def test_limits_params_and_validation_import_without_torch() -> None:
    code = (
        "import sys, wan_engine.limits, worker.tasks.params, worker.tasks.validation; "
        "heavy = {'torch', 'diffusers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
