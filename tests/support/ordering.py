"""
The order a parallel run hands tests to its workers in.

pytest-xdist's ``worksteal`` gives each worker a contiguous block of the
collection, and an idle worker takes the back half of the busiest one's
queue. In collection order the long tests (``tests/e2e`` and the others
:func:`isHeavy` names, each half a minute to two minutes of several
servers) sit together in one block, are
stolen late, and all run in the last two minutes while the other workers
have nothing left: the run is as long as that tail. Here each block begins
with its share of them, so they run from the start beside the quick tests,
whose order is kept.

Tests that share a module- or package-scoped fixture stay together (split,
each worker would set the fixture up again).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

#: Where the whole-installation tests live, and the private Tor networks'.
HEAVY_DIRECTORIES = tuple(Path(__file__).resolve().parents[1] / name for name in ("e2e", "tor"))

#: Modules elsewhere whose tests each take a real cluster, container or
#: JupyterLab (a Slurm job waits out its minute-long time limit): as long as
#: whole-installation tests, and as badly placed at the end.
HEAVY_MODULES = ("slurm", "podman", "jupyterlab")


def isHeavy(item: pytest.Item) -> bool:
    """Whether ``item`` is one of the long tests, to be started early."""
    return any(d in item.path.parents for d in HEAVY_DIRECTORIES) or any(
        word in item.path.stem for word in HEAVY_MODULES
    )


def _sharedFixtures(item: pytest.Item) -> set[object]:
    """The module-, package- or class-scoped fixtures ``item`` uses (each set up once for the tests that share it)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        d
        for defs in info.name2fixturedefs.values()
        for d in defs
        if d.scope in ("module", "package", "class") and d.baseid
    }


def units(items: Sequence[pytest.Item]) -> list[list[pytest.Item]]:
    """``items`` in runs that must stay on one worker: the tests that share such a fixture, else one test."""
    out: list[list[pytest.Item]] = []
    unitOf: dict[object, list[pytest.Item]] = {}
    for item in items:
        mine = _sharedFixtures(item)
        unit = next((unitOf[d] for d in mine if d in unitOf), None)
        if unit is None:
            unit = []
            out.append(unit)
        unit.append(item)
        for d in mine:
            unitOf.setdefault(d, unit)
    return out


def spread(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` reordered so that each of ``workers`` blocks starts with its share of the heavy tests."""
    heavy = units([i for i in items if isHeavy(i)])
    light = [i for i in items if not isHeavy(i)]
    if not heavy or workers < 2:
        return items
    ordered: list[pytest.Item] = []
    taken = 0
    for k in range(workers):
        # The block worksteal hands worker k: what is left, shared out evenly among the workers left.
        size = (len(items) - len(ordered)) // (workers - k)
        mine = [i for unit in heavy[k::workers] for i in unit]
        rest = max(0, size - len(mine)) if k < workers - 1 else len(light) - taken
        ordered += mine + light[taken : taken + rest]
        taken += rest
    assert len(ordered) == len(items), (len(ordered), len(items))
    return ordered
