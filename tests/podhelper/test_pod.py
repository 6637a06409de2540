"""
A pod of the ``process`` runtime, for real: its one helper process (forked
from the node's fork server) in front of a real tool, a real portal (OAuth
flow), a routing server, and the file server mounted with sshfs. A person
logs in through the routing server, reaches the tool and makes a WebSocket
round trip; the storage is theirs; a node restart finds the helper process
again; stop and discard leave no process and no mount.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.waiting import deferLater
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString

from dit4c.common.keys import generatePrivateKey, loadPrivateKey, publicJWK, savePrivateKey
from dit4c.common.tokens import JWKSKeySource, TokenVerifier
from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, Tool
from dit4c.node.processes import podProcesses, startTime
from dit4c.routing.server import RoutingServer
from dit4c.storage.helper import isMounted

# The auth helper's tests' world (a real portal, alice, her instance), reused as it is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, logIn, makeWorld  # noqa: E402

#: The test backend (``/headers``, ``/ws`` echo) on the loopback port it is given.
TOOL = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
    "from twisted.internet import reactor; from support.backend import backendSite;"
    "reactor.listenTCP(int(sys.argv[1]), backendSite(), interface='127.0.0.1'); reactor.run()"
)
SECRET = "file-server-secret-for-the-pod-test"


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path, fuse: None) -> Any:
    """The auth world, with a file server and a routing server that trust the portal's keys."""
    from dit4c.fileserver.service import FileServerService

    w = await makeWorld(tmp_path)
    # The portal publishes an instance's key (routing servers and the file server trust it) once a scheduler has it.
    scheduler = await w.store.createScheduler("cluster", json.dumps(publicJWK(generatePrivateKey())))
    w.instance = await w.store.updateInstance(
        w.instance.id, public_jwk=json.dumps(publicJWK(loadPrivateKey(w.keyFile))), scheduler_id=scheduler.id
    )
    w.portal.keysChanged()
    w.portal.reports.setFileServerSecret(SECRET)
    files = FileServerService(
        reactor, endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
        dataDir=tmp_path / "files", portal=w.portalURL, secret=SECRET,
    )  # fmt: skip
    keys = JWKSKeySource(f"{w.portalURL}/.well-known/jwks.json", reactor=reactor, min_refetch=0.5)
    routing = RoutingServer(reactor, TokenVerifier(keys, audience="dit4c-routing", clock=reactor), "localhost")
    tunnel = routing.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    public = routing.addPublicEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), "http")
    for service in (files, routing):
        service.startService()
        w.services.append(service)
    w.files = files
    w.tunnelPort = tunnel.port.getHost().port  # type: ignore[union-attr]
    w.httpPort = public.port.getHost().port  # type: ignore[union-attr]
    routing.publicURL = f"http://{{host}}:{w.httpPort}/"
    yield w
    await closeWorld(w)


def pids(pod: Path) -> dict[str, int]:
    return {p.stem: json.loads(p.read_text())["pid"] for p in pod.glob("*.pid")}


def alive(pid: int) -> bool:
    return startTime(pid) is not None


async def until(check: Any, what: str, pod: Path | None = None, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.1)):
        if await defer.maybeDeferred(check):
            return
        await deferLater(0.1)
    logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-1500:]}" for log in sorted((pod or Path("/-")).glob("*.log")))
    raise AssertionError(f"never: {what}{logs}")


class _Echo(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.callback(payload)


async def echo(w: Any, browser: Browser, message: bytes) -> bytes:
    cookie = "; ".join(f"{k}={v}" for k, v in browser.instanceCookies().items())
    factory = WebSocketClientFactory(f"ws://{w.host}/ws", headers={"Cookie": cookie})
    factory.protocol = _Echo
    factory.opened, factory.received = defer.Deferred(), defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", w.httpPort).connect(factory)
    client = await factory.opened.addTimeout(15, reactor)
    client.sendMessage(message, isBinary=True)
    try:
        return bytes(await factory.received.addTimeout(15, reactor))
    finally:
        client.sendClose()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_one_helper_process_fronts_the_tool_holds_the_storage_and_outlives_the_node(
    world: Any, tmp_path: Path
) -> None:
    w = world
    instance = w.instance.id
    directory = tmp_path / "node"
    pod = directory / instance
    pod.mkdir(parents=True, mode=0o700)
    savePrivateKey(loadPrivateKey(w.keyFile), pod / "instance.key")
    environment = {
        "DIT4C_INSTANCE": instance,
        "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
        "DIT4C_PORTAL": w.portalURL,
        "DIT4C_ROUTING": f"tcp:host=127.0.0.1:port={w.tunnelPort}",
        "DIT4C_STATE_DIR": str(pod / "state"),
        "DIT4C_FILE_SERVER": f"127.0.0.1:{w.files.listeners[0].port.getHost().port}",
        "DIT4C_FILE_SERVER_HOST_KEY": w.files.hostKeyLine,
    }
    tools = {"backend": Tool("backend", ("{python}", "-c", TOOL, "{port}"))}
    runtime = ProcessRuntime(reactor, directory, tools, stopGrace=3)
    later: ProcessRuntime | None = None
    try:
        await runtime.start(PodSpec(instance, "backend", None, pod, environment))
        await until(lambda: runtime.ready(instance), "the pod answers", pod)

        # One helper process beside the tool, forked from the node's fork server, in a session of its own.
        running = pids(pod)
        assert sorted(running) == ["helpers", "tool"] and all(alive(pid) for pid in running.values())
        assert json.loads((pod / "pod.json").read_text())["roles"] == ["tool", "helpers"]
        helper = running["helpers"]
        assert runtime.forkServer is not None
        server = runtime.forkServer._process.pid
        assert int(Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[1]) == server
        assert os.getsid(helper) == helper

        # The listener reported the instance's URL; a person logs in through the routing server.
        await until(
            lambda: w.store.instanceById(instance).addCallback(lambda i: bool(i.url)), "the URL is reported"
        )
        w.instance = await w.store.instanceById(instance)
        assert w.instance.url == f"http://{instance}.localhost:{w.httpPort}/"
        w.authPort = w.httpPort  # the Browser's instance URLs: through the routing server
        alice = Browser(w)
        assert (await logIn(alice, "alice", "/headers")).code == 303
        response = await alice.get(w.instanceURL + "headers", accept="application/json")
        assert response.code == 200
        headers = {k.lower(): v for k, v in (await response.json())["headers"].items()}
        assert headers["x-dit4c-user"] == ["alice"]
        assert await echo(w, alice, b"through one helper process") == b"through one helper process"

        # The person's storage is mounted in the pod: what is written there is on the file server.
        mount = pod / "mnt"
        await until(lambda: isMounted(mount), "the storage is mounted")
        # (In a thread: the file server answering the mount runs on this reactor.)
        await threads.deferToThread((mount / "thesis.tex").write_text, "years of work")
        assert (tmp_path / "files" / "users" / w.users["alice"].id / "thesis.tex").read_text() == "years of work"

        # The node restarts: its fork server goes, the helper process runs on and is found again.
        runtime.forget()
        await until(lambda: not alive(server), "the fork server has gone")
        assert alive(helper)
        later = ProcessRuntime(reactor, directory, tools, stopGrace=3)
        assert [(s.instance, s.running) for s in await later.pods()] == [(instance, True)]
        assert await later.ready(instance)
        assert await echo(w, alice, b"after the restart") == b"after the restart"

        # Stopped: no process of the pod, nothing mounted; the files stay the person's.
        await later.stop(instance)
        assert not any(alive(pid) for pid in running.values())
        assert not isMounted(mount)
        assert podProcesses(pod, instance) == []
        await later.discard(instance)
        assert not pod.exists()
        assert (tmp_path / "files" / "users" / w.users["alice"].id / "thesis.tex").read_text() == "years of work"
    finally:
        for r in (runtime, later):
            if r is not None:
                await r.discard(instance)
                r.forget()
