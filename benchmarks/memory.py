"""Peak resident memory of this process (Linux): benchmark instrumentation, kept out of the pipeline's code.

    result, growth = peak_rss_growth(lambda: feature_cache.build(...))   # growth in bytes, None off Linux
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


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


def peak_rss_growth(work: Callable[[], T]) -> tuple[T, int | None]:
    """work()'s result, and the bytes this process's peak resident memory grew by while it ran (None off Linux)."""
    resident = reset_peak_rss()
    result = work()
    peak = memory_status().get("VmHWM")
    return result, None if resident is None or peak is None else peak - resident
