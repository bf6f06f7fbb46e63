"""Where the worker may read inputs and write outputs (security rules of docs/DESIGN.md)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from worker.tasks.params import InvalidTaskError

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# The shape of a hashed stem (any case: outputs may live on a case-insensitive file system).
_HASHED_STEM = re.compile(r"^task-[0-9a-f]{24}$", re.IGNORECASE)


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
    """A file-name-safe stem for a task's output; ids from other programs can hold anything.

    Injective: a safe id is its own stem, any other id becomes `task-<sha256[:24]>`, and a safe id that has
    the shape of a hashed name is hashed too, so no client-chosen id can name another task's output.
    """
    if _SAFE_ID.match(task_id) and not task_id.startswith(".") and not _HASHED_STEM.match(task_id):
        return task_id
    # surrogatepass: two different ids holding lone surrogates must not encode to the same bytes ("replace").
    return "task-" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
