"""The claim filter: which queued rows a worker may take, as plain data computed before any claim.

A worker whose group has G ranks runs every task it claims on all G of them, so it claims the tasks that
ask for at most G GPUs and that it can split G ways (one GPU: parallel 1 only; a group: not VACE, whose
transformer diffusers cannot split). Travel orchestration and stitching load no model and run anywhere.

The filter holds the preset defaults it needs (each model's `parallel`) as a frozen mapping, so a claim
transaction calls only these pure functions of the row: no preset or model code runs while it is open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from wan_engine.presets import PresetRegistry
from worker.task import Task
from worker.tasks.hw_compat import is_hw_row, translate_hw_task
from worker.tasks.params import PARALLEL_MODES, TASK_TYPE_MODES, model_key_for, parallel_requested, params_or_none

MODEL_FREE_TASK_TYPES = frozenset({"travel_orchestrator", "travel_stitch"})  # bookkeeping and ffmpeg only


@dataclass(frozen=True)
class ClaimFilter:
    """`filter(task)`: may this worker claim the row? `model_of(task)`: the model the row will need."""

    group_size: int = 1
    preset_parallel: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_presets(cls, presets: PresetRegistry, group_size: int) -> ClaimFilter:
        parallel = {key: presets.get(key).settings.parallel or 1 for key in presets}
        return cls(group_size, MappingProxyType(parallel))

    def __call__(self, task: Task) -> bool:
        # Runs inside the claim transaction on rows any program wrote: it must never raise. A row it cannot
        # read is accepted, so the runner fails that row alone with a message instead of stopping the claim.
        try:
            return self._accepts(task)
        except Exception:
            return True

    def _accepts(self, task: Task) -> bool:
        """The rule itself (see the module docstring)."""
        if task.task_type in MODEL_FREE_TASK_TYPES:
            return True
        if self.parallel_for(task) > self.group_size:
            return False
        if self.group_size == 1:
            return True
        return TASK_TYPE_MODES.get(task.task_type) in PARALLEL_MODES

    def parallel_for(self, task: Task) -> int:
        """GPUs the row asks for: its `parallel`, else its model preset's, else 1."""
        requested = parallel_requested(task.params_text)
        if requested is not None:
            return requested
        model = model_key_for(task.task_type, task.params_text)
        return self.preset_parallel.get(model, 1) if model is not None else 1

    @staticmethod
    def model_of(task: Task) -> str | None:
        """The model a row will need (None: none, or it cannot tell); a pure function of the row."""
        try:
            if task.task_type in MODEL_FREE_TASK_TYPES:
                return None
            params = params_or_none(task.params_text)
            if params is not None and is_hw_row(task.task_type, params):  # a Headless-Wan2GP row's model
                translation = translate_hw_task(task.task_type, params)
                model = translation.params.get("model") if translation is not None else None
                return model if isinstance(model, str) else None
            return model_key_for(task.task_type, task.params_text)
        except Exception:  # never raise on row content inside the claim
            return None
