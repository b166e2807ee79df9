"""Memory probes: read the peak memory since the last reset, and reset it.

Three ways, one interface (`start`, `peak`, `reset`, `current`, `stop`, `describe`); numbers are GiB:

- `CudaProbe` (a CUDA device): the caching allocator's `torch.cuda.max_memory_allocated` (tensors) and
  `torch.cuda.max_memory_reserved` (what the allocator holds from the driver), reset with
  `torch.cuda.reset_peak_memory_stats`. Exact; other processes and the CUDA context are not counted.
- `ProcfsRssProbe` (Linux): the kernel's own high-water mark of the process's resident memory, `VmHWM` in
  `/proc/self/status`, reset by writing "5" to `/proc/self/clear_refs`. Exact: no allocation is missed, however
  short-lived.
- `SampledRssProbe` (elsewhere): a background thread samples the resident memory with psutil every
  `interval_s` seconds; a spike shorter than the interval can be missed.

The RSS probes report `peak_rss_above_baseline_gb`: the peak resident memory minus the resident memory at
`start()` (fit start, model on its device). It is negative when the process holds less than it did then.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import psutil
import torch

from dvpo_lightning.callbacks.reports import GIB

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class CudaProbe:
    """Peak allocated and reserved memory of one CUDA device, from the caching allocator."""

    method = "CUDA allocator peaks"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        self.reset()

    def peak(self) -> dict[str, float]:
        return {
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated(self.device) / GIB,
            "max_memory_reserved_gb": torch.cuda.max_memory_reserved(self.device) / GIB,
        }

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def current(self) -> dict[str, float]:
        return {}

    def stop(self) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"method": self.method}


class _RssProbe(ABC):
    """What both RSS probes share: the baseline and the current resident memory."""

    method = ""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.baseline_bytes = 0

    def _rss_bytes(self) -> int:
        return self._process.memory_info().rss

    @abstractmethod
    def _peak_bytes(self) -> int:
        """Largest resident memory since the last reset, in bytes."""

    @abstractmethod
    def reset(self) -> None:
        """Start a new peak from the memory held now."""

    def start(self) -> None:
        self.baseline_bytes = self._rss_bytes()
        self.reset()

    def peak(self) -> dict[str, float]:
        return {"peak_rss_above_baseline_gb": (self._peak_bytes() - self.baseline_bytes) / GIB}

    def current(self) -> dict[str, float]:
        return {"rss_gb": self._rss_bytes() / GIB}

    def stop(self) -> None:  # noqa: B027 - a hook: only the sampling probe has a thread to stop
        pass

    def describe(self) -> dict[str, object]:
        return {"method": self.method, "baseline_rss_gb": self.baseline_bytes / GIB}


class ProcfsRssProbe(_RssProbe):
    """Linux: the kernel's resident-memory high-water mark (VmHWM), reset through /proc/self/clear_refs."""

    method = "VmHWM (the kernel's resident-memory high-water mark)"

    @staticmethod
    def available() -> bool:
        """True if this process may reset its high-water mark and read it back."""
        try:
            _CLEAR_REFS.write_text("5")
            return "VmHWM:" in _STATUS.read_text()
        except OSError:
            return False

    def _peak_bytes(self) -> int:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                kib = int(line.split()[1])  # the kernel writes "VmHWM:  123456 kB"
                return kib * 1024
        raise RuntimeError(f"no VmHWM line in {_STATUS}")

    def reset(self) -> None:
        _CLEAR_REFS.write_text("5")


class SampledRssProbe(_RssProbe):
    """Anywhere psutil runs: the largest resident memory seen by a thread sampling every `interval_s` seconds."""

    method = "resident memory sampled by psutil"

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._max_bytes = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._sample, name="dvpo-rss-sampler", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._raise_max(self._rss_bytes())

    def _raise_max(self, rss_bytes: int) -> None:
        with self._lock:
            self._max_bytes = max(self._max_bytes, rss_bytes)

    def _peak_bytes(self) -> int:
        # The memory held right now counts even if no sample has seen it yet.
        self._raise_max(self._rss_bytes())
        return self._max_bytes

    def reset(self) -> None:
        with self._lock:
            self._max_bytes = self._rss_bytes()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()
            self._thread.join()
            self._thread = None

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "sampling_interval_s": self.interval_s}


def make_probe(device: torch.device) -> CudaProbe | ProcfsRssProbe | SampledRssProbe:
    """The exact probe for `device`: CUDA statistics on a CUDA device, else the process's RSS (procfs if possible)."""
    if device.type == "cuda":
        return CudaProbe(device)
    return ProcfsRssProbe() if ProcfsRssProbe.available() else SampledRssProbe()
