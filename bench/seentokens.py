#!/usr/bin/env python3
"""What the routing server's memory of spent token ids costs.

Fills a ``dit4c.routing.replay.SeenTokens`` with N ids (22-character jti,
as listeners make them, spread over instances) and prints the memory it
holds (tracemalloc) and the time of one check, for a new id and for a
replayed one. Prints figures; never passes or fails.

    python bench/seentokens.py
    python bench/seentokens.py --entries 100000 --instances 10000
"""

from __future__ import annotations

import argparse
import secrets
import time
import tracemalloc

from tables import markdown  # bench/tables.py
from twisted.internet.task import Clock

from dit4c.routing.errors import ReplayedToken
from dit4c.routing.replay import SeenTokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000, help="ids to hold (default 100000, the default bound)")
    parser.add_argument("--instances", type=int, default=10_000, help="instances they belong to (default 10000)")
    args = parser.parse_args()

    instances = [f"01hqz6y4d7{i:06d}" for i in range(args.instances)]
    jtis = [secrets.token_urlsafe(16) for _ in range(args.entries)]

    def fill() -> tuple[SeenTokens, float, float]:
        clock = Clock()
        clock.advance(1_700_000_000)
        until = clock.seconds() + 330
        seen = SeenTokens(clock, maxEntries=args.entries, maxPerInstance=args.entries)
        started = time.perf_counter()
        for i, jti in enumerate(jtis):
            seen.spend(instances[i % len(instances)], jti, until + i * 1e-3)
        return seen, (time.perf_counter() - started) / len(jtis), until

    # Memory on one fill, times on another (tracemalloc slows every allocation).
    tracemalloc.start()
    seen, _, _ = fill()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del seen
    seen, spend, until = fill()
    started = time.perf_counter()
    for i, jti in enumerate(jtis):
        try:
            seen.spend(instances[i % len(instances)], jti, until)
        except ReplayedToken:
            pass
    replay = (time.perf_counter() - started) / len(jtis)

    head = ["ids held", "instances", "memory held", "per id", "spend a new id", "refuse a replayed id"]
    row = [str(len(seen)), str(args.instances), f"{held / 2**20:.1f} MiB", f"{held / len(seen):.0f} B",
           f"{spend * 1e6:.1f} µs", f"{replay * 1e6:.1f} µs"]  # fmt: skip
    print("\n".join(markdown(head, [row], "rrrrrr")))


if __name__ == "__main__":
    main()
