"""GenerationRunner: runs a claimed task on the resident model, switching models only when it must.

The loop hands it a claimed `Task`; it validates the params (before anything loads), resolves the input
files inside the input roots, loads the task's model unless it is resident, picks the generate method of
the task's mode and returns the outcome. Travel tasks go to the `TravelCoordinator`. It also builds the
plain-data `ClaimFilter` the claim applies, so no preset code runs inside a claim transaction.

Outputs are staged, not published: every write of a run happens inside `staged_outputs()`, so the finished
file stays under an attempt-unique hidden name, registered with the `RunContext`; the loop renames it to
`<stem>.mp4` inside the guarded `Complete` write (see worker.loop.worker), only while the claim is still ours.

A plain generation run by the daemon (t2v, vace, i2v, flf2v, ti2v) returns a `PendingFinish` once its frames are
decoded: the engine's `PendingWrite` writes the MP4 (still under the staged name) on the loop's finisher thread
while the next task runs. Travel segments and stitches write in the run: a segment's output is the next
segment's guide and the stitch's input, so deferring them would only move the wait into the children's
bookkeeping for no overlap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from wan_engine.errors import ModelUnavailableError
from wan_engine.generation_run import PendingWrite
from wan_engine.generation_types import GenerationResult, ProgressEvent
from wan_engine.loras import resolve_lora_path
from wan_engine.video_io import OpenedInput, StagedOutputs, remove_partial_files, staged_outputs
from worker.loop.finisher import PendingFinish
from worker.loop.worker import RunContext
from worker.task import Task, TaskDeferred, TaskOutcome
from worker.tasks.claim_filter import ClaimFilter
from worker.tasks.hw_compat import HwTranslation, translate_hw_task
from worker.tasks.orchestrator import Orchestrator
from worker.tasks.params import (
    TASK_TYPE_MODES,
    GenerationParams,
    InvalidTaskError,
    check_parallel_mode,
    parse_params_text,
    validate_priority,
)
from worker.tasks.paths import close_inputs, open_input, output_stem
from worker.tasks.travel import TRAVEL_TASK_TYPES, TravelCoordinator, TravelSegmentParams, TravelStore
from worker.tasks.url_inputs import MAX_IMAGE_BYTES, MAX_LORA_BYTES, fetch_url, is_url
from worker.tasks.validation import preset_architecture, validate_task

log = logging.getLogger(__name__)


class GenerationRunner:
    """Runs a claimed task on the resident model; switches models only when the task needs another."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        outputs_dir: Path,
        input_roots: tuple[Path, ...] = (),
        store: TravelStore | None = None,
        allow_fallbacks: bool = False,
        group_size: int = 1,
        hw_table: bool = False,
    ) -> None:
        self.orchestrator = orchestrator
        self.hw_table = hw_table  # rows come from an adopted Headless-Wan2GP table (worker.tasks.hw_compat)
        self.allow_fallbacks = allow_fallbacks
        self.group_size = group_size  # ranks every generation runs on (worker.processes.group_ranks); 1: alone
        self.outputs_dir = outputs_dir
        self.input_roots = tuple(input_roots)  # input files are read only from here and outputs_dir
        self.model_loads = 0
        self.model_switches = 0
        self.load_seconds = 0.0
        self.last_reload_reason: str | None = None  # set by ensure_model
        self.last_transfers: list[dict[str, Any]] = []  # the last load's park/restore records (model cache)
        self.travel = (
            TravelCoordinator(store, outputs_dir, self.input_roots, self._travel_resolution) if store else None
        )
        # Computed once from the presets: the claim transaction applies it as plain data (worker.store).
        self.claim_filter = ClaimFilter.from_presets(orchestrator.presets, group_size)

    def resident_model(self) -> str | None:
        return self.orchestrator.current_model

    def device_name(self) -> str | None:
        """The GPU this runner generates on, for the `workers` table (None when torch cannot tell)."""
        try:
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except Exception:
            return None

    def ensure_model(self, model_key: str, context: RunContext | None = None) -> float | None:
        """Load `model_key` unless it is resident with unchanged weight files; returns the seconds spent
        loading (None: no load). `last_reload_reason` says why a resident model was loaded again (or None)."""
        self.last_reload_reason = None
        self.last_transfers = []
        previous = self.orchestrator.current_model
        # Stat only: a resident model whose files were rewritten in place is loaded again (issue 18).
        needs_reload = getattr(self.orchestrator, "needs_reload", None)  # absent on test doubles
        if previous == model_key and (needs_reload is None or needs_reload(model_key) is None):
            return None
        if context is not None:
            context.report("loading_model", model=model_key)
        cache = getattr(self.orchestrator, "model_cache", None)  # absent on test doubles and group proxies
        count = cache.transfer_count if cache is not None else 0
        seconds = self.orchestrator.load_model(model_key)
        # What the switch moved through pinned host RAM (and whether its slab was reserved ahead of time).
        self.last_transfers = cache.transfers_since(count) if cache is not None else []
        self.model_loads += 1
        self.model_switches += previous is not None and previous != model_key  # a reload is not a switch
        self.load_seconds += seconds
        self.last_reload_reason = getattr(self.orchestrator, "model_reloaded_because", None)
        log.info("loaded model in %.2fs (previous: %s)", seconds, previous, extra={"model": model_key})
        return seconds

    def run(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred | PendingFinish:
        validate_priority(task.priority)  # rows from other programs: refused before anything loads
        translation = self._translate(task)
        if translation is None:
            return self._run_native(task, context)
        log.info(
            "Headless-Wan2GP %s task runs as %s",
            translation.hw_task_type,
            translation.task_type,
            extra={"task_id": task.id, "event": "hw_task_translated"},
        )
        native = replace(task, task_type=translation.task_type, params_text=json.dumps(translation.params))
        outcome = self._run_native(native, context)
        if isinstance(outcome, PendingFinish):
            finish = outcome.finish
            return PendingFinish(lambda: _with_hw_record(finish(), translation))
        if isinstance(outcome, TaskOutcome):
            return _with_hw_record(outcome, translation)
        return outcome

    def _translate(self, task: Task) -> HwTranslation | None:
        """A Headless-Wan2GP row as our task, with its URLs fetched; None for a native row."""
        translation = translate_hw_task(
            task.task_type,
            parse_params_text(task.params_text),
            hw_table=self.hw_table,
            architecture_of=partial(preset_architecture, self.orchestrator.presets),
        )
        if translation is None:
            return None
        params = dict(translation.params)
        fetched = self.outputs_dir / "inputs" / output_stem(task.id)
        for key in ("video_guide", "video_mask", "image_start", "image_end"):
            if is_url(params.get(key)):
                params[key] = str(fetch_url(params[key], fetched, key, MAX_IMAGE_BYTES))
        for key in ("image_refs", "input_images"):
            if isinstance(params.get(key), list):
                params[key] = [
                    str(fetch_url(v, fetched, f"{key}[{i}]", MAX_IMAGE_BYTES)) if is_url(v) else v
                    for i, v in enumerate(params[key])
                ]
        for name, url in translation.lora_urls.items():
            self._fetch_lora(name, url, str(params.get("model")))
        return replace(translation, params=params)

    def _fetch_lora(self, name: str, url: str, model: str) -> None:
        """A LoRA a HW row names by URL: used when the LoRA folders hold a file of that name (looked up as
        the generation will look it up), else fetched into the first folder."""
        dirs = tuple(getattr(self.orchestrator, "loras_dirs", ()))
        if not dirs:
            raise InvalidTaskError(f"LoRA {url!r}: this worker has no LoRA directory to fetch it into")
        try:
            resolve_lora_path(name, dirs, subdirs=self.orchestrator.presets.get(model).model.lora_subdirs)
        except ValueError:  # not there (or an unknown model, which validation names): fetch it
            fetch_url(url, dirs[0], f"LoRA {name}", MAX_LORA_BYTES, name=name)

    def _run_native(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred | PendingFinish:
        if task.task_type in TRAVEL_TASK_TYPES:
            return self._run_travel(task, context)
        # The same checks as HeadlessTaskQueue.submit_task (schema, architecture, scheduler steps).
        params = validate_task(
            task.task_type, parse_params_text(task.params_text), self.orchestrator.presets, self.orchestrator.models_dir
        )
        mode = TASK_TYPE_MODES[task.task_type]
        self._check_parallel(params, mode)
        inputs = self._input_paths(params)  # before loading anything: a bad path fails at once
        try:
            return self._run_generation(task, context, params, mode, inputs)
        finally:
            close_inputs(inputs)  # the descriptors _input_paths opened

    def _run_generation(
        self, task: Task, context: RunContext, params: GenerationParams, mode: str, inputs: dict[str, Any]
    ) -> TaskOutcome | PendingFinish:
        """Load the model and generate with the opened `inputs` (see `run`)."""
        context.check()
        _ran, load_s, fallback = self._ensure_model_or_fallback(str(params.model), context)
        context.check()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        output_path = self.outputs_dir / f"{output_stem(task.id)}.mp4"
        for stale in remove_partial_files(output_stem(task.id), self.outputs_dir):  # left by a killed attempt
            log.warning("removed a killed attempt's partial output %s", stale.name, extra={"task_id": task.id})
        generate = self.orchestrator.generate_t2v
        if mode == "vace":
            generate = self.orchestrator.generate_vace
        elif mode in ("i2v", "flf2v") or (mode == "ti2v" and "image_start" in inputs):
            generate = self.orchestrator.generate_i2v
        # Daemon runs write the MP4 on the loop's finisher thread, overlapping the next task (issue 15); a
        # context-parallel group's proxy (no `supports_deferred_write`) and direct callers write in the run.
        deferred = context.can_defer and bool(getattr(self.orchestrator, "supports_deferred_write", False))
        report = partial(_report_event, context)
        with _staging(context):
            result = generate(
                params.prompt,
                output_path=output_path,
                progress=report,
                **({"deferred_write": True} if deferred else {}),
                **inputs,
                **params.generation_kwargs(),
            )
        # Read now: by the time a deferred write finishes, the next task's ensure_model has reset it.
        loaded = {
            "load_s": load_s,
            "fallback": fallback,
            "reloaded_because": self.last_reload_reason,
            "transfers": self.last_transfers,
        }
        if isinstance(result, PendingWrite):
            pending = result

            def finish() -> TaskOutcome:
                # On the finisher thread: a cancel, lost lease or abort stops the encode at the next frame.
                written = pending.finish(progress=report, check=context.check)
                return self._outcome(task, context, written, **loaded)

            return PendingFinish(finish)
        return self._outcome(task, context, result, **loaded)

    def _outcome(
        self,
        task: Task,
        context: RunContext,
        result: GenerationResult,
        load_s: float | None,
        fallback: dict[str, str] | None,
        reloaded_because: str | None,
        transfers: list[dict[str, Any]],
    ) -> TaskOutcome:
        result_data = {
            **result.to_dict(),
            "model_loaded": load_s is not None,
            "load_seconds": round(load_s or 0.0, 3),
            "model_fallback": fallback,
            "model_reloaded_because": reloaded_because,  # weight files changed under the resident model
            "model_transfers": transfers if load_s is not None else [],  # parks / restores of this switch
            "attempt": task.attempts,
            "worker_id": context.worker_id,
        }
        return TaskOutcome(str(result.output_path), result_data)

    def _ensure_model_or_fallback(
        self, model_key: str, context: RunContext
    ) -> tuple[str, float | None, dict[str, str] | None]:
        """Load the task's model; when its weights are unavailable and fallbacks are allowed, the first
        loadable preset of its `fallbacks` list (the seeds' alternative models). Returns the model that
        ran, the load time and what was substituted (None: no substitution)."""
        try:
            return model_key, self.ensure_model(model_key, context), None
        except ModelUnavailableError as exc:
            spec = self.orchestrator.presets.get(model_key).model
            alternatives = spec.fallbacks
            if not (self.allow_fallbacks and alternatives):
                raise
            for alternative in alternatives:
                if self.orchestrator.presets.get(alternative).model.architecture != spec.architecture:
                    continue  # a fallback must run the same mode with the same inputs
                try:
                    load_s = self.ensure_model(alternative, context)
                except ModelUnavailableError:
                    continue
                log.warning("model unavailable, ran fallback %s", alternative, extra={"model": model_key})
                return alternative, load_s, {"requested": model_key, "ran": alternative, "reason": str(exc)[:500]}
            raise ModelUnavailableError(f"{exc} Fallbacks {', '.join(alternatives)} are unavailable too.") from exc

    # ---- travel between images ---------------------------------------------------------------------

    def _run_travel(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred | PendingFinish:
        if self.travel is None:
            raise InvalidTaskError(f"{task.task_type} tasks need a worker with a task store (the daemon)")
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        if task.task_type == "travel_orchestrator":
            return self.travel.run_orchestrator(task)
        if task.task_type == "travel_stitch":
            return self._run_stitch(task, context)

        def generate(
            params: TravelSegmentParams,
            guide: np.ndarray,
            mask: np.ndarray,
            output_path: Path,
            progress: Callable[[str, int, int], None],
        ) -> dict[str, Any]:
            load_s = self.ensure_model(params.model, context)
            context.check()
            result = self.orchestrator.generate_vace(
                params.prompt,
                video_guide=guide,
                video_mask=mask,
                output_path=output_path,
                progress=lambda event: progress(event.stage, event.step, event.total_steps),
                **params.generation_kwargs(),
            )
            return {
                **result.to_dict(),
                "model_loaded": load_s is not None,
                "load_seconds": round(load_s or 0.0, 3),
                "model_reloaded_because": self.last_reload_reason,
                "model_transfers": self.last_transfers if load_s is not None else [],
            }

        with _staging(context):
            return self.travel.run_segment(task, generate, context.report, context.report_parent)

    def _run_stitch(self, task: Task, context: RunContext) -> TaskOutcome | PendingFinish:
        """A travel stitch: checked here; the stitch itself (decode, cross-fade, encode: CPU only) runs on the
        loop's finisher thread when the loop offers it, so the next task's GPU work overlaps it (issue 15)."""
        assert self.travel is not None
        with _staging(context) as staging:
            stitch = self.travel.prepare_stitch(task, context.report)
            if not context.can_defer:
                return stitch(staging)
        queued = time.perf_counter()

        def finish() -> TaskOutcome:
            # On the finisher thread: a cancel, lost lease or abort stops the stitch at the next progress report.
            waited = time.perf_counter() - queued
            outcome = stitch(staging)
            extra = {"write_overlapped": True, "write_queued_s": round(waited, 4)}
            return TaskOutcome(outcome.output_location, {**outcome.result_data, **extra})

        return PendingFinish(finish)

    def _travel_resolution(self, model: str, resolution: str | None) -> tuple[int, int]:
        """The (width, height) a travel runs at: its resolution param, else the VACE model's preset."""
        preset = self.orchestrator.presets.get(model)
        if preset.model.architecture != "vace":
            raise InvalidTaskError(f"travel needs a VACE model; {model!r} is a {preset.model.architecture} model")
        value = resolution or preset.settings.resolution or ""
        width, _, height = value.partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 16 or int(height) % 16:
            raise InvalidTaskError(f"resolution = {value!r}: must look like '832x480' with multiples of 16")
        return int(width), int(height)

    def _input_paths(self, params: GenerationParams) -> dict[str, Any]:
        """The mode's keys with every file opened (and checked on its descriptor) inside the input roots / outputs
        dir: the engine reads these `OpenedInput`s, never the paths again. The caller closes them (close_inputs)."""
        kwargs = params.mode_kwargs()
        roots = list(self.input_roots)
        try:
            for key in params.PATH_KEYS:
                value = kwargs.get(key)
                if isinstance(value, list):
                    opened: list[OpenedInput] = []
                    kwargs[key] = opened  # filled as they open: a refusal closes those already open
                    for i, v in enumerate(value):
                        opened.append(open_input(v, roots, self.outputs_dir, key=f"{key}[{i}]"))
                elif value is not None:
                    kwargs[key] = open_input(value, roots, self.outputs_dir, key=key)
        except BaseException:
            close_inputs(kwargs)  # those opened before the refused one
            raise
        return kwargs

    def _check_parallel(self, params: GenerationParams, mode: str) -> None:
        """A preset's `parallel` (the task's is checked with its params) and the group this worker has."""
        parallel = params.parallel or self.orchestrator.presets.get(str(params.model)).settings.parallel or 1
        check_parallel_mode(mode, max(parallel, self.group_size))
        if parallel > self.group_size:
            raise InvalidTaskError(
                f"parallel = {parallel}: this worker runs generations on {self.group_size} GPU(s); start a group "
                f"with `wan-worker run --parallel {parallel}`"
            )


def _with_hw_record(outcome: TaskOutcome, translation: HwTranslation) -> TaskOutcome:
    """A translated Headless-Wan2GP row's outcome, recording what was translated."""
    return TaskOutcome(outcome.output_location, {**outcome.result_data, "headless_wan2gp": translation.record()})


def _report_event(context: RunContext, event: ProgressEvent) -> None:
    """The engine's progress events as the task's progress (and its cancel / stop checks)."""
    context.report(event.stage, event.step, event.total_steps)


def _staging(context: RunContext) -> AbstractContextManager[StagedOutputs]:
    """A staging block whose files the loop publishes with the `Complete` write (or discards)."""
    staging = StagedOutputs()
    context.stage(staging)
    return staged_outputs(staging)
