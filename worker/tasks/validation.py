"""The one validation entry point of a task: `validate_task` (generation types and travel).

The runner (rows written by SQL users) and `HeadlessTaskQueue.submit_task` (Python users and
`wan-worker submit`) call it, so a submitted task is refused with exactly the message the worker
would write on the row. It checks, before anything loads:

1. the params schema of the task_type (`worker.tasks.params.validate_params`);
2. that the model's preset architecture can run the task_type's mode (`wan_engine.limits.MODE_ARCHITECTURES`);
3. the engine's own resolution of the params (built-in defaults < preset < params, `resolve_params`);
4. the scheduler's step-count limit: integer timesteps collide when the steps are many for the flow
   shift, and the engine refuses such counts. That limit depends only on the scheduler class, its
   config and the flow shift, so it is computed from the model folder's `scheduler/` config when that
   folder is on this machine (no weights are read); otherwise the worker still checks it at run time.

Importing this module needs neither torch nor diffusers; step 4 imports them only when a scheduler
config is found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from wan_engine.generation_params import ResolvedParams, resolve_params
from wan_engine.limits import MODE_ARCHITECTURES
from wan_engine.presets import Preset, PresetRegistry
from worker.tasks.hw_compat import translate_hw_task
from worker.tasks.params import TASK_TYPE_MODES, GenerationParams, InvalidTaskError, validate_params
from worker.tasks.travel import TravelOrchestratorParams, validate_travel_params


def validate_task(
    task_type: str, params: dict[str, Any], presets: PresetRegistry, models_dir: Path | None = None
) -> GenerationParams | TravelOrchestratorParams:
    """Validate a task as the worker will; returns the validated params (model filled in).

    Every submittable task_type: the generation types, and `travel_orchestrator` with the travel schema
    (`worker.tasks.travel.validate_travel_params`). `travel_segment` / `travel_stitch` are refused: only
    the orchestrator creates them.

    Raises `InvalidTaskError` / `InvalidRequestError` / `UnknownModelError` (all ValueErrors) whose
    message is the one the worker writes on the row. `models_dir`: where the model folders are, for
    the scheduler step limit (None: that check is left to the worker).
    """
    translation = translate_hw_task(task_type, params, architecture_of=partial(preset_architecture, presets))
    if translation is not None:  # a Headless-Wan2GP row: validated as the native task it runs as
        task_type, params = translation.task_type, translation.params
    if task_type == "travel_orchestrator":
        return validate_travel_params(params, presets)
    if task_type in ("travel_segment", "travel_stitch"):
        # Their params (ids of siblings, planned frames) only make sense as the orchestrator writes them.
        raise InvalidTaskError(
            f"task_type {task_type!r} is internal: travel_segment and travel_stitch tasks are created by a "
            "travel_orchestrator task; submit a travel_orchestrator with input_images and base_prompts"
        )
    validated = validate_params(task_type, params)
    preset = presets.get(str(validated.model))
    check_architecture(str(validated.model), preset, TASK_TYPE_MODES[task_type])
    resolved = resolve_params(preset, validated.prompt, validated.generation_kwargs())
    if models_dir is not None:
        check_scheduler_steps(preset, resolved, Path(models_dir))
    return validated


def preset_architecture(presets: PresetRegistry, model: str) -> str | None:
    """The architecture of a model's preset; None for an unknown model (validation names it later)."""
    try:
        return presets.get(model).model.architecture
    except ValueError:  # UnknownModelError
        return None


def check_architecture(model: str, preset: Preset, mode: str) -> None:
    """The preset's architecture must be one the mode accepts; the error names the accepted ones."""
    allowed = MODE_ARCHITECTURES[mode]
    if preset.model.architecture not in allowed:
        raise InvalidTaskError(
            f"model {model!r} is a {preset.model.architecture} model; {mode} tasks need one of "
            f"architecture {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class _SchedulerOnly:
    """The part of `pipeline_runtime.LoadedModel` that `experts.experts_for_steps` reads for its step check."""

    base_scheduler: Any
    is_dual_expert: bool = False  # the expert split is not needed here: only the step check matters


def check_scheduler_steps(preset: Preset, resolved: ResolvedParams, models_dir: Path) -> None:
    """Refuse a step count whose scheduler timesteps repeat, with the engine's own message.

    Runs the engine's check itself (`wan_engine.experts.experts_for_steps`) on the scheduler the model
    folder ships, so the limit and the wording cannot drift from what the worker does after loading.
    Does nothing when the folder or its scheduler config is not on this machine.
    """
    folder = _scheduler_folder(preset, models_dir)
    if folder is None:
        return
    config = folder / "scheduler" / "scheduler_config.json"
    scheduler = _base_scheduler(str(folder), config.stat().st_mtime_ns)
    if scheduler is None:
        return
    from wan_engine.experts import experts_for_steps  # torch + diffusers: only when needed

    experts_for_steps(_SchedulerOnly(scheduler), resolved.flow_shift, resolved.num_inference_steps, None)


def _scheduler_folder(preset: Preset, models_dir: Path) -> Path | None:
    """The pipeline folder the worker would load the preset's scheduler from (None: not here)."""
    from wan_engine.model_sources import check_model  # safetensors headers only, no weights

    try:
        path = check_model(preset, models_dir).path
    except (OSError, ValueError):  # unreadable folder: the worker reports it when it loads
        return None
    if path is None or not (path / "scheduler" / "scheduler_config.json").is_file():
        return None
    return path


@lru_cache(maxsize=16)
def _base_scheduler(folder: str, config_mtime_ns: int) -> Any:
    """The scheduler `from_pretrained` gives the pipeline in `folder` (class from model_index.json).

    Cached per folder and config modification time: a long-running worker sees an edited config.
    """
    del config_mtime_ns  # part of the cache key only
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
        library, class_name = index["scheduler"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if library != "diffusers":
        return None
    import diffusers

    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None:
        return None
    return scheduler_cls.from_pretrained(folder, subfolder="scheduler")
