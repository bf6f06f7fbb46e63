"""Weights rewritten in place under a resident model (issue 18, item 5): reload, never SIGBUS.

Tiny real models copied into each test's folder, so their files can be rewritten. The weights are
rewritten through the same inode (`r+b`), as `cp` over the file or `rsync --inplace` do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from headless_wgp import WanOrchestrator
from wan_engine.model_cache import GIB, ModelCache
from wan_engine.video_io import read_video_frames
from wan_engine.weight_files import (
    WeightFiles,
    detach_file_mappings,
    mapped_tensors,
    pipeline_modules,
    weight_paths,
)
from worker.loop.lease import LeaseKeeper
from worker.loop.worker import RunContext
from worker.task import Task, TaskOutcome, TaskStatus
from worker.tasks.runner import GenerationRunner

RUN = {"seed": 1, "video_length": 5, "resolution": "64x48", "num_inference_steps": 2}
REPO = Path(__file__).resolve().parents[2]


class _NoStore:
    """Stands in for the repository under the lease keeper; nothing here needs the database."""

    def heartbeat(self, *_args: object) -> bool:
        return True

    def get_status(self, _task_id: str) -> TaskStatus:
        return TaskStatus.IN_PROGRESS


@pytest.fixture
def models_dir(tiny_models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny models this module rewrites."""
    directory = tmp_path / "models"
    directory.mkdir()
    for name in ("tiny-wan2.1-t2v", "tiny-wan2.1-vace"):
        shutil.copytree(tiny_models_dir / name, directory / name)
    return directory


def _transformer_file(models_dir: Path) -> Path:
    return models_dir / "tiny-wan2.1-t2v" / "transformer" / "diffusion_pytorch_model.safetensors"


def rewrite_in_place(path: Path, scale: float = 1.5) -> None:
    """Write different weights (same names, shapes, size) into the same file object: the inode stays."""
    before = os.stat(path).st_ino
    tensors = safetensors.torch.load(path.read_bytes())
    data = safetensors.torch.save({k: (v * scale).contiguous() for k, v in tensors.items()})
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()
    assert os.stat(path).st_ino == before


def _run_task(runner: GenerationRunner, task_id: str) -> tuple[dict[str, object], np.ndarray]:
    task = Task(
        id=task_id,
        task_type="t2v",
        params_text=json.dumps({"model": "tiny_t2v", "prompt": "a cat", **RUN}),
        status=TaskStatus.IN_PROGRESS,
        attempts=1,
    )
    lease = LeaseKeeper(_NoStore(), task.id, "w", 30, 10)  # type: ignore[arg-type]
    context = RunContext(task, "w", lease, threading.Event())
    outcome = runner.run(task, context)
    assert isinstance(outcome, TaskOutcome)
    context.publish_staged()
    return outcome.result_data, read_video_frames(Path(str(outcome.output_location)))


def test_load_records_the_files_and_keeps_no_tensor_mapped(models_dir: Path) -> None:
    orchestrator = WanOrchestrator(models_dir)
    orchestrator.load_model("tiny_t2v")
    loaded = orchestrator._loaded
    assert loaded is not None
    recorded = {p.relative_to(models_dir / "tiny-wan2.1-t2v").as_posix() for p in loaded.weight_files.paths}
    assert recorded == {
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert loaded.weight_files.changed() is None
    assert mapped_tensors(pipeline_modules(loaded.pipe)) == []  # nothing aliases a file mapping


def test_detach_copies_mapped_tensors_and_keeps_ties(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"weight": torch.arange(12.0).reshape(3, 4)}, str(path))
    module = torch.nn.Linear(4, 3, bias=False)
    mapped = safetensors.torch.load_file(str(path))["weight"]  # a view of the file mapping
    module.weight.data = mapped
    twin = torch.nn.Module()
    twin.register_buffer("tied", module.weight.data[1:])  # another view of the same storage
    parameter = module.weight
    assert len(mapped_tensors([module, twin])) == 2
    assert detach_file_mappings([module, twin]) == 12 * 4
    assert mapped_tensors([module, twin]) == []
    assert module.weight is parameter  # same Parameter object, new memory
    assert module.weight.untyped_storage().data_ptr() == twin.tied.untyped_storage().data_ptr()
    path.write_bytes(b"")  # truncate: the copies are unaffected (no SIGBUS, same values)
    assert torch.equal(twin.tied, torch.arange(4.0, 12.0).reshape(2, 4))


def test_weight_files_say_what_changed(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x" * 10)
    files = WeightFiles.record([path])
    assert files.changed() is None
    with open(path, "r+b") as handle:
        handle.write(b"yy")
    os.utime(path, ns=(0, 1))  # a same-size rewrite shows by its mtime
    assert "rewritten in place (mtime" in (files.changed() or "")
    path.write_bytes(b"x" * 3)
    assert f"{path} was rewritten in place (size 10 -> 3 bytes)" in (files.changed() or "")
    path.unlink()
    assert "was removed" in (files.changed() or "")


def test_a_rewrite_in_place_reloads_and_matches_a_fresh_load(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = GenerationRunner(WanOrchestrator(models_dir), tmp_path / "outputs")
    first, frames_before = _run_task(runner, "before")
    assert first["model_loaded"] is True and first["model_reloaded_because"] is None
    again, frames_again = _run_task(runner, "again")
    assert again["model_loaded"] is False and again["model_reloaded_because"] is None
    assert np.array_equal(frames_before, frames_again)

    weights = _transformer_file(models_dir)
    rewrite_in_place(weights)
    with caplog.at_level(logging.WARNING, logger="headless_wgp"):
        after, frames_after = _run_task(runner, "after")
    reason = str(after["model_reloaded_because"])
    assert after["model_loaded"] is True
    assert str(weights) in reason and "rewritten in place" in reason
    assert any(str(weights) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert (runner.model_loads, runner.model_switches) == (2, 0)  # a reload is a load, not a switch

    fresh = WanOrchestrator(models_dir)
    fresh.load_model("tiny_t2v")
    result = fresh.generate_t2v("a cat", output_path=tmp_path / "fresh.mp4", **RUN)
    expected = read_video_frames(result.output_path)
    assert np.array_equal(frames_after, expected)  # the new weights, exactly
    assert not np.array_equal(frames_after, frames_before)


def test_a_parked_model_with_changed_files_is_loaded_from_disk(models_dir: Path) -> None:
    orchestrator = WanOrchestrator(models_dir)
    orchestrator.model_cache = ModelCache(GIB, orchestrator.device)
    orchestrator.load_model("tiny_t2v")
    parked = orchestrator._loaded
    orchestrator.load_model("tiny_vace")
    assert "tiny_t2v" in orchestrator.model_cache
    rewrite_in_place(_transformer_file(models_dir))
    orchestrator.load_model("tiny_t2v")
    assert orchestrator._loaded is not parked  # not the stale parked copy
    assert "rewritten in place" in (orchestrator.model_reloaded_because or "")
    assert "tiny_t2v" not in orchestrator.model_cache.parked_keys()


def test_weight_paths_follow_the_check(models_dir: Path) -> None:
    from wan_engine.model_sources import resolve_model
    from wan_engine.presets import load_presets

    check = resolve_model(load_presets().get("tiny_vace"), models_dir)
    names = sorted(p.parent.name for p in weight_paths(check))
    assert names == ["text_encoder", "transformer", "vae"]


_TRUNCATION_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[3])
    from headless_wgp import WanOrchestrator
    from wan_engine.errors import ModelUnavailableError
    from worker.loop.worker import RunContext
    from worker.task import Task, TaskStatus
    from worker.tasks.runner import GenerationRunner
    from tests.engine.test_weights_changed import RUN, _NoStore
    from worker.loop.lease import LeaseKeeper

    models, outputs = Path(sys.argv[1]), Path(sys.argv[2])
    weights = models / "tiny-wan2.1-t2v" / "transformer" / "diffusion_pytorch_model.safetensors"
    runner = GenerationRunner(WanOrchestrator(models), outputs)

    def task(task_id):
        row = Task(id=task_id, task_type="t2v", params_text=json.dumps({"model": "tiny_t2v", "prompt": "a", **RUN}),
                   status=TaskStatus.IN_PROGRESS, attempts=1)
        return runner.run(row, RunContext(row, "w", LeaseKeeper(_NoStore(), task_id, "w", 30, 10), threading.Event()))

    task("first")
    # The transformer, and the text encoder (transformers maps it even where diffusers is told not to).
    encoder = models / "tiny-wan2.1-t2v" / "text_encoder" / "model.safetensors"
    originals = {path: path.read_bytes() for path in (weights, encoder)}
    for path in originals:
        os.truncate(path, 0)
    # The resident weights are private copies: touching every one of them must not fault on the empty file.
    pipe = runner.orchestrator.pipeline
    total = sum(float(t.double().sum()) for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                for t in m.state_dict().values())
    report = {"touched": total == total}
    try:
        task("truncated")
        report["error"] = None
    except ModelUnavailableError as exc:
        report["error"] = str(exc)
    for path, data in originals.items():
        path.write_bytes(data)
    outcome = task("restored")
    report["restored"] = outcome.result_data["model_loaded"]
    print("REPORT " + json.dumps(report))
    """
)


def test_a_truncated_weight_file_fails_the_task_without_sigbus(models_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "truncate.py"
    script.write_text(_TRUNCATION_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(models_dir), str(tmp_path / "outputs"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode != -7, f"SIGBUS: {done.stderr[-2000:]}"
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert report["touched"] is True
    error = report["error"] or ""
    assert "corrupted" in error and str(_transformer_file(models_dir)) in error
    assert report["restored"] is True  # the next task after restoring the file loads and runs
