"""Resource monitoring: GPU memory, utilisation and temperature (pynvml), and this process's RSS (psutil).

A background thread samples every `interval_s`. Each task gets a window (peak and mean of every
sample taken while it ran, stored in result_data["monitor"]). When GPU memory in use passes
`warn_fraction` of the budget, `on_warning` is called once; it re-arms after use falls back below
5 points below it. A machine without a GPU (no NVML library, no driver, no device) is handled by
reporting the GPU fields as None.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)

GIB = 1024**3
WARN_FRACTION = 0.9
REARM_MARGIN = 0.05  # hysteresis: one warning per excursion above the line, not one per sample


@dataclass(frozen=True)
class GpuReading:
    """One NVML reading of the device."""

    used_bytes: int
    total_bytes: int
    utilization_percent: float | None
    temperature_c: float | None


@dataclass(frozen=True)
class Sample:
    """One sample: the GPU (None without one) and this process's resident memory."""

    ts: float
    gpu: GpuReading | None
    rss_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form, sizes in GiB."""
        gpu = self.gpu
        return {
            "ts": round(self.ts, 3),
            "rss_gb": round(self.rss_bytes / GIB, 3),
            "vram_used_gb": round(gpu.used_bytes / GIB, 3) if gpu else None,
            "vram_total_gb": round(gpu.total_bytes / GIB, 3) if gpu else None,
            "gpu_utilization": gpu.utilization_percent if gpu else None,
            "gpu_temperature_c": gpu.temperature_c if gpu else None,
        }


class NvmlProbe:
    """Reads one GPU through NVML; `available` is False (and stays so) when NVML cannot be used."""

    def __init__(self, index: int | None = None) -> None:
        if index is None:  # the GPU this process uses (a `--gpus` child sees one, NVML numbers them all)
            from wan_engine.vram import nvml_index

            index = nvml_index()
        self.index = index
        self.name: str | None = None
        self._handle: Any = None
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception as exc:  # not installed, no library, no driver, no device
            log.debug("no GPU monitoring: %s", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> GpuReading | None:
        """The current reading, or None (a failing device is dropped, not retried in a loop)."""
        if self._nvml is None:
            return None
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:
            log.warning("GPU monitoring stopped: %s", exc)
            self._nvml = None
            return None
        return GpuReading(int(memory.used), int(memory.total), _optional(self._utilization), _optional(self._temp))

    def _utilization(self) -> float:
        return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def _temp(self) -> float:
        return float(self._nvml.nvmlDeviceGetTemperature(self._handle, self._nvml.NVML_TEMPERATURE_GPU))


def _optional(read: Callable[[], float]) -> float | None:
    try:
        return read()
    except Exception:  # some GPUs (MIG slices, vGPUs) do not report utilisation or temperature
        return None


class _Window:
    """Running peak / mean of the samples taken during one task."""

    def __init__(self) -> None:
        self.samples = 0
        self.gpu_samples = 0
        self.rss_sum = self.rss_peak = 0
        self.vram_sum = self.vram_peak = 0
        self.util_sum = 0.0
        self.util_samples = 0
        self.temp_peak: float | None = None

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.rss_sum += sample.rss_bytes
        self.rss_peak = max(self.rss_peak, sample.rss_bytes)
        gpu = sample.gpu
        if gpu is None:
            return
        self.gpu_samples += 1
        self.vram_sum += gpu.used_bytes
        self.vram_peak = max(self.vram_peak, gpu.used_bytes)
        if gpu.utilization_percent is not None:
            self.util_sum += gpu.utilization_percent
            self.util_samples += 1
        if gpu.temperature_c is not None:
            self.temp_peak = max(self.temp_peak or gpu.temperature_c, gpu.temperature_c)

    def summary(self) -> dict[str, Any]:
        n, g = max(self.samples, 1), max(self.gpu_samples, 1)
        return {
            "samples": self.samples,
            "rss_peak_gb": round(self.rss_peak / GIB, 3),
            "rss_mean_gb": round(self.rss_sum / n / GIB, 3),
            "vram_peak_gb": round(self.vram_peak / GIB, 3) if self.gpu_samples else None,
            "vram_mean_gb": round(self.vram_sum / g / GIB, 3) if self.gpu_samples else None,
            "gpu_utilization_mean": round(self.util_sum / self.util_samples, 1) if self.util_samples else None,
            "gpu_temperature_max_c": self.temp_peak,
        }


class ResourceMonitor:
    """Samples the GPU and the process in a background thread; per-task windows and VRAM warnings."""

    def __init__(
        self,
        interval_s: float = 0.5,
        budget_bytes: int | None = None,
        warn_fraction: float = WARN_FRACTION,
        on_warning: Callable[[dict[str, Any]], None] | None = None,
        probe: Any = None,
    ) -> None:
        self.interval_s = interval_s
        self.probe = probe if probe is not None else NvmlProbe()
        self.budget_bytes = budget_bytes
        self.warn_fraction = warn_fraction
        self.on_warning = on_warning
        self.latest: Sample | None = None
        self.task_id: str | None = None
        self._window: _Window | None = None
        self._armed = True
        self._process = psutil.Process(os.getpid())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def gpu_name(self) -> str | None:
        return getattr(self.probe, "name", None)

    def start(self) -> ResourceMonitor:
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="resource-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # monitoring must never take the worker down
                log.debug("monitor sample failed: %s", exc)

    def sample(self) -> Sample:
        """Take one sample now (also called by the thread): update the window, maybe warn."""
        sample = Sample(time.time(), self.probe.read(), self._process.memory_info().rss)
        warning = None
        with self._lock:
            self.latest = sample
            if self._window is not None:
                self._window.add(sample)
            warning = self._check_budget(sample)
        if warning is not None and self.on_warning is not None:
            self.on_warning(warning)
        return sample

    def _check_budget(self, sample: Sample) -> dict[str, Any] | None:
        gpu = sample.gpu
        if gpu is None:
            return None
        budget = self.budget_bytes or gpu.total_bytes
        fraction = gpu.used_bytes / budget if budget else 0.0
        if fraction < self.warn_fraction - REARM_MARGIN:
            self._armed = True
        if fraction < self.warn_fraction or not self._armed:
            return None
        self._armed = False
        return {
            "task_id": self.task_id,
            "used_gb": round(gpu.used_bytes / GIB, 3),
            "budget_gb": round(budget / GIB, 3),
            "percent": round(100 * fraction, 1),
        }

    def begin_task(self, task_id: str) -> None:
        """Start a task's window."""
        with self._lock:
            self.task_id, self._window = task_id, _Window()
        self.sample()

    def end_task(self) -> dict[str, Any]:
        """Close the window: peak and mean over the task (one last sample included)."""
        self.sample()
        with self._lock:
            window, self._window, self.task_id = self._window, None, None
        return (window or _Window()).summary()

    def vram_gb(self) -> float | None:
        """GPU memory in use now (latest sample), for progress reports."""
        sample = self.latest
        return round(sample.gpu.used_bytes / GIB, 3) if sample and sample.gpu else None
