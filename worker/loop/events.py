"""What the worker loop reports to: the `EventSink` protocol and its no-op default.

`worker.live.events.LiveSink` is the real implementation (ETA, monitoring, WebSocket events); the loop
knows only this protocol, so it never imports the live layer.
"""

from __future__ import annotations

from typing import Any, Protocol

from worker.task import Task


class EventSink(Protocol):
    """What the worker loop reports to. Implementations never raise and never block the step loop."""

    def started(self, task: Task, resident_model: str | None) -> None: ...
    def progress(self, task: Task, progress: dict[str, Any]) -> None: ...  # may add keys in place
    def result_extras(self, task: Task) -> dict[str, Any]: ...  # merged into result_data
    def completed(self, task: Task, output: str | None, result: dict[str, Any]) -> None: ...
    def failed(self, task: Task, error: BaseException, message: str, retrying: bool) -> None: ...
    def cancelled(self, task: Task) -> None: ...


class NullSink:
    """The default sink: does nothing."""

    def started(self, task: Task, resident_model: str | None) -> None:
        pass

    def progress(self, task: Task, progress: dict[str, Any]) -> None:
        pass

    def result_extras(self, task: Task) -> dict[str, Any]:
        return {}

    def completed(self, task: Task, output: str | None, result: dict[str, Any]) -> None:
        pass

    def failed(self, task: Task, error: BaseException, message: str, retrying: bool) -> None:
        pass

    def cancelled(self, task: Task) -> None:
        pass


NULL_SINK = NullSink()
