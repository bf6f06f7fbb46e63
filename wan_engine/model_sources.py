"""Resolve a preset's `URLs` / `URLs2` / `base` to local files; download only when allowed.

A source is one of
- a diffusers folder path (relative ones are taken under the models dir);
- a Hugging Face repo id `owner/name`, looked up as `<models_dir>/<owner>/<name>`, `<models_dir>/<name>`
  and in the local HF cache;
- a single-file `.safetensors` transformer (original Wan or ComfyUI layout): a path, a repo file
  `owner/name/file.safetensors`, or a `https://huggingface.co/<owner>/<name>/resolve/<rev>/<file>` URL
  (Wan2GP style), looked up under the models dir (full path, then file name, then the file name in
  ComfyUI's `diffusion_models/` and `unet/` folders, so --models-dir may be a ComfyUI `models/`) and
  in the HF cache.
  The rest of the pipeline (VAE, text encoder, tokenizer, scheduler) and the transformer's config come
  from the preset's `model.base` diffusers folder / repo id (default: the `URLs` folder, when that is one).

`check_model` is the cheap, load-free check (headers only) behind the start-up report and
`wan-worker models`; `resolve_model` raises `ModelUnavailableError` with every place it looked.
Every Hub call here passes `local_files_only=True` unless the caller allows downloads.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from wan_engine.checkpoint_formats import (
    format_refusal,
    gguf_refusal,
    inspect_wan_folder,
    is_wan_original_folder,
    wan_expert_folders_hint,
)
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_checks import (
    PICKLE_SUFFIXES,
    FolderReport,
    inspect_pipeline_folder,
    inspect_single_file,
    inspect_transformer_folder,
    pickle_refusal,
)
from wan_engine.presets import Preset

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/(?:resolve|blob)/([^/]+)/(.+)$")
_HF_REPO_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$")
# Only what a diffusers pipeline needs; never a pickle.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# --allow-download fetches only from these hub hosts (HF_ENDPOINT could point the hub client anywhere).
DOWNLOAD_HOSTS_ENV = "WAN_DOWNLOAD_HOSTS"
DEFAULT_DOWNLOAD_HOSTS = ("huggingface.co",)
Status = Literal["present", "missing", "corrupted"]
# ComfyUI's folders of diffusion-model files under its models/ (unet/ is the older name).
COMFYUI_MODEL_FOLDERS = ("diffusion_models", "unet")


@dataclass(frozen=True)
class Candidate:
    """One place a source may live, and what we found there."""

    path: Path
    how: str  # "folder", "file", "models dir" or "HF cache"
    exists: bool


@dataclass(frozen=True)
class Download:
    """Something `--allow-download` would fetch: a repo snapshot or one repo file."""

    repo_id: str
    filename: str | None = None  # None: a snapshot of the repo
    revision: str | None = None
    skip_weights_of: tuple[str, ...] = ()  # components whose weights come from single files

    def describe(self) -> str:
        """`owner/name` or `owner/name/file` (at a revision)."""
        text = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return f"{text}@{self.revision}" if self.revision else text


@dataclass(frozen=True)
class ModelCheck:
    """Result of a cheap check of a preset's weights (headers read, nothing loaded)."""

    key: str
    status: Status
    path: Path | None = None  # the diffusers pipeline folder that is loaded (the base, for single files)
    path2: Path | None = None  # the low-noise expert folder, when URLs2 names a folder
    single_file: Path | None = None  # the transformer, when URLs names a .safetensors file
    single_file_2: Path | None = None  # the low-noise expert, when URLs2 names a .safetensors file
    candidates: tuple[Candidate, ...] = ()
    missing: tuple[str, ...] = ()  # files (absolute, or relative to the chosen folder)
    corrupted: tuple[str, ...] = ()  # sentences naming the file and what is wrong with it
    problems: tuple[str, ...] = ()  # sentences: pickles only, unsupported source, no base, ...
    downloads: tuple[Download, ...] = ()  # what --allow-download would fetch
    # Wan2GP `modules` files (VACE blocks) merged onto the base transformer, one per module, in order:
    # the loader (pipeline_runtime) receives them here.
    modules: tuple[Path, ...] = ()
    modules_2: tuple[Path, ...] = ()  # the same for the low-noise expert of a two-expert model

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for a start-up report or a CLI."""
        return {
            "key": self.key,
            "status": self.status,
            "path": str(self.path) if self.path else None,
            "path2": str(self.path2) if self.path2 else None,
            "single_file": str(self.single_file) if self.single_file else None,
            "single_file_2": str(self.single_file_2) if self.single_file_2 else None,
            "candidates": [{"path": str(c.path), "how": c.how, "exists": c.exists} for c in self.candidates],
            "missing": list(self.missing),
            "corrupted": list(self.corrupted),
            "problems": list(self.problems),
            "downloadable": [d.describe() for d in self.downloads],
            "modules": [str(m) for m in self.modules],
            "modules_2": [str(m) for m in self.modules_2],
        }


@dataclass
class _Found:
    """Outcome of looking up one role (URLs, URLs2 or base) through its sources."""

    path: Path | None = None
    is_file: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    report: FolderReport = field(default_factory=FolderReport)
    downloads: list[Download] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    text: str
    kind: Literal["path", "repo", "hf_file", "refused"]
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    reason: str = ""

    @property
    def is_file(self) -> bool:
        return self.kind == "hf_file" or self.text.endswith(".safetensors")


def parse_source(text: str) -> _Source:
    """Classify a `URLs` entry: local path, repo id, Hub file (repo path or URL), or refused."""
    text = text.strip()
    if (match := _HF_URL.match(text)) is not None:
        return _Source(text, "hf_file", match[1], match[3], None if match[2] == "main" else match[2])
    if (match := _HF_REPO_URL.match(text)) is not None:
        return _Source(text, "repo", match[1])
    if "://" in text:
        return _Source(text, "refused", reason=f"{text!r}: only Hugging Face URLs and local paths are supported")
    if text.endswith(PICKLE_SUFFIXES):
        return _Source(text, "refused", reason=pickle_refusal(text))
    if text.endswith(".gguf"):
        return _Source(text, "refused", reason=gguf_refusal(text))
    parts = text.split("/")
    if text.endswith(".safetensors") and len(parts) >= 3 and _REPO_ID.match("/".join(parts[:2])):
        return _Source(text, "hf_file", "/".join(parts[:2]), "/".join(parts[2:]))
    if _REPO_ID.match(text) and not text.startswith(".") and not Path(text).expanduser().is_absolute():
        return _Source(text, "repo", text)
    return _Source(text, "path")


def _hf_cache_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local HF cache snapshot of `repo_id`, never touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub not importable: just absent
        return None


def _hf_cache_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """The local HF cache copy of one repo file, never touching the network."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception:  # not cached, or hub not importable
        return None


def _hf_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _candidate(path: Path, how: str) -> Candidate:
    return Candidate(path, how, path.exists())


def candidate_paths(source: str, models_dir: Path) -> list[Candidate]:
    """Every place `source` may live, in lookup order (the HF cache is looked up offline)."""
    models_dir = Path(models_dir)
    parsed = parse_source(source)
    if parsed.kind == "refused":
        return []
    if parsed.kind == "hf_file":
        assert parsed.repo_id is not None and parsed.filename is not None
        name = Path(parsed.filename).name
        candidates = [_candidate(models_dir / parsed.repo_id / parsed.filename, "models dir")]
        candidates.append(_candidate(models_dir / name, "models dir"))
        candidates += [_candidate(models_dir / sub / name, "models dir") for sub in COMFYUI_MODEL_FOLDERS]
        cached = _hf_cache_file(parsed.repo_id, parsed.filename, parsed.revision)
        where = cached or _hf_cache_dir(parsed.repo_id) / "snapshots" / "<revision>" / parsed.filename
        candidates.append(Candidate(where, "HF cache", cached is not None))
        return candidates
    path = Path(parsed.text).expanduser()
    if path.is_absolute():
        return [_candidate(path, "file" if parsed.is_file else "folder")]
    candidates = [_candidate(models_dir / path, "models dir")]
    if parsed.is_file and len(path.parts) == 1:
        candidates += [_candidate(models_dir / sub / path, "models dir") for sub in COMFYUI_MODEL_FOLDERS]
    if parsed.kind == "repo":
        assert parsed.repo_id is not None
        candidates.append(_candidate(models_dir / parsed.repo_id.split("/", 1)[1], "models dir"))
        snapshot = _hf_cache_snapshot(parsed.repo_id)
        cache = snapshot if snapshot is not None else _hf_cache_dir(parsed.repo_id)
        candidates.append(Candidate(cache, "HF cache", snapshot is not None))
    return candidates


def _locate(sources: tuple[str, ...], models_dir: Path, inspect_folder: Any, skip: tuple[str, ...] = ()) -> _Found:
    """Try each source in order; the first complete folder or file wins, else everything that was wrong."""
    found = _Found()
    for source in sources:
        parsed = parse_source(source)
        if parsed.kind == "refused":
            found.report.problems.append(parsed.reason)
            continue
        candidates = candidate_paths(source, models_dir)
        found.candidates.extend(candidates)
        for candidate in candidates:
            if not candidate.exists:
                continue
            is_file = candidate.path.is_file()
            if is_file and not parsed.is_file:
                found.report.problems.append(f"{candidate.path} is a file; {source!r} should name a diffusers folder")
                continue
            # An original Wan repository folder (Wan's config.json + shards) is a transformer, like a single file.
            original = not is_file and is_wan_original_folder(candidate.path)
            if is_file:
                report = inspect_single_file(candidate.path)
                refusal = format_refusal(candidate.path) if report.ok else None  # e.g. quanto int4, NVFP4
                report.problems += [refusal] if refusal else []
            elif not original and (hint := wan_expert_folders_hint(candidate.path)) is not None:
                found.report.problems.append(hint)
                continue
            else:
                report = inspect_wan_folder(candidate.path) if original else inspect_folder(candidate.path)
            if report.ok:
                return _Found(candidate.path, is_file or original, found.candidates)
            prefix = "" if is_file else f"{candidate.path}/"
            found.report.missing += [f"{prefix}{m}" for m in report.missing]
            found.report.corrupted += report.corrupted
            found.report.problems += [f"{prefix}{p}" for p in report.problems]
        if parsed.repo_id is not None and not found.downloads:
            # A list is variants of one file (Wan2GP: bf16, then int8, ...): any one present serves, and
            # --allow-download fetches only the first one that can be downloaded.
            found.downloads.append(Download(parsed.repo_id, parsed.filename, parsed.revision, skip))
        if not any(c.exists for c in candidates):
            what = "file" if parsed.is_file else "diffusers folder (model_index.json)"
            looked = ", ".join(str(c.path) for c in candidates)
            found.report.missing.append(f"{source}: no {what} at {looked}")
    return found


def check_model(preset: Preset, models_dir: Path) -> ModelCheck:
    """Cheap check (safetensors headers, no loading, no network) that a preset's weights are usable."""
    models_dir = Path(models_dir)
    urls2 = preset.model.urls2
    need_t2 = preset.is_dual_expert and not urls2
    primary = _locate(preset.model.urls, models_dir, lambda p: inspect_pipeline_folder(p, need_transformer_2=need_t2))
    second = _locate(urls2, models_dir, inspect_transformer_folder) if urls2 else _Found()
    found = [primary, second] if urls2 else [primary]
    # Judge by what was found; when nothing was, by the first source's name.
    primary_file = primary.is_file if primary.path else parse_source(preset.model.urls[0]).is_file
    second_file = bool(urls2) and (second.is_file if second.path else parse_source(urls2[0]).is_file)

    # A single-file transformer needs a diffusers base: model.base (the URLs folder is its own base).
    base = _Found(primary.path)
    if primary_file:
        skip = ("transformer", "transformer_2") if second_file else ("transformer",)
        base = _Found()
        base_source = preset.model.default_base  # model.base, else the architecture's diffusers repo
        if base_source:
            base = _locate(
                (base_source,),
                models_dir,
                lambda p: inspect_pipeline_folder(p, need_transformer_2=need_t2, config_only=frozenset(skip)),
                skip=skip,
            )
            if base.path is None and not preset.model.base:
                base.report.problems.append(
                    f"URLs names a single-file checkpoint ({preset.model.urls[0]}): its transformer config, VAE, "
                    f"text encoder and tokenizer come from the default base of architecture "
                    f"{preset.model.wan2gp_architecture or preset.model.architecture!r}, the diffusers folder "
                    f"{base_source!r}, which is not there: put it under --models-dir, or set the preset's model.base "
                    "to the diffusers folder or repo id the checkpoint belongs to"
                )
        else:
            base.report.problems.append(
                f"URLs names a single-file checkpoint ({preset.model.urls[0]}) and architecture "
                f"{preset.model.architecture!r} (group {preset.model.group!r}) has no default base: set the preset's "
                "model.base to the diffusers folder or repo id it belongs to (transformer config, VAE, text "
                "encoder, tokenizer)"
            )
        found.append(base)

    # Wan2GP modules: each a list of variants of one .safetensors file, found like a single-file URLs entry;
    # on a two-expert model the low-noise expert gets its own list (the same files, unless per expert).
    modules = [_locate(variants, models_dir, inspect_transformer_folder) for variants in preset.model.modules]
    modules_2 = []
    if preset.is_dual_expert:
        modules_2 = [_locate(variants, models_dir, inspect_transformer_folder) for variants in preset.model.modules2]
    found += modules + modules_2

    ok = all(f.path is not None for f in found)
    corrupted = [c for f in found for c in f.report.corrupted]
    status: Status = "present" if ok else ("corrupted" if corrupted else "missing")
    return ModelCheck(
        key=preset.key,
        status=status,
        path=base.path if ok else None,
        path2=second.path if ok and urls2 and not second.is_file else None,
        single_file=primary.path if ok and primary.is_file else None,
        single_file_2=second.path if ok and second.is_file else None,
        candidates=tuple(c for f in found for c in f.candidates),
        missing=() if ok else tuple(m for f in found for m in f.report.missing),
        corrupted=() if ok else tuple(corrupted),
        problems=() if ok else tuple(p for f in found for p in f.report.problems),
        downloads=() if ok else tuple(dict.fromkeys(d for f in found for d in f.downloads)),
        modules=tuple(m.path for m in modules if m.path is not None) if ok else (),
        modules_2=tuple(m.path for m in modules_2 if m.path is not None) if ok else (),
    )


def summary(check: ModelCheck) -> str:
    """One line for a log or a table: where it is, or what is wrong."""
    if check.status == "present":
        files = (
            check.single_file,
            check.single_file_2,
            check.path2,
            check.path,
            *dict.fromkeys(check.modules + check.modules_2),
        )
        return " + ".join(str(p) for p in files if p is not None)
    if check.status == "corrupted":
        return "corrupted: " + "; ".join(check.corrupted)
    parts = [f"missing: {', '.join(check.missing)}"] if check.missing else []
    return "; ".join(parts + list(check.problems))


def unavailable_message(preset: Preset, check: ModelCheck, models_dir: Path, *, allow_download: bool = False) -> str:
    """A message a person can act on: what was looked for, where, what is wrong, how to fix it."""
    sources = " / ".join(repr(s) for s in preset.model.urls + (preset.model.urls2 or ()))
    base = preset.model.base or (preset.model.default_base if parse_source(preset.model.urls[0]).is_file else None)
    if base:
        sources += f" (base {base!r})"
    if preset.model.modules:
        sources += " + modules " + " / ".join(repr(v) for module in preset.model.modules for v in module)
    looked = "; ".join(f"{c.path} ({c.how}: {'incomplete' if c.exists else 'not found'})" for c in check.candidates)
    state = "is corrupted" if check.status == "corrupted" else "is not available"
    parts = [f"Model {preset.key!r} {state}: looked for {sources}"]
    if looked:
        parts.append(f"at: {looked}.")
    if check.corrupted:
        parts.append(f"Corrupted: {'; '.join(check.corrupted)}.")
    if check.missing:
        parts.append(f"Missing: {', '.join(check.missing)}.")
    if check.problems:
        parts.append(f"Problems: {'; '.join(check.problems)}.")
    first = parse_source(preset.model.urls[0])
    where = Path(models_dir) / (first.repo_id or first.text) if first.kind != "hf_file" else Path(models_dir)
    parts.append(
        f"Fix: put the diffusers folder (model_index.json + component folders, safetensors weights) or the "
        f".safetensors file at {where}, or pass --models-dir pointing at the folder that holds it."
    )
    if check.downloads and not allow_download:
        wanted = ", ".join(d.describe() for d in check.downloads)
        parts.append(f"Nothing is downloaded unless --allow-download is given (it would fetch {wanted}).")
    elif not check.downloads:
        parts.append("Nothing is downloaded automatically.")
    return " ".join(parts)


def allowed_download_hosts() -> tuple[str, ...]:
    """Hosts downloads may come from: env WAN_DOWNLOAD_HOSTS (comma-separated), default huggingface.co."""
    hosts = tuple(h.strip().lower() for h in os.environ.get(DOWNLOAD_HOSTS_ENV, "").split(",") if h.strip())
    return hosts or DEFAULT_DOWNLOAD_HOSTS


def check_download_host(endpoint: str) -> None:
    """Refuse (ModelUnavailableError) a hub endpoint whose host is not in the download allow-list."""
    host = (urlsplit(endpoint).hostname or "").lower()
    allowed = allowed_download_hosts()
    if host not in allowed:
        raise ModelUnavailableError(
            f"downloads from {endpoint!r} are refused: host {host!r} is not in the download allow-list "
            f"({', '.join(allowed)}; set {DOWNLOAD_HOSTS_ENV} to change it)"
        )


def download(item: Download) -> Path:
    """Fetch a repo snapshot (safetensors, configs, tokenizer files only) or one file into the HF cache,
    from an allowed host only."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    check_download_host(constants.ENDPOINT)
    log.warning("downloading %s from the Hugging Face Hub", item.describe())
    if item.filename is not None:
        return Path(hf_hub_download(item.repo_id, item.filename, revision=item.revision, local_files_only=False))
    ignore = [f"{name}/*.safetensors" for name in item.skip_weights_of]
    ignore += [f"{name}/*.safetensors.index.json" for name in item.skip_weights_of]
    return Path(
        snapshot_download(
            item.repo_id,
            revision=item.revision,
            allow_patterns=DOWNLOAD_PATTERNS,
            ignore_patterns=ignore or None,
            local_files_only=False,
        )
    )


def resolve_model(preset: Preset, models_dir: Path, *, allow_download: bool = False) -> ModelCheck:
    """The check of a usable preset; `ModelUnavailableError` with the full report otherwise.

    With `allow_download`, a missing Hub source (repo or file) is downloaded into the HF cache and
    the preset checked again; corrupted local files are never replaced silently.
    """
    check = check_model(preset, models_dir)
    if check.status == "missing" and allow_download and check.downloads:
        for item in check.downloads:
            try:
                download(item)
            except Exception as exc:  # network, auth, missing repo: report it with the rest
                raise ModelUnavailableError(
                    f"Model {preset.key!r}: downloading {item.describe()} failed ({exc.__class__.__name__}: {exc}). "
                    + unavailable_message(preset, check, models_dir, allow_download=True)
                ) from exc
        check = check_model(preset, models_dir)
    if check.status != "present":
        raise ModelUnavailableError(unavailable_message(preset, check, models_dir, allow_download=allow_download))
    return check
