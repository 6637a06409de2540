"""
Each test's CPU, recorded when ``DIT4C_TEST_CPU`` names a file: one JSON
line per test (its node id, wall seconds, CPU seconds), appended by every
worker. ``bench/testcpu.py`` turns the file into tables.

A test's CPU is what its worker and every process under it used while the
test ran: the worker's own, the servers forked from its zygote, the pods
those start, its Chromium. Read from ``/proc`` (user + system time, the
reaped children's included) before and after the test, process by
process, so a process that starts and ends within the test counts through
the parent that reaped it (see :func:`used` for what is approximate).
What leaves the tree counts not: containers, whose processes are podman's
``conmon``'s, and a process orphaned to init. On a machine whose cores are
shared by several workers, wall seconds say how long a test waited; CPU
seconds say what it cost the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["TestCPU", "processTable"]

_TICKS = os.sysconf("SC_CLK_TCK")


def processTable() -> dict[int, tuple[int, str, int, int]]:
    """
    Every process: pid → (parent pid, start time, clock ticks it used,
    clock ticks its reaped children used).
    """
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), fields[19], int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return out


#: A process: (pid, start time).
Key = tuple[int, str]


def tree(root: int) -> dict[Key, tuple[int, Key | None]]:
    """``root`` and every process under it: each one's clock ticks (its own and its reaped children's) and parent."""
    table = processTable()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[Key, tuple[int, Key | None]] = {}
    todo: list[tuple[int, Key | None]] = [(root, None)]
    while todo:
        pid, above = todo.pop()
        if pid not in table:
            continue
        key = (pid, table[pid][1])
        out[key] = (table[pid][2] + table[pid][3], above)
        todo.extend((child, key) for child in children.get(pid, ()))
    return out


def used(before: dict[Key, tuple[int, Key | None]], after: dict[Key, tuple[int, Key | None]]) -> float:
    """
    CPU seconds used between two :func:`tree` readings: what each process
    used since the first (all of it, for a new one), less what a process
    gone since had used before, when its parent or an ancestor is still
    there (which reaped it, or reaped what did: the gone one's whole time
    is in its reaped children's now). Approximate where a process leaves
    the tree otherwise: orphaned to init, it counts less than it used.
    """
    ticks = sum(max(0, now - before[key][0] if key in before else now) for key, (now, _) in after.items())
    for key, (then, parent) in before.items():
        if key in after:
            continue
        # Reaped by its parent, or by its parent's parent once that ended too, and so on up.
        while parent is not None and parent not in after:
            parent = before[parent][1] if parent in before else None
        if parent is not None:
            ticks -= then
    return max(0, ticks) / _TICKS


class TestCPU:
    """One test's measure: :meth:`begin` before it, :meth:`end` after it."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, path: str) -> None:
        self.path = path
        self._wall = 0.0
        self._before: dict[Key, tuple[int, Key | None]] = {}

    def begin(self) -> None:
        self._wall = time.monotonic()
        self._before = tree(os.getpid())

    def end(self, test: str) -> None:
        line = {
            "test": test,
            "wall": round(time.monotonic() - self._wall, 3),
            "cpu": round(used(self._before, tree(os.getpid())), 3),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
