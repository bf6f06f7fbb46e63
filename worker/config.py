"""Worker settings: one frozen value built from CLI flags and WAN_* environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
    presets_dir: Path | None = None
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


ENV_VARS = {
    "db_url": "WAN_DB_URL",
    "models_dir": "WAN_MODELS_DIR",
    "outputs_dir": "WAN_OUTPUTS_DIR",
    "presets_dir": "WAN_PRESETS_DIR",
    "input_roots": "WAN_INPUT_ROOTS",
    "lease_s": "WAN_LEASE_SECONDS",
    "worker_id": "WAN_WORKER_ID",
    "preload_model": "WAN_PRELOAD_MODEL",
    "allow_download": "WAN_ALLOW_DOWNLOAD",
    "allow_fallbacks": "WAN_ALLOW_FALLBACKS",
    "gpus": "WAN_GPUS",
    "parallel": "WAN_PARALLEL",
}


def env_default(name: str, fallback: str | None = None) -> str | None:
    """The WAN_* environment value for a setting, else the fallback."""
    return os.environ.get(ENV_VARS[name], fallback)


def parse_input_roots(value: str | None) -> tuple[Path, ...]:
    """`a:b` (os.pathsep-separated) or comma-separated directories."""
    if not value:
        return (Path("."),)
    separator = "," if "," in value else os.pathsep
    return tuple(Path(part).expanduser() for part in value.split(separator) if part.strip())
