"""The file server's limits, over real sockets: connections at once, idle connections, open files; and its options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from fileserver_client import FXF_CREAT, FXF_WRITE, connect
from fileserver_world import SECRET, World, portOf
from support.waiting import eventually
from twisted.conch.ssh import filetransfer
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage

from dit4c.fileserver.service import FileServerService
from dit4c.fileserver.tap import Options


class Raw(protocol.Protocol):
    """A TCP client that says nothing and records what it hears."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def raw(port: int) -> Raw:
    client = Raw()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    return client


async def greeted(*clients: Raw) -> None:
    """Until the server has said its version to each: it holds their connections."""
    await eventually(lambda: all(c.received.startswith(b"SSH-2.0-") for c in clients))


def closedWhenDue(clock: Clock, service: FileServerService, due: float) -> None:
    """
    Move ``clock`` to just before ``due`` seconds: the server's one
    connection is still open; then to ``due``: the server is closing it.
    """

    def closing() -> list[bool]:
        return [bool(t.transport.disconnecting) for t in service.factory.live]

    clock.advance(due - 0.1)
    assert closing() == [False]
    clock.advance(0.1)
    assert closing() == [True]


def startedAt() -> Clock:
    """The file server's clock, for its timeouts: moved by the test."""
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


@pytest_twisted.ensureDeferred
async def test_connections_past_the_limit_are_closed(world: World) -> None:
    w = world
    port = portOf(w.startServer(maxConnections=2))
    first, second = await raw(port), await raw(port)
    await greeted(first, second)
    third = await raw(port)
    await third.lost
    assert third.received == b""
    # A place frees when a connection ends.
    first.transport.loseConnection()
    await first.lost
    session, client = await connect(port, w.a.id, w.keyA, w.hostKey)
    await session.close()
    second.transport.loseConnection()
    await second.lost


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed(world: World) -> None:
    w = world
    clock = startedAt()
    service = w.startServer(idleTimeout=0.5, clock=clock)
    port = portOf(service)
    silent = await raw(port)
    await greeted(silent)
    closedWhenDue(clock, service, 0.5)
    await silent.lost.addTimeout(10, reactor)
    # A logged-in SFTP session that goes quiet too.
    session, client = await connect(port, w.a.id, w.keyA, w.hostKey)
    closedWhenDue(clock, service, 0.5)
    await session.closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_slow_logins_are_closed(world: World) -> None:
    w = world
    clock = startedAt()
    service = w.startServer(loginTimeout=0.5, clock=clock)
    client = await raw(portOf(service))
    # Key exchange only would need a real client: say the version and wait.
    client.transport.write(b"SSH-2.0-test\r\n")
    await greeted(client)
    closedWhenDue(clock, service, 0.5)
    await client.lost.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_open_files_are_limited(world: World) -> None:
    w = world
    port = portOf(w.startServer(maxHandles=3))
    session, client = await connect(port, w.a.id, w.keyA, w.hostKey)
    files = [await client.openFile(f"f{i}".encode(), FXF_WRITE | FXF_CREAT, {}) for i in range(3)]
    with pytest.raises(filetransfer.SFTPError):
        await client.openFile(b"f3", FXF_WRITE | FXF_CREAT, {})
    with pytest.raises(filetransfer.SFTPError):
        await client.openDirectory(b"/")
    await files[0].close()
    await (await client.openFile(b"f3", FXF_WRITE | FXF_CREAT, {})).close()
    await session.close()


def test_options(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    options = Options()
    options.parseOptions(["--portal", "http://127.0.0.1:8000", "--secret-file", str(secret), "--max-connections", "7", "--idle-timeout", "9"])
    assert options["secret"] == SECRET
    assert options["listen"] == ["tcp:8700:interface=127.0.0.1"]
    assert (options["max-connections"], options["idle-timeout"]) == (7, 9.0)
    bad = [
        [],
        ["--portal", "http://p"],
        ["--portal", "ftp://p", "--secret-file", str(secret)],
        ["--portal", "http://p", "--secret-file", str(tmp_path / "missing")],
        ["--portal", "http://p", "--secret-file", str(secret), "--max-connections", "0"],
        ["--portal", "http://p", "--secret-file", str(secret), "--listen", "nonsense:1"],
    ]
    for args in bad:
        with pytest.raises(usage.UsageError):
            Options().parseOptions(args)
    secret.write_text("short")
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--portal", "http://p", "--secret-file", str(secret)])


def test_the_session_limit_counts_sessions_open_at_once(tmp_path: Path) -> None:
    """Four SFTP sessions on one connection at once; one closed, another may open (a remount reuses its connection)."""
    from twisted.internet.task import Clock

    from dit4c.fileserver.access import Access
    from dit4c.fileserver.jail import Jail
    from dit4c.fileserver.server import MAX_SESSIONS, StorageUser

    user = StorageUser(Access("i1", "u1", None, Clock(), 0.0), Jail(tmp_path))  # type: ignore[arg-type]
    sessions = [user.lookupSubsystem(b"sftp", b"") for _ in range(MAX_SESSIONS)]
    assert None not in sessions
    assert user.lookupSubsystem(b"sftp", b"") is None
    sessions[0].connectionLost(None)
    sessions[0].connectionLost(None)  # said twice, as Conch may: counted once
    assert user.lookupSubsystem(b"sftp", b"") is not None
    assert user.lookupSubsystem(b"sftp", b"") is None
