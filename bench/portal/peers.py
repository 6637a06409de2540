#!/usr/bin/env python3
"""How fast portal processes on one PostgreSQL hear each other (docs/protocols.md 16).

Two ``PostgresPeers`` (two portal processes' links, here in one process on
one reactor) on a throwaway PostgreSQL server:

  tell      one tells ``command`` messages at a fixed rate; the time until the
            other hears each (p50, p99, max)
  burst     one tells N messages at once; how long until the other has heard
            them all (messages/s)
  change    an instance changed in the store and published on one process's
            bus (``EventRelay``); the time until the other's bus has it, read
            from the store (what a page's event stream then sends)

Before LISTEN/NOTIFY, a command stored by one process reached a scheduler
connected to another at that one's next poll (every 30 s: 15 s on average),
and an instance's change reached the other's pages at their next event.
Prints a markdown table; never passes or fails.

    python bench/portal/peers.py
    python bench/portal/peers.py --rate 500 --seconds 10 --burst 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # bench/: plumbing, tables
sys.path.insert(0, str(HERE.parent.parent))  # the dit4c package from this checkout

from plumbing import Run, Skip, log  # noqa: E402
from run import Postgres  # noqa: E402  (the portal bench's database)
from tables import heading, machine, markdown  # noqa: E402


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import reactor, task

    from dit4c.common.life import State
    from dit4c.portal.events import InstanceEvents
    from dit4c.portal.peers import EventRelay
    from dit4c.portal.pgpeers import PostgresPeers
    from dit4c.portal.store import openStore

    results: dict[str, Any] = {}
    one, two = PostgresPeers(reactor, url), PostgresPeers(reactor, url)
    for peers in (one, two):
        peers.startService()
        await peers.listening
    try:
        # tell: at a fixed rate, each message's number in its body.
        sent: dict[str, float] = {}
        heard: dict[str, float] = {}
        two.hear("command", lambda body: heard.setdefault(body["scheduler"], time.perf_counter()))
        count = int(args.rate * args.seconds)
        start = time.perf_counter()
        for n in range(count):
            due = start + n / args.rate
            wait = due - time.perf_counter()
            if wait > 0:
                await task.deferLater(reactor, wait, lambda: None)
            sent[str(n)] = time.perf_counter()
            one.tell("command", {"scheduler": str(n)})
        await _until(lambda: len(heard) >= count, 30)
        latencies = [(heard[k] - sent[k]) * 1000 for k in sent if k in heard]
        results["tell"] = {"rate": args.rate, "sent": count, "heard": len(latencies), **percentiles(latencies)}
        log(f"  tell at {args.rate}/s: {results['tell']}")

        # burst: N at once.
        burst: dict[str, float] = {}
        two.hear("access", lambda body: burst.setdefault(str(body["user"]), time.perf_counter()))
        start = time.perf_counter()
        for n in range(args.burst):
            one.tell("access", {"user": f"b{n}"})
        await _until(lambda: len(burst) >= args.burst, 60)
        took = (max(burst.values()) - start) if burst else float("nan")
        results["burst"] = {"n": args.burst, "heard": len(burst), "seconds": took, "per_second": len(burst) / took}
        log(f"  burst of {args.burst}: {results['burst']}")

        # change: store write + publish on one bus -> the other's bus, through the store.
        stores = [await openStore(url, reactor) for _ in range(2)]
        buses = [InstanceEvents(), InstanceEvents()]
        EventRelay(buses[0], one, stores[0])
        EventRelay(buses[1], two, stores[1])
        arrived: list[tuple[str, State, float]] = []
        buses[1].subscribe(lambda i: arrived.append((i.id, i.state, time.perf_counter())))
        user = await stores[0].createUser("bench")
        image = await stores[0].createImage("Tool", "tool", owner_id=None)
        changes = []
        states = [State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED]
        for n in range(args.changes):
            instance = await stores[0].createInstance(user.id, image.id)
            for state in states:
                updated = await stores[0].updateInstance(instance.id, state=state)
                published = time.perf_counter()
                buses[0].publish(updated)
                changes.append((instance.id, state, published))
            if n % 20 == 19:
                await task.deferLater(reactor, 0.01, lambda: None)
        # The other process reads the instance when it hears of it: a quicker
        # change after it may be what it reads, so a change has arrived when
        # that state or a later one has.
        order = {state: n for n, state in enumerate(states)}
        await _until(lambda: sum(1 for _, s, _ in arrived if s is State.STOPPED) >= args.changes, 60)
        lat = []
        for i, s, t in changes:
            later = [when for j, state, when in arrived if j == i and order[state] >= order[s]]
            if later:
                lat.append((min(later) - t) * 1000)
        skipped = len(changes) - len({(i, s) for i, s, _ in arrived})
        results["change"] = {"changes": len(changes), "arrived": len(lat), "read_later": skipped, **percentiles(lat)}
        log(f"  change: {results['change']}")
        for store in stores:
            await store.close()
    finally:
        for peers in (one, two):
            peers.stopService()
    return results


async def _until(condition: Any, timeout: float) -> None:
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.005, lambda: None)


def report(results: dict[str, Any]) -> str:
    t, b, c = results["tell"], results["burst"], results["change"]
    rows = [
        ["messages told at a fixed rate: time until heard (ms)", f"{t['rate']:g}/s, {t['heard']}/{t['sent']} heard",
         f"{t['p50']:.2f}", f"{t['p99']:.2f}", f"{t['max']:.2f}"],
        ["an instance's change: published on one bus until it, or a later one, is on the other's (ms)",
         f"{c['arrived']}/{c['changes']} arrived ({c['read_later']} as a later state)",
         f"{c['p50']:.2f}", f"{c['p99']:.2f}", f"{c['max']:.2f}"],
    ]  # fmt: skip
    lines = [
        *markdown(["", "load", "p50", "p99", "max"], rows, "lrrrr"),
        "",
        f"A burst of {b['n']} messages told at once: all heard after {b['seconds']:.2f} s "
        f"({b['per_second']:.0f} messages/s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="messages told per second (default 200)")
    parser.add_argument("--seconds", type=float, default=5.0, help="for how long (default 5)")
    parser.add_argument("--burst", type=int, default=5000, help="messages told at once (default 5000)")
    parser.add_argument("--changes", type=int, default=200, help="instances changed four times each (default 200)")
    parser.add_argument("--json", metavar="OUT", help="also write all results as JSON here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    run = Run("bench/portal/peers.py", argv, "dit4c-bench-peers-", 1 << 30)
    with run:
        try:
            db = Postgres(None, run.logs)
            db.start()
        except Skip as e:
            print(f"skipped: {e}")
            return 0
        try:
            from twisted.internet import defer, task

            def go(reactor: Any) -> defer.Deferred[None]:
                async def both() -> None:
                    results.update(await measure(db.url(), args))

                return defer.Deferred.fromCoroutine(both())

            try:
                task.react(go)
            except SystemExit as e:
                if e.code:
                    raise
            results["server_version"] = db.version()
        finally:
            db.stop()
    vers = machine({}, packages=("psycopg", "twisted"), more={"PostgreSQL": str(results.get("server_version", "?"))})
    about = [
        "PostgreSQL (defaults, Unix socket, in the temp dir); two portal processes' links to each other"
        " (PostgresPeers, each with its own listening and sending connection) in this one process, on one reactor."
        " Before LISTEN/NOTIFY, a command stored by one process reached a scheduler connected to another at that"
        " one's next poll (every 30 s), and a change reached the other's pages at their next event."
    ]
    return run.publish(heading("Between portal processes: LISTEN/NOTIFY", run, vers, about), report(results),
                       args.json, vars(args), vers, results)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
