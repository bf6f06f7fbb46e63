"""Context parallelism on a real 2-rank gloo group (torchrun), against a single-process run.

One torchrun run of group_script.py covers: both ranks really hold half of the tokens; the output
(a PNG, lossless) and the latents of Wan 2.2 (both experts split), TI2V and CLIP I2V match the
single-process run; a random
seed is drawn once on rank 0 and recorded as random; a cancel at step 2 stops both ranks at that step
and writes nothing; the group keeps working after it; rank 0's stop ends the follower with code 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from headless_wgp import WanOrchestrator
from tests.parallel.group_script import CANCEL_AT_STEP, Probe, generate_other_modes

pytestmark = pytest.mark.parallel

SCRIPT = Path(__file__).with_name("group_script.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("group")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WAN_PARALLEL_TIMEOUT_S": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(SCRIPT), str(tiny_models_dir), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def single(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same generations in this process, without a group."""
    out = tmp_path_factory.mktemp("single")
    orchestrator = WanOrchestrator(tiny_models_dir)
    probe = Probe()
    orchestrator.load_model("tiny_t2v")
    probe.attach(orchestrator)
    t2v = orchestrator.generate_t2v("a cat", output_path=out / "t2v.mp4", seed=7, video_length=1)
    orchestrator.load_model("tiny_t2v_2_2")
    probe.attach(orchestrator)
    probe.latents.clear()
    dual = orchestrator.generate_t2v("surf", output_path=out / "dual.mp4", seed=11, num_inference_steps=4)
    found = {"t2v": t2v.output_path, "latents": probe.latents[0], "experts": list(dual.experts_used or ())}
    found.update(generate_other_modes(orchestrator, orchestrator, probe, out))
    orchestrator.unload_model()
    return found


def test_each_rank_holds_half_of_the_tokens(report: dict[str, Any]) -> None:
    # Single process: 12 tokens (1 latent frame x 3 x 4 patches), 36 (3 latent frames; I2V too) and 6 (TI2V:
    # 3 latent frames x 1 x 2 patches of its 16x VAE). Split: 6, 18 and 3.
    assert [rank["tokens"] for rank in report["ranks"]] == [[3, 6, 18], [3, 6, 18]]
    assert report["t2v"]["extra"] == {"ranks": 2, "ulysses_degree": 2, "backend": "gloo"}


def test_output_matches_a_single_process_run(report: dict[str, Any], single: dict[str, Any]) -> None:
    parallel = np.asarray(Image.open(report["t2v"]["path"]), dtype=np.int16)
    alone = np.asarray(Image.open(single["t2v"]), dtype=np.int16)
    assert parallel.shape == alone.shape
    assert np.abs(parallel - alone).max() <= 1  # float32 on a CPU: equal up to rounding


def test_both_wan_2_2_experts_split_and_match(report: dict[str, Any], single: dict[str, Any]) -> None:
    assert report["dual"]["experts"] == single["experts"] and set(single["experts"]) == {"high", "low"}
    np.testing.assert_allclose(report["dual"]["latents"], single["latents"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("key", ["tiny_ti2v", "tiny_i2v"])
def test_ti2v_and_clip_i2v_split_and_match(report: dict[str, Any], single: dict[str, Any], key: str) -> None:
    np.testing.assert_allclose(report[key], single[key], rtol=0, atol=1e-4)


def test_a_random_seed_is_drawn_once_and_recorded_as_random(report: dict[str, Any]) -> None:
    assert report["random_seed"]["was_random"] is True
    assert isinstance(report["random_seed"]["seed"], int)


def test_cancel_stops_every_rank_at_the_same_step(report: dict[str, Any]) -> None:
    assert report["cancel"] == "raised" and report["cancel_output"] == []
    # tiny_t2v_2_2 runs CFG: two transformer calls per step on every rank, none after the cancel.
    assert report["cancel_calls"] == 2 * CANCEL_AT_STEP
    leader, follower = report["ranks"]
    assert leader["calls"] == follower["calls"], "the follower ran a different number of transformer calls"
    assert report["follower_usable"].endswith("after.mp4")
    assert follower["code"] == 0


def test_a_bad_call_fails_on_rank_0_alone_and_the_group_goes_on(report: dict[str, Any]) -> None:
    assert "text-to-video needs one of" in report["refused"]
    assert report["after_refusal"].endswith("ok.mp4")
