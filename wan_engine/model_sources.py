"""Resolve a preset's `URLs` to a local diffusers folder, without ever downloading.

A source is a folder path (relative ones are taken under the models dir) or a Hugging Face repo id
looked up as `<models_dir>/<owner>/<name>`, `<models_dir>/<name>` and in the local HF cache.
`check_model` is the cheap, load-free check behind a worker's start-up report; `resolve_model`
raises `ModelUnavailableError` with every place it looked and how to fix it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wan_engine.errors import ModelUnavailableError
from wan_engine.presets import Preset

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
# Components without weights, and the file that proves each is there.
_CONFIG_ONLY = {"scheduler": ("scheduler_config.json",), "tokenizer": _TOKENIZER_FILES}
_NOT_FOUND = "no folder for"  # problem prefix when no candidate exists (the message lists them anyway)
_NO_FOLDER = "model_index.json (no candidate folder exists)"


@dataclass(frozen=True)
class Candidate:
    """One place a source may live, and what we found there."""

    path: Path
    how: str  # "folder", "models dir" or "HF cache"
    exists: bool


@dataclass(frozen=True)
class ModelCheck:
    """Result of a cheap presence check of a preset's weights (nothing is loaded)."""

    key: str
    status: Literal["present", "missing"]
    path: Path | None = None  # the folder that will be loaded (status "present")
    path2: Path | None = None  # the low-noise expert folder, when the preset has URLs2
    candidates: tuple[Candidate, ...] = ()
    missing: tuple[str, ...] = ()  # files, relative to the chosen folder
    problems: tuple[str, ...] = ()  # sentences: pickles only, unsupported source, ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for a start-up report or a CLI."""
        return {
            "key": self.key,
            "status": self.status,
            "path": str(self.path) if self.path else None,
            "path2": str(self.path2) if self.path2 else None,
            "candidates": [{"path": str(c.path), "how": c.how, "exists": c.exists} for c in self.candidates],
            "missing": list(self.missing),
            "problems": list(self.problems),
        }


@dataclass
class _FolderReport:
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local HF cache snapshot of `repo_id`, never touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub not importable: just absent
        return None


def _hf_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def candidate_paths(source: str, models_dir: Path) -> list[Candidate]:
    """Every place `source` may live, in lookup order."""
    models_dir = Path(models_dir)
    path = Path(source).expanduser()
    if path.is_absolute():
        return [Candidate(path, "folder", path.exists())]
    candidates = [Candidate(models_dir / path, "models dir", (models_dir / path).exists())]
    if _REPO_ID.match(source) and not source.startswith("."):
        short = models_dir / source.split("/", 1)[1]
        candidates.append(Candidate(short, "models dir", short.exists()))
        snapshot = _hf_cache_snapshot(source)
        cache = snapshot if snapshot is not None else _hf_cache_dir(source)
        candidates.append(Candidate(cache, "HF cache", snapshot is not None))
    return candidates


def _weights_report(component_dir: Path, name: str, report: _FolderReport) -> None:
    """Require safetensors weights (whole or sharded) in a model component folder."""
    files = [p for p in component_dir.iterdir() if p.is_file()] if component_dir.is_dir() else []
    if not any(f.name == "config.json" for f in files):
        report.missing.append(f"{name}/config.json")
    shard_indexes = [f for f in files if f.name.endswith(".safetensors.index.json")]
    for index in shard_indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            report.problems.append(f"{name}/{index.name} is not a readable shard index")
            continue
        report.missing.extend(f"{name}/{s}" for s in sorted(shards) if not (component_dir / s).is_file())
    if shard_indexes or any(f.suffix == ".safetensors" for f in files):
        return
    pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        report.problems.append(
            f"{name}/ holds only pickle weights ({', '.join(pickles)}); they are never loaded because "
            "unpickling can run code: convert them to .safetensors"
        )
    report.missing.append(f"{name}/*.safetensors")


def inspect_folder(folder: Path, *, need_transformer_2: bool = False) -> tuple[list[str], list[str]]:
    """List the missing files and the problems of a diffusers pipeline folder."""
    report = _FolderReport()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except FileNotFoundError:
        return ["model_index.json"], []
    except (OSError, ValueError) as exc:
        return [], [f"model_index.json is unreadable ({exc})"]
    components = {
        name: value
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    if need_transformer_2 and "transformer_2" not in components:
        report.missing.append("transformer_2 (the low-noise expert of a Wan 2.2 model)")
    for name in components:
        sub = folder / name
        if name in _CONFIG_ONLY:
            if not any((sub / f).is_file() for f in _CONFIG_ONLY[name]):
                report.missing.append(f"{name}/{_CONFIG_ONLY[name][0]}")
        else:
            _weights_report(sub, name, report)
    return report.missing, report.problems


def inspect_transformer_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Missing files / problems of a lone transformer folder (a `URLs2` expert)."""
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder: its transformer is the expert
    report = _FolderReport()
    _weights_report(folder, folder.name, report)
    return report.missing, report.problems


def _check_source(
    sources: tuple[str, ...], models_dir: Path, inspect: Any
) -> tuple[Path | None, list[Candidate], list[str], list[str]]:
    """Try each source in order; return the first complete folder, else what was wrong."""
    all_candidates: list[Candidate] = []
    missing: list[str] = []
    problems: list[str] = []
    for source in sources:
        if source.endswith(".safetensors") or "://" in source:
            problems.append(
                f"{source!r} is a single-file checkpoint or URL; this engine loads diffusers folders only "
                "(model_index.json + component folders)"
            )
            continue
        candidates = candidate_paths(source, models_dir)
        all_candidates.extend(candidates)
        if not any(c.exists for c in candidates):
            problems.append(f"{_NOT_FOUND} {source!r} at {', '.join(str(c.path) for c in candidates)}")
        for candidate in candidates:
            if not candidate.exists:
                continue
            found_missing, found_problems = inspect(candidate.path)
            if not found_missing and not found_problems:
                return candidate.path, all_candidates, [], []
            missing.extend(f"{candidate.path}/{m}" for m in found_missing)
            problems.extend(f"{candidate.path}/{p}" for p in found_problems)
    if not missing:
        missing.append(_NO_FOLDER)
    return None, all_candidates, missing, problems


def check_model(preset: Preset, models_dir: Path) -> ModelCheck:
    """Cheap check (no loading) that a preset's weights are on this machine, in safetensors."""
    need_t2 = preset.is_dual_expert and not preset.model.urls2
    path, candidates, missing, problems = _check_source(
        preset.model.urls, models_dir, lambda p: inspect_folder(p, need_transformer_2=need_t2)
    )
    path2 = None
    if preset.model.urls2:
        path2, candidates2, missing2, problems2 = _check_source(
            preset.model.urls2, models_dir, inspect_transformer_folder
        )
        candidates += candidates2
        missing += missing2
        problems += problems2
    ok = path is not None and (path2 is not None or not preset.model.urls2)
    return ModelCheck(
        key=preset.key,
        status="present" if ok else "missing",
        path=path,
        path2=path2,
        candidates=tuple(candidates),
        missing=() if ok else tuple(missing),
        problems=() if ok else tuple(problems),
    )


def unavailable_message(preset: Preset, check: ModelCheck, models_dir: Path) -> str:
    """A message a person can act on: what was looked for, where, and how to fix it."""
    sources = " / ".join(repr(s) for s in preset.model.urls + (preset.model.urls2 or ()))
    looked = "; ".join(f"{c.path} ({c.how}: {'incomplete' if c.exists else 'not found'})" for c in check.candidates)
    parts = [f"Model {preset.key!r} is not available: looked for the diffusers folder of {sources}"]
    if looked:
        parts.append(f"at: {looked}.")
    # The candidate list above already says what was not found; add only what was wrong elsewhere.
    missing = [m for m in check.missing if m != _NO_FOLDER]
    problems = [p for p in check.problems if not p.startswith(_NOT_FOUND)]
    if missing:
        parts.append(f"Missing: {', '.join(missing)}.")
    if problems:
        parts.append(f"Problems: {'; '.join(problems)}.")
    parts.append(
        f"Fix: put the diffusers folder (model_index.json + component folders, safetensors weights) at "
        f"{Path(models_dir) / preset.model.urls[0]} or pass --models-dir pointing at the folder that "
        "holds it. Nothing is downloaded automatically."
    )
    return " ".join(parts)


def resolve_model(preset: Preset, models_dir: Path) -> ModelCheck:
    """The check of a preset whose weights are present; `ModelUnavailableError` otherwise."""
    check = check_model(preset, models_dir)
    if check.status != "present":
        raise ModelUnavailableError(unavailable_message(preset, check, models_dir))
    return check
