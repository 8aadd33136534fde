"""What the benchmark scripts measure the same way (imported from the scripts' own folder)."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, MB). Unlike ``ru_maxrss``, it is not inherited across
    exec from the parent (which may have held the generated recording)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
