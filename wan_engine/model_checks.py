"""File-level checks of model weights: safetensors headers, shard indexes and component folders.

Nothing here loads a tensor. A safetensors file is an 8-byte little-endian header length N, a JSON
header of N bytes naming each tensor's dtype, shape and `[begin, end)` offsets into the data buffer
that follows, then that buffer. Reading the header and comparing the offsets with the file size is
enough to catch truncated downloads, garbage files and shard indexes that do not match their shards,
in milliseconds, even for a 28 GB model. (A bit flip inside the data is not caught: that needs a hash.)
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
# Bits per element of each safetensors dtype (sub-byte float formats included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# Components without weights (by class name in model_index.json), and the files of which one proves
# each is there.
_WEIGHTLESS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("Scheduler",), ("scheduler_config.json",)),
    (("Tokenizer",), ("tokenizer.json", "spiece.model", "tokenizer_config.json")),
    (("Processor", "FeatureExtractor"), ("preprocessor_config.json",)),
)


def weightless_files(class_name: str) -> tuple[str, ...] | None:
    """The files that prove a weightless component (scheduler, tokenizer, processor); None if it has weights."""
    for markers, files in _WEIGHTLESS:
        if any(marker in class_name for marker in markers):
            return files
    return None


class SafetensorsError(ValueError):
    """A file is not a complete, readable safetensors file; the message names it and says why."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file (the data itself is never read)."""

    path: Path
    file_size: int
    header_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header promises."""
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def numel(self) -> int:
        """Total number of parameters (elements of every tensor)."""
        return sum(t.numel for t in self.tensors.values())


def _expected_bytes(entry: TensorEntry) -> int | None:
    bits = DTYPE_BITS.get(entry.dtype)
    return None if bits is None else math.ceil(entry.numel * bits / 8)


def _parse_entry(path: Path, name: str, raw: Any) -> TensorEntry:
    try:
        begin, end = (int(x) for x in raw["data_offsets"])
        entry = TensorEntry(str(raw["dtype"]), tuple(int(x) for x in raw["shape"]), begin, end)
    except (TypeError, KeyError, ValueError) as exc:
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry ({exc!r})") from None
    expected = _expected_bytes(entry)
    if end < begin or (expected is not None and end - begin != expected):
        raise SafetensorsError(
            f"{path}: tensor {name!r} ({entry.dtype} {list(entry.shape)}) spans bytes [{begin}, {end}) "
            f"but needs {expected}; the header is corrupted"
        )
    return entry


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header against the file size; `SafetensorsError` if broken."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: truncated ({size} bytes, not even the 8-byte header length)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or header_size > size - 8:
                raise SafetensorsError(
                    f"{path}: truncated or not a safetensors file (header length {header_size} bytes, "
                    f"file {size} bytes)"
                )
            raw_header = handle.read(header_size)
    except OSError as exc:
        raise SafetensorsError(f"{path}: unreadable ({exc})") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"{path}: the JSON header is unreadable ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _parse_entry(path, name, raw) for name, raw in header.items()}
    # The data buffer must be exactly the concatenation of the tensors (safetensors' own rule).
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: item[1].begin):
        if entry.begin != position:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {entry.begin}, expected {position}")
        position = entry.end
    available = size - 8 - header_size
    if position > available:
        raise SafetensorsError(
            f"{path}: truncated: the header promises {position} bytes of tensor data, the file holds {available} "
            f"({size} bytes in all); download it again"
        )
    if position < available:
        raise SafetensorsError(f"{path}: {available - position} unexpected trailing bytes after the tensor data")
    return SafetensorsHeader(path, size, header_size, tensors, dict(metadata))


@dataclass
class FolderReport:
    """What is wrong with a model folder: missing files, corrupted files, other problems."""

    missing: list[str] = field(default_factory=list)  # relative to the inspected folder
    corrupted: list[str] = field(default_factory=list)  # sentences naming the file
    problems: list[str] = field(default_factory=list)  # pickles only, unreadable index, ...

    @property
    def ok(self) -> bool:
        """True when nothing is missing, corrupted or otherwise wrong."""
        return not (self.missing or self.corrupted or self.problems)

    def extend(self, other: FolderReport) -> None:
        """Add another report's findings to this one."""
        self.missing += other.missing
        self.corrupted += other.corrupted
        self.problems += other.problems


def _check_json(path: Path, rel: str, report: FolderReport) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        report.missing.append(rel)
        return None
    except (OSError, ValueError) as exc:
        report.corrupted.append(f"{path}: unreadable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        report.corrupted.append(f"{path}: not a JSON object")
        return None
    return data


def _headers(files: list[Path], report: FolderReport) -> dict[Path, SafetensorsHeader]:
    headers = {}
    for path in files:
        try:
            headers[path] = read_safetensors_header(path)
        except SafetensorsError as exc:
            report.corrupted.append(str(exc))
    return headers


def _check_shard_index(index: Path, name: str, report: FolderReport) -> None:
    """Shards exist, hold the tensors the weight map puts there, and add up to metadata.total_size."""
    data = _check_json(index, f"{name}/{index.name}", report)
    weight_map = data.get("weight_map") if data else None
    if data is None:
        return
    if not isinstance(weight_map, dict):
        report.corrupted.append(f"{index}: no weight_map")
        return
    shard_names = sorted(set(weight_map.values()))
    present = [index.parent / s for s in shard_names if (index.parent / s).is_file()]
    report.missing += [f"{name}/{s}" for s in shard_names if not (index.parent / s).is_file()]
    headers = _headers(present, report)
    if len(headers) != len(shard_names):
        return  # already reported as missing / corrupted
    by_name = {path.name: header for path, header in headers.items()}
    absent = [t for t, shard in weight_map.items() if t not in by_name[shard].tensors]
    if absent:
        report.corrupted.append(
            f"{index}: {len(absent)} tensors of the weight map are not in their shard (first: {absent[0]!r})"
        )
    total = (data.get("metadata") or {}).get("total_size")
    actual = sum(h.data_size for h in headers.values())
    if isinstance(total, int) and total != actual:
        report.corrupted.append(
            f"{index}: metadata.total_size is {total} bytes but the shards hold {actual}: a shard is from "
            "another version or was cut short"
        )


def inspect_component(folder: Path, name: str) -> FolderReport:
    """Check one weighted component folder: config.json plus complete safetensors (whole or sharded)."""
    report = FolderReport()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    _check_json(folder / "config.json", f"{name}/config.json", report)
    indexes = [f for f in files if f.name.endswith(".safetensors.index.json")]
    for index in indexes:
        _check_shard_index(index, name, report)
    sharded: set[str] = set()
    for index in indexes:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # reported by _check_shard_index
            sharded |= set(json.loads(index.read_text()).get("weight_map", {}).values())
    singles = [f for f in files if f.suffix == ".safetensors" and f.name not in sharded]
    _headers(singles, report)
    if indexes or singles:
        return report
    pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        report.problems.append(
            f"{name}/ holds only pickle weights ({', '.join(pickles)}); they are never loaded because "
            "unpickling can run code: convert them to .safetensors"
        )
    report.missing.append(f"{name}/*.safetensors")
    return report


def inspect_pipeline_folder(
    folder: Path, *, need_transformer_2: bool = False, config_only: frozenset[str] = frozenset()
) -> FolderReport:
    """Check a diffusers pipeline folder: model_index.json and every component it lists.

    Components named in `config_only` need only their config.json (their weights come from a
    single-file checkpoint elsewhere).
    """
    report = FolderReport()
    index = _check_json(folder / "model_index.json", "model_index.json", report)
    if index is None:
        return report
    components = {
        name: value
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    }
    if need_transformer_2 and "transformer_2" not in components:
        report.missing.append("transformer_2 (the low-noise expert of a Wan 2.2 model)")
    for name, (_library, class_name) in components.items():
        sub = folder / name
        proofs = weightless_files(str(class_name))
        if proofs is not None:
            if not any((sub / f).is_file() for f in proofs):
                report.missing.append(f"{name}/{proofs[0]}")
        elif name in config_only:
            _check_json(sub / "config.json", f"{name}/config.json", report)
        else:
            report.extend(inspect_component(sub, name))
    return report


def inspect_transformer_folder(folder: Path) -> FolderReport:
    """Check a lone transformer folder (a `URLs2` expert), or a pipeline folder's `transformer`."""
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder: its transformer is the expert
    return inspect_component(folder, folder.name)


def inspect_single_file(path: Path) -> FolderReport:
    """Check a single-file checkpoint: safetensors only, complete header, data of the promised size."""
    report = FolderReport()
    if path.suffix in PICKLE_SUFFIXES:
        report.problems.append(pickle_refusal(path))
    elif not path.is_file():
        report.missing.append(str(path))
    else:
        _headers([path], report)
    return report


def pickle_refusal(path: Path | str) -> str:
    """The sentence that refuses a pickle checkpoint, naming the file."""
    return (
        f"{path} is a pickle checkpoint ({Path(path).suffix}); only .safetensors files are loaded because "
        "unpickling can run arbitrary code: convert it to .safetensors"
    )
