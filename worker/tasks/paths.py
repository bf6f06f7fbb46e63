"""Where the worker may read inputs and write outputs (security rules of docs/DESIGN.md).

Inputs are opened once, here, and checked on the open descriptor; the decoders read that descriptor
(docs/RELIABILITY.md, "Inputs opened once").
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from wan_engine.video_io import NotARegularFile, OpenedInput, descriptor_path
from worker.tasks.params import InvalidTaskError

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# The shape of a hashed stem (any case: outputs may live on a case-insensitive file system).
_HASHED_STEM = re.compile(r"^task-[0-9a-f]{24}$", re.IGNORECASE)


def open_input(value: str, input_roots: list[Path], outputs_dir: Path, *, key: str) -> OpenedInput:
    """Open a user-given input file once, inside an input root or the outputs dir, and check the open file.

    Symlinks are resolved first, so a link pointing outside the roots is refused like `../..` is. The
    resolved path is then opened with O_NOFOLLOW (a link swapped in since fails) and O_NONBLOCK (a FIFO
    cannot hang the worker); anything but a regular file is refused, and the descriptor's own real path
    must lie inside the roots (a parent directory swapped since is caught too). Every later read goes
    through the returned descriptor, never the path: close it (or use `with`) once the inputs are read.
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidTaskError(f"{key} must be a non-empty file path, got {value!r}")
    roots = [root.resolve() for root in [*input_roots, outputs_dir]]
    raw = Path(value)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    reason = ""
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _inside(resolved, roots):
            continue
        try:
            opened = OpenedInput.open(resolved, follow_symlinks=False)
        except NotARegularFile as exc:
            reason = f": {exc.strerror}"  # a FIFO, a directory ...
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                reason = f": {exc.strerror}"  # unreadable, or a symlink swapped in (ELOOP)
            continue
        if _descriptor_inside(opened, resolved, roots):
            return opened
        opened.close()
        reason = ": it moved outside them while it was opened"
    allowed = ", ".join(str(root) for root in roots)
    raise InvalidTaskError(
        f"{key} {value!r} is not a readable file inside the input roots or the outputs dir ({allowed}){reason}"
    )


def resolve_input_path(value: str, input_roots: list[Path], outputs_dir: Path, *, key: str) -> Path:
    """Check a user-given input file as `open_input` does and return its real path; the file is closed again.

    For checks only (a travel's key images, read later by its segments): a path can be swapped after it is
    checked, so whatever reads an input must read what `open_input` opened, not this path.
    """
    with open_input(value, input_roots, outputs_dir, key=key) as opened:
        return opened.path


def close_inputs(values: dict[str, Any]) -> None:
    """Close every `OpenedInput` among `values` (single values and lists), e.g. a generation's inputs."""
    for value in values.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, OpenedInput):
                item.close()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _descriptor_inside(opened: OpenedInput, resolved: Path, roots: list[Path]) -> bool:
    """Whether the file open in `opened` lies inside the roots, judged on the descriptor itself."""
    real = descriptor_path(opened.fileno())
    if real is not None:  # Linux: the kernel's name for the open file, whatever happened to the path since
        return _inside(real, roots)
    # No /proc: the checked path must still name this very file (device and inode) and still resolve inside.
    try:
        info = os.stat(resolved)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == opened.identity and _inside(resolved.resolve(), roots)


def output_stem(task_id: str) -> str:
    """A file-name-safe stem for a task's output; ids from other programs can hold anything.

    Injective: a safe id is its own stem, any other id becomes `task-<sha256[:24]>`, and a safe id that has
    the shape of a hashed name is hashed too, so no client-chosen id can name another task's output.
    """
    if _SAFE_ID.match(task_id) and not task_id.startswith(".") and not _HASHED_STEM.match(task_id):
        return task_id
    # surrogatepass: two different ids holding lone surrogates must not encode to the same bytes ("replace").
    return "task-" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
