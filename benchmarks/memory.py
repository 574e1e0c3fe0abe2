"""Peak resident memory of this process (Linux): benchmark instrumentation, kept out of the pipeline's code.

    resident = reset_peak_rss()
    ...                                   # the work to measure
    growth = memory_status()["VmHWM"] - resident
"""

from __future__ import annotations

from pathlib import Path


def memory_status() -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of this process in bytes; empty off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.startswith(("VmRSS", "VmHWM"))}


def reset_peak_rss() -> int | None:
    """Make the peak resident memory start again from now (Linux's clear_refs); the resident bytes now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return memory_status().get("VmRSS")
