"""The `Orchestrator` protocol: what the runner needs from the model owner.

`headless_wgp.WanOrchestrator` implements it on one device; `worker.processes.group_ranks.GroupLeaderProxy`
implements it on rank 0 of a context-parallel group (every call also runs on the other ranks). The
runner depends on this protocol only, so nothing in `worker.tasks` imports `headless_*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from wan_engine.generation_types import GenerationResult, ProgressCallback
from wan_engine.presets import PresetRegistry


class Orchestrator(Protocol):
    """Loads one model at a time from presets and generates videos with it."""

    @property
    def presets(self) -> PresetRegistry: ...
    @property
    def current_model(self) -> str | None: ...
    @property
    def models_dir(self) -> Path: ...
    def load_model(self, model_key: str, *, progress: ProgressCallback | None = None) -> float: ...
    def generate_t2v(self, prompt: str, *, output_path: Path, **params: Any) -> GenerationResult: ...
    def generate_vace(self, prompt: str, *, output_path: Path, **params: Any) -> GenerationResult: ...
    def generate_i2v(self, prompt: str, *, output_path: Path, **params: Any) -> GenerationResult: ...
