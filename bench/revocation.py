#!/usr/bin/env python3
"""
What it costs the portal to tell auth helpers of access changes, and how
soon an access that ends ends (docs/protocols.md 6.6).

A portal (SQLite, in a process of its own: ``--serve``, its CPU and memory
read with psutil) with ``--instances`` instances, each with its own key,
people with sessions and access tokens. This process is the client:

1. ``GET /oauth/userinfo`` closed loop (16 at once, ``--seconds``): what
   one question costs the portal. Polling open sessions every ``T``
   seconds costs (open sessions) / T of these per second.
2. one watch per instance held open (``GET /oauth/watch``, as each
   instance's helper would): the portal's memory per watch and its CPU
   while they idle (a keepalive line every 5 s to each).
3. the bound: one auth helper (in this process) in front of a WebSocket
   echo tool; bob holds a WebSocket through it; alice unshares through the
   API; the time from the API's answer to bob's WebSocket closed, then
   shared again, ``--rounds`` times. The helper's own recheck is an hour,
   so only the watch can close it.

It never passes or fails: it prints a markdown table.

    python bench/revocation.py                   # 300 instances, 5 s, 20 rounds
    python bench/revocation.py --instances 50 --seconds 3 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# -- the portal's side (``--serve DIR``) -----------------------------------------------------------


def serve(directory: Path, instances: int) -> None:
    from twisted.internet import defer, reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from dit4c.common.keys import generatePrivateKey, publicJWK, savePrivateKey
    from dit4c.common.life import State
    from dit4c.portal import security
    from dit4c.portal.app import Portal, PortalConfig
    from dit4c.portal.keys import KeyRing
    from dit4c.portal.oauth import audienceFor
    from dit4c.portal.store import hashToken, openStore

    async def main() -> None:
        site = Site(Resource())
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        store = await openStore(f"sqlite:///{directory / 'portal.db'}", reactor, clock=reactor)
        keys = KeyRing(directory / "keys", issuer=url, clock=reactor)
        portal = Portal(store, keys, PortalConfig(publicURL=url), reactor)
        site.resource = portal.app.resource()
        hashed = await security.hashPassword("bench password")
        alice = await store.createUser("alice", password_hash=hashed)
        bob = await store.createUser("bob", password_hash=hashed)
        image = await store.createImage("Tool", "tool:latest", owner_id=None, port=8888)
        session = await store.createSession(bob.id, 24 * 3600)
        ids = []
        for n in range(instances):
            key = generatePrivateKey()
            savePrivateKey(key, directory / f"instance-{n}.pem")
            instance = await store.createInstance(alice.id, image.id, public_jwk=json.dumps(publicJWK(key)))
            await store.updateInstance(instance.id, state=State.RUNNING)
            await store.shareInstance(instance.id, bob.id)
            ids.append(instance.id)
        signer = keys.signer()
        _, apiToken = await store.createApiToken(alice.id, "bench")
        info = {
            "url": url,
            "instances": ids,
            "bob": bob.id,
            "api": apiToken,
            "tokens": [
                signer.sign(
                    {"sub": bob.id, "name": "bob", "sid": hashToken(session.id)},
                    audience=audienceFor(i),
                    lifetime=24 * 3600,
                )
                for i in ids
            ],
        }
        print(json.dumps(info), flush=True)

    defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()


# -- the client ------------------------------------------------------------------------------------


class Server:
    def __init__(self, instances: int) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="dit4c-revocation-")
        self.directory = Path(self.tmp.name)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.directory), "--instances", str(instances)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.info: dict[str, Any] = json.loads(self.process.stdout.readline())
        self.ps = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.tmp.cleanup()


async def userinfo(server: Server, seconds: float, concurrency: int = 16) -> dict[str, float]:
    import treq
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = concurrency
    info = server.info
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        nonlocal done
        instance, token = info["instances"][n % len(info["instances"])], info["tokens"][n % len(info["tokens"])]
        url = f"{info['url']}/oauth/userinfo?instance={instance}"
        while time.monotonic() < deadline:
            response = await treq.get(url, headers={"Authorization": f"Bearer {token}"}, pool=pool)
            await response.content()
            assert response.code == 200, response.code
            done += 1

    from twisted.internet import defer

    began, cpu = time.monotonic(), server.cpu()
    await defer.gatherResults([defer.ensureDeferred(worker(n)) for n in range(concurrency)])
    elapsed, used = time.monotonic() - began, server.cpu() - cpu
    await pool.closeCachedConnections()
    return {"requests": done, "rps": done / elapsed, "cpu_ms": 1000 * used / max(done, 1)}


async def watches(server: Server, idle: float) -> dict[str, float]:
    import secrets

    import treq
    from twisted.internet import defer, reactor
    from twisted.internet.protocol import Protocol

    from dit4c.common.keys import loadPrivateKey
    from dit4c.common.tokens import TokenSigner
    from dit4c.portal.oauth import WATCH_AUDIENCE

    info = server.info
    before = server.rss()
    bodies: list[Any] = []

    class Body(Protocol):
        def connectionMade(self) -> None:
            bodies.append(self)

    async def open(n: int, instance: str) -> None:
        signer = TokenSigner(loadPrivateKey(server.directory / f"instance-{n}.pem"))
        token = signer.sign({"sub": instance, "jti": secrets.token_urlsafe(16)}, audience=WATCH_AUDIENCE, lifetime=60)
        response = await treq.get(
            f"{info['url']}/oauth/watch", headers={"Authorization": f"Bearer {token}"}, unbuffered=True, persistent=False
        )
        assert response.code == 200, response.code
        response.deliverBody(Body())

    await defer.gatherResults([defer.ensureDeferred(open(n, i)) for n, i in enumerate(info["instances"])])
    opened = server.rss()
    cpu, began = server.cpu(), time.monotonic()
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(idle, d.callback, None)
    await d
    used, elapsed = server.cpu() - cpu, time.monotonic() - began
    for body in bodies:
        body.transport.stopProducing()
    return {
        "watches": len(bodies),
        "kib_each": (opened - before) / 1024 / max(len(bodies), 1),
        "cpu_pct": 100 * used / elapsed,
    }


async def bound(server: Server, rounds: int) -> list[float]:
    import treq
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString

    from dit4c.auth.service import AuthService

    info = server.info
    instance = info["instances"][0]
    from wsecho import echoFactory  # bench/wsecho.py: the tool, a WebSocket echo server

    tool = reactor.listenTCP(0, echoFactory(), interface="127.0.0.1")
    helper = AuthService(
        reactor,
        instance=instance,
        keyFile=str(server.directory / "instance-0.pem"),
        portal=info["url"],
        portalInternal=info["url"],
        listen=serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
        tool=clientFromString(reactor, f"tcp:host=127.0.0.1:port={tool.getHost().port}"),
        recheck=3600,
        unwatchedRecheck=3600,
    )
    helper.startService()
    while helper.watch.state != "watching":
        await task_sleep(0.01)
    port = helper.port.getHost().port
    headers = {"Authorization": f"Bearer {info['api']}", "Content-Type": "application/json"}
    api = f"{info['url']}/api/v1/instances/{instance}/shares"

    class Socket(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.factory.opened.callback(self)

        def onClose(self, wasClean: bool, code: int, reason: str) -> None:
            if not self.factory.closed.called:
                self.factory.closed.callback(reactor.seconds())

    times = []
    for _ in range(rounds):
        factory = WebSocketClientFactory(
            f"ws://{instance}.localhost/ws", headers={"Cookie": f"dit4c_auth={info['tokens'][0]}"}
        )
        factory.protocol = Socket
        factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        await factory.opened.addTimeout(10, reactor)
        response = await treq.delete(f"{api}/bob", headers=headers)
        await response.content()
        answered = reactor.seconds()
        closed = await factory.closed.addTimeout(30, reactor)
        times.append(closed - answered)
        response = await treq.post(api, data=json.dumps({"user": "bob"}).encode(), headers=headers)
        await response.content()
        await task_sleep(0.2)
    await helper.stopService()
    await tool.stopListening()
    return times


def task_sleep(seconds: float) -> Any:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the watches idle while CPU is read")
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    if options.serve is not None:
        serve(options.serve, options.instances)
        return

    from twisted.internet import defer, task

    async def run(reactor: Any) -> None:
        server = Server(options.instances)
        try:
            asked = await userinfo(server, options.seconds)
            held = await watches(server, options.idle)
            times = await bound(server, options.rounds)
        finally:
            server.stop()
        from tables import markdown  # bench/tables.py

        ms = sorted(1000 * t for t in times)
        rows = [
            ["`GET /oauth/userinfo`, 16 at once", f"{asked['rps']:.0f} req/s, {asked['cpu_ms']:.2f} ms portal CPU each"],
            ["open watches (`GET /oauth/watch`)", f"{held['watches']:.0f}: {held['kib_each']:.1f} KiB portal memory each"],
            [f"portal CPU while they idle ({options.idle:.0f} s)", f"{held['cpu_pct']:.2f} % of a core"],
            [f"unshare answered → WebSocket closed ({len(ms)} rounds)",
             f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"],
        ]  # fmt: skip
        print("\n".join(markdown(["measure", f"value ({options.instances} instances)"], rows)))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
