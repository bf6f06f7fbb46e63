"""`wan-worker status ID --follow`: a terminal progress bar drawn from the table until the task ends.

Reads the row about twice a second (works against any worker, on any machine sharing the database).
While the task is queued the bar says how many tasks are ahead and when it should start (learned ETAs);
while it runs it shows the stage, the denoising step and the worker's ETA. Exit code 0 on Complete,
1 on Failed / Cancelled / unknown id.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from worker.live.eta import EtaEstimator
from worker.task import TaskStatus

POLL_S = 0.5


def _eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA unknown"
    seconds = max(0, round(seconds))
    return f"ETA {seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"ETA {seconds}s"


def _queued_text(repository: Any, task_id: str, estimator: EtaEstimator | None) -> str:
    """'queued: N ahead, starts in ...' (counting every queued task ahead of it and the running ones)."""
    queued = repository.queued_in_order(1000)
    ids = [task.id for task in queued]
    if task_id not in ids:
        return "queued"
    ahead = ids.index(task_id)
    running = repository.recently_updated([TaskStatus.IN_PROGRESS.value], 10)
    text = f"queued: {ahead} ahead" + (f", {len(running)} running" if running else "")
    if estimator is None:
        return text
    remaining: float | None = 0.0
    if running:
        remaining = max(((task.progress or {}).get("eta_seconds") or -1.0) for task in running)
        remaining = None if remaining < 0 else remaining
    etas = estimator.queue_etas(remaining, None, queued[: ahead + 1])
    eta = etas.get(task_id)
    return f"{text}, starts {_eta_text(eta.start_in if eta else None).replace('ETA', 'in')}"


def follow_task(
    repository: Any,
    task_id: str,
    estimator: EtaEstimator | None = None,
    out: TextIO | None = None,
    poll_s: float = POLL_S,
) -> int:
    """Draw the task's progress until it ends; 0 when it completed, 1 otherwise."""
    out = out or sys.stderr
    bar = tqdm(total=100, file=out, unit="%", bar_format="{l_bar}{bar}| {postfix}", dynamic_ncols=True)
    refreshed = 0.0
    try:
        while True:
            task = repository.get(task_id)
            if task is None:
                bar.write(f"error: no task with id {task_id!r}")
                return 1
            if task.status.is_final:
                bar.set_description_str(task.status.value)
                if task.status is TaskStatus.COMPLETE:
                    bar.n = 100
                bar.set_postfix_str(task.output_location or task.error_message or "", refresh=True)
                return 0 if task.status is TaskStatus.COMPLETE else 1
            if task.status is TaskStatus.QUEUED:
                if estimator is not None and time.monotonic() - refreshed > 10:
                    estimator.refresh()
                    refreshed = time.monotonic()
                bar.set_description_str("queued")
                bar.set_postfix_str(_queued_text(repository, task_id, estimator), refresh=False)
            else:
                progress = task.progress or {}
                stage = str(progress.get("stage") or "starting")
                step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
                bar.n = 100 if stage in ("decoding", "writing_video") else (100.0 * step / total if total else 0)
                bar.set_description_str(stage.replace("_", " "))
                steps = f"step {step}/{total}, " if total else ""
                bar.set_postfix_str(steps + _eta_text(progress.get("eta_seconds")), refresh=False)
            bar.refresh()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        bar.write("stopped following (the task goes on)")
        return 1
    finally:
        bar.close()
