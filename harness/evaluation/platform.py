"""The platform that produced a result: numerics differ between CPUs and kernels, so every record
says where it came from (the leaderboard warns when its rows come from more than one; which fields
must match is :func:`harness.evaluation.stats.platform_identity`)."""

from __future__ import annotations

import os
import platform as _platform
from typing import Any

import torch

#: environment variables that change which kernels torch runs (and so how results round)
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "CUBLAS_WORKSPACE_CONFIG")


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def platform_info(device: str | None = None) -> dict[str, Any]:
    """torch version, device, CPU capability, threads, GPU name, Python, machine, kernel env.

    ``device`` is where the run computed (``"cpu"`` or ``"cuda"``); default: cuda if available.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": "cuda" if on_gpu else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "python": _platform.python_version(),
        "machine": _platform.machine(),
        "processor": _processor(),
        "peak_mem_method": "cuda_max_allocated" if on_gpu else "rss_rise",
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }
