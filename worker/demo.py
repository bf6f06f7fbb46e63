"""`wan-worker demo`: tiny models, a fresh SQLite queue, tasks of several priorities and models, a real
worker run, and a results table. Everything is real (diffusers pipelines, ffmpeg, the table); only the
weights are tiny and random, so the videos are noise."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from headless_model_management import GenerationTask, HeadlessTaskQueue
from wan_engine.tiny_models import build_tiny_models
from worker.config import WorkerSettings

# (model, prompt, priority, extra params): queued in this order; the worker runs priority first,
# then FIFO, preferring the resident model within a priority.
DEMO_TASKS: list[tuple[str, str, int, dict[str, object]]] = [
    ("tiny_t2v", "a red fox running through snow", 0, {}),
    ("tiny_t2v_2_2", "waves breaking on a rocky shore", 0, {"seed": 7}),
    ("tiny_t2v", "a lighthouse at dusk, urgent", 10, {"video_length": 17}),
    ("tiny_t2v_2_2", "city lights from above, urgent", 10, {"resolution": "96x64"}),
    ("tiny_t2v", "a single still frame of a mountain", 5, {"video_length": 1}),
    ("tiny_t2v", "a paper boat drifting on a canal", 0, {"num_inference_steps": 6}),
]


def run_demo(directory: Path) -> int:
    """Run the demo in `directory` (its database and outputs are recreated each time)."""
    directory = directory.resolve()
    models_dir = directory / "models"
    print(f"building tiny Wan models in {models_dir} (skipped when present) ...")
    build_tiny_models(models_dir)
    for stale in (directory / "outputs", directory / "tasks.db"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    settings = WorkerSettings(
        db_url=f"sqlite:///{directory / 'tasks.db'}",
        models_dir=models_dir,
        outputs_dir=directory / "outputs",
        worker_id="demo-worker",
        poll_interval_s=0.2,
    )
    queue = HeadlessTaskQueue(settings=settings)
    ids = [
        queue.submit_task(GenerationTask(model=model, prompt=prompt, priority=priority, parameters=params))
        for model, prompt, priority, params in DEMO_TASKS
    ]
    print(f"queued {len(ids)} tasks in {settings.db_url}; running the worker until the queue is empty ...")
    started = time.monotonic()
    queue.run_forever(until_idle=True)
    wall = time.monotonic() - started

    rows = sorted((queue.repository.get(task_id) for task_id in ids), key=lambda t: t.generation_started_at)
    print()
    print(f"{'#':>2} {'pri':>3} {'model':13} {'status':9} {'frames':>6} {'size':>7} {'load s':>6} {'gen s':>6}  output")
    for order, task in enumerate(rows, start=1):
        result = task.result_data or {}
        size = f"{result.get('width', '?')}x{result.get('height', '?')}"
        timings = result.get("timings", {})
        print(
            f"{order:>2} {task.priority:>3} {_model(task.params_text):13} {task.status.value:9} "
            f"{result.get('frames', '-'):>6} {size:>7} {result.get('load_seconds', 0):>6.2f} "
            f"{timings.get('total', 0):>6.2f}  {task.output_location or task.error_message}"
        )
    status = queue.get_queue_status()
    print(
        f"\n{status['completed']} complete, {status['failed']} failed in {wall:.1f}s; "
        f"model loads: {status['model_loads']}, switches: {status['model_switches']}"
    )
    queue.engine.dispose()
    return 0 if status["completed"] == len(ids) else 1


def _model(params_text: str) -> str:
    import json

    return str(json.loads(params_text).get("model"))
