"""Cost that belongs to the stage that spent it: wall time and peak memory per stage.

Peak memory on a GPU is the allocator's peak during the stage
(``torch.cuda.reset_peak_memory_stats`` at its start, ``max_memory_allocated`` at its end). On a
CPU, ``ru_maxrss`` is the peak of the whole process, which in a multirun sweep includes every
earlier job; instead a sampling thread reads the resident set size (``/proc/self/statm``) every
``interval`` seconds and the stage reports the **rise** of the RSS over its value at the stage's
start (``peak - start``). Before the start is read, garbage is collected and glibc's
``malloc_trim(0)`` hands the allocator's free memory back to the system, so memory that an earlier
stage freed is not silently reused by this one and counted as nothing. Memory the process still
holds (a cached model, live tensors) is not counted again; what the stage allocated and freed
between two samples may be missed, so the figure is a lower bound at the sampling resolution.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import threading
import time
from dataclasses import dataclass, field

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """The resident set size of this process now (MiB); falls back to ru_maxrss off Linux."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Collect garbage and return the C allocator's free memory to the system (glibc only)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class StageCost:
    """What one stage spent: ``wall_s``, ``peak_mem_mb`` and whether it came from the cache."""

    wall_s: float = 0.0
    peak_mem_mb: float = 0.0
    cached: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, stage: str) -> dict[str, float]:
        """``cost/<stage>/wall_s``, ``cost/<stage>/peak_mem_mb``, ``cost/<stage>/cached``, extras."""
        out = {f"cost/{stage}/wall_s": self.wall_s, f"cost/{stage}/peak_mem_mb": self.peak_mem_mb,
               f"cost/{stage}/cached": float(self.cached)}
        out.update({f"cost/{stage}/{k}": v for k, v in self.extra.items()})
        return out


class StageMeter:
    """Context manager timing a stage and measuring its peak memory (see the module docstring)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.cost = StageCost()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu = torch.cuda.is_available()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_mb())

    def __enter__(self) -> StageMeter:
        self._t0 = time.perf_counter()
        if self._gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()
            self._start = self._peak = rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cost.wall_s = time.perf_counter() - self._t0
        if self._gpu:
            self.cost.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, rss_mb())
            self.cost.peak_mem_mb = self._peak - self._start
