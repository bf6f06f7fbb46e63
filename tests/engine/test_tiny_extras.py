"""The extras of `wan-worker make-tiny-models`: a tiny LoRA, a single-file checkpoint and its preset.

One real `make-tiny-models` process builds the folder every test here uses, so the files under test
are the ones a user gets.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from headless_wgp import WanOrchestrator
from tests.support.processes import wan_worker_command
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
from wan_engine.single_file import detect_layout
from wan_engine.tiny_models import TINY_MODEL_DIRS, build_tiny_extras
from wan_engine.video_io import read_video_frames

PROMPT = "a lantern on a quiet lake"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A models dir written by the real CLI, and what it printed."""
    directory = tmp_path_factory.mktemp("made") / "tiny"
    done = subprocess.run(
        [*wan_worker_command(), "make-tiny-models", str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return directory, done.stdout


@pytest.fixture(scope="module")
def t2v(made: tuple[Path, str]) -> Iterator[WanOrchestrator]:
    """tiny_t2v resident, with the generated LoRA folder as its LoRA folder."""
    directory, _ = made
    orchestrator = WanOrchestrator(directory, loras_dir=directory / "loras")
    orchestrator.load_model("tiny_t2v")
    yield orchestrator
    orchestrator.unload_model()


def still(orchestrator: WanOrchestrator, path: Path, **params: Any) -> np.ndarray:
    """One lossless frame (PNG), so equal computations give bit-equal pixels."""
    result = orchestrator.generate_t2v(PROMPT, output_path=path, seed=11, video_length=1, **params)
    return read_video_frames(result.output_path)


def test_cli_writes_the_lora_the_single_file_and_its_preset(made: tuple[Path, str]) -> None:
    directory, stdout = made
    lora = directory / "loras" / "tiny_style.safetensors"
    single = directory / "tiny_t2v_single.safetensors"
    preset = directory / "presets" / "tiny_t2v_single.json"
    for path in (lora, single, preset):
        assert path.is_file() and str(path) in stdout, path
    # The LoRA is in the original Wan layout (lora_down / lora_up / alpha), the single file too.
    keys = set(load_file(lora))
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.cross_attn.o.lora_up.weight" in keys
    assert "diffusion_model.blocks.0.self_attn.q.alpha" in keys
    assert detect_layout(list(load_file(single))) == "wan"
    data = json.loads(preset.read_text())
    assert data["model"]["URLs"] == single.name and data["model"]["base"] == TINY_MODEL_DIRS["tiny_t2v"]
    # A second build leaves the files alone.
    before = [p.stat().st_mtime_ns for p in (lora, single, preset)]
    build_tiny_extras(directory)
    assert [p.stat().st_mtime_ns for p in (lora, single, preset)] == before


def test_single_file_holds_the_folder_weights(made: tuple[Path, str]) -> None:
    directory, _ = made
    presets = load_presets(BUILTIN_PRESETS_DIR, directory / "presets")
    check = check_model(presets.get("tiny_t2v_single"), directory)
    assert check.status == "present", check
    assert check.single_file == directory / "tiny_t2v_single.safetensors"
    assert check.path == directory / "tiny-wan2.1-t2v"
    orchestrator = WanOrchestrator(directory, presets)
    orchestrator.load_model("tiny_t2v_single")
    loaded = orchestrator._loaded.pipe.transformer.state_dict()  # type: ignore[union-attr]
    orchestrator.unload_model()
    folder = WanTransformer3DModel.from_pretrained(directory / "tiny-wan2.1-t2v", subfolder="transformer")
    reference = folder.state_dict()
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k].float(), reference[k].float()) for k in reference)


def test_single_file_preset_gives_the_folder_frames(made: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = made
    presets = load_presets(BUILTIN_PRESETS_DIR, directory / "presets")
    frames = {}
    for key in ("tiny_t2v", "tiny_t2v_single"):
        orchestrator = WanOrchestrator(directory, presets)
        orchestrator.load_model(key)
        frames[key] = still(orchestrator, tmp_path / f"{key}.png")
        orchestrator.unload_model()
    np.testing.assert_array_equal(frames["tiny_t2v_single"], frames["tiny_t2v"])


def test_tiny_lora_changes_the_frames_and_multiplier_0_does_not(t2v: WanOrchestrator, tmp_path: Path) -> None:
    base = still(t2v, tmp_path / "base.png")
    styled = still(t2v, tmp_path / "styled.png", lora_names=["tiny_style"], lora_multipliers="1.0")
    # The tiny VAE squeezes everything towards grey: another seed changes a pixel by ~0.8 on average,
    # the LoRA by as much (a LoRA that missed its layers would change nothing at all).
    changed = np.abs(styled.astype(np.float32) - base.astype(np.float32))
    assert changed.mean() > 0.3 and changed.max() >= 4, (changed.mean(), changed.max())
    off = still(t2v, tmp_path / "off.png", lora_names=["tiny_style"], lora_multipliers="0")
    np.testing.assert_array_equal(off, base)
    # And without the LoRA afterwards, the model computes what it did before it.
    np.testing.assert_array_equal(still(t2v, tmp_path / "after.png"), base)
