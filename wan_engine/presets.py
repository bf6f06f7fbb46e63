"""Model presets: Wan2GP-style JSON files `defaults/<key>.json`, validated with pydantic.

A preset file holds a `model` object (which weights, which architecture) plus default generation
settings. Built-in presets live in the repository's `defaults/`, which a wheel installs as the data
package `wan_engine/_defaults` (pyproject.toml); a user directory may override any property of a
built-in (the `model` object is merged key by key) or add new presets.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wan_engine import wan2gp_definitions as wan2gp
from wan_engine.errors import PresetError, UnknownModelError
from wan_engine.limits import (
    MAX_GUIDANCE_PHASES,
    MAX_PARALLEL,
    MAX_SEED,
    MAX_STEPS,
    MAX_SWITCH_THRESHOLD,
    MIN_STEPS,
    MIN_SWITCH_THRESHOLD,
    RANDOM_SEED,
)

logger = logging.getLogger(__name__)

_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def builtin_data_dir(packaged: str, checkout: str) -> Path:
    """Where a folder of data shipped with the worker is: packaged in a wheel, else in the checkout.

    `packaged` is its name inside the installed `wan_engine` package (`_defaults`, `_loras`: the
    pyproject's package-dir mapping puts the top-level folders there in a wheel); `checkout` is the
    top-level folder of the repository, which an editable install keeps reading. When neither
    exists, the one this installation should have is returned, so that errors name it.
    """
    installed = resources.files("wan_engine") / packaged
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    checkout_dir = _CHECKOUT_ROOT / checkout
    if checkout_dir.is_dir() or (_CHECKOUT_ROOT / "pyproject.toml").is_file() or not isinstance(installed, Path):
        return checkout_dir
    return installed


# The built-in presets (`defaults/<key>.json`) and the default LoRA folder (`loras/`, README only
# in a wheel; headless_wgp.BUILTIN_LORAS_DIR re-exports it).
BUILTIN_PRESETS_DIR = builtin_data_dir("_defaults", "defaults")
BUILTIN_LORAS_DIR = builtin_data_dir("_loras", "loras")

Architecture = Literal["t2v", "vace", "i2v", "flf2v", "ti2v"]
Group = Literal["wan", "wan2_2"]

_RESOLUTION_PATTERN = r"^\d+x\d+$"


def _as_tuple(value: Any) -> Any:
    """Accept one source as a string or several as a list (Wan2GP lists quantization variants)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


class ModelSpec(BaseModel):
    """The `model` object of a preset: which weights to load and how to treat them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    architecture: Architecture
    urls: tuple[str, ...] = Field(alias="URLs", min_length=1)
    urls2: tuple[str, ...] | None = Field(default=None, alias="URLs2", min_length=1)
    # For single-file .safetensors URLs/URLs2: the diffusers folder or repo id giving the transformer
    # config (from_single_file's config=) and the VAE, text encoder, tokenizer and scheduler.
    base: str | None = None
    group: Group = "wan"
    description: str | None = None
    # LoRA file names in the LoRA folders, or (Wan2GP) Hugging Face URLs fetched into the first LoRA
    # folder under --allow-download's host allow-list (wan_engine.lora_downloads).
    loras: tuple[str, ...] = ()
    loras_multipliers: tuple[float | str, ...] = ()
    # Wan2GP `modules`: files merged onto the base transformer (VACE blocks), each a list of variants of
    # one module (the first present is used); references to other definitions are resolved on load.
    modules: tuple[tuple[str, ...], ...] = ()
    # The low-noise expert's modules on a two-expert model: Wan2GP's list entries go onto both experts
    # (its submodel 0), a {"URLs": ..., "URLs2": ...} entry gives each expert its own file.
    modules2: tuple[tuple[str, ...], ...] = ()
    # The Wan2GP architecture name the file gave (`t2v_1.3B`, `vace_14B_2_2`, ...) when it is not one of
    # ours: it picks the default `base` and the Wan2GP LoRA subfolder (wan_engine.wan2gp_definitions).
    wan2gp_architecture: str | None = None
    # Alternative presets (same architecture) tried in order when this one's weights are missing or
    # corrupted -- only on a worker started with --allow-fallbacks; the substitution is recorded.
    fallbacks: tuple[str, ...] = ()

    @field_validator("urls", "urls2", "loras", "loras_multipliers", "fallbacks", mode="before")
    @classmethod
    def _normalize_sources(cls, value: Any) -> Any:
        return _as_tuple(value)

    @field_validator("modules", "modules2", mode="before")
    @classmethod
    def _normalize_modules(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(_as_tuple(entry) for entry in value)
        return value

    @property
    def default_base(self) -> str | None:
        """`base`, else the diffusers repo id this architecture's single files are completed with."""
        return self.base or wan2gp.default_base(self.architecture, self.group, self.wan2gp_architecture)

    @property
    def lora_subdirs(self) -> tuple[str, ...]:
        """Subfolders of a LoRA folder looked in before its root (ours, then Wan2GP's for this model)."""
        return wan2gp.lora_subdirs(self.architecture, self.group, self.wan2gp_architecture)


class PresetSettings(BaseModel):
    """Default generation settings of a preset; a task's params override each one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_inference_steps: int | None = Field(default=None, ge=MIN_STEPS, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0)
    guidance2_scale: float | None = Field(default=None, ge=0)
    flow_shift: float | None = Field(default=None, gt=0)
    switch_threshold: float | None = Field(default=None, ge=MIN_SWITCH_THRESHOLD, le=MAX_SWITCH_THRESHOLD)
    video_length: int | None = Field(default=None, ge=1)
    resolution: str | None = Field(default=None, pattern=_RESOLUTION_PATTERN)
    fps: int | None = Field(default=None, ge=1)
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=RANDOM_SEED, le=MAX_SEED)
    # Wan2GP's guidance phases: 1, 2 (the expert switch at switch_threshold) or 3 (a second switch at
    # switch_threshold2, guidance3_scale after it; model_switch_phase: the phase after which the
    # low-noise expert takes over). wan_engine.experts plans them.
    guidance_phases: int | None = Field(default=None, ge=1, le=MAX_GUIDANCE_PHASES)
    guidance3_scale: float | None = Field(default=None, ge=0)
    switch_threshold2: float | None = Field(default=None, ge=MIN_SWITCH_THRESHOLD, le=MAX_SWITCH_THRESHOLD)
    model_switch_phase: int | None = Field(default=None, ge=1, le=MAX_GUIDANCE_PHASES - 1)
    sample_solver: str | None = None  # Wan2GP's solver names (wan2gp_definitions.SAMPLE_SOLVERS)
    # GPUs a generation with this model is split over by default (a task's `parallel` overrides it);
    # a worker property rather than a generation parameter, so not part of as_params().
    parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL)

    @field_validator("sample_solver")
    @classmethod
    def _known_solver(cls, value: str | None) -> str | None:
        return None if value is None else wan2gp.check_sample_solver(value)

    def as_params(self) -> dict[str, Any]:
        """The settings this preset sets, as generation parameters (unset ones left out)."""
        return self.model_dump(exclude_none=True, exclude={"parallel"})


class Preset(BaseModel):
    """One model preset: its key (the file stem), the model to load and its default settings."""

    model_config = ConfigDict(frozen=True)

    key: str
    model: ModelSpec
    settings: PresetSettings
    source_files: tuple[Path, ...] = ()
    ignored: tuple[str, ...] = ()  # Wan2GP keys read and left unused (dotted names: "prompt", "model.visible")

    @property
    def is_dual_expert(self) -> bool:
        """True for Wan 2.2 A14B-style models: a high-noise and a low-noise transformer.

        Either `URLs2` names the low-noise expert, or the Wan 2.2 diffusers folder holds both
        (`transformer` + `transformer_2`); the TI2V-5B model of the same group is a single one.
        """
        if self.model.urls2:
            return True
        return self.model.group == "wan2_2" and self.model.architecture != "ti2v"


# A preset file on its own may be partial (a user override), so every field is optional here;
# the merged result is validated again with the complete models above.
class _PartialModelSpec(ModelSpec):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = None  # type: ignore[assignment]
    architecture: Architecture | None = None  # type: ignore[assignment]
    urls: tuple[str, ...] | None = Field(default=None, alias="URLs", min_length=1)  # type: ignore[assignment]
    # Checked once references are resolved: a file may name other definitions' modules, or one per expert.
    modules: Any = None
    modules2: Any = None


class _PresetFile(PresetSettings):
    model: _PartialModelSpec | None = None


class _CompletePresetFile(PresetSettings):
    model: ModelSpec


class PresetRegistry:
    """The presets known to this process, looked up by key."""

    def __init__(self, presets: Mapping[str, Preset], *, skipped: Mapping[str, str] | None = None) -> None:
        self._presets = dict(sorted(presets.items()))
        self.skipped = dict(sorted((skipped or {}).items()))  # definitions of other families: key -> why

    def get(self, key: str) -> Preset:
        """The preset named `key`; `UnknownModelError` lists the known keys when there is none."""
        try:
            return self._presets[key]
        except KeyError:
            known = ", ".join(self._presets) or "(none)"
            why = f" (its definition was skipped: {self.skipped[key]})" if key in self.skipped else ""
            raise UnknownModelError(f"Unknown model {key!r}{why}: known models are {known}.") from None

    def __getitem__(self, key: str) -> Preset:
        return self.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._presets)

    def __len__(self) -> int:
        return len(self._presets)

    def __contains__(self, key: object) -> bool:
        return key in self._presets

    def keys(self) -> list[str]:
        """The known preset keys, sorted."""
        return list(self._presets)


def _format_validation_error(path: Path | str, error: ValidationError) -> str:
    """One line per problem: the file, the dotted field name, what is wrong and the bad value."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(file)"
        value = item.get("input")
        shown = f" (got {value!r})" if item["type"] != "missing" else ""
        lines.append(f"{path}: field {field!r}: {item['msg']}{shown}")
    return "Invalid preset: " + "; ".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PresetError(f"Invalid preset: {path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise PresetError(f"Invalid preset: {path}: cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise PresetError(f"Invalid preset: {path}: the file must hold a JSON object, got {kind}")
    return data


def _read_preset_file(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Parse and check one preset file on its own (Wan2GP names translated); errors name the file and the field.

    Returns the data and the Wan2GP keys it ignores.
    """
    data, ignored = wan2gp.normalize(_read_json(path))
    try:
        _PresetFile.model_validate(data)
    except ValidationError as exc:
        raise PresetError(_format_validation_error(path, exc)) from exc
    return data, ignored


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Property-by-property override; the `model` object is merged key by key."""
    merged = dict(base)
    for name, value in override.items():
        if name == "model" and isinstance(value, dict) and isinstance(base.get("model"), dict):
            merged["model"] = {**base["model"], **value}
        else:
            merged[name] = value
    return merged


def _build_preset(key: str, data: dict[str, Any], files: list[Path], ignored: tuple[str, ...]) -> Preset:
    """Validate a (possibly merged) preset dict into a complete `Preset`."""
    try:
        parsed = _CompletePresetFile.model_validate(data)
    except ValidationError as exc:
        # A merged preset may come from two files: name both, the user's last.
        raise PresetError(_format_validation_error(" + ".join(str(f) for f in files), exc)) from exc
    settings = PresetSettings.model_validate(parsed.model_dump(exclude={"model"}))
    return Preset(key=key, model=parsed.model, settings=settings, source_files=tuple(files), ignored=ignored)


def _preset_files(directory: Path | None) -> dict[str, Path]:
    if directory is None or not Path(directory).is_dir():
        return {}
    return {path.stem: path for path in sorted(Path(directory).glob("*.json"))}


PresetDirs = Path | str | Sequence[Path | str] | None


def split_dirs(value: PresetDirs) -> tuple[Path, ...]:
    """Directories from a path, an os.pathsep-separated string (WAN_PRESETS_DIR, WAN_LORAS_DIR) or a sequence."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, Path)) else list(value)
    dirs: list[Path] = []
    for item in items:
        dirs += [Path(part).expanduser() for part in str(item).split(os.pathsep) if part.strip()]
    return tuple(dirs)


def load_presets(builtin_dir: Path = BUILTIN_PRESETS_DIR, user_dir: PresetDirs = None) -> PresetRegistry:
    """Load built-in presets, then each user directory's files (overrides and new keys) on top, in order.

    `user_dir` may be several directories (a sequence, or one os.pathsep-separated string): a later
    one overrides an earlier one as a user file overrides a built-in. Wan2GP definitions are read as
    they are (wan_engine.wan2gp_definitions): complete definitions of families not served here are
    skipped with one warning each and listed by `PresetRegistry.skipped`.
    """
    raw: dict[str, dict[str, Any]] = {}
    files: dict[str, list[Path]] = {}
    ignored: dict[str, tuple[str, ...]] = {}
    skipped: dict[str, str] = {}
    for directory in (Path(builtin_dir), *split_dirs(user_dir)):
        for key, path in _preset_files(directory).items():
            reason = wan2gp.skip_reason(_read_json(path))
            if reason is not None:
                logger.warning("skipping model definition %s: %s", path, reason, extra={"model": key})
                skipped[key] = f"{path}: {reason}"
                continue
            data, file_ignored = _read_preset_file(path)
            raw[key] = _merge(raw.get(key, {}), data)
            files.setdefault(key, []).append(path)
            ignored[key] = tuple(dict.fromkeys((*ignored.get(key, ()), *file_ignored)))
            if file_ignored:
                logger.debug("model definition %s: keys ignored: %s", path, ", ".join(file_ignored))
    resolved, unresolved = wan2gp.resolve_references(raw)
    for key, reason in unresolved.items():
        logger.warning("skipping model definition %s: %s", files[key][-1], reason, extra={"model": key})
        skipped[key] = f"{files[key][-1]}: {reason}"
    presets = {key: _build_preset(key, data, files[key], ignored[key]) for key, data in resolved.items()}
    return PresetRegistry(presets, skipped={k: v for k, v in skipped.items() if k not in presets})
