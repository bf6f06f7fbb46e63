"""Retry policy: an exception and a task in, a decision out (the loop only persists it)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.task import Task

RETRY_BASE_DELAY_S = 5.0
RETRY_MAX_DELAY_S = 300.0


@dataclass(frozen=True)
class RetryDecision:
    """Either retry after `delay_s`, or fail for good with `message`."""

    retry: bool
    delay_s: float
    message: str


def is_permanent(exc: BaseException) -> bool:
    """Bad input never gets better by retrying: our errors say so with `permanent = True`."""
    return bool(getattr(exc, "permanent", False)) or isinstance(exc, ValueError)


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off for transient errors, bounded by the row's max_attempts."""

    base_delay_s: float = RETRY_BASE_DELAY_S
    max_delay_s: float = RETRY_MAX_DELAY_S

    def decide(self, exc: BaseException, task: Task) -> RetryDecision:
        if is_permanent(exc):
            return RetryDecision(False, 0.0, describe(exc))
        if task.attempts >= task.max_attempts:
            return RetryDecision(
                False,
                0.0,
                f"failed after {task.attempts} attempt(s) (max_attempts {task.max_attempts}); "
                f"last error: {describe(exc)}",
            )
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, task.attempts - 1))
        return RetryDecision(True, delay, f"attempt {task.attempts} failed, retrying in {delay:.0f}s: {describe(exc)}")
