"""Task parameter validation (pydantic), run before anything loads.

Unknown keys, wrong types and out-of-range values are rejected with a message that names the key,
the value and what is allowed. Defaults that depend on the model (steps, resolution...) are left as
None here: the preset fills them (built-in defaults < preset < task params).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Every bound comes from wan_engine.limits (the engine's resolver reads the same objects); the names are
# re-exported here for the modules and tests that import them from this one.
from wan_engine.limits import (
    MAX_CONTROL_SCALE,
    MAX_FLOW_SHIFT,
    MAX_FPS,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_GUIDANCE_PHASES,
    MAX_IMAGE_REFS,
    MAX_LORA_MULTIPLIERS_CHARS,
    MAX_LORAS,
    MAX_MODEL_KEY_CHARS,
    MAX_PARALLEL,
    MAX_PARAMS_BYTES,
    MAX_PARAMS_DEPTH,
    MAX_PATH_CHARS,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE_PX,
    MAX_STEPS,
    MAX_SWITCH_THRESHOLD,
    MIN_CONTROL_SCALE,
    MIN_FPS,
    MIN_FRAMES,
    MIN_GUIDANCE,
    MIN_GUIDANCE_PHASES,
    MIN_PRIORITY,
    MIN_SIDE_PX,
    MIN_STEPS,
    MIN_SWITCH_THRESHOLD,
    RANDOM_SEED,
    SIDE_MULTIPLE_PX,
)

# Modes whose transformer diffusers can split over GPUs (it has no context-parallel plan for VACE).
PARALLEL_MODES = frozenset({"t2v", "i2v", "flf2v", "ti2v"})

# task_type -> model used when params name none (docs/DESIGN.md: aliases map to a default model).
TASK_TYPE_DEFAULT_MODELS: dict[str, str] = {
    "t2v": "t2v_1.3B",
    "t2v_21": "t2v_1.3B",
    "t2v_22": "t2v_2_2",
    "vace": "vace_1.3B",
    "vace_21": "vace_14B",
    "vace_22": "vace_14B_cocktail_2_2",
    "i2v": "i2v_14B",
    "i2v_22": "i2v_2_2",
    "flf2v": "flf2v_14B",
    "ti2v": "ti2v_2_2",
}
# What each task_type runs; the orchestrator method is chosen from this.
TASK_TYPE_MODES: dict[str, str] = {
    "t2v": "t2v",
    "t2v_21": "t2v",
    "t2v_22": "t2v",
    "vace": "vace",
    "vace_21": "vace",
    "vace_22": "vace",
    "i2v": "i2v",
    "i2v_22": "i2v",
    "flf2v": "flf2v",
    "ti2v": "ti2v",
}
SUPPORTED_TASK_TYPES = tuple(sorted(TASK_TYPE_MODES))

_RESOLUTION = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class InvalidTaskError(ValueError):
    """The task's row cannot run as written; permanent (the task ends Failed at once)."""

    permanent = True


class GenerationParams(BaseModel):
    """Parameters common to every generation task (docs/DESIGN.md, "Parameters")."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_KEY_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    resolution: str | None = None
    video_length: int | None = Field(default=None, ge=MIN_FRAMES, le=MAX_FRAMES)
    num_inference_steps: int | None = Field(default=None, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    guidance2_scale: float | None = Field(default=None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    flow_shift: float | None = Field(default=None, gt=0, le=MAX_FLOW_SHIFT)
    switch_threshold: float | None = Field(default=None, ge=MIN_SWITCH_THRESHOLD, le=MAX_SWITCH_THRESHOLD)
    # Wan2GP's guidance phases (wan_engine.experts): phase 3 from switch_threshold2 down, guidance3_scale there.
    guidance_phases: int | None = Field(default=None, ge=MIN_GUIDANCE_PHASES, le=MAX_GUIDANCE_PHASES)
    guidance3_scale: float | None = Field(default=None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    switch_threshold2: float | None = Field(default=None, ge=MIN_SWITCH_THRESHOLD, le=MAX_SWITCH_THRESHOLD)
    model_switch_phase: int | None = Field(default=None, ge=1, le=MAX_GUIDANCE_PHASES - 1)
    sample_solver: str | None = Field(default=None, min_length=1, max_length=32)  # unipc, euler, dpm++
    seed: int = Field(default=RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED)
    fps: int | None = Field(default=None, ge=MIN_FPS, le=MAX_FPS)
    memory_profile: Literal["auto", "gpu", "model_offload", "group_offload", "sequential", "cpu"] | None = None
    lora_names: list[str] | None = Field(default=None, max_length=MAX_LORAS)
    lora_multipliers: str | None = Field(default=None, max_length=MAX_LORA_MULTIPLIERS_CHARS)
    # GPUs to split this generation over (context parallelism); None: the preset's, else 1. Only a worker
    # group of at least this many ranks claims the task (worker.store.repository, GenerationRunner.claimable).
    parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL)

    # Mode-specific keys, passed to the orchestrator apart from the common settings.
    MODE_KEYS: ClassVar[tuple[str, ...]] = ()
    # Keys naming input files; the runner resolves them inside the input roots first.
    PATH_KEYS: ClassVar[tuple[str, ...]] = ()

    @field_validator("prompt", "negative_prompt", "model")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _RESOLUTION.match(value)
        if not match:
            raise ValueError("must look like '832x480' (width x height)")
        width, height = int(match.group(1)), int(match.group(2))
        for side in (width, height):
            if side % SIDE_MULTIPLE_PX or not MIN_SIDE_PX <= side <= MAX_SIDE_PX:
                raise ValueError(
                    f"width and height must be multiples of {SIDE_MULTIPLE_PX} between {MIN_SIDE_PX} and {MAX_SIDE_PX}"
                )
        return value

    def generation_kwargs(self) -> dict[str, Any]:
        """The non-None generation settings, without model, prompt, parallel and the mode's own keys."""
        return self.model_dump(exclude_none=True, exclude={"model", "prompt", "parallel", *self.MODE_KEYS})

    def mode_kwargs(self) -> dict[str, Any]:
        """The mode's own keys (input files, control_scale) that are set."""
        return {key: value for key in self.MODE_KEYS if (value := getattr(self, key)) is not None}


def _path_field(required: bool = False) -> Any:
    return Field(... if required else None, min_length=1, max_length=MAX_PATH_CHARS)


class VaceParams(GenerationParams):
    """`vace`: a control video (or image), an optional mask and reference images."""

    video_guide: str = _path_field(required=True)
    video_mask: str | None = _path_field()
    image_refs: list[str] | None = Field(default=None, max_length=MAX_IMAGE_REFS)
    control_scale: float | None = Field(default=None, ge=MIN_CONTROL_SCALE, le=MAX_CONTROL_SCALE)

    MODE_KEYS: ClassVar[tuple[str, ...]] = ("video_guide", "video_mask", "image_refs", "control_scale")
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("video_guide", "video_mask", "image_refs")


class I2VParams(GenerationParams):
    """`i2v`: a start image, optionally an end image (first-last-frame)."""

    image_start: str = _path_field(required=True)
    image_end: str | None = _path_field()

    MODE_KEYS: ClassVar[tuple[str, ...]] = ("image_start", "image_end")
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("image_start", "image_end")


class FLF2VParams(I2VParams):
    """`flf2v`: first-last-frame; both images are required."""

    image_end: str = _path_field(required=True)


class TI2VParams(GenerationParams):
    """`ti2v` (Wan 2.2 TI2V-5B): text-to-video, or image-to-video when image_start is given."""

    image_start: str | None = _path_field()

    MODE_KEYS: ClassVar[tuple[str, ...]] = ("image_start",)
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("image_start",)


# The params model of each mode.
MODE_PARAMS: dict[str, type[GenerationParams]] = {
    "t2v": GenerationParams,
    "vace": VaceParams,
    "i2v": I2VParams,
    "flf2v": FLF2VParams,
    "ti2v": TI2VParams,
}


# The characters that change JSON nesting or string state; everything else is skipped by the C regex engine.
_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def json_depth(text: str) -> int:
    """The deepest array/object nesting of a JSON text, by a linear scan that never recurses.

    Brackets inside strings are ignored (JSON strings are delimited by `"` with backslash escapes), so the
    result bounds the recursion `json.loads` would need; malformed text gives a best-effort count.
    """
    depth = deepest = 0
    in_string = False
    skip_at = -1  # position of the character a backslash escapes
    for match in _STRUCTURE.finditer(text):
        char, at = match.group(), match.start()
        if at == skip_at:
            continue
        if in_string:
            if char == "\\":
                skip_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def _as_text(params_text: Any) -> str:
    """The params column as text: a BLOB is decoded as UTF-8, other values are refused by name."""
    if isinstance(params_text, str):
        # Lone surrogates are how worker.store.db hands over a BLOB that was not valid UTF-8.
        try:
            params_text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidTaskError(
                f"params is not valid UTF-8 text (undecodable byte at position {exc.start}); store it as UTF-8 JSON"
            ) from None
        return params_text
    if isinstance(params_text, bytes | bytearray | memoryview):
        try:
            return bytes(params_text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidTaskError(
                f"params is not valid UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                "store it as UTF-8 JSON"
            ) from None
    raise InvalidTaskError(f"params must be JSON text, got {type(params_text).__name__}: {_short(params_text)}")


def parse_params_text(params_text: str) -> dict[str, Any]:
    """Decode the row's JSON params (the one decoder of the project); the error names what is wrong.

    Bounded before decoding: the size (MAX_PARAMS_BYTES) and the nesting depth (MAX_PARAMS_DEPTH), so a
    hostile row can never make `json.loads` recurse past Python's limit and take the worker down.
    """
    params_text = _as_text(params_text)
    if len(params_text.encode("utf-8", "replace")) > MAX_PARAMS_BYTES:
        raise InvalidTaskError(f"params is {len(params_text)} characters; at most {MAX_PARAMS_BYTES} bytes allowed")
    depth = json_depth(params_text)
    if depth > MAX_PARAMS_DEPTH:
        raise InvalidTaskError(f"params nest {depth} levels deep; at most {MAX_PARAMS_DEPTH} levels allowed")
    try:
        params = json.loads(params_text)
    except json.JSONDecodeError as exc:
        raise InvalidTaskError(
            f"params is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {params_text[:80]!r}"
        ) from None
    except RecursionError:  # unreachable after the depth bound; kept so no text can ever raise it
        raise InvalidTaskError(f"params nest too deeply; at most {MAX_PARAMS_DEPTH} levels allowed") from None
    if not isinstance(params, dict):
        raise InvalidTaskError(f"params must be a JSON object, got {type(params).__name__}: {params_text[:80]!r}")
    return params


def params_or_none(params_text: Any) -> dict[str, Any] | None:
    """`parse_params_text` for the claim-time and live helpers: None instead of any error, never raising."""
    try:
        return parse_params_text(params_text)
    except Exception:  # any row content at all: the runner fails the row itself with the message
        return None


def validate_priority(priority: Any) -> None:
    """A task's priority must be an integer from MIN_PRIORITY to MAX_PRIORITY; the error names the value."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidTaskError(
            f"priority {priority!r} is out of range: it must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}"
        )


def validate_params(task_type: str, params: dict[str, Any]) -> GenerationParams:
    """Validate a task's params for its type and fill the model from the task_type alias."""
    if task_type not in TASK_TYPE_MODES:
        supported = ", ".join((*SUPPORTED_TASK_TYPES, "travel_orchestrator", "travel_segment", "travel_stitch"))
        raise InvalidTaskError(f"unknown task_type {task_type!r}; supported: {supported}")
    model_cls = MODE_PARAMS[TASK_TYPE_MODES[task_type]]
    try:
        validated = model_cls.model_validate(params)
    except ValidationError as exc:
        raise InvalidTaskError(describe_validation_error(exc, params, model_cls)) from None
    if validated.model is None:
        validated = validated.model_copy(update={"model": TASK_TYPE_DEFAULT_MODELS[task_type]})
    check_parallel_mode(TASK_TYPE_MODES[task_type], validated.parallel or 1)
    return validated


def check_parallel_mode(mode: str, parallel: int) -> None:
    """`parallel` > 1 only where the transformer can be split (not VACE); the error names the value."""
    if parallel > 1 and mode not in PARALLEL_MODES:
        raise InvalidTaskError(
            f"parallel = {parallel}: {mode} tasks run on one GPU (diffusers cannot split the VACE transformer "
            f"over GPUs); use parallel 1, or a mode of {', '.join(sorted(PARALLEL_MODES))}"
        )


def parallel_requested(params_text: str) -> int | None:
    """The row's `parallel`, cheaply and without raising: None when absent, 1 when not a valid count
    (a worker of any size then claims the row and fails it with the validation message)."""
    params = params_or_none(params_text)
    if params is None:
        return 1
    value = params.get("parallel")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        return 1
    return value


def describe_validation_error(
    exc: ValidationError, params: dict[str, Any], model_cls: type[GenerationParams] = GenerationParams
) -> str:
    """One readable sentence per problem: key, value, what is allowed."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "params"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(model_cls.model_fields)
            problems.append(f"unknown key {key!r} (value {error['input']!r}); allowed keys: {allowed}")
        elif error["type"] == "missing":
            problems.append(f"missing required key {key!r}")
        else:
            value = params.get(error["loc"][0]) if error["loc"] else params
            problems.append(f"{key} = {_short(value)}: {error['msg']}")
    return "invalid params: " + "; ".join(problems)


def model_key_for(task_type: str, params_text: str) -> str | None:
    """The model a queued row will need, cheaply and without raising (None when it cannot tell)."""
    params = params_or_none(params_text)
    if params is None:
        return None
    model = params.get("model")
    if isinstance(model, str):
        return model
    try:
        return TASK_TYPE_DEFAULT_MODELS.get(task_type)
    except TypeError:  # an unhashable task_type (never from SQL, but the helper must not raise)
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
