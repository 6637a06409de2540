"""
The public servers as an operator runs them, for the attacks in
tests/security/: ``twistd dit4c-portal``, ``twistd dit4c-routing``, the auth
helper (``python -m twisted dit4c-helper-auth`` with the helper environment,
as a node starts it) and ``twistd dit4c-imageserver``, each a real process
on a loopback port it chose (read back from its log); and clients that
misbehave on plain blocking sockets (the servers are other processes, so
nothing here needs the reactor).
"""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from support.passwords import cheapHash
from support.processes import Process
from twisted.internet import reactor

from dit4c.common.helperenv import HelperEnvironment, toEnvironment
from dit4c.common.keys import generatePrivateKey, savePrivateKey
from dit4c.portal.store import openStore

LOCAL = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024
GiB = 1024 * MiB
PASSWORD = "correct horse battery"


@dataclass
class RunningPortal:
    process: Process
    port: int
    #: The portal's TMPDIR: where twisted.web would spool a large body.
    spool: Path
    database: Path
    #: A personal API token of alice's.
    token: str
    #: The port schedulers may dial besides the web port (``--channel``).
    channelPort: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def filesUnder(self, directory: Path) -> list[str]:
        """The portal's open files under ``directory``, unlinked ones included (what psutil leaves out)."""
        found = []
        fds = Path(f"/proc/{self.process.pid}/fd")
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(directory) + "/"):
                found.append(target)
        return found


async def startPortal(processes: Any, tmp_path: Path) -> RunningPortal:
    """``twistd dit4c-portal`` with its own TMPDIR, alice registered, and an API token of hers."""
    spool = tmp_path / "portal-tmp"
    spool.mkdir()
    data = tmp_path / "portal"
    proc: Process = processes(
        "dit4c-portal", "--listen", LOCAL, "--channel", LOCAL, "--data-dir", str(data),
        "--public-url", "http://portal.localhost", name="portal", env={"TMPDIR": str(spool)},
    )  # fmt: skip
    await proc.waitForLog(r"portal listening on IPv4Address", 30)
    await proc.waitForLog(r"scheduler channel listening on IPv4Address", 30)
    database = data / "portal.db"
    store = await openStore(f"sqlite:///{database}", reactor)
    try:
        alice = await store.createUser("alice", password_hash=cheapHash(PASSWORD))
        _, token = await store.createApiToken(alice.id, "tests")
    finally:
        await store.close()
    return RunningPortal(proc, proc.port("portal"), spool, database, token, proc.port("scheduler channel"))


async def startRouting(processes: Any, signing: Any) -> Process:
    """``twistd dit4c-routing``, once its tunnel port and public HTTP port are bound."""
    proc: Process = processes(
        "dit4c-routing", "--tunnel", LOCAL, "--http", LOCAL,
        "--jwks-file", str(signing.jwksPath), "--domain", "localhost", name="routing",
    )  # fmt: skip
    await proc.waitForLog(r"tunnel listening on IPv4Address", 30)
    await proc.waitForLog(r"public http listening on IPv4Address", 30)
    return proc


async def startAuthHelper(tmp_path: Path, portal: str, started: list[Process]) -> int:
    """The auth helper of an instance, as a node starts it (``python -m twisted``, the helper environment): its port."""
    key = tmp_path / "instance.pem"
    savePrivateKey(generatePrivateKey(), key)
    env = toEnvironment(
        HelperEnvironment(
            instance="hm8nsrkm2namn9hm3",
            keyFile=str(key),
            portal=portal,
            tool="tcp:host=127.0.0.1:port=9",
            authListen=LOCAL,
        )
    )
    proc = Process(
        [sys.executable, "-m", "twisted", "--log-format=text", "dit4c-helper-auth"], tmp_path / "auth.log", env
    )
    started.append(proc)
    await proc.waitForLog(r"auth helper listening on IPv4Address", 30)
    return proc.port("auth helper")


async def startImageServer(processes: Any, tmp_path: Path, portal: str) -> int:
    """``twistd dit4c-imageserver`` asking ``portal``: its port."""
    secret = tmp_path / "image-server.secret"
    secret.write_text("image-server-secret-0123456789\n")
    proc: Process = processes(
        "dit4c-imageserver", "--listen", LOCAL, "--data-dir", str(tmp_path / "images"),
        "--portal", portal, "--secret-file", str(secret), name="images",
    )  # fmt: skip
    await proc.waitForLog(r"image server listening on", 30)
    return proc.port("image server")


# -- clients that misbehave ---------------------------------------------------------------------


def status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    assert match, answer[:300]
    return int(match.group(1))


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send ``data``, then read until the answer's head is in (or the server closes); the answer so far."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            answer += more
        return answer


@dataclass
class Pushed:
    #: What the server answered (while the body was still being sent).
    answer: bytes
    #: Body bytes the kernel took before the server reset the connection (or the body ended).
    sent: int
    #: Whether the server reset the connection: it stopped reading.
    cut: bool


def push(port: int, head: bytes, body: Iterator[bytes], watch: Any = None, timeout: float = 60.0) -> Pushed:
    """
    Send ``head``, then ``body`` as fast as the server takes it, reading
    whatever it answers meanwhile, until the server resets the connection
    (or the body ends, or ``timeout``); ``watch()`` is called after every
    4 MiB sent.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(head)
        s.setblocking(False)
        answer, sent, pending = b"", 0, b""
        reading, cut = True, False
        nextWatch = 4 * MiB
        deadline = time.monotonic() + timeout
        while not cut and time.monotonic() < deadline:
            readable, writable, _ = select.select([s] if reading else [], [s], [], 0.5)
            if readable:
                try:
                    more = s.recv(65536)
                except BlockingIOError:
                    more = b"-"
                except ConnectionResetError:
                    more, cut = b"", True
                if not more:
                    reading = False  # the server shut its side; it may still read (and drop) a while
                elif more != b"-":
                    answer += more
            if writable and not cut:
                pending = pending or next(body, b"")
                if not pending:
                    break
                try:
                    n = s.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    cut = True
                except BlockingIOError:
                    pass
                else:
                    sent += n
                    pending = pending[n:]
                    if watch is not None and sent >= nextWatch:
                        watch()
                        nextWatch += 4 * MiB
        if reading:
            # The answer may have come with the reset, after the last look:
            # it is still in the socket's buffer (what a browser would show).
            answer += drain(s)
        return Pushed(answer, sent, cut)
    finally:
        s.close()


def drain(s: socket.socket, wait: float = 1.0) -> bytes:
    """What is left to read on ``s`` until its end, a reset or ``wait`` seconds of silence."""
    s.settimeout(wait)
    got = b""
    while True:
        try:
            more = s.recv(65536)
        except OSError:  # a reset, or no more within ``wait``
            return got
        if not more:
            return got
        got += more


def lengthBody(total: int, piece: int = 256 * 1024) -> Iterator[bytes]:
    block = b"x" * piece
    left = total
    while left > 0:
        yield block[: min(piece, left)]
        left -= piece


def chunkedBody(total: int, piece: int = 256 * 1024) -> Iterator[bytes]:
    for block in lengthBody(total, piece):
        yield b"%x\r\n" % len(block) + block + b"\r\n"
    yield b"0\r\n\r\n"


def drip(
    port: int, data: bytes, connections: int = 1, interval: float = 0.5, limit: float = 35.0, during: Any = None
) -> list[float]:
    """
    Open ``connections`` connections and send ``data`` on each one byte
    every ``interval`` seconds; the seconds until the server cut each one
    (``inf`` if it did not within ``limit``). ``during(open)`` is called
    once, 2 s in, with the number of connections still open.
    """
    sockets = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        sockets.append(s)
    start = time.monotonic()
    cut: dict[socket.socket, float] = {}
    sentBytes = {s: 0 for s in sockets}
    nextSend = start
    called = during is None
    try:
        while len(cut) < len(sockets) and time.monotonic() - start < limit:
            live = [s for s in sockets if s not in cut]
            readable, _, _ = select.select(live, [], [], 0.05)
            now = time.monotonic()
            for s in readable:
                try:
                    more = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    more = b""
                if not more:  # (an answer, a 408, comes first: the close follows)
                    cut[s] = now - start
            if now >= nextSend:
                for s in sockets:
                    if s in cut or sentBytes[s] >= len(data):
                        continue
                    try:
                        s.send(data[sentBytes[s] : sentBytes[s] + 1])
                        sentBytes[s] += 1
                    except (BrokenPipeError, ConnectionResetError):
                        cut[s] = now - start
                    except BlockingIOError:
                        pass
                nextSend += interval
            if not called and now - start >= 2.0:
                called = True
                during(len(sockets) - len(cut))
        return [cut.get(s, float("inf")) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slowHead(host: bytes = b"localhost", path: bytes = b"/") -> bytes:
    """A request head that never ends (an endless header line), to send one byte at a time."""
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-Slow: " + b"a" * 4096


def slowTunnelHello() -> bytes:
    """A tunnel's preface and the start of a ``HELLO`` frame that never ends (docs/protocols.md 1.2)."""
    from dit4c.tunnel.frames import PREFACE, encodeHeader

    return PREFACE + encodeHeader(0, 0, 4096) + b'{"version": 1, "token": "' + b"a" * 4000
