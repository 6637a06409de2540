"""
The file server's Prometheus figures (``twistd dit4c-fileserver --metrics``),
scraped over a real socket while a real SFTP client logs in (or is refused),
writes, reads and removes files on loopback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from fileserver_client import LoginRefused, connect, readFile, writeFile
from fileserver_world import SECRET, World, portOf
from support.metrics import Figures, scrape
from support.sockets import RawClient
from support.waiting import eventually
from twisted.conch.ssh import keys
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.task import Clock
from twisted.python import usage

from dit4c.common.keys import generatePrivateKey
from dit4c.fileserver.metrics import LOGIN_OUTCOMES
from dit4c.fileserver.service import FileServerService
from dit4c.fileserver.tap import Options, makeService

LOOPBACK = "tcp:0:interface=127.0.0.1"



def metricsPortOf(service: FileServerService) -> int:
    assert service.metricsListener is not None and service.metricsListener.port is not None
    return int(service.metricsListener.port.getHost().port)  # type: ignore[attr-defined]




async def health(port: int) -> Any:
    response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
    assert response.code == 200
    return await response.json()


def logins(figures: Figures) -> dict[str, float]:
    return {outcome: figures[("dit4c_files_logins_total", (("outcome", outcome),))] for outcome in LOGIN_OUTCOMES}


def gauges(figures: Figures) -> tuple[float, float]:
    """SSH connections and SFTP sessions open now."""
    return figures[("dit4c_files_connections", ())], figures[("dit4c_files_sftp_sessions", ())]


def noLogins(**counts: int) -> dict[str, float]:
    """Every outcome at 0 but those given."""
    return {outcome: float(counts.get(outcome, 0)) for outcome in LOGIN_OUTCOMES}


def startedAt() -> Clock:
    """A clock for the file server (its deadlines, how fresh the portal's keys are), moved only by the test."""
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


async def closedDown(port: int) -> None:
    """Until the server holds no connection and no session (it learns of a client's close a moment later)."""

    async def idle() -> bool:
        return gauges(await scrape(port)) == (0, 0)

    await eventually(idle, what="connections and sessions back to 0")


@pytest_twisted.ensureDeferred
async def test_logins_sessions_and_bytes_are_counted(world: World) -> None:
    w = world
    # The server's own clock stands still: the instance's key, once fetched, stays fresh until the test stops it.
    service = w.startServer(clock=startedAt(), metricsEndpoint=serverFromString(reactor, LOOPBACK))
    port, metrics = portOf(service), metricsPortOf(service)
    before = await scrape(metrics)
    assert logins(before) == noLogins()
    assert gauges(before) == (0, 0)
    assert before[("dit4c_files_read_bytes_total", ())] == 0
    assert before[("dit4c_files_written_bytes_total", ())] == 0

    session, client = await connect(port, w.a.id, w.keyA, w.hostKey)
    data = os.urandom(70_000)  # read back in two chunks: each is counted
    await writeFile(client, "data.bin", data)
    assert await readFile(client, "data.bin") == data
    during = await scrape(metrics)
    assert logins(during) == noLogins(accepted=1)
    assert gauges(during) == (1, 1)
    assert during[("dit4c_files_written_bytes_total", ())] == 70_000
    assert during[("dit4c_files_read_bytes_total", ())] == 70_000
    assert during[("dit4c_files_removed_files_total", ())] == 0
    assert await health(metrics) == {"status": "ok", "connections": 1, "sessions": 1}

    await client.removeFile(b"data.bin")
    assert not (w.home(w.alice) / "data.bin").exists()
    assert (await scrape(metrics))[("dit4c_files_removed_files_total", ())] == 1

    await session.close()
    await closedDown(metrics)
    assert await health(metrics) == {"status": "ok", "connections": 0, "sessions": 0}

    # Someone with a key that is not the instance's.
    with pytest.raises(LoginRefused):
        await connect(port, w.a.id, generatePrivateKey(), w.hostKey)
    # Stopped after its key was fetched: the key is right, the portal says no.
    await w.store.updateInstance(w.a.id, state="stopped")
    with pytest.raises(LoginRefused):
        await connect(port, w.a.id, w.keyA, w.hostKey)
    after = await scrape(metrics)
    assert logins(after) == noLogins(accepted=1, refused=1, bad_credentials=1)
    assert after[("dit4c_files_written_bytes_total", ())] == 70_000  # refused logins touched nothing
    await closedDown(metrics)


@pytest_twisted.ensureDeferred
async def test_connections_over_the_limit_and_slow_logins_are_counted(world: World) -> None:
    w = world
    clock = startedAt()
    service = w.startServer(maxConnections=1, loginTimeout=5.0, clock=clock, metricsEndpoint=serverFromString(reactor, LOOPBACK))
    port, metrics = portOf(service), metricsPortOf(service)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    first = RawClient()
    await connectProtocol(endpoint, first)
    await eventually(lambda: first.received.startswith(b"SSH-2.0-"), what="the server's version")
    second = RawClient()
    await connectProtocol(endpoint, second)
    assert await second.done.addTimeout(10, reactor) == b""  # closed before a word
    figures = await scrape(metrics)
    assert logins(figures) == noLogins(over_limit=1)
    assert gauges(figures) == (1, 0)

    clock.advance(5.0)  # the first never logged in
    await first.done.addTimeout(10, reactor)
    assert logins(await scrape(metrics)) == noLogins(over_limit=1, timed_out=1)
    await closedDown(metrics)


@pytest_twisted.ensureDeferred
async def test_a_portal_that_cannot_be_asked_is_counted_apart(world: World) -> None:
    """A file server with the wrong shared secret: the portal answers 403 with no decision."""
    w = world
    service = FileServerService(
        reactor, endpoints=[serverFromString(reactor, LOOPBACK)], dataDir=w.tmp / "files", portal=w.portalURL,
        secret="not-the-secret-" + "x" * 16, metricsEndpoint=serverFromString(reactor, LOOPBACK),
    )  # fmt: skip
    service.startService()
    w.services.append(service)  # stopped by the world
    with pytest.raises(LoginRefused):
        await connect(portOf(service), w.a.id, w.keyA, w.hostKey)
    metrics = metricsPortOf(service)
    assert logins(await scrape(metrics)) == noLogins(portal_unavailable=1)
    await closedDown(metrics)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_figures_on_their_own_endpoint(world: World, processes: Any, tmp_path: Path) -> None:
    w = world
    secret = tmp_path / "file-server.secret"
    secret.write_text(SECRET + "\n")
    data = tmp_path / "twistd-files"
    proc = processes(
        "dit4c-fileserver", "--data-dir", str(data), "--portal", w.portalURL, "--secret-file", str(secret),
        "--listen", LOOPBACK, "--metrics", LOOPBACK,
    )  # fmt: skip
    metrics = await proc.waitForPort("file server metrics")
    port = await proc.waitForPort(r"file server \(SFTP\)")
    hostKey = keys.Key.fromString((data / "host_key.pub").read_text())
    assert logins(await scrape(metrics)) == noLogins()

    session, client = await connect(port, w.a.id, w.keyA, hostKey)
    await writeFile(client, "hello.txt", b"hello, metrics")
    assert await readFile(client, "hello.txt") == b"hello, metrics"
    figures = await scrape(metrics)
    assert logins(figures) == noLogins(accepted=1)
    assert gauges(figures) == (1, 1)
    assert figures[("dit4c_files_written_bytes_total", ())] == len(b"hello, metrics")
    assert figures[("dit4c_files_read_bytes_total", ())] == len(b"hello, metrics")
    await session.close()
    await closedDown(metrics)
    assert await health(metrics) == {"status": "ok", "connections": 0, "sessions": 0}


def test_the_metrics_option(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    base = ["--portal", "http://127.0.0.1:8000", "--secret-file", str(secret), "--data-dir", str(tmp_path / "files")]
    plain = Options()
    plain.parseOptions(base)
    assert plain["metrics"] is None
    assert makeService(plain, reactor).metricsListener is None  # type: ignore[attr-defined]
    given = Options()
    given.parseOptions([*base, "--metrics", "tcp:9105:interface=127.0.0.1"])
    assert given["metrics"] == "tcp:9105:interface=127.0.0.1"
    service = makeService(given, reactor)
    assert service.metricsListener is not None  # type: ignore[attr-defined]
    assert service.metricsListener.port is None  # type: ignore[attr-defined]  # nothing bound until it starts
    for bad in ("nonsense:1", "tcp:notaport"):
        with pytest.raises(usage.UsageError, match="--metrics"):
            Options().parseOptions([*base, "--metrics", bad])
