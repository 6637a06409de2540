"""
Three portal processes (``twistd dit4c-portal``) on one PostgreSQL
database behind a real load balancer (HAProxy, round robin, health
checks), with a scheduler on its channel through the balancer too:

- a person logs in with a form one portal made and another took;
- their page's event stream is served by one portal, their start by a
  second, and the scheduler's channel is held by the third: the command
  reaches the scheduler and its states reach the page, live;
- the tool's output, asked of a portal that does not hold the channel, is
  relayed to the one that does;
- the portal holding the channel is SIGKILLed: the scheduler's channel
  comes back through another, the person's next requests are answered
  (the output through the other one too), and their stop reaches the
  scheduler and the page.

The same in Chromium: the person's page, its event stream on p1 and its
forms wherever the balancer sends them, shows the states p3 applies, and
after p3 is SIGKILLed a Stop on the page reaches the scheduler and shows.

HAProxy takes the balancer's listening socket as it is handed over (``bind
fd@3``); each portal listens on port 0 and says the port it got. A request
header (``X-Portal: p1``) steers a request to a given portal, so that the
test says which serves what; the channel goes to ``p3`` while it is up, and
the pages' event streams (``/events``) to ``p1``.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from portal_client import Browser, csrfOf, submit
from support.passwords import cheapHash
from support.postgres import PostgresServer
from support.processes import TWISTD, Process
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.life import State
from dit4c.common.listening import listeningSocket
from dit4c.portal.store import IStore, openStore
from dit4c.testing.scheduler import TestingScheduler, registerScheduler

PORTALS = ("p1", "p2", "p3")
PASSWORD = "correct horse battery"

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (bash scripts/install --test)")


def haproxyConfig(backends: dict[str, int]) -> str:
    servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in backends.items())
    steering = "\n".join(f"    use-server {name} if {{ req.hdr(x-portal) -m str {name} }}" for name in backends)
    return f"""\
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 3
    option redispatch
listen portals
    bind fd@3
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host portal
    default-server check inter 200ms fall 1 rise 2
{steering}
    use-server p3 if {{ path_beg /.dit4c/channel }}
    use-server p1 if {{ path /events }}
    http-response set-header X-Served-By %s
{servers}
"""


class Site:
    """Three portals, HAProxy in front, one database; what the test started, to stop."""

    def __init__(self, directory: Path, database: str) -> None:
        self.directory = directory
        self.database = database
        self.processes: dict[str, Process] = {}
        self.lb = listeningSocket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.lb.getsockname()[1]}"

    async def start(self) -> None:
        ports = {}
        for name in PORTALS:
            self.processes[name] = Process(
                [*TWISTD, "-n", "--pidfile=", "dit4c-portal", "--listen", "tcp:0:interface=127.0.0.1",
                 "--database", self.database, "--data-dir", str(self.directory / name), "--public-url", self.url],
                self.directory / f"{name}.log",
            )  # fmt: skip
        for name in PORTALS:
            ports[name] = await self.processes[name].waitForPort("portal", timeout=30)
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxyConfig(ports))
        haproxy = shutil.which("haproxy")
        assert haproxy is not None
        self.processes["haproxy"] = Process([haproxy, "-db", "-f", str(config)], self.directory / "haproxy.log", sockets=[self.lb])

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    def holding(self, schedulerId: str) -> list[str]:
        """The portals whose log says the scheduler connected to them, in the order they started."""
        return [name for name in PORTALS if f"({schedulerId}) connected from" in self.processes[name].log()]

    async def connect(self, scheduler: TestingScheduler, store: IStore) -> str:
        """A scheduler registered and connected through the balancer, which sends it to p3; its id."""
        record, key = await registerScheduler(store, "hpc")
        await scheduler.connect(self.url.replace("http:", "ws:"), record.id, key).whenConnected()
        await eventually(lambda: self.holding(record.id) == ["p3"], what=lambda: str(self.holding(record.id)))
        return str(record.id)

    async def killP3(self, scheduler: TestingScheduler, schedulerId: str) -> None:
        """SIGKILL p3, which holds the scheduler's channel, until the channel is back through another."""
        self.processes["p3"].signal(signal.SIGKILL)
        await eventually(
            lambda: any(p in self.holding(schedulerId) for p in ("p1", "p2")) and scheduler.client.connected,
            timeout=30, what=lambda: f"the channel back through another portal: {self.holding(schedulerId)}",
        )  # fmt: skip


class Person(Browser):
    """A person's browser, steered to one portal (or to the balancer's choice) per request."""

    def __init__(self, url: str) -> None:
        super().__init__(SimpleNamespace(testURL=url))  # type: ignore[arg-type]

    def at(self, portal: str | None) -> Person:
        self.extra.pop("X-Portal", None)
        if portal is not None:
            self.extra["X-Portal"] = portal
        return self


async def openStream(site: Site, person: Person, portal: str) -> RawClient:
    stream = RawClient()
    port = int(site.url.rsplit(":", 1)[1])
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stream)
    cookie = "; ".join(f"{k}={v}" for k, v in person.cookies.items())
    stream.transport.write(
        f"GET /events HTTP/1.1\r\nHost: portal\r\nX-Portal: {portal}\r\nCookie: {cookie}\r\n\r\n".encode()
    )
    await eventually(lambda: b"watching" in stream.received, what=lambda: repr(bytes(stream.received)))
    assert f"x-served-by: {portal}".encode() in bytes(stream.received).lower()
    return stream


def states(stream: RawClient, instance: str) -> list[str]:
    found = []
    for block in bytes(stream.received).split(b"\n\n"):
        lines = block.split(b"\n")
        if b"event: instance" in lines:
            for line in lines:
                if line.startswith(b"data: "):
                    body = json.loads(line[len(b"data: ") :])
                    if body["id"] == instance:
                        found.append(body["state"])
    return found


@pytest_twisted.async_yield_fixture
async def site(postgresServer: PostgresServer, tmp_path: Path) -> AsyncIterator[Site]:
    name = postgresServer.createDatabase()
    running = Site(tmp_path, postgresServer.url(name))
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        postgresServer.dropDatabase(name)


@pytest_twisted.ensureDeferred
async def test_three_portals_behind_a_balancer_one_killed(site: Site) -> None:
    store = await openStore(site.database, reactor)
    scheduler = TestingScheduler(reactor, delays={"start": 0.2, "stop": 0.2})
    try:
        await store.createUser("alice", password_hash=cheapHash(PASSWORD))
        image = await store.createImage("Tool", "tool", owner_id=None)
        schedulerId = await site.connect(scheduler, store)

        person = Person(site.url)
        # The login form from p1, sent to p2: p2 checks what p1 signed.
        _, page = await person.at("p1").get("/login")
        response, answer = await person.at("p2").post(
            "/login", {"csrf": csrfOf(page), "username": "alice", "password": PASSWORD, "next": "/"}
        )
        assert response.code == 303, answer
        assert response.headers.getRawHeaders("x-served-by") == ["p2"]

        stream = await openStream(site, person, "p1")
        await submit(person.at("p2"), "/instances", image=image.id)
        instances = await store.listInstancesOf((await store.userByName("alice")).id)
        assert len(instances) == 1
        instance = instances[0].id
        # Stored by p2, sent by p3 (the channel), reported to p3, and seen on p1's stream.
        await eventually(lambda: State.RUNNING in states(stream, instance), what=lambda: str(states(stream, instance)))
        # The tool's output, asked of p1: p3 asks the scheduler.
        scheduler.output[instance] = b"hello from the tool\n"
        response, output = await person.at("p1").get(f"/instances/{instance}/output.txt")
        assert (response.code, output) == (200, "hello from the tool\n")

        await site.killP3(scheduler, schedulerId)
        # The person's next requests, wherever the balancer sends them.
        for _ in range(6):
            response, page = await person.at(None).get("/")
            assert response.code == 200, page
            assert "alice" in page
        holder = "p1" if "p1" in site.holding(schedulerId) else "p2"
        other = "p2" if holder == "p1" else "p1"
        response, output = await person.at(other).get(f"/instances/{instance}/output.txt")
        assert (response.code, output) == (200, "hello from the tool\n")
        response, answer = await person.at(None).post(f"/instances/{instance}/stop", {"csrf": csrfOf(page)})
        assert response.code == 303, answer
        await eventually(lambda: State.STOPPED in states(stream, instance), timeout=20, what=lambda: str(states(stream, instance)))
        assert (await store.instanceById(instance)).state is State.STOPPED
    finally:
        await scheduler.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_page_in_chromium_shows_states_another_portal_applied(site: Site, browser: Any) -> None:
    store = await openStore(site.database, reactor)
    scheduler = TestingScheduler(reactor, delays={"start": 0.5, "stop": 0.5})
    try:
        await store.createUser("alice", password_hash=cheapHash(PASSWORD))
        await store.createImage("Tool", "tool", owner_id=None)
        schedulerId = await site.connect(scheduler, store)

        # The login form and its post go wherever the balancer sends them.
        await browser.logIn(site.url, "alice", PASSWORD)
        await browser.waitFor("#start-button")
        await browser.click("#start-button")
        row = await eventually(
            lambda: browser.execute("const r = document.querySelector('#instances tr[data-instance]'); return r && r.dataset.instance"),
            15, what="the new instance on the page",
        )  # fmt: skip
        cell = f'#instances tr[data-instance="{row}"] td.state'
        # Applied by p3 (the channel), shown by the page's stream on p1.
        await browser.waitFor(f'{cell}[data-state="running"]', 30)

        await site.killP3(scheduler, schedulerId)
        await browser.click(f'#instances tr[data-instance="{row}"] button.stop')
        await browser.waitFor(f'{cell}[data-state="stopped"]', 30)
        assert (await store.instanceById(row)).state is State.STOPPED
    finally:
        await scheduler.stop()
        await store.close()
