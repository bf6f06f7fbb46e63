"""Where the worker may read inputs and write outputs (security rules of docs/DESIGN.md)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from worker.tasks.params import InvalidTaskError

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def resolve_input_path(value: str, input_roots: list[Path], outputs_dir: Path, *, key: str) -> Path:
    """Resolve a user-given input file; it must exist inside an input root or the outputs dir.

    Symlinks are resolved first, so a link pointing outside the roots is refused like `../..` is.
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidTaskError(f"{key} must be a non-empty file path, got {value!r}")
    roots = [root.resolve() for root in [*input_roots, outputs_dir]]
    raw = Path(value)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            continue
        if resolved.is_file():
            return resolved
    allowed = ", ".join(str(root) for root in roots)
    raise InvalidTaskError(
        f"{key} {value!r} is not a readable file inside the input roots or the outputs dir ({allowed})"
    )


def output_stem(task_id: str) -> str:
    """A file-name-safe stem for a task's output; ids from other programs can hold anything."""
    if _SAFE_ID.match(task_id) and not task_id.startswith("."):
        return task_id
    return "task-" + hashlib.sha256(task_id.encode("utf-8", "replace")).hexdigest()[:24]
