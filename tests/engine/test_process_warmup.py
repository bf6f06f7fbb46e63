"""The process warm-up (wan_engine.process_warmup): what it imports, that it never fails, that the
orchestrator runs it at creation (in a worker: its start-up) unless told not to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_engine import process_warmup
from wan_engine.process_warmup import speed_path_compiles, warm_process

REPO = Path(__file__).resolve().parents[2]
# diffusers imports the Wan pipeline module lazily, at the first attribute access: the warm-up's job. A fresh
# process each time, so the module is not already there from another test.
PROBE = """
import sys
from headless_wgp import WanOrchestrator
before = "diffusers.pipelines.wan.pipeline_wan" in sys.modules
orchestrator = WanOrchestrator(sys.argv[2], device="cpu", warm_up=sys.argv[1] == "warm")
report = orchestrator.warmup
print(before, "diffusers.pipelines.wan.pipeline_wan" in sys.modules, report.errors if report else None)
"""


@pytest.mark.parametrize(("mode", "imported"), [("warm", "True"), ("off", "False")])
def test_the_orchestrator_warms_a_fresh_process_at_creation(mode: str, imported: str, tiny_models_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(tiny_models_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["False", imported, "{}" if mode == "warm" else "None"]


def test_a_failing_step_is_recorded_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no such module")

    monkeypatch.setattr(process_warmup, "_import_classes", broken)
    report = warm_process(torch.device("cpu"), compiler=True)
    assert report.errors == {"imports": "RuntimeError: no such module"}
    assert set(report.seconds) == {"imports"}  # a CPU: no CUDA or compiler step


def test_cuda_steps_run_only_for_cuda_and_the_compiler_only_when_it_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(process_warmup, "_import_classes", lambda: ran.append("imports"))
    monkeypatch.setattr(process_warmup, "_warm_cuda", lambda device: ran.append(f"cuda:{device}"))
    monkeypatch.setattr(process_warmup, "_import_compiler", lambda: ran.append("compiler"))
    warm_process(torch.device("cuda", 1), compiler=True)
    warm_process(torch.device("cuda"), compiler=False)
    warm_process(torch.device("cpu"), compiler=True)
    assert ran == ["imports", "cuda:cuda:1", "compiler", "imports", "cuda:cuda", "imports"]


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
