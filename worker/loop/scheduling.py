"""Which ready task to claim: priority first, then age, preferring the resident model without starving.

Pure functions plus a little per-worker memory (when each task was first passed over), so the policy
is unit-testable without a database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.task import Task

# A task passed over in favour of the resident model runs anyway once it has waited this long,
# or been passed over this many times: switching is expensive, starvation is worse.
AFFINITY_MAX_WAIT_S = 300.0
AFFINITY_MAX_SKIPS = 8


@dataclass
class ModelAffinity:
    """Prefers tasks for the resident model within the top priority, with bounded waiting for others."""

    max_wait_s: float = AFFINITY_MAX_WAIT_S
    max_skips: int = AFFINITY_MAX_SKIPS
    clock: Callable[[], float] = time.monotonic
    _first_skipped_at: dict[str, float] = field(default_factory=dict)
    _skips: dict[str, int] = field(default_factory=dict)

    def choose(
        self, candidates: Sequence[Task], resident_model: str | None, model_of: Callable[[Task], str | None]
    ) -> Task | None:
        """Pick from candidates already ordered by (priority desc, age)."""
        self._prune({task.id for task in candidates})
        if not candidates:
            return None
        top = [task for task in candidates if task.priority == candidates[0].priority]
        oldest = top[0]
        if resident_model is None or model_of(oldest) == resident_model:
            return self._picked(oldest)
        same_model = next((task for task in top if model_of(task) == resident_model), None)
        if same_model is None or self._overdue(oldest):
            return self._picked(oldest)
        # Pass over every older task of the top priority that needs another model.
        for task in top:
            if task is same_model:
                break
            self._first_skipped_at.setdefault(task.id, self.clock())
            self._skips[task.id] = self._skips.get(task.id, 0) + 1
        return self._picked(same_model)

    def _overdue(self, task: Task) -> bool:
        first = self._first_skipped_at.get(task.id)
        waited = 0.0 if first is None else self.clock() - first
        return waited >= self.max_wait_s or self._skips.get(task.id, 0) >= self.max_skips

    def _picked(self, task: Task) -> Task:
        self._first_skipped_at.pop(task.id, None)
        self._skips.pop(task.id, None)
        return task

    def _prune(self, live_ids: set[str]) -> None:
        # Tasks no longer ready (taken by another worker, cancelled) are forgotten: memory stays bounded.
        for task_id in [task_id for task_id in self._skips if task_id not in live_ids]:
            self._first_skipped_at.pop(task_id, None)
            self._skips.pop(task_id, None)
