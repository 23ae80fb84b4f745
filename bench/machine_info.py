"""What a GPU benchmark records about the machine it ran on (shared by bench/gpu_*.py, which also
run on a lent device machine from the repository root: only the standard library here)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gpu_info() -> dict:
    """The first GPU's name, driver and memory from nvidia-smi; {} without one."""
    try:
        row = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        name, driver, memory = [part.strip() for part in row.splitlines()[0].split(",")]
        return {"name": name, "driver": driver, "memory": memory}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {}
