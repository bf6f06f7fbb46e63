"""Inputs given as http(s) URLs (Headless-Wan2GP rows name Supabase image URLs and Hugging Face LoRA URLs).

A URL is fetched only from a host in the download allow-list (`WAN_DOWNLOAD_HOSTS`, default huggingface.co,
the same list model downloads obey), over https (http only for a loopback host, as tests use), with a size
cap, into a folder of ours; the file is written under a temporary name and renamed when complete, so a
killed fetch never leaves a half file that a later run would take for the input.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from wan_engine.errors import ModelUnavailableError
from wan_engine.model_sources import check_download_host
from worker.tasks.params import InvalidTaskError

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_LORA_BYTES = 4 * 1024 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0
_CHUNK = 1024 * 1024


class FetchFailed(RuntimeError):
    """A URL could not be fetched (network, server): not the row's fault, so the attempt is retried."""


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _check_url(url: str, key: str) -> None:
    try:
        check_download_host(url)  # the allow-list model downloads obey
    except ModelUnavailableError as refused:
        raise InvalidTaskError(f"{key}: {refused}") from None
    parts = urlsplit(url)
    if parts.scheme != "https" and not _loopback((parts.hostname or "").lower()):
        raise InvalidTaskError(f"{key} = {url!r}: only https URLs are fetched")


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_url(url: str, directory: Path, key: str, max_bytes: int, name: str | None = None) -> Path:
    """The local copy of `url` in `directory` (fetched unless already there); errors name `key` and the URL."""
    _check_url(url, key)
    base = name or unquote(PurePosixPath(urlsplit(url).path).name) or "download"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = directory / (base if name else f"{digest}-{base}")
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{target.name}.{os.getpid()}.part"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "wan-worker"})
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response, partial.open("wb") as out:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InvalidTaskError(f"{key} = {url!r}: {declared} bytes; at most {max_bytes} bytes are fetched")
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidTaskError(f"{key} = {url!r}: larger than {max_bytes} bytes; not fetched")
                out.write(chunk)
        partial.replace(target)
    except InvalidTaskError:
        raise
    except OSError as exc:  # URLError and HTTPError are OSErrors: transient, the attempt is retried
        raise FetchFailed(f"{key} = {url!r}: could not be fetched ({exc})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
