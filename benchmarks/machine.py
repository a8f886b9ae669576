"""What the benchmarks record of the machine they ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name(fallback: str | None = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo``; else ``fallback``, else the platform's processor
    string, else ``"unknown CPU"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback or platform.processor() or "unknown CPU"
