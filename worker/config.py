"""Worker settings: one frozen value built from CLI flags and WAN_* environment variables.

`EnvironmentSettings` (pydantic-settings) reads and checks every WAN_* variable the CLI takes, in one place:
the parser takes its defaults from it, a bad value is one `error:` line naming the variable and what is
allowed (exit 2), and the README's flag table is generated from it and the parser (worker.cli.flag_table).
`WorkerSettings` is what `run` hands the worker once flags are applied.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.store.schema import DEFAULT_DB_URL

LEASE_S = 60.0  # a task whose worker is silent this long is re-queued
HEARTBEAT_INTERVAL_S = 1.0  # lease renewal + progress write + cancel check, from a background thread
POLL_INTERVAL_S = 1.0  # idle wait between claim attempts
STALE_SWEEP_INTERVAL_S = 15.0  # how often a running worker looks for other workers' expired leases
DB_STARTUP_WAIT_S = 120.0  # `run` waits this long for a database that is not up yet (a reboot, a restart)
DB_RETRY_MAX_S = 30.0  # longest back-off between attempts to reach a lost database


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `wan-worker run` needs; defaults are the documented ones."""

    db_url: str = DEFAULT_DB_URL
    models_dir: Path = Path("models")
    outputs_dir: Path = Path("outputs")
    # Extra preset / Wan2GP definition folders, in order (a later one overrides an earlier one).
    presets_dir: Path | tuple[Path, ...] | None = None
    # LoRA folders, in order (empty: the worker's own loras/); each also looked in under wan/, wan2_2/
    # and Wan2GP's subfolders, so a Wan2GP loras/ or a ComfyUI models/loras folder serves as it is.
    loras_dirs: tuple[Path, ...] = ()
    input_roots: tuple[Path, ...] = (Path("."),)
    lease_s: float = LEASE_S
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    poll_interval_s: float = POLL_INTERVAL_S
    stale_sweep_interval_s: float = STALE_SWEEP_INTERVAL_S
    worker_id: str = field(default_factory=default_worker_id)
    preload_model: str | None = None
    allow_download: bool = False  # fetch missing Hub weights when a task needs them (off: never)
    allow_fallbacks: bool = False  # run a preset's `fallbacks` when its own weights are unavailable
    parallel: int = 1  # ranks of this worker's group: every generation is split over all of them

    def __post_init__(self) -> None:
        if self.lease_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_s {self.lease_s} must be at least 3 x heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.parallel < 1:
            raise ValueError(f"parallel {self.parallel}: must be at least 1")


ENV_PREFIX = "WAN_"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class ConfigError(ValueError):
    """A WAN_* variable holds a value its setting cannot take; the message is one line naming both."""


class EnvironmentSettings(BaseSettings):
    """Every WAN_* environment variable of the CLI, typed. Field `x` is variable `WAN_X`; flags override it.

    Lists of folders stay text (os.pathsep-separated) and are split where they are used.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    db_url: str = DEFAULT_DB_URL
    models_dir: Path = Path("models")
    outputs_dir: Path = Path("outputs")
    presets_dir: str | None = None
    loras_dir: str | None = None
    input_roots: str | None = None
    lease_seconds: float = Field(LEASE_S, gt=0)
    worker_id: str | None = None
    preload_model: str | None = None
    allow_download: bool = False
    allow_fallbacks: bool = False
    db_startup_wait_seconds: float = Field(DB_STARTUP_WAIT_S, ge=0)
    gpus: str | None = None
    parallel: int = Field(1, ge=1)
    fp8: bool = False
    vram_limit_gb: float | None = Field(None, gt=0)
    http: str | None = None
    http_token: str | None = Field(None, repr=False)
    http_token_file: Path | None = None
    log_level: str = "info"
    log_json: bool = False
    # Read where they are used (the engine), checked here too so that a bad value stops `wan-worker` at once.
    download_hosts: str | None = None
    speed: bool = True
    attention_backend: str = "auto"
    compile: bool = True
    compile_dynamic: Literal["mark", "auto", "off"] = "mark"
    compile_policy: Literal["pays", "always"] = "pays"
    compile_cache_dir: str | None = None
    mp4_preset: Literal[X264_PRESETS] = "veryfast"  # type: ignore[valid-type]
    overlap_decode: Literal["auto", "on", "off"] = "auto"
    vae_precision: Literal["auto", "32", "16", "bf16"] = "auto"
    pinned_cache_gb: float | None = Field(None, ge=0)
    parallel_timeout_s: float = Field(600.0, gt=0)

    @field_validator(
        "compile_dynamic", "compile_policy", "mp4_preset", "overlap_decode", "vae_precision", mode="before"
    )
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


# Variables that are read where they are used and have no flag (they still belong to the settings above).
ENV_ONLY = {
    "download_hosts": "hosts downloads (weights, LoRAs, input URLs) may come from, comma-separated (default "
    "huggingface.co)",
    "speed": "off: plain diffusers (default attention, no compile); see Performance",
    "attention_backend": "a diffusers attention backend name instead of the probe (auto)",
    "compile": "off: keep the attention choice, skip torch.compile",
    "compile_dynamic": "mark, auto or off: how compiled code covers new shapes",
    "compile_policy": "pays or always: compile only where the task's steps earn it back, or every task",
    "compile_cache_dir": "torch's on-disk compile caches (default <models dir>/.compile_cache; off: torch's own)",
    "mp4_preset": "the x264 preset MP4s are written with",
    "overlap_decode": "auto, on or off: a finished task's VAE decode runs beside the next task (auto: on CUDA)",
    "vae_precision": "the VAE's dtype: auto (float16 on CUDA, float32 elsewhere), 32, 16 (float16) or bf16",
    "pinned_cache_gb": "host RAM for models parked after a switch (default half the RAM on a GPU machine)",
    "parallel_timeout_s": "longest wait for a peer in a --parallel group's collective",
}


def environment_settings() -> EnvironmentSettings:
    """The WAN_* variables of this moment; `ConfigError` (one line) when one holds a bad value."""
    try:
        return EnvironmentSettings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}={os.environ.get(name, error.get('input'))!r}: {error['msg']}")
        raise ConfigError("; ".join(problems)) from None


def parse_input_roots(value: str | None) -> tuple[Path, ...]:
    """`a:b` (os.pathsep-separated) or comma-separated directories."""
    if not value:
        return (Path("."),)
    separator = "," if "," in value else os.pathsep
    return tuple(Path(part).expanduser() for part in value.split(separator) if part.strip())


def parse_dirs(value: str | None) -> tuple[Path, ...]:
    """Directories from an os.pathsep-separated setting (WAN_PRESETS_DIR, WAN_LORAS_DIR); '' and None: none."""
    if not value:
        return ()
    return tuple(Path(part).expanduser() for part in value.split(os.pathsep) if part.strip())
