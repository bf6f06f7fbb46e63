"""LoRAs: safe lookup by name, Wan2GP-style multipliers, and loading/swapping them on a resident pipeline.

Names resolve only inside the LoRA directory (optionally in a per-family subfolder such as
`loras/wan/` or `loras/wan2_2/`); only `.safetensors` files are read. Multipliers follow Wan2GP:
one entry per LoRA separated by spaces, `;` splits the Wan 2.2 phases (high-noise;low-noise expert)
and `,` spreads a schedule over the denoising steps (of that phase). Files are loaded through
diffusers' Wan LoRA loader, which also converts ComfyUI / Kijai / musubi key layouts; DiffSynth and
unprefixed layouts are renamed first, and the full weight deltas diffusers drops (`.diff`, `diff_m`:
lightx2v / CausVid norms and modulation) are applied here (`wan_engine.lora_formats`).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_engine.errors import InvalidRequestError
from wan_engine.lora_formats import DeltaTable, describe_keys, has_lora_pairs, normalize_lora, split_weight_deltas

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickles can run code when loaded
MAX_MULTIPLIER = 10.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+()\[\]-]{0,199}$")
Expert = str  # "high" (transformer) or "low" (transformer_2)
_COMPONENTS: dict[Expert, str] = {"high": "transformer", "low": "transformer_2"}


# ----- names -------------------------------------------------------------------------------------------


def lora_folders(loras_dirs: Path | Sequence[Path], subdirs: Sequence[str] = ()) -> list[Path]:
    """Where LoRA files are looked for, in order: for each LoRA folder, its `subdirs` then its root.

    `subdirs` are the model's group folder (`wan/`, `wan2_2/`) and Wan2GP's folder for it (`wan_i2v/`,
    `wan_1.3B/`, `wan_5B/`), so a Wan2GP `loras/` or a ComfyUI `models/loras` folder serves as it is.
    """
    roots = [Path(loras_dirs)] if isinstance(loras_dirs, (str, Path)) else [Path(d) for d in loras_dirs]
    return list(dict.fromkeys(folder for root in roots for folder in (*(root / d for d in subdirs), root)))


def resolve_lora_path(
    name: Any, loras_dir: Path | Sequence[Path], group: str | None = None, *, subdirs: Sequence[str] | None = None
) -> Path:
    """The file a LoRA name refers to: `<loras_dir>/<group>/<name>.safetensors`, else `<loras_dir>/<name>...`.

    `loras_dir` may be several folders, looked in in order (each with its subfolders: `subdirs`, default
    the `group`). A name is a bare file name (with or without `.safetensors`): path separators, `..`,
    absolute paths and pickle formats are refused, so a task can never read outside the LoRA folders.
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
    folders = lora_folders(loras_dir, subdirs if subdirs is not None else ((group,) if group else ()))
    for folder in folders:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(folder / file_name) for folder in folders)
    raise InvalidRequestError(f"LoRA {name!r} not found: looked for {looked}. Put the .safetensors file there.")


# ----- multipliers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraMultiplier:
    """The multiplier of one LoRA: one phase (all steps) or one per phase, each constant or per step.

    Phases are Wan2GP's: on a Wan 2.2 two-expert model the high-noise then the low-noise expert's steps
    (`high;low`); on a 3-phase definition (guidance_phases 3) the steps of each guidance phase
    (`a;b;c`), whichever expert runs them. `step_phases` gives the phase (0, 1, 2) of each step of a
    3-phase run (`for_phases`); without it the phase is the expert's.
    """

    phases: tuple[tuple[float, ...], ...]
    text: str
    step_phases: tuple[int, ...] | None = None

    def for_phases(self, step_phases: Sequence[int]) -> LoraMultiplier:
        """This multiplier on a run whose steps belong to these guidance phases (3-phase definitions)."""
        return replace(self, step_phases=tuple(step_phases))

    def value_at(self, step: int, experts: Sequence[Expert]) -> float:
        """The multiplier at denoising `step`, given the expert that runs each step.

        A schedule of k values is spread evenly over the steps of its phase: with 3 values over 6 steps,
        steps 0-1 get the first, 2-3 the second, 4-5 the third.
        """
        if len(self.phases) == 1:
            values, index, count = self.phases[0], step, len(experts)
        else:
            labels: Sequence[Any] = self.step_phases if self.step_phases is not None else experts
            label = labels[step]
            phase = label if self.step_phases is not None else (0 if label == "high" else 1)
            values = self.phases[min(phase, len(self.phases) - 1)]
            same = [i for i, other in enumerate(labels) if other == label]
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


def _phase_parts(token: str, *, dual: bool, guidance_phases: int | None, model_switch_phase: int) -> list[str]:
    """The `;`-separated parts of one entry, as many as the model's phases (or one for all of them)."""
    parts = token.split(";")
    phases = 3 if guidance_phases == 3 else (2 if dual else 1)
    if len(parts) == 1:
        return parts
    if phases == 1:
        raise InvalidRequestError(
            f"Invalid lora_multipliers entry {token!r}: ';' separates the phases of a Wan 2.2 two-expert "
            "model (or of a 3-phase definition), but this model has one transformer and one phase."
        )
    if len(parts) > 3:
        raise InvalidRequestError(f"Invalid lora_multipliers entry {token!r}: at most three phases ('a;b;c').")
    if len(parts) == 3 and phases == 2:
        raise InvalidRequestError(
            f"Invalid lora_multipliers entry {token!r}: three phases need a 3-phase definition (guidance_phases 3); "
            "this model runs two phases ('high;low'), so give at most two phases separated by ';'."
        )
    if len(parts) == 2 and phases == 3:
        # Wan2GP's rule: two values on three phases follow the expert switch (model_switch_phase).
        return [parts[0], *parts] if model_switch_phase == 2 else [*parts, parts[1]]
    return parts


def parse_lora_multipliers(
    spec: Any, count: int, *, dual: bool, guidance_phases: int | None = None, model_switch_phase: int = 1
) -> tuple[LoraMultiplier, ...]:
    """Parse `lora_multipliers` for `count` LoRAs; a LoRA without an entry gets 1.0.

    `"1.0 0.5"`: two LoRAs. `"1.0;0.5"`: high-noise expert 1.0, low-noise 0.5 (Wan 2.2 only).
    `"1.0,0.8,0.6"`: a per-step schedule. `"1.0,0.5;0.3"`: a schedule over the high-noise steps.
    On a 3-phase definition (`guidance_phases` 3) `"0;1;0"` gives one value per guidance phase, and
    `"a;b"` is read as Wan2GP does: `a;a;b` when `model_switch_phase` is 2, else `a;b;b`.
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
        parts = _phase_parts(token, dual=dual, guidance_phases=guidance_phases, model_switch_phase=model_switch_phase)
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
    """A LoRA file loaded into one or both experts: peft adapter layers and/or full weight deltas."""

    name: str
    path: Path
    adapter: str
    experts: tuple[Expert, ...]
    layers: dict[Expert, int]  # layers changed per expert: peft layers + weights carrying a delta
    peft_layers: dict[Expert, int] = field(default_factory=dict)
    layout: str = ""  # the key layout it came in (wan_engine.lora_formats.normalize_lora)


@dataclass
class LoraState:
    """What is loaded on a resident pipeline now; `key` identifies it to skip needless reloads."""

    key: tuple[Any, ...] = ()
    loaded: list[LoadedLora] = field(default_factory=list)
    current: dict[Expert, tuple[float, ...]] = field(default_factory=dict)
    deltas: dict[Expert, DeltaTable] = field(default_factory=dict)  # norm / modulation deltas (.diff, diff_m)
    # Set by wan_engine.lora_fusion while a call runs with its LoRAs fused: takes a step's new peft weights
    # (re-fuses them) instead of peft's set_adapters, whose layers are out of the module tree then.
    fused_update: Callable[[Expert, dict[str, float]], None] | None = None


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


def _has_peft_layers(pipe: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [getattr(pipe, name, None) for name in _COMPONENTS.values()]
    return any(isinstance(m, BaseTunerLayer) for module in modules if module is not None for m in module.modules())


def unload_all(pipe: Any, state: LoraState) -> None:
    """Remove every LoRA layer and weight delta: the transformers are back to their exact base weights."""
    for table in state.deltas.values():
        table.restore()
    if _has_peft_layers(pipe):
        pipe.unload_lora_weights()
    if state.loaded:
        logger.info("LoRAs unloaded", extra={"loras": [lora.name for lora in state.loaded]})
    state.key, state.loaded, state.current, state.deltas = (), [], {}, {}


def _no_layer_message(request: LoraRequest, expert: Expert, layout: str, raw: dict[str, Any]) -> str:
    return (
        f"LoRA {request.name!r} ({request.path}) matches no layer of the model's {_COMPONENTS[expert]} "
        f"({layout} key layout, {describe_keys(raw)}): it was made for another model family, or its "
        "layout is not one of diffusers/peft, original Wan (ComfyUI, Kijai, lightx2v), musubi-tuner or "
        "DiffSynth. Use a Wan LoRA of this model's size in one of those layouts."
    )


def _load_one(pipe: Any, index: int, request: LoraRequest, experts: tuple[Expert, ...], state: LoraState) -> LoadedLora:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(request.path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidRequestError(
            f"LoRA {request.name!r} ({request.path}) is not a readable safetensors file: {exc}"
        ) from exc
    # DiffSynth / unprefixed layouts renamed for diffusers' loader; .diff / diff_m deltas applied by us.
    normalized, layout = normalize_lora(raw, request.name)
    state_dict, deltas = split_weight_deltas(normalized)
    adapter = _adapter_name(index, request.path)
    layers: dict[Expert, int] = {}
    peft_layers: dict[Expert, int] = {}
    for expert in experts:
        module = getattr(pipe, _COMPONENTS[expert])
        peft_layers[expert] = 0
        if has_lora_pairs(state_dict):
            try:
                with warnings.catch_warnings():
                    # peft warns on every adapter after the first; several LoRAs at once are what we want.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    pipe.load_lora_weights(
                        dict(state_dict), adapter_name=adapter, load_into_transformer_2=expert == "low"
                    )
            except (ValueError, KeyError, IndexError, RuntimeError) as exc:  # malformed or mismatched tensors
                if layout == "unknown" or "not found in the base model" in str(exc):  # peft: no target module
                    raise InvalidRequestError(_no_layer_message(request, expert, layout, raw)) from exc
                raise InvalidRequestError(
                    f"LoRA {request.name!r} ({layout} layout) cannot be applied to this model: {exc!r}"
                ) from exc
            peft_layers[expert] = _count_layers(module, adapter)
        if peft_layers[expert] == 0 and not deltas:
            # diffusers only warns when no key matches: a silent no-op LoRA would be a fake result.
            raise InvalidRequestError(_no_layer_message(request, expert, layout, raw))
        table = state.deltas.setdefault(expert, DeltaTable(module))
        layers[expert] = peft_layers[expert] + (table.add(adapter, deltas, request.name) if deltas else 0)
    return LoadedLora(request.name, request.path, adapter, experts, layers, peft_layers, layout)


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
                loaded.append(_load_one(pipe, index, request, used, state))
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
    peft = [(lora.adapter, w) for (lora, _r), w in zip(active, weights, strict=True) if lora.peft_layers.get(expert)]
    if peft and state.fused_update is not None:
        state.fused_update(expert, dict(peft))
    elif peft:
        getattr(pipe, _COMPONENTS[expert]).set_adapters([a for a, _w in peft], [w for _a, w in peft])
    if expert in state.deltas:
        state.deltas[expert].set_weights({lora.adapter: w for (lora, _r), w in zip(active, weights, strict=True)})
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
