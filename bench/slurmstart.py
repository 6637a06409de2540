#!/usr/bin/env python3
"""
Seconds from a runtime's start of a pod to its tool answering and its
listener's tunnel held by a routing server, for the ``slurm`` runtime beside
the ``process`` runtime: the same tool (the built-in notes), the same real
pod helper process, a routing server in this process that trusts the
instances' keys (the portal they would report to is absent, as in
``start.py``'s memory runs). The slurm runtime's cluster is a one-machine
Slurm cluster (munged, slurmctld, slurmd) started here with the tests'
harness (``tests/support/slurm.py``; Debian's slurm-wlm must be installed).
Each pod is discarded before the next starts; the first start of each
runtime is a warm-up, not counted. It never passes or fails.

    python bench/slurmstart.py --runs 20      # JSON: runtime → seconds
    python bench/start.py --runtime slurm     # the same, as start.py's table rows

``dit4c-dev`` (what ``start.py`` measures the process and podman runtimes
through, from the portal's API) has no slurm runtime, so these figures are
the runtime's alone: what the portal and the browser add is the same for
every runtime (``start.py``'s process rows show it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


async def measure(reactor: Any, kind: str, runs: int, directory: Path, environment: dict[str, str]) -> list[float]:
    from twisted.internet import task
    from twisted.internet.endpoints import serverFromString

    from dit4c.common.keys import generatePrivateKey, publicJWK, savePrivateKey
    from dit4c.common.tokens import StaticKeySource, TokenVerifier
    from dit4c.node.interfaces import PodSpec
    from dit4c.node.process import ProcessRuntime, builtinTools
    from dit4c.node.slurm import SlurmRuntime
    from dit4c.routing.server import RoutingServer

    instances = [f"{kind[0]}b{n}" for n in range(runs + 1)]
    privates = {instance: generatePrivateKey() for instance in instances}
    keys = [{**publicJWK(key), "kid": f"instance:{instance}"} for instance, key in privates.items()]
    routing = RoutingServer(reactor, TokenVerifier(StaticKeySource({"keys": keys}), audience="dit4c-routing"), "localhost")
    tunnel = routing.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    routing.startService()
    port = tunnel.port.getHost().port  # type: ignore[union-attr]
    runtime: Any
    if kind == "slurm":
        from support.slurm import PARTITION

        runtime = SlurmRuntime(reactor, directory, builtinTools(), partition=PARTITION, slurmEnvironment=environment)
    else:
        runtime = ProcessRuntime(reactor, directory, builtinTools())
    times: list[float] = []
    try:
        for instance in instances:
            pod = directory / instance
            pod.mkdir(parents=True, mode=0o700)
            savePrivateKey(privates[instance], pod / "instance.key")
            spec = PodSpec(instance, "dit4c/notes", None, pod, {
                "DIT4C_INSTANCE": instance, "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
                "DIT4C_PORTAL": "http://127.0.0.1:9", "DIT4C_ROUTING": f"tcp:host=127.0.0.1:port={port}",
                "DIT4C_STATE_DIR": str(pod / "state"),
            })  # fmt: skip
            began = reactor.seconds()
            await runtime.start(spec)
            host = routing.registry.hostFor(instance)
            for _ in range(3000):
                if await runtime.ready(instance) and routing.registry.resolve(host) is not None:
                    break
                await task.deferLater(reactor, 0.02, lambda: None)
            else:
                raise RuntimeError(f"{kind}: {instance} never answered (see {pod})")
            if instance != instances[0]:
                times.append(reactor.seconds() - began)
            print(f"{kind} start {len(times)}: {reactor.seconds() - began:.2f} s", file=sys.stderr)
            await runtime.discard(instance)
    finally:
        runtime.forget()
        await routing.stopService()
    return times


def run(runs: int, kinds: list[str]) -> dict[str, list[float]]:
    """Each runtime's start times, in a reactor of this process (a cluster started for the slurm runtime)."""
    from support.slurm import SlurmCluster
    from twisted.internet import defer, task

    results: dict[str, list[float]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="dit4c-bench-slurm-"))
    cluster = SlurmCluster(scratch / "cluster") if "slurm" in kinds else None

    async def main(reactor: Any) -> None:
        for kind in kinds:
            environment = cluster.environment if cluster is not None else {}
            results[kind] = await measure(reactor, kind, runs, scratch / kind, environment)

    if cluster is not None:
        cluster.start()
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if cluster is not None:
            cluster.stop()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--runtime", action="append", choices=["process", "slurm"])
    options = parser.parse_args()
    print(json.dumps(run(options.runs, options.runtime or ["process", "slurm"])))
