"""Shared fixtures: tiny models built once per session, and orchestrators over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from headless_wgp import WanOrchestrator
from wan_engine.presets import PresetRegistry, load_presets


@pytest.fixture(scope="session")
def builtin_presets() -> PresetRegistry:
    """The built-in presets of defaults/."""
    return load_presets()


@pytest.fixture(scope="module")
def t2v_orchestrator(tiny_models_dir: Path) -> Iterator[WanOrchestrator]:
    """An orchestrator with tiny_t2v resident (shared by a test module)."""
    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_t2v")
    yield orchestrator
    orchestrator.unload_model()


@pytest.fixture(scope="module")
def dual_orchestrator(tiny_models_dir: Path) -> Iterator[WanOrchestrator]:
    """An orchestrator with the two-expert tiny_t2v_2_2 resident."""
    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_t2v_2_2")
    yield orchestrator
    orchestrator.unload_model()
