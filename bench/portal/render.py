#!/usr/bin/env python3
"""How long the portal takes to make the instances page's HTML (``GET /``).

The page's template (``dit4c/portal/templates/home.html``) rendered in this
process with the context the portal gives it (``pageview.homeContext``),
for a person with ``--instances`` instances and a catalogue and saved
images of ``--images``: milliseconds per render (best of ``--rounds``) and
the page's size. Under ``wrk`` the page's HTML is the largest part of a
portal process's CPU per request (docs/performance.md); this measures that
part alone, without the HTTP server, the store or the machine's load.
Prints a markdown table; never passes or fails.

    python bench/portal/render.py
    python bench/portal/render.py --instances 50 --images 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: tables
sys.path.insert(0, str(HERE.parent.parent))  # the dit4c package from this checkout

from plumbing import Run  # noqa: E402
from tables import heading, machine, markdown  # noqa: E402

from dit4c.common.life import State  # noqa: E402
from dit4c.portal.pageview import homeContext  # noqa: E402
from dit4c.portal.store.model import Image, Instance, User  # noqa: E402
from dit4c.portal.web import Pages  # noqa: E402

#: The states a person's instances are in, in turn.
STATES = (State.RUNNING, State.STOPPED, State.SAVED, State.ERRORED, State.STARTING)


def context(instances: int, images: int) -> dict[str, Any]:
    """What ``Portal.homePage`` gives the template for such a person."""
    me = User("u-me", "alice", None, None, "Alice", False, None, 0.0, False)
    catalogue = [Image(f"c{n:03d}", f"Tool number {n}", f"docker.io/x/t{n}:latest", None, None, None, 0.0, False) for n in range(images)]
    saved = [Image(f"s{n:03d}", f"Saved <work> {n}", f"https://images/{n}", "sha256:" + "0" * 64, me.id, None, 0.0, False) for n in range(images)]
    rows = [
        Instance(
            f"i{n:03d}-0123456789abcdef", me.id, catalogue[n % images].id if images else "?", "s1",
            STATES[n % len(STATES)], "ran out of memory" if STATES[n % len(STATES)] is State.ERRORED else None,
            f"https://i{n:03d}-0123456789abcdef.apps.example.org/", None, 0.0, 0.0,
        )  # fmt: skip
        for n in range(instances)
    ]
    allImages = catalogue + saved
    view = SimpleNamespace(
        user=me, instances=rows, shared=[], images=allImages, imageNames={i.id: i.name for i in allImages},
        schedulers=[], sharedCounts={rows[0].id: 2} if rows else {},
    )  # fmt: skip
    return {"user": me, "csrf": "c" * 43, "quota": 5, **homeContext(view)}  # type: ignore[arg-type]


def measure(instances: int, images: int, renders: int, rounds: int) -> tuple[float, int]:
    """Milliseconds per render (best round) and the page's size in bytes."""
    template = Pages().templates.get_template("home.html")
    values = context(instances, images)
    page = template.render(**values)
    for _ in range(renders // 10):
        template.render(**values)
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(renders):
            template.render(**values)
        best = min(best, (time.perf_counter() - began) / renders)
    return best * 1000, len(page.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--images", type=int, default=10, help="catalogue entries, and as many saved images")
    p.add_argument("--renders", type=int, default=1000, help="renders per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write every figure here too")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with Run("bench/portal/render.py", argv, "dit4c-bench-render-", 0) as run:
        for instances in sorted({0, args.instances}):
            ms, size = measure(instances, args.images, args.renders, args.rounds)
            results[f"{instances} instances"] = {"ms": ms, "bytes": size}
    rows = [
        [f"{k}, {args.images} + {args.images} images", f"{v['ms']:.3f}", f"{v['bytes'] / 1000:.1f}"] for k, v in results.items()
    ]
    vers = machine({}, packages=("jinja2", "markupsafe"))
    about = ["The template alone, in this process: no HTTP server, no store."]
    body = "\n".join(markdown(["page", "ms per render (best round)", "KB"], rows, "lrr"))
    return run.publish(heading("The instances page's HTML", run, vers, about), body, args.json, vars(args), vers, results)


if __name__ == "__main__":
    sys.exit(main())
