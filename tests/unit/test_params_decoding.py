"""The one params decoder: bounded depth, never a RecursionError, and claim-time helpers that never raise."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.task import Task, TaskStatus
from worker.tasks.claim_filter import ClaimFilter
from worker.tasks.params import (
    MAX_PARAMS_DEPTH,
    InvalidTaskError,
    json_depth,
    model_key_for,
    parallel_requested,
    params_or_none,
    parse_params_text,
)


def nested(levels: int, key: str = "x") -> str:
    """A params object whose `key` holds arrays nested so that the whole text is `levels` deep."""
    return '{"prompt": "a", "' + key + '": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


@pytest.mark.parametrize(
    ("text", "depth"),
    [("{}", 1), ("1", 0), ('{"a": [1, {"b": 2}]}', 3), ('{"a": "[[[[{{{"}', 1), ('{"a": "\\"[[["}', 1), ("[[[", 3)],
)
def test_json_depth_ignores_strings(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_depth_at_the_limit_is_accepted() -> None:
    assert parse_params_text(nested(MAX_PARAMS_DEPTH))["prompt"] == "a"


@pytest.mark.parametrize("levels", [MAX_PARAMS_DEPTH + 1, 2000, 100_000])
def test_too_deep_is_bad_input_naming_depth_and_limit(levels: int) -> None:
    with pytest.raises(InvalidTaskError, match=f"params nest {levels} levels deep; at most {MAX_PARAMS_DEPTH}"):
        parse_params_text(nested(levels))


def test_deep_text_never_raises_recursion_error_in_helpers() -> None:
    deep = nested(5000, key="model")
    with pytest.raises(RecursionError):  # what json.loads alone does: the bug this guards against
        json.loads(deep)
    assert model_key_for("t2v", deep) is None
    assert parallel_requested(deep) == 1  # any worker claims it and fails it with the depth message
    assert params_or_none(deep) is None


def test_blob_params_decode_or_fail_as_bad_input() -> None:
    assert parse_params_text(b'{"prompt": "a"}') == {"prompt": "a"}  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="not valid UTF-8"):
        parse_params_text(b'{"prompt": "\xff"}')  # type: ignore[arg-type]
    surrogate = b'{"prompt": "\xff"}'.decode("utf-8", "surrogateescape")  # how worker.store.db hands it over
    with pytest.raises(InvalidTaskError, match="not valid UTF-8"):
        parse_params_text(surrogate)
    with pytest.raises(InvalidTaskError, match="must be JSON text, got int"):
        parse_params_text(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content", [None, 42, 1.5, b"\xff\xfe", b"{}", "", "\x00", "[" * 10_000, "{" * 300_000, nested(50), object()]
)
def test_claim_time_helpers_never_raise(content: Any) -> None:
    model_key_for("t2v", content)
    parallel_requested(content)
    task = Task(id="t", task_type="t2v", params_text=content, status=TaskStatus.QUEUED)
    for claim_filter in (ClaimFilter(), ClaimFilter(group_size=2)):
        assert isinstance(claim_filter(task), bool)
        claim_filter.model_of(task)
