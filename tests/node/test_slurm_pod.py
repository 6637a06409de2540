"""
A ``slurm``-runtime pod, for real: a Slurm job (on a one-machine cluster
started for this module) runs a real tool and the real pod helper process
(``dit4c-helper-pod``), whose listener dials out from the job to a routing
server; a person logs in through the routing server (a real portal, OAuth)
and reaches the tool, a WebSocket included; a stop ends the job and every
process of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.slurm import PARTITION, SlurmCluster, requireSlurm
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from dit4c.common.keys import generatePrivateKey, loadPrivateKey, publicJWK, savePrivateKey
from dit4c.common.tokens import JWKSKeySource, TokenVerifier
from dit4c.node.interfaces import PodSpec
from dit4c.node.processes import startTime
from dit4c.node.processtools import Tool
from dit4c.node.slurm import SlurmRuntime
from dit4c.routing.server import RoutingServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "podhelper"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, logIn, makeWorld  # noqa: E402
from test_pod import TOOL, echo, until  # noqa: E402

requireSlurm("the slurm runtime's pod test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: Any) -> Any:
    made = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    made.start()
    yield made
    made.stop()


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    """The auth world, and a routing server that trusts the portal's keys."""
    w = await makeWorld(tmp_path)
    # The portal publishes an instance's key (the routing server trusts it) once a scheduler has it.
    scheduler = await w.store.createScheduler("cluster", json.dumps(publicJWK(generatePrivateKey())))
    w.instance = await w.store.updateInstance(
        w.instance.id, public_jwk=json.dumps(publicJWK(loadPrivateKey(w.keyFile))), scheduler_id=scheduler.id
    )
    w.portal.keysChanged()
    keys = JWKSKeySource(f"{w.portalURL}/.well-known/jwks.json", reactor=reactor, min_refetch=0.5)
    routing = RoutingServer(reactor, TokenVerifier(keys, audience="dit4c-routing", clock=reactor), "localhost")
    tunnel = routing.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    public = routing.addPublicEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), "http")
    routing.startService()
    w.services.append(routing)
    w.tunnelPort = tunnel.port.getHost().port  # type: ignore[union-attr]
    w.httpPort = public.port.getHost().port  # type: ignore[union-attr]
    routing.publicURL = f"http://{{host}}:{w.httpPort}/"
    yield w
    await closeWorld(w)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_person_reaches_the_tool_of_a_slurm_job_through_its_listener(
    world: Any, cluster: SlurmCluster, tmp_path: Path
) -> None:
    w = world
    instance = w.instance.id
    directory = tmp_path / "pods"
    pod = directory / instance
    pod.mkdir(parents=True, mode=0o700)
    savePrivateKey(loadPrivateKey(w.keyFile), pod / "instance.key")
    environment = {
        "DIT4C_INSTANCE": instance,
        "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
        "DIT4C_PORTAL": w.portalURL,
        "DIT4C_ROUTING": f"tcp:host=127.0.0.1:port={w.tunnelPort}",
        "DIT4C_STATE_DIR": str(pod / "state"),
    }
    tools = {"backend": Tool("backend", ("{python}", "-c", TOOL, "{port}"))}
    runtime = SlurmRuntime(
        reactor, directory, tools, partition=PARTITION, stopGrace=3, pollInterval=0.5,
        slurmEnvironment=cluster.environment,
    )  # fmt: skip
    try:
        await runtime.start(PodSpec(instance, "backend", None, pod, environment))
        await until(lambda: runtime.ready(instance), "the job's pod answers", pod, timeout=60)
        running = {p.stem: json.loads(p.read_text())["pid"] for p in pod.glob("*.pid")}
        assert sorted(running) == ["helpers", "tool"]

        # The listener, in the job, reported the instance's URL; a person logs in through the routing server.
        await until(lambda: w.store.instanceById(instance).addCallback(lambda i: bool(i.url)), "the URL is reported", pod)
        w.instance = await w.store.instanceById(instance)
        assert w.instance.url == f"http://{instance}.localhost:{w.httpPort}/"
        w.authPort = w.httpPort
        alice = Browser(w)
        assert (await logIn(alice, "alice", "/headers")).code == 303
        response = await alice.get(w.instanceURL + "headers", accept="application/json")
        assert response.code == 200
        headers = {k.lower(): v for k, v in (await response.json())["headers"].items()}
        assert headers["x-dit4c-user"] == ["alice"]
        assert await echo(w, alice, b"through a slurm job") == b"through a slurm job"

        # Stopped: the job is gone from the queue, and every process of it ended.
        await runtime.stop(instance)
        queue = cluster.run("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING", "--format=%j")
        assert f"dit4c-{instance}" not in queue
        assert not any(startTime(pid) for pid in running.values())
    finally:
        await runtime.discard(instance)
        runtime.forget()
