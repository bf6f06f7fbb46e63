"""The sweep's dependency-cycle rule and the claim-time priority rule, on both backends (fast, no models)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from worker.store.repository import CYCLE_IDS_SHOWN, SqlTaskRepository, find_dependency_cycles
from worker.task import NewTask, TaskStatus
from worker.tasks.params import MAX_PRIORITY, MIN_PRIORITY, InvalidTaskError, validate_priority


def test_find_dependency_cycles() -> None:
    assert find_dependency_cycles({}) == []
    assert find_dependency_cycles({"a": "a"}) == [["a"]]
    assert find_dependency_cycles({"a": "b", "b": "c"}) == []  # c is not waiting on anything
    # a chain leading into a cycle: only the cycle is reported
    cycles = find_dependency_cycles({"x": "y", "y": "a", "a": "b", "b": "c", "c": "a"})
    assert [sorted(c) for c in cycles] == [["a", "b", "c"]]
    two = find_dependency_cycles({"a": "b", "b": "a", "c": "d", "d": "c", "e": "a"})
    assert sorted(sorted(c) for c in two) == [["a", "b"], ["c", "d"]]


def test_find_dependency_cycles_is_linear_on_long_chains() -> None:
    n = 200_000
    chain = {f"t{i}": f"t{i + 1}" for i in range(n)}
    assert find_dependency_cycles(chain) == []
    chain[f"t{n}"] = "t0"
    (cycle,) = find_dependency_cycles(chain)
    assert len(cycle) == n + 1


@pytest.fixture
def repo(engine: Engine) -> SqlTaskRepository:
    return SqlTaskRepository(engine)


def _add(repo: SqlTaskRepository, task_id: str, on: str | None) -> str:
    return repo.insert(NewTask(task_type="t2v", params={"prompt": task_id}, id=task_id, dependant_on=on))


def test_sweep_fails_cycles_and_leaves_honest_chains(repo: SqlTaskRepository) -> None:
    for task_id, on in [("a", "b"), ("b", "c"), ("c", "a"), ("tail", "a"), ("first", None), ("then", "first")]:
        _add(repo, task_id, on)
    long_cycle = [f"long-{i:02d}" for i in range(CYCLE_IDS_SHOWN + 5)]
    for i, task_id in enumerate(long_cycle):
        _add(repo, task_id, long_cycle[(i + 1) % len(long_cycle)])

    failed = repo.fail_blocked()
    assert sorted(failed) == sorted(["a", "b", "c", *long_cycle])
    for task_id in ("a", "b", "c"):
        task = repo.get(task_id)
        assert task is not None and task.status is TaskStatus.FAILED and task.attempts == 0
        assert "dependency cycle of 3 task(s): " in (task.error_message or "")
        assert all(name in (task.error_message or "") for name in ("a -> b", "b -> c", "c -> a"))
    long_message = repo.get(long_cycle[0]).error_message or ""  # type: ignore[union-attr]
    assert f"of {len(long_cycle)} task(s)" in long_message and long_message.count("long-") == CYCLE_IDS_SHOWN
    assert repo.get_status("first") is TaskStatus.QUEUED and repo.get_status("then") is TaskStatus.QUEUED
    assert repo.get_status("tail") is TaskStatus.QUEUED  # waits on a Failed task: failed by the next sweep

    assert repo.fail_blocked() == ["tail"]
    tail = repo.get("tail")
    assert tail is not None and "prerequisite task a ended Failed" in (tail.error_message or "")
    assert "dependency cycle" in (tail.error_message or "")
    assert repo.fail_blocked() == []
    repo.engine.dispose()


@pytest.mark.parametrize("priority", [MIN_PRIORITY, 0, MAX_PRIORITY])
def test_priority_in_range_is_accepted(priority: int) -> None:
    validate_priority(priority)


@pytest.mark.parametrize("priority", [MIN_PRIORITY - 1, MAX_PRIORITY + 1, 2**31 - 1, True, 1.5, "5"])
def test_priority_out_of_range_is_refused_naming_the_value(priority: object) -> None:
    with pytest.raises(InvalidTaskError, match=f"priority {priority!r} is out of range"):
        validate_priority(priority)
