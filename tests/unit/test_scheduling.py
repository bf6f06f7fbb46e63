"""ModelAffinity.choose: priority first, FIFO within a priority, resident-model preference without starvation."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import pytest

from worker.loop.scheduling import ModelAffinity
from worker.task import Task, TaskStatus
from worker.tasks.params import model_key_for

_ids = itertools.count()


def make_task(model: str, priority: int = 0, task_id: str | None = None) -> Task:
    """A queued task for `model`; ids increase with creation order (the FIFO order)."""
    return Task(
        id=task_id or f"task-{next(_ids):05d}",
        task_type="t2v",
        params_text=json.dumps({"model": model, "prompt": "a cat"}),
        status=TaskStatus.QUEUED,
        priority=priority,
    )


def model_of(task: Task) -> str | None:
    return model_key_for(task.task_type, task.params_text)


def ordered(tasks: Sequence[Task]) -> list[Task]:
    """The order the repository hands candidates over in: priority desc, then age (stable sort)."""
    return sorted(tasks, key=lambda task: -task.priority)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(queue: list[Task], affinity: ModelAffinity, resident: str | None = None) -> tuple[list[Task], int]:
    """A worker that runs whatever it picks and loads the picked task's model when it is not resident.

    Returns the execution order and the number of model loads.
    """
    queue = list(queue)
    executed: list[Task] = []
    loads = 0
    while queue:
        chosen = affinity.choose(ordered(queue), resident, model_of)
        assert chosen is not None
        queue.remove(chosen)
        if model_of(chosen) != resident:
            resident = model_of(chosen)
            loads += 1
        executed.append(chosen)
    return executed, loads


def test_empty_candidates_choose_nothing() -> None:
    assert ModelAffinity().choose([], "m", model_of) is None


def test_highest_priority_first_even_when_resident_model_is_lower_priority() -> None:
    resident_low = make_task("M", priority=0)
    other_high = make_task("N", priority=5)
    chosen = ModelAffinity().choose(ordered([resident_low, other_high]), "M", model_of)
    assert chosen is other_high


def test_fifo_within_priority_without_resident_model() -> None:
    first, second, third = make_task("M"), make_task("N"), make_task("M")
    chosen = ModelAffinity().choose([first, second, third], None, model_of)
    assert chosen is first


def test_fifo_when_oldest_matches_resident_model() -> None:
    first, second = make_task("M"), make_task("M")
    assert ModelAffinity().choose([first, second], "M", model_of) is first


def test_prefers_resident_model_within_top_priority() -> None:
    older_other, newer_resident = make_task("N", priority=3), make_task("M", priority=3)
    chosen = ModelAffinity().choose([older_other, newer_resident], "M", model_of)
    assert chosen is newer_resident


def test_no_resident_task_in_top_priority_takes_oldest() -> None:
    top_n1, top_n2 = make_task("N", priority=3), make_task("K", priority=3)
    low_resident = make_task("M", priority=1)
    chosen = ModelAffinity().choose(ordered([top_n1, top_n2, low_resident]), "M", model_of)
    assert chosen is top_n1


def test_never_picks_lower_priority_over_higher_across_a_whole_run() -> None:
    tasks = [make_task("M", 0), make_task("N", 2), make_task("M", 2), make_task("N", 1), make_task("M", 1)]
    executed, _ = simulate(tasks, ModelAffinity(), resident="M")
    priorities = [task.priority for task in executed]
    assert priorities == sorted(priorities, reverse=True)


def test_alternating_models_are_grouped_two_loads_not_four() -> None:
    m1, n1, m2, n2 = make_task("M"), make_task("N"), make_task("M"), make_task("N")
    executed, loads = simulate([m1, n1, m2, n2], ModelAffinity(), resident=None)
    assert loads == 2
    assert executed == [m1, m2, n1, n2]


def test_plain_fifo_would_need_four_loads() -> None:
    """Guards the test above: the same queue taken strictly FIFO switches four times."""
    tasks = [make_task("M"), make_task("N"), make_task("M"), make_task("N")]
    resident, loads = None, 0
    for task in tasks:
        if model_of(task) != resident:
            resident, loads = model_of(task), loads + 1
    assert loads == 4


@pytest.mark.parametrize("max_skips", [1, 3, 8])
def test_starvation_bound_by_skips(max_skips: int) -> None:
    """An N task among an endless stream of M tasks runs after at most max_skips passes."""
    clock = FakeClock()
    affinity = ModelAffinity(max_wait_s=1e9, max_skips=max_skips, clock=clock)
    starving = make_task("N")
    queue = [starving, make_task("M")]
    passes_over = 0
    for _ in range(max_skips + 5):
        chosen = affinity.choose(ordered(queue), "M", model_of)
        assert chosen is not None
        queue.remove(chosen)
        if chosen is starving:
            break
        passes_over += 1
        queue.append(make_task("M"))  # the stream never dries up
    else:
        pytest.fail(f"N task still waiting after {max_skips + 5} claims")
    assert passes_over == max_skips


def test_starvation_bound_by_wait_time_with_injected_clock() -> None:
    clock = FakeClock()
    affinity = ModelAffinity(max_wait_s=30.0, max_skips=10_000, clock=clock)
    starving = make_task("N")
    queue = [starving, make_task("M")]
    chosen = affinity.choose(ordered(queue), "M", model_of)
    assert chosen is not starving  # first pass-over starts the wait
    queue.remove(chosen)
    queue.append(make_task("M"))

    clock.now += 29.0
    chosen = affinity.choose(ordered(queue), "M", model_of)
    assert chosen is not starving, "picked before max_wait_s elapsed"
    queue.remove(chosen)
    queue.append(make_task("M"))

    clock.now += 1.0  # 30 s since first passed over
    assert affinity.choose(ordered(queue), "M", model_of) is starving


def test_overdue_task_runs_even_though_resident_tasks_remain() -> None:
    affinity = ModelAffinity(max_skips=1)
    starving, resident_1, resident_2 = make_task("N"), make_task("M"), make_task("M")
    assert affinity.choose([starving, resident_1, resident_2], "M", model_of) is resident_1
    assert affinity.choose([starving, resident_2], "M", model_of) is starving


def test_memory_is_pruned_when_a_task_disappears() -> None:
    affinity = ModelAffinity(max_skips=2, max_wait_s=1e9, clock=FakeClock())
    starving = make_task("N")
    affinity.choose([starving, make_task("M")], "M", model_of)
    assert affinity._skips == {starving.id: 1}

    # Taken by another worker (or cancelled): gone from the candidates, so it is forgotten.
    affinity.choose([make_task("M")], "M", model_of)
    assert starving.id not in affinity._skips
    assert starving.id not in affinity._first_skipped_at

    # Back again (say a stale lease was re-queued): its count starts over. Were the old pass-over
    # remembered, the second claim below would find it overdue (2 skips) and pick it.
    resident_1, resident_2 = make_task("M"), make_task("M")
    assert affinity.choose([starving, resident_1, resident_2], "M", model_of) is resident_1
    assert affinity.choose([starving, resident_2], "M", model_of) is resident_2


def test_memory_stays_bounded_over_many_claims() -> None:
    affinity = ModelAffinity(max_skips=3)
    for _ in range(200):
        affinity.choose([make_task("N"), make_task("M")], "M", model_of)
    assert len(affinity._skips) <= 1
    assert len(affinity._first_skipped_at) <= 1


def test_picking_a_task_clears_its_memory() -> None:
    affinity = ModelAffinity(max_skips=5)
    starving = make_task("N")
    affinity.choose([starving, make_task("M")], "M", model_of)
    assert affinity.choose([starving], "M", model_of) is starving
    assert starving.id not in affinity._skips
