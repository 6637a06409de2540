"""
What is mounted where, from the kernel's list alone (``/proc/self/mountinfo``).

Standard library only: the tool launcher (:mod:`dit4c.node.confine`) uses
it before it execs a tool, and it must not pay for importing Twisted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["isMount", "mountPoints"]


def mountPoints() -> set[str]:
    """Every mount point, from ``/proc/self/mountinfo`` (bind mounts too, which ``ismount`` misses)."""
    points: set[str] = set()
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return points
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            # Spaces and the like are octal escapes: \040.
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def isMount(path: str | Path, points: set[str] | None = None) -> bool:
    """
    Whether ``path`` is a mount point, from the kernel's list alone: no
    ``stat`` of it, which on a FUSE mount waits for its server (and the
    file server may be served by this very reactor: ``dit4c-dev``).
    """
    known = mountPoints() if points is None else points
    return os.path.abspath(path) in known
