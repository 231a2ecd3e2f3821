"""The machine a figure was measured on: every benchmark and evaluation report states it the same way."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_details(**extra) -> dict:
    """CPU model, cores, torch version and threads, device, load average, Python and platform, plus ``extra``."""
    import torch

    cuda = torch.cuda.is_available()
    details = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if cuda else f"cpu ({os.cpu_count()} cores)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    details.update(extra)
    return details
