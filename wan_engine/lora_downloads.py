"""LoRAs a preset names by URL (Wan2GP's `model.loras`): found by file name, fetched only when allowed.

A Wan2GP definition lists its accelerator LoRAs as Hugging Face file URLs. Here such an entry is
its file name in the LoRA folders (the model's group and Wan2GP subfolders, then each root), as a
Wan2GP install keeps them. When none is there and the worker runs with --allow-download, the file
is fetched from the Hub -- only from a host of the download allow-list (model_sources) and only
`.safetensors` -- and copied into the first LoRA folder. Tasks cannot name URLs: only presets can.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from wan_engine.errors import InvalidRequestError
from wan_engine.loras import LORA_SUFFIX, resolve_lora_path
from wan_engine.model_sources import allowed_download_hosts, check_download_host, parse_source

log = logging.getLogger(__name__)


def is_lora_url(name: str) -> bool:
    """Whether a preset's LoRA entry is a URL rather than a file name."""
    return "://" in name


def lora_file_name(url: str) -> str:
    """The file name a LoRA URL is kept under in a LoRA folder."""
    return Path(unquote(urlsplit(url).path)).name


def preset_lora_path(
    url: str, loras_dirs: Path | Sequence[Path], subdirs: Sequence[str], *, allow_download: bool = False
) -> Path:
    """The local file of a preset's LoRA URL; downloaded into the first LoRA folder when allowed and missing."""
    name = lora_file_name(url)
    if not name.lower().endswith(LORA_SUFFIX):
        raise InvalidRequestError(
            f"LoRA {url!r}: only {LORA_SUFFIX} LoRA files are loaded (pickle files can run code)."
        )
    try:
        return resolve_lora_path(name, loras_dirs, subdirs=subdirs)
    except InvalidRequestError as missing:
        if not allow_download:
            raise InvalidRequestError(
                f"{missing} The preset names it by URL ({url}); nothing is downloaded unless the worker runs "
                "with --allow-download."
            ) from None
    roots = [Path(loras_dirs)] if isinstance(loras_dirs, (str, Path)) else [Path(d) for d in loras_dirs]
    if not roots:
        raise InvalidRequestError(f"LoRA {url!r}: no LoRA folder to download it into (--loras-dir)")
    return _download(url, name, roots[0])


def _download(url: str, name: str, folder: Path) -> Path:
    """Fetch one Hub file (allowed hosts only) and copy it atomically to `folder/name`."""
    host = (urlsplit(url).hostname or "").lower()
    if host not in allowed_download_hosts():
        raise InvalidRequestError(
            f"LoRA {url!r}: host {host!r} is not in the download allow-list ({', '.join(allowed_download_hosts())})"
        )
    source = parse_source(url)
    if source.kind != "hf_file" or source.repo_id is None or source.filename is None:
        raise InvalidRequestError(f"LoRA {url!r}: only Hugging Face file URLs (.../resolve/<rev>/<file>) are fetched")
    from huggingface_hub import constants, hf_hub_download

    check_download_host(constants.ENDPOINT)
    log.warning("downloading LoRA %s into %s", url, folder)
    try:
        cached = Path(hf_hub_download(source.repo_id, source.filename, revision=source.revision))
    except Exception as exc:  # network, auth, missing file: the task fails with the reason
        raise InvalidRequestError(f"LoRA {url!r}: download failed ({exc.__class__.__name__}: {exc})") from exc
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    os.close(handle)
    try:
        shutil.copyfile(cached, temp)
        os.replace(temp, target)  # never a half-written LoRA under its real name
    finally:
        Path(temp).unlink(missing_ok=True)
    return target
