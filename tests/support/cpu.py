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

__all__ = ["TestCPU"]

_TICKS = os.sysconf("SC_CLK_TCK")


def _table() -> dict[int, tuple[int, str, int]]:
    """Every process: pid → (parent pid, start time, clock ticks used by it and its reaped children)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), fields[19], sum(int(f) for f in fields[11:15]))
    return out


def tree(root: int) -> dict[tuple[int, str], int]:
    """``root`` and every process under it: (pid, start time) → clock ticks used by it and its reaped children."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out[(pid, table[pid][1])] = table[pid][2]
        todo.extend(children.get(pid, ()))
    return out


def used(before: dict[tuple[int, str], int], after: dict[tuple[int, str], int]) -> float:
    """
    CPU seconds used between two :func:`tree` readings. Approximate: a
    process that ran before and ended between them counts wholly (in its
    parent's reaped children's time) if a process of the tree reaped it,
    else not at all (Chromium's renderers, a process orphaned to init).
    """
    return sum(max(0, ticks - before.get(key, 0)) for key, ticks in after.items()) / _TICKS


class TestCPU:
    """One test's measure: :meth:`begin` before it, :meth:`end` after it."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, path: str) -> None:
        self.path = path
        self._wall = 0.0
        self._before: dict[tuple[int, str], int] = {}

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
