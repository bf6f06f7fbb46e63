"""Retry decisions, and the path rules for task inputs and output names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.loop.retry import RetryPolicy, is_permanent
from worker.task import Task, TaskStatus
from worker.tasks.params import InvalidTaskError
from worker.tasks.paths import output_stem, resolve_input_path


def running(attempts: int, max_attempts: int = 3) -> Task:
    return Task(
        id="t1",
        task_type="t2v",
        params_text="{}",
        status=TaskStatus.IN_PROGRESS,
        attempts=attempts,
        max_attempts=max_attempts,
    )


class PermanentError(RuntimeError):
    permanent = True


class GpuHiccup(RuntimeError):
    """A transient error: nothing marks it permanent."""


# ---- RetryPolicy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("resolution '1x1' is not allowed"),
        InvalidTaskError("resolution '1x1' is not allowed"),
        PermanentError("resolution '1x1' is not allowed"),
    ],
)
def test_permanent_errors_fail_at_once(exc: Exception) -> None:
    assert is_permanent(exc)
    decision = RetryPolicy().decide(exc, running(attempts=1, max_attempts=5))
    assert decision.retry is False
    assert "resolution '1x1' is not allowed" in decision.message


def test_permanent_error_message_is_the_sentence_itself() -> None:
    decision = RetryPolicy().decide(ValueError("video_guide is required"), running(1))
    assert decision.message == "video_guide is required"


def test_transient_error_is_retried_with_growing_delay() -> None:
    policy = RetryPolicy(base_delay_s=5.0, max_delay_s=1000.0)
    exc = GpuHiccup("CUDA driver hiccup")
    first = policy.decide(exc, running(attempts=1, max_attempts=10))
    second = policy.decide(exc, running(attempts=2, max_attempts=10))
    third = policy.decide(exc, running(attempts=3, max_attempts=10))
    assert first.retry and second.retry and third.retry
    assert first.delay_s == 5.0
    assert first.delay_s < second.delay_s < third.delay_s
    assert "GpuHiccup" in first.message and "CUDA driver hiccup" in first.message


def test_delay_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=5.0, max_delay_s=60.0)
    decision = policy.decide(GpuHiccup("x"), running(attempts=30, max_attempts=100))
    assert decision.retry
    assert decision.delay_s == 60.0


@pytest.mark.parametrize(("attempts", "max_attempts"), [(3, 3), (4, 3), (1, 1)])
def test_fails_once_attempts_reach_max(attempts: int, max_attempts: int) -> None:
    decision = RetryPolicy().decide(GpuHiccup("connection reset"), running(attempts, max_attempts))
    assert decision.retry is False
    assert f"{attempts} attempt" in decision.message
    assert str(max_attempts) in decision.message
    assert "connection reset" in decision.message


def test_last_attempt_before_max_still_retries() -> None:
    assert RetryPolicy().decide(GpuHiccup("x"), running(attempts=2, max_attempts=3)).retry


def test_exception_without_text_still_described() -> None:
    decision = RetryPolicy().decide(GpuHiccup(), running(1))
    assert "GpuHiccup" in decision.message


# ---- resolve_input_path ----------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """inputs/ (an input root) with a file, outputs/ with a file, and a secret outside both."""
    inputs, outputs, outside = tmp_path / "inputs", tmp_path / "outputs", tmp_path / "outside"
    for directory in (inputs, outputs, outside, inputs / "sub"):
        directory.mkdir()
    (inputs / "guide.mp4").write_bytes(b"video")
    (inputs / "sub" / "ref.png").write_bytes(b"png")
    (outputs / "previous.mp4").write_bytes(b"video")
    (outside / "secret.txt").write_text("secret")
    return {"inputs": inputs, "outputs": outputs, "outside": outside}


def resolve(value: str, layout: dict[str, Path]) -> Path:
    return resolve_input_path(value, [layout["inputs"]], layout["outputs"], key="video_guide")


def refused(value: str, layout: dict[str, Path]) -> str:
    with pytest.raises(InvalidTaskError) as info:
        resolve(value, layout)
    message = str(info.value)
    assert "video_guide" in message
    return message


def test_relative_path_inside_root(layout: dict[str, Path]) -> None:
    assert resolve("guide.mp4", layout) == (layout["inputs"] / "guide.mp4").resolve()
    assert resolve("sub/ref.png", layout) == (layout["inputs"] / "sub" / "ref.png").resolve()


def test_absolute_path_inside_root(layout: dict[str, Path]) -> None:
    target = layout["inputs"] / "guide.mp4"
    assert resolve(str(target), layout) == target.resolve()


def test_dotdot_that_stays_inside_is_fine(layout: dict[str, Path]) -> None:
    assert resolve("sub/../guide.mp4", layout) == (layout["inputs"] / "guide.mp4").resolve()


def test_dotdot_escape_refused_even_though_file_exists(layout: dict[str, Path]) -> None:
    assert (layout["inputs"] / "../outside/secret.txt").resolve().is_file()
    message = refused("../outside/secret.txt", layout)
    assert "'../outside/secret.txt'" in message
    refused("../../../../../../etc/passwd", layout)


def test_absolute_path_outside_refused(layout: dict[str, Path]) -> None:
    refused(str(layout["outside"] / "secret.txt"), layout)
    if Path("/etc/passwd").is_file():
        refused("/etc/passwd", layout)


def test_symlink_pointing_out_refused(layout: dict[str, Path]) -> None:
    link = layout["inputs"] / "innocent.mp4"
    os.symlink(layout["outside"] / "secret.txt", link)
    assert link.is_file()
    refused("innocent.mp4", layout)
    refused(str(link), layout)


def test_symlinked_directory_pointing_out_refused(layout: dict[str, Path]) -> None:
    os.symlink(layout["outside"], layout["inputs"] / "escape")
    refused("escape/secret.txt", layout)


def test_symlink_inside_root_allowed(layout: dict[str, Path]) -> None:
    os.symlink(layout["inputs"] / "guide.mp4", layout["inputs"] / "alias.mp4")
    assert resolve("alias.mp4", layout) == (layout["inputs"] / "guide.mp4").resolve()


def test_missing_file_refused(layout: dict[str, Path]) -> None:
    assert "'nope.mp4'" in refused("nope.mp4", layout)


def test_directory_is_not_a_file(layout: dict[str, Path]) -> None:
    refused("sub", layout)


@pytest.mark.parametrize("value", ["", "guide\x00.mp4"])
def test_empty_or_nul_refused(value: str, layout: dict[str, Path]) -> None:
    refused(value, layout)


def test_outputs_dir_allowed(layout: dict[str, Path]) -> None:
    expected = (layout["outputs"] / "previous.mp4").resolve()
    assert resolve("previous.mp4", layout) == expected
    assert resolve(str(layout["outputs"] / "previous.mp4"), layout) == expected


def test_message_lists_the_allowed_roots(layout: dict[str, Path]) -> None:
    message = refused("nope.mp4", layout)
    assert str(layout["inputs"].resolve()) in message
    assert str(layout["outputs"].resolve()) in message


# ---- output_stem -------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["abc123", "0f3a9c2e4b", "task_1-retry.2", "A" * 100])
def test_safe_ids_kept(task_id: str) -> None:
    assert output_stem(task_id) == task_id


@pytest.mark.parametrize(
    "task_id",
    ["../x", "/etc/passwd", "a/b", "a\\b", "a\x00b", ".hidden", "..", ".", "", "A" * 101, "spaces here", "ünï"],
)
def test_unsafe_ids_hashed(task_id: str) -> None:
    stem = output_stem(task_id)
    assert stem != task_id
    assert not stem.startswith(".")
    assert "/" not in stem and "\\" not in stem and "\x00" not in stem
    assert 0 < len(stem) <= 100
    assert stem == output_stem(task_id), "the same id must always give the same name (re-runs overwrite)"


def test_distinct_unsafe_ids_get_distinct_names() -> None:
    ids = ["../x", "../y", "/etc/passwd", "/etc/shadow", "a/b", "a\x00b"]
    assert len({output_stem(task_id) for task_id in ids}) == len(ids)


def test_stem_stays_inside_a_directory(tmp_path: Path) -> None:
    for task_id in ["../../escape", "/abs/path", "..", "x/../../y"]:
        target = (tmp_path / f"{output_stem(task_id)}.mp4").resolve()
        assert target.parent == tmp_path.resolve()
