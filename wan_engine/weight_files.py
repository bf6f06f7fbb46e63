"""The weight files a resident model came from, and whether they changed since (issue 18, item 5).

A model stays resident for hours; meanwhile someone may rewrite its files in place (`cp` over the file,
`rsync --inplace`) or truncate them. Two things protect the worker:

- `WeightFiles` records each file's identity (device, inode, size, mtime in ns) when the load starts and
  `changed()` compares it with a fresh `os.stat` (no reads, microseconds per file) before a generation,
  so the orchestrator can drop the model and load the new weights instead of serving stale ones.
- `detach_file_mappings` copies every parameter/buffer whose storage lies in a file mapping into ordinary
  memory once, at load: safetensors loads by mmap, and on the CPU diffusers/transformers keep tensors that
  alias the mapping, so a rewrite would silently change the weights and a truncation would kill the
  process with SIGBUS on the next page touched.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_engine.checkpoint_formats import transformer_files

log = logging.getLogger(__name__)

MAPS_FILE = "/proc/self/maps"


@dataclass(frozen=True)
class FileIdentity:
    """What `os.stat` says about one file: a rewrite in place changes size or mtime, a replace the inode."""

    st_dev: int
    st_ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        """The identity of `path` (symlinks followed, as the loader reads them); None when it is gone."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def difference(self, now: FileIdentity | None) -> str | None:
        """A phrase saying what changed (None: nothing)."""
        if now is None:
            return "was removed"
        if (now.st_dev, now.st_ino) != (self.st_dev, self.st_ino):
            return f"was replaced (inode {self.st_ino} -> {now.st_ino})"
        if now.size != self.size:
            return f"was rewritten in place (size {self.size} -> {now.size} bytes)"
        if now.mtime_ns != self.mtime_ns:
            return f"was rewritten in place (mtime {self.mtime_ns} -> {now.mtime_ns} ns)"
        return None


class WeightFiles:
    """The identities of a model's weight files, recorded at load; `changed()` re-checks them with stat only."""

    def __init__(self, identities: dict[Path, FileIdentity | None] | None = None) -> None:
        self.identities: dict[Path, FileIdentity | None] = dict(identities or {})

    @classmethod
    def record(cls, paths: list[Path] | tuple[Path, ...]) -> WeightFiles:
        """Stat every path now. Call it before the files are read: a change during the load then shows too."""
        return cls({Path(p): FileIdentity.of(Path(p)) for p in paths})

    @property
    def paths(self) -> list[Path]:
        """The recorded files."""
        return list(self.identities)

    def changed(self) -> str | None:
        """None when every file is as recorded; else a sentence naming the first changed file and how."""
        for path, then in self.identities.items():
            now = FileIdentity.of(path)
            if then is None:
                if now is not None:
                    return f"weight file {path} appeared after the model was loaded"
                continue
            what = then.difference(now)
            if what is not None:
                return f"weight file {path} {what} since the model was loaded"
        return None


def weight_paths(check: Any) -> list[Path]:
    """Every safetensors file a load of `check` (a `model_sources.ModelCheck`) reads.

    The pipeline folder's components as model_index.json lists them (a component a single file replaces
    is skipped: its folder holds at most a config), the URLs2 expert folder, and the single files.
    """
    files: list[Path] = []
    singles = (("transformer", check.single_file), ("transformer_2", check.single_file_2))
    skipped = {name for name, file in singles if file is not None}
    if check.path is not None:
        files += _component_files(Path(check.path), skipped)
    if check.path2 is not None:
        path2 = Path(check.path2)
        # A pipeline folder lends its transformer (pipeline_runtime._load_expert); else a transformer folder.
        expert = path2 / "transformer" if (path2 / "model_index.json").is_file() else path2
        files += sorted(expert.glob("*.safetensors"))
    for single in (check.single_file, check.single_file_2):
        if single is not None:
            files += transformer_files(Path(single))  # a file, or an original Wan folder's shards
    files += [Path(m) for m in (*(getattr(check, "modules", ()) or ()), *(getattr(check, "modules_2", ()) or ()))]
    return files


def _component_files(folder: Path, skipped: set[str]) -> list[Path]:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return sorted(folder.glob("*/*.safetensors"))  # the loader will report it; watch what is there
    names = [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    ]
    return [f for name in sorted(names) if name not in skipped for f in sorted((folder / name).glob("*.safetensors"))]


# ---- no tensor may alias a file mapping ------------------------------------------------------------------


def file_mappings(maps_file: str = MAPS_FILE) -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process, sorted; [] where /proc is absent.

    Device files (/dev/...: GPU driver mappings, pinned memory) are left out: no weights live there.
    """
    ranges: list[tuple[int, int, str]] = []
    try:
        with open(maps_file) as handle:
            lines = handle.readlines()
    except OSError:
        return ranges
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/") or parts[5].startswith("/dev/"):
            continue  # anonymous memory, [heap]/[stack], or a device
        start, _, end = parts[0].partition("-")
        ranges.append((int(start, 16), int(end, 16), parts[5].rstrip("\n")))
    ranges.sort()
    return ranges


def _mapped_file(ptr: int, starts: list[int], ranges: list[tuple[int, int, str]]) -> str | None:
    index = bisect.bisect_right(starts, ptr) - 1
    if index >= 0 and ptr < ranges[index][1]:
        return ranges[index][2]
    return None


def _tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensors.append(tensor)
    return tensors


def pipeline_modules(pipe: Any) -> list[torch.nn.Module]:
    """The torch modules among a diffusers pipeline's components."""
    return [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]


def mapped_tensors(modules: list[torch.nn.Module], maps_file: str = MAPS_FILE) -> list[tuple[torch.Tensor, str]]:
    """The CPU parameters/buffers whose storage lies in a file mapping, with the mapped file's path."""
    ranges = file_mappings(maps_file)
    if not ranges:
        return []
    starts = [r[0] for r in ranges]
    found = []
    for tensor in _tensors(modules):
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
            continue  # device memory and meta/empty tensors are never file-backed
        path = _mapped_file(tensor.untyped_storage().data_ptr(), starts, ranges)
        if path is not None:
            found.append((tensor, path))
    return found


@torch.no_grad()
def detach_file_mappings(modules: list[torch.nn.Module], maps_file: str = MAPS_FILE) -> int:
    """Copy every file-mapped parameter/buffer into ordinary memory; returns the bytes copied.

    Each storage is copied once and every tensor viewing it is re-pointed at the copy with its offset and
    strides, so tied weights stay tied and Parameters keep their identity (optimisers, hooks, LoRA layers).
    Without /proc/self/maps (not Linux) nothing can be told apart: every CPU tensor is copied.
    """
    if os.path.exists(maps_file):
        hits = mapped_tensors(modules, maps_file)
    else:
        hits = [(t, "?") for t in _tensors(modules) if t.device.type == "cpu" and t.untyped_storage().nbytes()]
    copies: dict[int, torch.UntypedStorage] = {}
    copied = 0
    for tensor, _path in hits:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:
            copies[key] = storage.clone()  # an ordinary (anonymous) allocation
            copied += storage.nbytes()
        fresh = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        fresh.set_(copies[key], tensor.storage_offset(), tensor.size(), tensor.stride())
        tensor.data = fresh
    return copied
