"""Travel between images: the orchestrator, segment and stitch tasks (persistence side).

`travel_between_images` plans, builds guide/mask frames and stitches (pure); this module turns a
`travel_orchestrator` row into child rows and runs those children:

- the orchestrator inserts one `travel_segment` row per segment (each depending on the previous one)
  and one `travel_stitch` row depending on the last segment, with deterministic ids
  (`<parent>-seg000`, ..., `<parent>-stitch`), so running it again after a crash creates no duplicates
  and reuses segments already Complete; it then waits (deferred on the stitch row) and, once woken,
  completes with the stitched video. A failing child fails the stitch and then the orchestrator through
  the dependency sweep, whose message quotes the failing child's id and error.
- a segment builds its VACE guide and mask (start/end images, the previous segment's tail) and
  generates through the runner's `SegmentGenerator`;
- the stitch cross-fades the segment videos into `<parent>.mp4` (needing no GPU, the daemon runs it on its output
  finisher thread while the next task runs: `prepare_stitch`, worker.tasks.runner).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import travel_between_images as travel
from wan_engine.generation_inputs import load_image
from wan_engine.limits import (
    MAX_CROSSFADE_SHARPEN,
    MAX_FLOW_SHIFT,
    MAX_FPS,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_MODEL_KEY_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MAX_SWITCH_THRESHOLD,
    MAX_TRAVEL_IMAGES,
    MIN_FPS,
    MIN_FRAMES,
    MIN_GUIDANCE,
    MIN_STEPS,
    MIN_SWITCH_THRESHOLD,
    MIN_TRAVEL_IMAGES,
    RANDOM_SEED,
)
from wan_engine.presets import PresetRegistry
from wan_engine.video_io import OpenedInput, StagedOutputs, active_staging, remove_partial_files
from worker.task import NewTask, Task, TaskDeferred, TaskOutcome, TaskStatus
from worker.tasks.params import InvalidTaskError, describe_validation_error, parse_params_text
from worker.tasks.paths import open_input, output_stem, resolve_input_path

DEFAULT_TRAVEL_MODEL = "vace_14B_cocktail_2_2"
TRAVEL_TASK_TYPES = ("travel_orchestrator", "travel_segment", "travel_stitch")
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5  # stitch progress callbacks come per frame; the row needs far fewer


class TravelStore(Protocol):
    """The repository operations travel needs."""

    def insert_children(self, children: list[NewTask]) -> list[str]: ...
    def children_of(self, parent_id: str) -> list[Task]: ...
    def get(self, task_id: str) -> Task | None: ...


class SegmentGenerator(Protocol):
    """Generates one VACE segment from guide/mask frames (the runner's model management behind it)."""

    def __call__(
        self,
        params: TravelSegmentParams,
        guide: np.ndarray,
        mask: np.ndarray,
        output_path: Path,
        progress: Callable[[str, int, int], None],
    ) -> dict[str, Any]: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TravelSettings(_Strict):
    """Generation settings shared by every segment of a travel."""

    model: str = Field(default=DEFAULT_TRAVEL_MODEL, min_length=1, max_length=MAX_MODEL_KEY_CHARS)
    resolution: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    guidance2_scale: float | None = Field(default=None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    flow_shift: float | None = Field(default=None, gt=0, le=MAX_FLOW_SHIFT)
    switch_threshold: float | None = Field(default=None, ge=MIN_SWITCH_THRESHOLD, le=MAX_SWITCH_THRESHOLD)
    fps: int = Field(default=16, ge=MIN_FPS, le=MAX_FPS)
    crossfade_sharpen: float = Field(default=0.0, ge=0, le=MAX_CROSSFADE_SHARPEN)


class TravelOrchestratorParams(TravelSettings):
    """`travel_orchestrator` params (docs/DESIGN.md)."""

    input_images: list[str] = Field(min_length=MIN_TRAVEL_IMAGES, max_length=MAX_TRAVEL_IMAGES)
    base_prompts: str | list[str]
    negative_prompts: str | list[str] | None = None
    segment_frames: int | list[int] = 81
    frame_overlap: int | list[int] = 8
    seed_base: int = Field(default=RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED)
    # Written on the children as `orchestrator_run_id` (HW readers group a run's segments by it); default: the id.
    run_id: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_KEY_CHARS)


class TravelSegmentParams(TravelSettings):
    """A `travel_segment` row, written by the orchestrator."""

    orchestrator: str
    segment_index: int = Field(ge=0)
    num_segments: int = Field(ge=1)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = None
    seed: int = Field(ge=0, le=MAX_SEED)
    frames: int = Field(ge=MIN_FRAMES, le=MAX_FRAMES)  # one segment is one generation
    overlap_in: int = Field(ge=0)
    start_image: str | None = None
    end_image: str
    previous_segment: str | None = None
    # Headless-Wan2GP's link to the orchestrator (its readers look for a run's children by these).
    orchestrator_task_id_ref: str | None = None
    orchestrator_run_id: str | None = None

    def generation_kwargs(self) -> dict[str, Any]:
        """What the VACE call takes besides guide, mask and prompt."""
        keys = ("resolution", "num_inference_steps", "guidance_scale", "guidance2_scale", "flow_shift")
        kwargs = {key: getattr(self, key) for key in (*keys, "switch_threshold") if getattr(self, key) is not None}
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = self.negative_prompt
        return {**kwargs, "seed": self.seed, "video_length": self.frames, "fps": self.fps}


class TravelStitchParams(_Strict):
    """A `travel_stitch` row, written by the orchestrator."""

    orchestrator: str
    segments: list[str] = Field(min_length=1)
    overlaps: list[int]
    fps: int = Field(ge=MIN_FPS, le=MAX_FPS)
    crossfade_sharpen: float = Field(default=0.0, ge=0, le=MAX_CROSSFADE_SHARPEN)
    orchestrator_task_id_ref: str | None = None
    orchestrator_run_id: str | None = None


def _validate(model: type[_Strict], task: Task) -> Any:
    return _validate_params(model, parse_params_text(task.params_text))


def _validate_params(model: type[_Strict], params: dict[str, Any]) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        # The schema's own keys in the message: a travel row's unknown key lists the travel keys.
        raise InvalidTaskError(describe_validation_error(exc, params, model)) from None  # type: ignore[arg-type]


def validate_travel_params(params: dict[str, Any], presets: PresetRegistry) -> TravelOrchestratorParams:
    """Validate `travel_orchestrator` params as the worker will, before anything loads (for `submit_task`).

    The schema (unknown keys list the travel keys), the model (known, a VACE model), the resolution the
    segments run at and the segment plan (frames, overlaps, one prompt or one per segment). Input paths are
    left to the worker: the submitter may not see the worker's input roots. Raises `InvalidTaskError` /
    `UnknownModelError` (ValueErrors) with the worker's messages.
    """
    validated: TravelOrchestratorParams = _validate_params(TravelOrchestratorParams, params)
    preset = presets.get(validated.model)
    if preset.model.architecture != "vace":
        raise InvalidTaskError(f"travel needs a VACE model; {validated.model!r} is a {preset.model.architecture} model")
    value = validated.resolution or preset.settings.resolution or ""
    width, _, height = value.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) % 16 or int(height) % 16:
        raise InvalidTaskError(f"resolution = {value!r}: must look like '832x480' with multiples of 16")
    TravelCoordinator._plan(validated, len(validated.input_images), max(validated.seed_base, 0))
    return validated


def _child_id(parent_id: str, suffix: str) -> str:
    """A child's id, derived from its parent's so that a re-run orchestrator makes the same rows.

    A parent id in the canonical uuid form (Headless-Wan2GP's Supabase table, whose `id` column is a uuid)
    gets a uuid5 child id, which that column accepts; any other id gets a readable `-<suffix>`."""
    if len(parent_id) == 36:
        try:
            return str(uuid.uuid5(uuid.UUID(parent_id), suffix))
        except ValueError:
            pass
    return f"{parent_id}-{suffix}"


def segment_id(parent_id: str, index: int) -> str:
    return _child_id(parent_id, f"seg{index:03d}")


def stitch_id(parent_id: str) -> str:
    return _child_id(parent_id, "stitch")


@dataclass
class TravelCoordinator:
    """Runs the three travel task types; one instance per worker."""

    store: TravelStore
    outputs_dir: Path
    input_roots: Sequence[Path]
    resolution_for: Callable[[str, str | None], tuple[int, int]]  # (model, resolution param) -> (w, h)

    # ---- travel_orchestrator ----------------------------------------------------------------------

    def run_orchestrator(self, task: Task) -> TaskOutcome | TaskDeferred:
        params: TravelOrchestratorParams = _validate(TravelOrchestratorParams, task)
        images = [
            str(resolve_input_path(path, list(self.input_roots), self.outputs_dir, key=f"input_images[{i}]"))
            for i, path in enumerate(params.input_images)
        ]
        self.resolution_for(params.model, params.resolution)  # unknown model / bad resolution fail here
        children = self.store.children_of(task.id)
        if not children:
            seed_base = params.seed_base if params.seed_base >= 0 else int.from_bytes(os.urandom(4), "little")
            plan = self._plan(params, len(images), seed_base)
            self.store.insert_children(self._children(task, params, plan, images))
            children = self.store.children_of(task.id)
        stitch = next((child for child in children if child.id == stitch_id(task.id)), None)
        if stitch is None:
            raise InvalidTaskError(f"travel {task.id} has children but no stitch task {stitch_id(task.id)}")
        segments = [child for child in children if child.task_type == "travel_segment"]
        if stitch.status is TaskStatus.COMPLETE:
            return TaskOutcome(stitch.output_file, self._summary(segments, stitch))
        failed = next((c for c in [*segments, stitch] if c.status in (TaskStatus.FAILED, TaskStatus.CANCELLED)), None)
        if failed is not None:
            raise InvalidTaskError(
                f"travel child {failed.id} ({failed.task_type}) ended {failed.status.value}: {failed.error_message}"
            )
        done = sum(child.status is TaskStatus.COMPLETE for child in segments)
        progress = {
            "stage": "waiting_for_segments",
            "step": done,
            "total_steps": len(segments),
            "percent": round(100.0 * done / len(segments), 1),
        }
        return TaskDeferred(wait_for=stitch.id, progress=progress)

    @staticmethod
    def _plan(params: TravelOrchestratorParams, num_images: int, seed_base: int) -> travel.TravelPlan:
        try:
            return travel.plan_travel(
                num_images,
                params.segment_frames,
                params.frame_overlap,
                params.base_prompts,
                seed_base,
                negative_prompts=params.negative_prompts,
            )
        except travel.TravelPlanError as exc:
            raise InvalidTaskError(str(exc)) from None

    def _children(
        self, task: Task, params: TravelOrchestratorParams, plan: travel.TravelPlan, images: list[str]
    ) -> list[NewTask]:
        shared = params.model_dump(include=set(TravelSettings.model_fields), exclude_none=True)
        hw_link = {"orchestrator_task_id_ref": task.id, "orchestrator_run_id": params.run_id or task.id}
        children = []
        for segment in plan.segments:
            previous = segment_id(task.id, segment.index - 1) if segment.index else None
            child_params = {
                **shared,
                "orchestrator": task.id,
                "segment_index": segment.index,
                "num_segments": len(plan.segments),
                "prompt": segment.prompt,
                "negative_prompt": segment.negative_prompt,
                "seed": segment.seed,
                "frames": segment.frames,
                "overlap_in": segment.overlap_in,
                "start_image": images[segment.start_image_index] if segment.index == 0 else None,
                "end_image": images[segment.end_image_index],
                "previous_segment": previous,
                **hw_link,
            }
            children.append(
                self._child(task, segment_id(task.id, segment.index), "travel_segment", child_params, previous)
            )
        stitch_params = {
            "orchestrator": task.id,
            "segments": [segment_id(task.id, s.index) for s in plan.segments],
            "overlaps": list(plan.overlaps),
            "fps": params.fps,
            "crossfade_sharpen": params.crossfade_sharpen,
            **hw_link,
        }
        last = segment_id(task.id, plan.segments[-1].index)
        children.append(self._child(task, stitch_id(task.id), "travel_stitch", stitch_params, last))
        return children

    @staticmethod
    def _child(task: Task, child_id: str, task_type: str, params: dict[str, Any], after: str | None) -> NewTask:
        return NewTask(
            task_type=task_type,
            params=params,
            id=child_id,
            priority=task.priority,
            dependant_on=after,
            parent_task_id=task.id,
            max_attempts=task.max_attempts,
        )

    @staticmethod
    def _summary(segments: list[Task], stitch: Task) -> dict[str, Any]:
        return {
            **(stitch.result_data or {}),
            "segments": [
                {
                    "id": s.id,
                    "output": s.output_file,
                    "seed": (s.result_data or {}).get("seed"),
                    "frames": (s.result_data or {}).get("frames"),
                }
                for s in segments
            ],
        }

    # ---- travel_segment -----------------------------------------------------------------------------

    def run_segment(
        self,
        task: Task,
        generate: SegmentGenerator,
        report: Callable[..., None],
        report_parent: Callable[[dict[str, Any]], None],
    ) -> TaskOutcome:
        params: TravelSegmentParams = _validate(TravelSegmentParams, task)
        width, height = self.resolution_for(params.model, params.resolution)
        end_image, end_note = travel.fit_image(self._image(params.end_image, "end_image"), width, height)
        start_image, start_note = None, None
        if params.start_image is not None:
            start_image, start_note = travel.fit_image(self._image(params.start_image, "start_image"), width, height)
        previous_tail = self._previous_tail(params) if params.previous_segment else None
        plan = travel.SegmentPlan(
            index=params.segment_index,
            start_image_index=params.segment_index,
            end_image_index=params.segment_index + 1,
            frames=params.frames,
            own_frames=params.frames - params.overlap_in,
            overlap_in=params.overlap_in,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            seed=params.seed,
        )
        guide, mask = travel.build_segment_guide(plan, width, height, start_image, end_image, previous_tail)

        def progress(stage: str, step: int, total: int) -> None:
            report(stage, step, total)
            fraction = (
                params.segment_index + (step / total if total and stage == "denoising" else 0)
            ) / params.num_segments
            report_parent(
                {
                    "stage": f"segment {params.segment_index + 1}/{params.num_segments}: {stage}",
                    "step": step,
                    "total_steps": total,
                    "segments_done": params.segment_index,
                    "segments_total": params.num_segments,
                    "percent": round(100.0 * fraction, 1),
                }
            )

        output_path = self.outputs_dir / f"{output_stem(task.id)}.mp4"
        _remove_partials(output_stem(task.id), self.outputs_dir, task.id)
        result = generate(params, guide, mask, output_path, progress)
        result["inputs_fitted"] = {"start_image": start_note, "end_image": end_note}
        result["segment_index"] = params.segment_index
        return TaskOutcome(str(result.get("output_path", output_path)), result)

    def _image(self, path: str, key: str) -> np.ndarray:
        # Opened once and checked on the descriptor; the engine's bounded loader reads that descriptor (formats,
        # decompression bombs and pixel limits as for every other input).
        with open_input(path, list(self.input_roots), self.outputs_dir, key=key) as opened:
            return np.asarray(load_image(opened, key=key))

    def _previous_tail(self, params: TravelSegmentParams) -> np.ndarray:
        previous = self.store.get(str(params.previous_segment))
        if previous is None or previous.status is not TaskStatus.COMPLETE or not previous.output_file:
            raise InvalidTaskError(f"previous segment {params.previous_segment} has no completed output")
        tail: deque[np.ndarray] = deque(maxlen=max(1, params.overlap_in))
        # Opened once; decoded through that descriptor by an ffmpeg spawned without fork (travel.clip_frames).
        with OpenedInput.open(Path(previous.output_file)) as opened:
            for frame in travel.clip_frames(opened):
                tail.append(frame)
        return np.stack(list(tail))

    # ---- travel_stitch ------------------------------------------------------------------------------

    def run_stitch(self, task: Task, report: Callable[..., None]) -> TaskOutcome:
        """Stitch now, on this thread (inside a staging block the output stays staged, as `prepare_stitch`)."""
        return self.prepare_stitch(task, report)(active_staging())

    def prepare_stitch(self, task: Task, report: Callable[..., None]) -> Callable[[StagedOutputs | None], TaskOutcome]:
        """Check a stitch row (params, every segment Complete with an output) and return the stitch itself.

        The returned call needs no GPU, so the worker may run it on its output finisher thread while the
        next task runs (worker.tasks.runner); it takes the attempt's `StagedOutputs` explicitly (a
        ContextVar does not cross threads): the stitch is written under its staged name and published
        with the Complete write, or (None: a direct call) renamed into place.
        """
        params: TravelStitchParams = _validate(TravelStitchParams, task)
        outputs = []
        for child_id in params.segments:
            child = self.store.get(child_id)
            if child is None or child.status is not TaskStatus.COMPLETE or not child.output_file:
                raise InvalidTaskError(f"segment {child_id} has no completed output to stitch")
            outputs.append(Path(child.output_file))

        def stitch(staging: StagedOutputs | None) -> TaskOutcome:
            return self._stitch(task, params, outputs, report, staging)

        return stitch

    def _stitch(
        self,
        task: Task,
        params: TravelStitchParams,
        outputs: list[Path],
        report: Callable[..., None],
        staging: StagedOutputs | None,
    ) -> TaskOutcome:
        last_report = 0.0

        def progress(written: int, total: int) -> None:
            nonlocal last_report
            if written == total or time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                report("stitching", written, total)

        started = time.perf_counter()
        output = self.outputs_dir / f"{output_stem(params.orchestrator)}.mp4"
        _remove_partials(output_stem(params.orchestrator), self.outputs_dir, task.id)
        target = staging.path_for(output) if staging is not None else output
        # Each segment file is opened once and probed and decoded through that descriptor (stitch_videos).
        result = travel.stitch_videos(outputs, params.overlaps, target, params.fps, params.crossfade_sharpen, progress)
        if staging is not None:
            staging.add(result.output_path, output)
        return TaskOutcome(
            str(output if staging is not None else result.output_path),
            {
                "frames": result.frames,
                "width": result.width,
                "height": result.height,
                "fps": params.fps,
                "overlaps": params.overlaps,
                "stitch_seconds": round(time.perf_counter() - started, 3),
                "video_encoding": result.encoding,  # issue 15: the H.264 settings the stitch used
            },
        )


def _remove_partials(stem: str, directory: Path, task_id: str) -> None:
    """Delete what a killed earlier attempt left half-written under this output's name."""
    for stale in remove_partial_files(stem, directory):
        log.warning("removed a killed attempt's partial output %s", stale.name, extra={"task_id": task_id})
