"""The process warm-up (wan_engine.process_warmup): what it imports, that it never fails, that the first load
waits for it and counts the wait as load time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from headless_wgp import WanOrchestrator
from wan_engine import process_warmup
from wan_engine.process_warmup import ProcessWarmup, speed_path_compiles

REPO = Path(__file__).resolve().parents[2]
# diffusers imports the Wan pipeline module lazily, at the first attribute access: the warm-up's job.
PROBE = """
import sys, torch
from wan_engine.process_warmup import ProcessWarmup
before = "diffusers.pipelines.wan.pipeline_wan" in sys.modules
warmup = ProcessWarmup.start(torch.device("cpu"), compiler=False) if sys.argv[1] == "warm" else None
if warmup is not None:
    warmup.wait()
print(before, "diffusers.pipelines.wan.pipeline_wan" in sys.modules, warmup.errors if warmup else None)
"""


@pytest.mark.parametrize(("mode", "imported"), [("warm", "True"), ("none", "False")])
def test_a_fresh_process_warm_up_imports_the_lazy_wan_modules(mode: str, imported: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert done.stdout.split() == ["False", imported, "{}" if mode == "warm" else "None"]


def test_a_failing_step_is_recorded_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no such module")

    monkeypatch.setattr(process_warmup, "_import_classes", broken)
    warmup = ProcessWarmup.start(torch.device("cpu"), compiler=True)
    warmup.wait(timeout=30)
    assert warmup.done
    assert warmup.errors == {"imports": "RuntimeError: no such module"}
    assert set(warmup.seconds) == {"imports"}  # CPU: no CUDA or compiler step


def test_the_first_load_waits_for_the_warm_up_and_counts_it(
    monkeypatch: pytest.MonkeyPatch, tiny_models_dir: Path
) -> None:
    release = threading.Event()
    monkeypatch.setattr(process_warmup, "_import_classes", lambda: release.wait(30))
    orchestrator = WanOrchestrator(tiny_models_dir, device="cpu")
    warmup = orchestrator._warmup
    assert warmup is not None and not warmup.done
    loaded: list[float] = []
    loader = threading.Thread(target=lambda: loaded.append(orchestrator.load_model("tiny_t2v")))
    loader.start()
    time.sleep(0.5)
    assert not loaded, "the first load must not start before the warm-up ends"
    release.set()
    loader.join(60)
    assert loaded and loaded[0] >= 0.5  # the wait is load time: the ETA learns what the task waited for
    assert warmup.done and orchestrator._warmup is None
    orchestrator.unload_model()


def test_warm_up_off_starts_no_thread(tiny_models_dir: Path) -> None:
    assert WanOrchestrator(tiny_models_dir, device="cpu", warm_up=False)._warmup is None


@pytest.mark.parametrize(
    ("env", "compiles"),
    [({}, True), ({"WAN_SPEED": "off"}, False), ({"WAN_COMPILE": "off"}, False), ({"WAN_COMPILE_DYNAMIC": "x"}, False)],
)
def test_the_compiler_step_follows_the_speed_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], compiles: bool
) -> None:
    for name in ("WAN_SPEED", "WAN_COMPILE", "WAN_COMPILE_DYNAMIC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert speed_path_compiles() is compiles
