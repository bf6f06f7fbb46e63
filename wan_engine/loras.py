"""LoRAs: safe lookup by name, Wan2GP-style multipliers, and loading/swapping them on a resident pipeline.

Names resolve only inside the LoRA directory (optionally in a per-family subfolder such as
`loras/wan/` or `loras/wan2_2/`); only `.safetensors` files are read. Multipliers follow Wan2GP:
one entry per LoRA separated by spaces, `;` splits the Wan 2.2 phases (high-noise;low-noise expert)
and `,` spreads a schedule over the denoising steps (of that phase). Files are loaded through
diffusers' Wan LoRA loader, which also converts ComfyUI / Kijai / musubi key layouts.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickles can run code when loaded
MAX_MULTIPLIER = 10.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+()\[\]-]{0,199}$")
Expert = str  # "high" (transformer) or "low" (transformer_2)
_COMPONENTS: dict[Expert, str] = {"high": "transformer", "low": "transformer_2"}


# ----- names -------------------------------------------------------------------------------------------


def resolve_lora_path(name: Any, loras_dir: Path, group: str | None = None) -> Path:
    """The file a LoRA name refers to: `<loras_dir>/<group>/<name>.safetensors`, else `<loras_dir>/<name>...`.

    A name is a bare file name (with or without `.safetensors`): path separators, `..`, absolute
    paths and pickle formats are refused, so a task can never read outside the LoRA directory.
    """
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"Invalid lora_names entry {name!r}: a LoRA is named by its file name in the loras directory "
            "(letters, digits, spaces and _ . + - ( ) [ ]; no path separators or '..')."
        )
    lowered = name.lower()
    if lowered.endswith(REFUSED_SUFFIXES):
        raise InvalidRequestError(
            f"Invalid lora_names entry {name!r}: only {LORA_SUFFIX} LoRA files are loaded (pickle files can run code)."
        )
    file_name = name if lowered.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    root = Path(loras_dir)
    folders = [root / group, root] if group else [root]
    for folder in folders:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(folder / file_name) for folder in folders)
    raise InvalidRequestError(f"LoRA {name!r} not found: looked for {looked}. Put the .safetensors file there.")


# ----- multipliers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraMultiplier:
    """The multiplier of one LoRA: one phase (both experts) or two (high;low), each constant or per step."""

    phases: tuple[tuple[float, ...], ...]
    text: str

    def value_at(self, step: int, experts: Sequence[Expert]) -> float:
        """The multiplier at denoising `step`, given the expert that runs each step.

        A schedule of k values is spread evenly over the steps of its phase: with 3 values over 6 steps,
        steps 0-1 get the first, 2-3 the second, 4-5 the third.
        """
        if len(self.phases) == 1:
            values, index, count = self.phases[0], step, len(experts)
        else:
            expert = experts[step]
            values = self.phases[0 if expert == "high" else 1]
            same = [i for i, e in enumerate(experts) if e == expert]
            index, count = same.index(step), len(same)
        return values[min(len(values) - 1, index * len(values) // max(count, 1))]


def _number(text: str, token: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise InvalidRequestError(
            f"Invalid lora_multipliers entry {token!r}: {text!r} is not a number from {-MAX_MULTIPLIER} to "
            f"{MAX_MULTIPLIER}."
        )
    return value


def parse_lora_multipliers(spec: Any, count: int, *, dual: bool) -> tuple[LoraMultiplier, ...]:
    """Parse `lora_multipliers` for `count` LoRAs; a LoRA without an entry gets 1.0.

    `"1.0 0.5"`: two LoRAs. `"1.0;0.5"`: high-noise expert 1.0, low-noise 0.5 (Wan 2.2 only).
    `"1.0,0.8,0.6"`: a per-step schedule. `"1.0,0.5;0.3"`: a schedule over the high-noise steps.
    """
    if spec is None:
        tokens: list[str] = []
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        tokens = [repr(float(spec))]
    elif isinstance(spec, str):
        tokens = spec.split()
    else:
        raise InvalidRequestError(f"Invalid lora_multipliers: {spec!r}; must be a string such as '1.0 0.5;0.8'.")
    if len(tokens) > count:
        raise InvalidRequestError(
            f"Invalid lora_multipliers: {spec!r} has {len(tokens)} entries but {count} LoRA(s) are named; "
            "give one space-separated entry per LoRA."
        )
    result = []
    for token in tokens:
        parts = token.split(";")
        if len(parts) > 2:
            raise InvalidRequestError(
                f"Invalid lora_multipliers entry {token!r}: at most two phases ('high;low') separated by ';'."
            )
        if len(parts) == 2 and not dual:
            raise InvalidRequestError(
                f"Invalid lora_multipliers entry {token!r}: ';' separates the phases of a Wan 2.2 two-expert "
                "model, but this model has one transformer."
            )
        phases = tuple(tuple(_number(v, token) for v in part.split(",")) for part in parts)
        result.append(LoraMultiplier(phases=phases, text=token))
    result += [LoraMultiplier(phases=((1.0,),), text="1.0")] * (count - len(tokens))
    return tuple(result)


# ----- loading on a pipeline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA a generation asked for: its name, the file it resolved to and its multiplier."""

    name: str
    path: Path
    multiplier: LoraMultiplier


@dataclass
class LoadedLora:
    """A LoRA file loaded as a peft adapter into one or both experts."""

    name: str
    path: Path
    adapter: str
    experts: tuple[Expert, ...]
    layers: dict[Expert, int]


@dataclass
class LoraState:
    """What is loaded on a resident pipeline now; `key` identifies it to skip needless reloads."""

    key: tuple[Any, ...] = ()
    loaded: list[LoadedLora] = field(default_factory=list)
    current: dict[Expert, tuple[float, ...]] = field(default_factory=dict)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _adapter_name(index: int, path: Path) -> str:
    # peft keeps adapters in ModuleDicts: a name may not contain dots.
    return f"lora{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:60]


def _count_layers(module: Any, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer) and adapter in getattr(sub, "lora_A", {}):
            count += 1
    return count


def unload_all(pipe: Any, state: LoraState) -> None:
    """Remove every LoRA layer: the transformers are back to their exact base modules."""
    if state.loaded:
        pipe.unload_lora_weights()
        logger.info("LoRAs unloaded", extra={"loras": [lora.name for lora in state.loaded]})
    state.key, state.loaded, state.current = (), [], {}


def _load_one(pipe: Any, index: int, request: LoraRequest, experts: tuple[Expert, ...]) -> LoadedLora:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(request.path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidRequestError(
            f"LoRA {request.name!r} ({request.path}) is not a readable safetensors file: {exc}"
        ) from exc
    adapter = _adapter_name(index, request.path)
    layers: dict[Expert, int] = {}
    for expert in experts:
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several LoRAs at once are what we want.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(state_dict, adapter_name=adapter, load_into_transformer_2=expert == "low")
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:  # malformed or mismatched tensors
            raise InvalidRequestError(f"LoRA {request.name!r} cannot be applied to this model: {exc!r}") from exc
        layers[expert] = _count_layers(getattr(pipe, _COMPONENTS[expert]), adapter)
        if layers[expert] == 0:
            # diffusers only warns when no key matches: a silent no-op LoRA would be a fake result.
            raise InvalidRequestError(
                f"LoRA {request.name!r} ({request.path}) matches no layer of the model's {_COMPONENTS[expert]}: "
                "it was made for another model family."
            )
    return LoadedLora(request.name, request.path, adapter, experts, layers)


def apply_loras(
    pipe: Any, state: LoraState, requests: Sequence[LoraRequest], experts_per_step: Sequence[Expert]
) -> LoraState:
    """Make exactly `requests` the loaded LoRAs (reusing what is loaded when it is the same set).

    A LoRA is loaded into an expert only if some step run by that expert gives it a non-zero
    multiplier. With no requests every LoRA layer is removed, so the model computes exactly what a
    freshly loaded one does.
    """
    plan = []
    for request in requests:
        used = tuple(
            expert
            for expert in ("high", "low")
            if any(
                e == expert and request.multiplier.value_at(step, experts_per_step) != 0.0
                for step, e in enumerate(experts_per_step)
            )
        )
        plan.append((request, used))
    key = tuple((_file_key(r.path), used) for r, used in plan)
    if key == state.key:
        return state
    unload_all(pipe, state)
    if not any(used for _r, used in plan):
        state.key = key
        state.loaded = [LoadedLora(r.name, r.path, "", (), {}) for r, _used in plan]
        return state
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise InvalidRequestError("LoRAs need the 'peft' package: pip install peft.")
    loaded = []
    try:
        for index, (request, used) in enumerate(plan):
            if used:
                loaded.append(_load_one(pipe, index, request, used))
            else:
                loaded.append(LoadedLora(request.name, request.path, "", (), {}))
            state.loaded = loaded  # so a failure below unloads what is already in
    except BaseException:
        unload_all(pipe, state)
        raise
    state.key, state.current = key, {}
    logger.info("LoRAs loaded", extra={"loras": [lora.name for lora in loaded]})
    return state


def set_step_weights(
    pipe: Any, state: LoraState, requests: Sequence[LoraRequest], step: int, experts_per_step: Sequence[Expert]
) -> None:
    """Set the adapters' weights of the expert that runs `step` (skipped when unchanged).

    Called before each step through `wan_engine.experts.ExpertPlan.set_lora_weights`, which owns the plan.
    """
    expert = experts_per_step[step]
    active = [(lora, r) for lora, r in zip(state.loaded, requests, strict=True) if expert in lora.experts]
    if not active:
        return
    weights = tuple(r.multiplier.value_at(step, experts_per_step) for _lora, r in active)
    if state.current.get(expert) == weights:
        return
    getattr(pipe, _COMPONENTS[expert]).set_adapters([lora.adapter for lora, _r in active], list(weights))
    state.current[expert] = weights


def describe_loras(
    state: LoraState, requests: Sequence[LoraRequest], experts_per_step: Sequence[Expert], dual: bool
) -> list[dict[str, Any]]:
    """What result_data records per LoRA: file, multiplier text, experts it went into, weight per step."""
    out = []
    for lora, request in zip(state.loaded, requests, strict=True):
        per_step = [request.multiplier.value_at(s, experts_per_step) for s in range(len(experts_per_step))]
        names = {"high": "high" if dual else "transformer", "low": "low"}
        out.append(
            {
                "name": request.name,
                "file": str(request.path),
                "multipliers": request.multiplier.text,
                "loaded_into": [names[e] for e in lora.experts],
                "layers": {names[e]: n for e, n in lora.layers.items()},
                "per_step": per_step,
            }
        )
    return out
