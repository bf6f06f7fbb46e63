"""Preset fallbacks (the seeds' alternative models): off by default, honoured and recorded when allowed.

Real orchestrator and tiny models; the preset whose weights are missing is a user override file.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from headless_wgp import WanOrchestrator
from wan_engine.errors import ModelUnavailableError
from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
from worker.loop.lease import LeaseKeeper
from worker.loop.worker import RunContext
from worker.task import Task, TaskOutcome, TaskStatus
from worker.tasks.runner import GenerationRunner


class _NoStore:
    """Stands in for the repository under the lease keeper; nothing here needs the database."""

    def heartbeat(self, *_args: object) -> bool:
        return True

    def get_status(self, _task_id: str) -> TaskStatus:
        return TaskStatus.IN_PROGRESS


def _runner(models_dir: Path, presets_dir: Path, outputs: Path, allow: bool) -> GenerationRunner:
    presets = load_presets(BUILTIN_PRESETS_DIR, presets_dir)
    return GenerationRunner(WanOrchestrator(models_dir, presets), outputs, allow_fallbacks=allow)


def _run(runner: GenerationRunner, model: str) -> dict[str, object]:
    task = Task(
        id="fallback-task",
        task_type="t2v",
        params_text=json.dumps({"model": model, "prompt": "a"}),
        status=TaskStatus.IN_PROGRESS,
        attempts=1,
    )
    lease = LeaseKeeper(_NoStore(), task.id, "w", 30, 10)  # type: ignore[arg-type]
    outcome = runner.run(task, RunContext(task, "w", lease, threading.Event()))
    assert isinstance(outcome, TaskOutcome)
    return outcome.result_data


@pytest.fixture
def presets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "presets"
    directory.mkdir()
    (directory / "gone_t2v.json").write_text(
        json.dumps(
            {
                "model": {
                    "name": "weights not here",
                    "architecture": "t2v",
                    "URLs": "no-such-folder",
                    "fallbacks": ["tiny_vace", "also_gone", "tiny_t2v"],
                },
                "resolution": "64x48",
                "video_length": 5,
                "num_inference_steps": 2,
            }
        )
    )
    (directory / "also_gone.json").write_text(
        json.dumps(
            {
                "model": {"name": "also missing", "architecture": "t2v", "URLs": "nowhere"},
            }
        )
    )
    return directory


def test_fallbacks_are_off_by_default(tiny_models_dir: Path, presets_dir: Path, tmp_path: Path) -> None:
    runner = _runner(tiny_models_dir, presets_dir, tmp_path / "out", allow=False)
    with pytest.raises(ModelUnavailableError, match="no-such-folder"):
        _run(runner, "gone_t2v")


def test_an_allowed_fallback_runs_and_is_recorded(tiny_models_dir: Path, presets_dir: Path, tmp_path: Path) -> None:
    runner = _runner(tiny_models_dir, presets_dir, tmp_path / "out", allow=True)
    result = _run(runner, "gone_t2v")
    # tiny_vace is skipped (another architecture), also_gone is missing too: tiny_t2v ran.
    assert result["model"] == "tiny_t2v"
    fallback = result["model_fallback"]
    assert isinstance(fallback, dict) and fallback["requested"] == "gone_t2v" and fallback["ran"] == "tiny_t2v"
    assert "no-such-folder" in fallback["reason"]
