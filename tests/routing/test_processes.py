"""
The real programs, as separate processes: ``twistd dit4c-routing`` and
``twistd dit4c-helper-listener`` started the way an operator starts them,
with the backend web tool (``support.backend``) in this process.

These tests watch what only a real process shows: option parsing and usage
errors, peak memory while hundreds of megabytes pass, a peer frozen with
SIGSTOP, a routing server restarted under a running listener, a listener
killed with SIGKILL mid-download, and the admin endpoint. The last tests
guard against two bugs found here (connections left open after a large
response; an unreadable JWKS file reported with a traceback).

Every address is ``tcp:0:interface=127.0.0.1`` and ports are learnt from
the logs (where a restart must keep the tunnel's address, it is a Unix
socket). The reactor is never blocked: waits go through ``waitForLog`` and
``eventually``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from support.backend import patternDigest
from support.processes import TWISTD, Process
from support.waiting import eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from dit4c.listener.tap import Options as ListenerOptions
from dit4c.routing.tap import Options as RoutingOptions

MiB = 1024 * 1024
LOCAL = "tcp:0:interface=127.0.0.1"

#: Bytes moved each way by the bulk test.
BULK = 300 * MiB
#: A response small enough never to pass the routing server's 64 KiB transport
#: buffer: larger ones can leave a ``Connection: close`` exchange open (a dit4c
#: bug, see test_connection_closes_after_a_large_response).
SMALL = 60_000
#: Seconds the bulk download's reader stops reading.
STALL = 1.0
#: What peak RSS may grow by, over its level after start-up and one small request.
RSS_ALLOWANCE = 64 * MiB


# -- starting the programs ---------------------------------------------------------------


async def startRouting(
    processes: Any,
    signing: Any,
    *extra: str,
    tunnel: str = LOCAL,
    http: str = LOCAL,
    admin: bool = False,
    name: str = "routing",
) -> Process:
    """``twistd dit4c-routing`` on loopback; returns once every port is bound."""
    args = ["--tunnel", tunnel, "--http", http, "--jwks-file", str(signing.jwksPath), "--domain", "localhost"]
    if admin:
        args += ["--admin", LOCAL]
    proc: Process = processes("dit4c-routing", *args, *extra, name=name)
    await proc.waitForLog(r"tunnel listening on (IPv4|UNIX)Address")
    await proc.waitForLog(r"public http listening on IPv4Address")
    if admin:
        await proc.waitForLog(r"admin listening on IPv4Address")
    return proc


async def startListener(
    processes: Any,
    signing: Any,
    tmp_path: Path,
    routing: Process,
    instance: str,
    target: str,
    *,
    tokens: Path | None = None,
    name: str | None = None,
    wait: bool = True,
    dial: str | None = None,
) -> Process:
    """
    ``twistd dit4c-helper-listener`` for ``instance``, signing its own tokens
    with the key the routing server trusts (as README says); returns once it
    is registered. ``tokens`` instead names a token file; ``dial``, the
    routing server's tunnel endpoint (default: its TCP port).
    """
    how = ["--token-file", str(tokens)] if tokens else ["--key-file", str(signing.keyPath), "--instance", instance]
    proc: Process = processes(
        "dit4c-helper-listener",
        "--routing", dial or f"tcp:host=127.0.0.1:port={routing.port('tunnel')}",
        *how,
        "--target", target,
        name=name or f"listener-{instance}",
    )  # fmt: skip
    if wait:
        await proc.waitForLog(rf"tunnel up: instance {instance} at http://{instance}\.localhost:\d+/")
        await routing.waitForLog(rf"tunnel for {instance} from .* registered")
    return proc


async def waitForExit(proc: Process, timeout: float = 15.0) -> int:
    await eventually(
        lambda: proc.proc.poll() is not None, timeout, 0.05, lambda: f"{proc.args[4:6]} to exit:\n{proc.log()}"
    )
    return int(proc.proc.returncode)


def assertNoTraceback(*procs: Process) -> None:
    for proc in procs:
        text = proc.log()
        assert "Traceback" not in text and "Unhandled" not in text, text


# -- HTTP clients --------------------------------------------------------------------------


class RawHTTP(Protocol):
    """
    One request on one connection, by hand: counts (and keeps, unless told not
    to) what comes back, and says how the connection ended. Lets a test see a
    connection being cut, which a full HTTP client would turn into a retry or
    an exception somewhere else.
    """

    def __init__(self, request: bytes, keep: bool = True) -> None:
        self.request = request
        self.keep = keep
        self.received = 0
        self.data: list[bytes] = []
        #: The first bytes, kept even when ``keep`` is false.
        self.head = b""
        #: Fires (with None) when the connection has ended; ``reason`` says how.
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.firstBytes: defer.Deferred[None] = defer.Deferred()
        self.watermark: tuple[int, defer.Deferred[None]] | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]
        self.received += len(data)
        if self.keep:
            self.data.append(data)
        if not self.firstBytes.called:
            self.firstBytes.callback(None)
        if self.watermark is not None and self.received >= self.watermark[0]:
            _, d = self.watermark
            self.watermark = None
            d.callback(None)

    def whenReceived(self, n: int) -> defer.Deferred[None]:
        """Fires once at least ``n`` bytes have come."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.received >= n:
            d.callback(None)
        else:
            self.watermark = (n, d)
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason or Failure(ConnectionDone())
        self.lost.callback(None)

    async def whenComplete(self) -> None:
        """Fires once the head and a ``Content-Length`` body have come (the
        connection may stay open)."""
        await self.firstBytes
        while b"\r\n\r\n" not in self.head:
            await self.whenReceived(len(self.head) + 1)
        head, _, _ = self.head.partition(b"\r\n\r\n")
        match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
        assert match, head
        await self.whenReceived(len(head) + 4 + int(match.group(1)))

    def status(self) -> int:
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", self.head)
        assert match, self.head[:200]
        return int(match.group(1))

    def body(self) -> bytes:
        return b"".join(self.data).partition(b"\r\n\r\n")[2]


class SlowReader(RawHTTP):
    """Reads one chunk, then stops reading for a moment: a slow client."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.pauseProducing()
        reactor.callLater(0.004, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.resumeProducing()


async def slowConnect(port: int, request: bytes, keep: bool = False) -> SlowReader:
    """A slow client with a small receive buffer, so that the routing server's own buffer backs up."""
    reader = SlowReader(request, keep)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))  # loopback: at once
        sock.setblocking(False)
        # Adopting it calls connectionMade (which sends the request) before returning.
        reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: reader))
    assert reader.transport is not None
    return reader


async def rawConnect(port: int, request: bytes, keep: bool = True) -> RawHTTP:
    protocol = RawHTTP(request, keep)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    return protocol


def getRequest(host: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


async def fetch(port: int, host: str, path: str = "/", timeout: float = 10.0) -> RawHTTP:
    """A whole ``Connection: close`` exchange; the connection is closed afterwards."""
    protocol = await rawConnect(port, getRequest(host, path))
    try:
        await defer.Deferred.addTimeout(protocol.lost, timeout, reactor)
    except defer.TimeoutError:
        protocol.transport.abortConnection()
        raise AssertionError(
            f"no complete answer from {host}{path} in {timeout}s "
            f"({protocol.received} bytes: {b''.join(protocol.data)[:300]!r})"
        ) from None
    return protocol


async def waitForStatus(port: int, host: str, path: str, status: int, timeout: float) -> float:
    """Poll until ``host`` answers ``status``; returns the seconds it took (a figure to print)."""
    started = time.monotonic()
    last: Any = None

    async def answered() -> bool:
        nonlocal last
        try:
            last = (await fetch(port, host, path, timeout=2.0)).status()
        except Exception as e:  # refused while a server restarts, or cut off
            last = e
        return bool(last == status)

    await eventually(answered, timeout, 0.2, lambda: f"{host}{path} to answer {status} (last: {last!r})")
    return time.monotonic() - started


def httpClient() -> Any:
    """treq over a pool that keeps no connection: one connection per request, closed after."""
    return treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class StallingHashReader(Protocol):
    """
    A response body reader that hashes and counts what comes, and once, after
    ``stallAt`` bytes, stops reading for ``stallFor`` seconds.
    """

    def __init__(self, stallAt: int, stallFor: float) -> None:
        self.sha256 = hashlib.sha256()
        self.received = 0
        self.stallAt = stallAt
        self.stallFor = stallFor
        self.stalled = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.sha256.update(data)
        if not self.stalled and self.received >= self.stallAt:
            self.stalled = True
            self.transport.pauseProducing()
            reactor.callLater(self.stallFor, self.transport.resumeProducing)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is not None and not reason.check(ResponseDone):
            self.done.errback(reason)
        else:
            self.done.callback(None)


@implementer(IBodyProducer)
class GeneratedBody:
    """
    A request body made up as it is sent (never held whole) and hashed on
    the way out. A push producer: the transport pauses it when its buffer
    fills.
    """

    def __init__(self, length: int, block: int = 64 * 1024) -> None:
        self.length = length
        self.remaining = length
        self.sha256 = hashlib.sha256()
        self._block = block
        self._seed = os.urandom(block + 4096)
        self._n = 0
        self._paused = False
        self._stopped = False
        self._consumer: Any = None
        self._done: defer.Deferred[None] = defer.Deferred()

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self._consumer = consumer
        reactor.callLater(0, self.resumeProducing)
        return self._done

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self._stopped and self.remaining > 0:
            offset = (self._n * 97) % 4096
            self._n += 1
            chunk = self._seed[offset : offset + min(self._block, self.remaining)]
            self.remaining -= len(chunk)
            self.sha256.update(chunk)
            self._consumer.write(chunk)
        if self.remaining == 0 and not self._stopped:
            self._stopped = True
            self._done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._done.errback(Exception("upload stopped"))


# -- 1. options -------------------------------------------------------------------------------


def documentedOptions(helpText: str) -> dict[str, str]:
    """``--name`` → the first line of its description, from a usage text."""
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^\s+--([a-z][a-z-]*)=?[ \t]*(.*)$", helpText, re.MULTILINE)
    }


def declaredOptions(options: type) -> set[str]:
    names = {p[0] for p in getattr(options, "optParameters", [])}
    names |= {f[0] for f in getattr(options, "optFlags", [])}
    names |= {a[4:].replace("_", "-") for a in dir(options) if a.startswith("opt_")}
    return names - {"help", "version"}


async def runTwistd(cwd: Path, *args: str) -> tuple[int, str]:
    out, err, code = await getProcessOutputAndValue(
        TWISTD[0], [*TWISTD[1:], *args], env=dict(os.environ), path=str(cwd)
    )
    return code, (out + err).decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_help_documents_every_option(tmp_path: Path) -> None:
    (routingCode, routingHelp), (listenerCode, listenerHelp) = await defer.gatherResults(
        [
            defer.ensureDeferred(runTwistd(tmp_path, "dit4c-routing", "--help")),
            defer.ensureDeferred(runTwistd(tmp_path, "dit4c-helper-listener", "--help")),
        ]
    )
    for code, text, options, required in (
        (
            routingCode,
            routingHelp,
            RoutingOptions,
            {"tunnel", "tunnel-websocket", "http", "https", "admin", "jwks-file", "jwks-url", "audience",
             "issuer", "domain", "public-url", "heartbeat", "timeout", "max-streams", "head-timeout",
             "idle-timeout", "drain-timeout", "max-token-lifetime", "max-seen-tokens", "max-connections"},
        ),
        (listenerCode, listenerHelp, ListenerOptions, {"routing", "key-file", "instance", "token-file", "target"}),
    ):  # fmt: skip
        assert code == 0, text
        assert "Traceback" not in text
        documented = documentedOptions(text)
        assert required <= declaredOptions(options)
        for name in required | declaredOptions(options):
            assert name in documented, f"--{name} missing from:\n{text}"
            assert documented[name], f"--{name} has no description in:\n{text}"
    assert "Repeatable" in routingHelp
    assert (
        "dit4c-helper-listener [--routing ENDPOINT | --onion CONTROL_ENDPOINT] [--target ENDPOINT]"
        " [--key-file PATH --instance ID | --token-file PATH]"
        in listenerHelp
    )
    # The token rules and the cap's default are said where an operator looks.
    words = " ".join(routingHelp.split())
    assert "(exp - iat); longer ones are refused. [default: 300.0]" in words
    assert "not have been seen before" in words
    assert "DIT4C_INSTANCE_KEY" in listenerHelp  # run beside an instance, it reads the helper environment


#: (arguments after the plugin name, a phrase the error must contain)
BAD_ROUTING = [
    (["--http", LOCAL, "--jwks-file", "{jwks}"], "give at least one --tunnel or --tunnel-websocket"),
    (["--tunnel", LOCAL, "--jwks-file", "{jwks}"], "give at least one --http or --https"),
    (["--tunnel", "bogus:1", "--http", LOCAL, "--jwks-file", "{jwks}"], "--tunnel: bad endpoint 'bogus:1'"),
    (["--tunnel", LOCAL, "--http", "tcp:notaport", "--jwks-file", "{jwks}"], "--http: bad endpoint"),
    (["--tunnel", LOCAL, "--http", LOCAL], "give exactly one of --jwks-url and --jwks-file"),
    (["--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", "{jwks}", "--heartbeat", "soon"], "'soon' is not a number"),
    (["--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", "{jwks}", "--heartbeat", "5", "--timeout", "2"],
     "--timeout must be longer than --heartbeat"),
    (["--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", "{jwks}", "--no-such-option"], "no-such-option"),
    (["--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", "{jwks}", "--max-token-lifetime", "0"], "'0' must be positive"),
    (["--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", "{jwks}", "--max-seen-tokens", "many"],
     "'many' is not a whole number"),
]  # fmt: skip

BAD_LISTENER = [
    (["--target", "tcp:host=127.0.0.1:port=1", "--token-file", "{token}"], "--routing is required"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--token-file", "{token}"], "--target is required"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2"],
     "--key-file with --instance (or --token-file) is required"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--token-file", "{missing}"],
     "is not a file"),
    (["--routing", "tcp:host=127.0.0.1", "--target", "tcp:host=127.0.0.1:port=2", "--token-file", "{token}"],
     "--routing: bad endpoint"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "nope:x", "--token-file", "{token}"],
     "--target: bad endpoint 'nope:x'"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--key-file", "{key}"],
     "--key-file needs --instance"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--key-file", "{key}",
      "--instance", "abc", "--token-file", "{token}"], "not both"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--key-file", "{key}",
      "--instance", "Not_A_Label"], "--instance: not an instance id"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--key-file", "{missing}",
      "--instance", "abc"], "--key-file: cannot read"),
    (["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2", "--key-file", "{token}",
      "--instance", "abc"], "--key-file: "),
]  # fmt: skip


@pytest.mark.parametrize(
    "plugin, options, args, phrase",
    [("dit4c-routing", RoutingOptions, args, phrase) for args, phrase in BAD_ROUTING]
    + [("dit4c-helper-listener", ListenerOptions, args, phrase) for args, phrase in BAD_LISTENER],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, signing: Any, plugin: str, options: Any, args: list[str], phrase: str
) -> None:
    """
    Every mistake is refused while the options are read, with a one-line
    reason: a ``UsageError``, which twistd prints under the usage text and
    exits non-zero for, with no traceback (as the test below shows with
    the real command, once per plugin).
    """
    with pytest.raises(usage.UsageError) as refused:
        options().parseOptions([a.format(**badPaths(tmp_path, signing)) for a in args])
    assert phrase in str(refused.value)
    assert "\n" not in str(refused.value).strip()


def badPaths(tmp_path: Path, signing: Any) -> dict[str, str]:
    """The files the bad options name: a JWKS, a routing token, a key, and a path with nothing there."""
    token = tmp_path / "token"
    token.write_text(signing.token("abc"))
    return {
        "jwks": str(signing.jwksPath),
        "token": str(token),
        "missing": str(tmp_path / "nope"),
        "key": str(signing.keyPath),
    }


@pytest_twisted.ensureDeferred
async def test_twistd_prints_a_bad_option_under_the_usage_and_exits(tmp_path: Path, signing: Any) -> None:
    """As a person runs it: non-zero, the usage text and the one-line reason, no traceback, no pid file."""
    paths = badPaths(tmp_path, signing)
    cases = [("dit4c-routing", *BAD_ROUTING[0]), ("dit4c-helper-listener", *BAD_LISTENER[-1])]
    results = await defer.gatherResults(
        [
            defer.ensureDeferred(runTwistd(tmp_path, "-n", "--pidfile=", plugin, *(a.format(**paths) for a in args)))
            for plugin, args, _ in cases
        ]
    )
    for (plugin, args, phrase), (code, text) in zip(cases, results, strict=True):
        where = f"{plugin} {' '.join(args)}:\n{text}"
        assert code != 0, where
        assert "Traceback" not in text, where
        assert "Usage:" in text, where
        assert phrase in text, where
    assert not (tmp_path / "twistd.pid").exists()


@pytest_twisted.ensureDeferred
async def test_unreadable_jwks_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.json").write_text("not a key\n")
    for jwks in (tmp_path / "missing.json", tmp_path / "garbage.json"):
        code, text = await runTwistd(
            tmp_path, "-n", "--pidfile=", "dit4c-routing",
            "--tunnel", LOCAL, "--http", LOCAL, "--jwks-file", str(jwks),
        )  # fmt: skip
        assert code != 0, text
        assert "Traceback" not in text, text
        assert str(jwks) in text, text


# -- 2. bulk transfers, bounded memory ------------------------------------------------------------


def rssMiB(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_bulk_transfers_with_bounded_memory(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    routing = await startRouting(processes, signing)
    listener = await startListener(processes, signing, tmp_path, routing, "bulk", backend.endpoint)
    port = routing.port("public http")
    host = "bulk.localhost"
    client = httpClient()
    base = f"http://127.0.0.1:{port}"

    # Start-up and one small request in each direction: the baseline.
    response = await client.get(f"{base}/bytes?n=1000", headers={"Host": host})
    assert response.code == 200
    assert hashlib.sha256(await response.content()).hexdigest() == patternDigest(1000)
    response = await client.post(f"{base}/sink", data=b"hello", headers={"Host": host})
    assert await response.json() == {"length": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    baseline = {"routing": routing.peakRSS(), "listener": listener.peakRSS()}

    # Download: hashed as it arrives, never held. The reader stalls for a
    # second early on: back-pressure, not memory, must absorb that.
    body = StallingHashReader(stallAt=32 * MiB, stallFor=STALL)
    started = time.monotonic()
    response = await client.get(f"{base}/bytes?n={BULK}", headers={"Host": host}, unbuffered=True)
    assert response.code == 200
    assert response.length == BULK
    response.deliverBody(body)
    await body.done
    downSeconds = time.monotonic() - started - STALL
    assert body.received == BULK
    assert body.sha256.hexdigest() == patternDigest(BULK)
    assert body.stalled

    # Upload: made up and hashed as it is sent; the backend hashes what it gets.
    body = GeneratedBody(BULK)
    started = time.monotonic()
    response = await client.post(
        f"{base}/sink",
        data=body,
        headers={"Host": host, "Content-Type": "application/octet-stream"},
    )
    assert response.code == 200
    sink = await response.json()
    upSeconds = time.monotonic() - started
    assert sink == {"length": BULK, "sha256": body.sha256.hexdigest()}

    peak = {"routing": routing.peakRSS(), "listener": listener.peakRSS()}
    print(
        f"\n{BULK // MiB} MiB through a real routing server and listener: "
        f"download {BULK / MiB / downSeconds:.0f} MiB/s ({downSeconds:.1f}s, not counting a {STALL:.0f}s stall), "
        f"upload {BULK / MiB / upSeconds:.0f} MiB/s ({upSeconds:.1f}s)"
    )
    for what in ("routing", "listener"):
        print(
            f"  {what}: peak RSS {rssMiB(baseline[what])} after start-up -> {rssMiB(peak[what])} "
            f"after transfers (+{rssMiB(peak[what] - baseline[what])})"
        )
    for what in ("routing", "listener"):
        assert peak[what] < baseline[what] + RSS_ALLOWANCE, (what, baseline[what], peak[what])
    assertNoTraceback(routing, listener)


# -- 3. a frozen peer --------------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_frozen_listener_is_noticed_by_heartbeat(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    heartbeat, timeout = 0.5, 2.0
    routing = await startRouting(processes, signing, "--heartbeat", str(heartbeat), "--timeout", str(timeout))
    listener = await startListener(processes, signing, tmp_path, routing, "frozen", backend.endpoint)
    port = routing.port("public http")
    host = "frozen.localhost"
    assert (await fetch(port, host, "/bytes?n=10")).status() == 200

    # A slow download far too long to finish; freeze the listener once it flows.
    download = await slowConnect(port, getRequest(host, f"/bytes?n={100 * 1024 * MiB}"))
    await defer.Deferred.addTimeout(download.whenReceived(MiB), 10, reactor)
    mark, listenerMark = len(routing.log()), len(listener.log())
    listener.signal(signal.SIGSTOP)
    frozenAt = time.monotonic()
    try:
        # The routing server gives up on it: only its heartbeat can tell (the
        # frozen process's kernel keeps the socket open and acknowledges).
        await routing.waitForLog(r"tunnel peer .* silent for [\d.]+s; closing", start=mark)
        await routing.waitForLog(r"tunnel for frozen closed", start=mark)
        noticed = time.monotonic() - frozenAt
        # The public connection that was in flight is closed, not left hanging.
        await defer.Deferred.addTimeout(download.lost, 10.0, reactor)
        assert download.reason is not None
        cut = time.monotonic() - frozenAt
        assert download.received < 100 * 1024 * MiB
        answer = await fetch(port, host, "/bytes?n=10")
        assert answer.status() == 404, answer.data
        print(
            f"\nfrozen listener (heartbeat {heartbeat}s, timeout {timeout}s): tunnel dropped after "
            f"{noticed:.1f}s, client cut after {cut:.1f}s ({download.reason.type.__name__})"
        )
    finally:
        listener.signal(signal.SIGCONT)

    # Thawed, the listener finds its tunnel dead and dials again.
    await listener.waitForLog(r"tunnel up: instance frozen at", start=listenerMark)
    how = "its own heartbeat" if "silent for" in listener.log()[listenerMark:] else "the closed socket"
    print(f"thawed listener noticed the dead tunnel by {how} and registered again")
    await routing.waitForLog(r"tunnel for frozen from .* registered", start=mark)
    answer = await fetch(port, host, f"/bytes?n={SMALL}")
    assert answer.status() == 200
    assert hashlib.sha256(answer.body()).hexdigest() == patternDigest(SMALL)
    assertNoTraceback(routing, listener)


# -- 4. the routing server restarted ------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_listener_reconnects_to_restarted_routing_server(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    # The tunnel on a Unix socket: the address the listener dials stays the
    # routing server's across the restart (a TCP port, once closed, is anyone's).
    tunnel = tmp_path / "tunnel.sock"
    first = await startRouting(processes, signing, tunnel=f"unix:{tunnel}", name="routing-first")
    httpPort = first.port("public http")
    listener = await startListener(
        processes, signing, tmp_path, first, "phoenix", backend.endpoint, dial=f"unix:path={tunnel}"
    )
    host = "phoenix.localhost"
    assert (await fetch(httpPort, host, "/bytes?n=10")).status() == 200

    first.signal(signal.SIGTERM)
    code = await waitForExit(first)
    # twistd ends by re-raising the signal it stopped on.
    assert code in (0, -signal.SIGTERM), first.log()
    assert "Server Shut Down." in first.log()
    stoppedAt = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await rawConnect(httpPort, b"")

    mark = len(listener.log())
    second = await startRouting(processes, signing, tunnel=f"unix:{tunnel}", name="routing-second")
    took = await waitForStatus(second.port("public http"), host, "/bytes?n=10", 200, timeout=15.0)
    await listener.waitForLog(r"tunnel up: instance phoenix at", start=mark)
    print(f"\nrouting server restarted: traffic again {time.monotonic() - stoppedAt:.1f}s after it stopped "
          f"({took:.1f}s after the new one bound its ports)")
    assert listener.proc.poll() is None
    assertNoTraceback(first, second, listener)


# -- 5. a listener killed mid-download -------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_killed_listener_cuts_its_clients_only(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    routing = await startRouting(processes, signing)
    port = routing.port("public http")
    doomed = await startListener(processes, signing, tmp_path, routing, "doomed", backend.endpoint)
    other = await startListener(processes, signing, tmp_path, routing, "other", backend.endpoint)
    for host in ("doomed.localhost", "other.localhost"):
        answer = await fetch(port, host, f"/bytes?n={SMALL}")
        assert answer.status() == 200
        assert hashlib.sha256(answer.body()).hexdigest() == patternDigest(SMALL)

    # A download on each tunnel; the doomed one's listener dies mid-way.
    huge = 100 * 1024 * MiB
    cut = await rawConnect(port, getRequest("doomed.localhost", f"/bytes?n={huge}"), keep=False)
    # The other download is held mid-way (its reader paused) across the kill.
    survivor = await rawConnect(port, getRequest("other.localhost", f"/bytes?n={16 * MiB}"), keep=False)
    await defer.Deferred.addTimeout(survivor.whenReceived(MiB), 10, reactor)
    survivor.transport.pauseProducing()
    await defer.Deferred.addTimeout(cut.whenReceived(MiB), 10, reactor)
    mark = len(routing.log())
    doomed.signal(signal.SIGKILL)
    killedAt = time.monotonic()
    await defer.Deferred.addTimeout(cut.lost, 5.0, reactor)
    closedAfter = time.monotonic() - killedAt
    assert cut.received < huge
    assert cut.reason is not None
    await routing.waitForLog(r"tunnel for doomed closed", start=mark, timeout=5.0)
    print(f"\nlistener killed: its client's connection closed after {closedAfter:.2f}s "
          f"({cut.reason.type.__name__}, {cut.received / MiB:.0f} MiB received)")

    # The routing server and the other tunnel carry on.
    assert not survivor.lost.called and survivor.received < 16 * MiB
    survivor.transport.resumeProducing()
    await defer.Deferred.addTimeout(defer.ensureDeferred(survivor.whenComplete()), 20.0, reactor)
    assert survivor.status() == 200
    survivor.transport.loseConnection()
    assert routing.proc.poll() is None
    answer = await fetch(port, "other.localhost", f"/bytes?n={SMALL}")
    assert answer.status() == 200
    assert hashlib.sha256(answer.body()).hexdigest() == patternDigest(SMALL)
    assert (await fetch(port, "doomed.localhost", "/")).status() == 404
    assert other.proc.poll() is None
    assert await waitForExit(doomed) == -signal.SIGKILL
    assertNoTraceback(routing, other)


# -- 6. the admin endpoint -------------------------------------------------------------------------


async def adminJSON(port: int, path: str) -> Any:
    response = await httpClient().get(f"http://127.0.0.1:{port}{path}")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return await response.json()


async def scrapeMetrics(port: int) -> str:
    response = await httpClient().get(f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    return str(await response.text("utf-8"))


def metricValue(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"no {name} in:\n{metrics}"
    return float(match.group(1))


@pytest_twisted.ensureDeferred
async def test_admin_health_and_metrics(processes: Any, signing: Any, backend: Any, tmp_path: Path) -> None:
    routing = await startRouting(processes, signing, admin=True)
    port, admin = routing.port("public http"), routing.port("admin")
    assert admin not in (port, routing.port("tunnel"))

    health = await adminJSON(admin, "/health")
    assert health["tunnels"] == 0
    listeners = [
        await startListener(processes, signing, tmp_path, routing, name, backend.endpoint)
        for name in ("one", "two")
    ]
    health = await adminJSON(admin, "/health")
    assert health == {"status": "ok", "tunnels": 2}

    answer = await fetch(port, "one.localhost", f"/bytes?n={SMALL}")
    assert answer.status() == 200
    assert (await fetch(port, "nobody.localhost", "/")).status() == 404

    metrics = await scrapeMetrics(admin)
    for family in (
        "dit4c_routing_tunnels",
        "dit4c_routing_streams",
        "dit4c_routing_bytes_total",
        "dit4c_routing_requests_total",
        "dit4c_routing_errors_total",
    ):
        assert re.search(rf"^{family}[{{ ]", metrics, re.MULTILINE), f"no {family} in:\n{metrics}"
    assert metricValue(metrics, "dit4c_routing_tunnels") == 2
    assert metricValue(metrics, "dit4c_routing_streams") == 0
    assert metricValue(metrics, 'dit4c_routing_errors_total{kind="unknown_host"}') == 1
    assert metricValue(metrics, "dit4c_routing_requests_total") == 2
    assert metricValue(metrics, 'dit4c_routing_bytes_total{direction="out"}') > SMALL
    assert metricValue(metrics, 'dit4c_routing_bytes_total{direction="in"}') > 0

    # A listener that stops is gone from both.
    mark = len(routing.log())
    listeners[1].signal(signal.SIGTERM)
    await routing.waitForLog(r"tunnel for two closed", start=mark)
    assert (await adminJSON(admin, "/health"))["tunnels"] == 1
    metrics = await scrapeMetrics(admin)
    assert metricValue(metrics, "dit4c_routing_tunnels") == 1
    assertNoTraceback(routing, *listeners)


# -- regressions ------------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_connection_closes_after_a_large_response(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    """
    After a ``Connection: close`` response the routing server closes the
    public connection, however slowly the client read. Ten slow clients in
    turn: whether one hangs depends on where the last pause falls (about half
    of them do).
    """
    routing = await startRouting(processes, signing)
    await startListener(processes, signing, tmp_path, routing, "slow", backend.endpoint)
    port = routing.port("public http")
    size = MiB
    readers = []
    for _ in range(10):
        reader = await slowConnect(port, getRequest("slow.localhost", f"/bytes?n={size}"))
        readers.append(reader)
        # One at a time: the routing server and listener do nothing else meanwhile.
        await defer.Deferred.addTimeout(reader.whenReceived(size + 100), 10, reactor)
    try:
        await eventually(
            lambda: all(r.lost.called for r in readers),
            what=lambda: f"{sum(not r.lost.called for r in readers)} of {len(readers)} connections "
            "left open after the whole response",
        )
    finally:
        for r in readers:
            if not r.lost.called:
                r.transport.abortConnection()


# -- 7. a token opens one tunnel; a name cannot be stolen by a replay ----------------------------


@pytest_twisted.ensureDeferred
async def test_a_replayed_token_is_refused_and_the_listener_keeps_its_name(
    processes: Any, signing: Any, backend: Any, tmp_path: Path, replay: Any
) -> None:
    """
    The same token sent again in a HELLO from elsewhere: refused with a
    reason, logged without the token, and the listener that sent it first
    keeps the name and goes on answering.
    """
    routing = await startRouting(processes, signing, admin=True)
    token = signing.token("kept")
    tokenFile = tmp_path / "kept.token"
    tokenFile.write_text(token + "\n")
    listener = await startListener(processes, signing, tmp_path, routing, "kept", backend.endpoint, tokens=tokenFile)
    port, admin = routing.port("public http"), routing.port("admin")
    assert (await fetch(port, "kept.localhost", f"/bytes?n={SMALL}")).status() == 200
    mark, listenerMark = len(routing.log()), len(listener.log())

    refused = await replay(routing.port("tunnel"), token)
    assert refused.reason == "token already used"
    await routing.waitForLog(r"tunnel from .* refused: token already used", start=mark)
    await routing.waitForLog(r"a used token for kept came again from", start=mark)
    signature = token.rsplit(".", 1)[1]
    assert signature not in routing.log() and signature not in listener.log()

    answer = await fetch(port, "kept.localhost", f"/bytes?n={SMALL}")
    assert answer.status() == 200
    assert hashlib.sha256(answer.body()).hexdigest() == patternDigest(SMALL)
    assert "going away" not in listener.log()[listenerMark:]
    assert (await adminJSON(admin, "/health"))["tunnels"] == 1
    metrics = await scrapeMetrics(admin)
    assert metricValue(metrics, 'dit4c_routing_errors_total{kind="tunnel_replay"}') == 1
    assertNoTraceback(routing, listener)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_tokens_without_jti_or_living_too_long_are_refused(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    """
    A listener given a token file that something else writes: each token is
    refused with its reason until a good one is there, which the listener
    reads at its next dial.
    """
    routing = await startRouting(processes, signing)
    tokenFile = tmp_path / "renewed.token"
    noJti = signing.signer.sign({"sub": "renewed"}, audience="dit4c-routing", lifetime=60)
    tenYears = signing.token("renewed", lifetime=10 * 365 * 86400)
    tokenFile.write_text(noJti)
    listener = await startListener(
        processes, signing, tmp_path, routing, "renewed", backend.endpoint, tokens=tokenFile, wait=False
    )
    await listener.waitForLog(r"tunnel not established: missing jti claim")
    await routing.waitForLog(r"tunnel from .* refused: missing jti claim")

    tokenFile.write_text(tenYears)
    await listener.waitForLog(r"tunnel not established: token lifetime 3\.1536e\+08 s is longer than the 300 s allowed")
    await routing.waitForLog(r"refused: token lifetime 3\.1536e\+08 s is longer than the 300 s allowed")

    tokenFile.write_text(signing.token("renewed"))
    await listener.waitForLog(r"tunnel up: instance renewed at")
    assert (await fetch(routing.port("public http"), "renewed.localhost", "/bytes?n=10")).status() == 200
    for token in (noJti, tenYears):
        assert token.rsplit(".", 1)[1] not in routing.log()
    assertNoTraceback(routing, listener)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_duplicate_listener_does_not_take_the_name_for_good(
    processes: Any, signing: Any, backend: Any, tmp_path: Path
) -> None:
    """
    A second listener for the same instance, with fresh tokens signed by
    the same key (a stale duplicate; an attacker with only a copied token
    cannot do this): the genuine listener dials again at once, then with a
    growing back-off; requests are answered all along; once the duplicate
    is gone one listener holds the name.
    """
    routing = await startRouting(processes, signing, admin=True)
    port, admin = routing.port("public http"), routing.port("admin")
    genuine = await startListener(processes, signing, tmp_path, routing, "twin", backend.endpoint, name="genuine")
    duplicate = await startListener(
        processes, signing, tmp_path, routing, "twin", backend.endpoint, name="duplicate", wait=False
    )

    statuses: list[int] = []

    async def thirdTimeInARow() -> bool:
        """Requests all along, until the genuine one has dialled again three times."""
        if "(3 times in a row)" in genuine.log():
            return True
        statuses.append((await fetch(port, "twin.localhost", "/bytes?n=1000")).status())
        return False

    await eventually(thirdTimeInARow, 30, 0, genuine.log)
    assert len(statuses) > 3 and set(statuses) == {200}
    delays = [
        float(d)
        for d in re.findall(r"took this instance's name \(\d+ times in a row\); dialling again in ([\d.]+) s", genuine.log())
    ]
    assert delays[0] == 0.0 and 0 < delays[1] <= delays[2], delays
    assert "tunnel up: instance twin" in duplicate.log()
    print(f"\ntwo listeners of one instance: the genuine one dialled again after {delays} s; "
          f"{len(statuses)} requests meanwhile, all answered")

    duplicate.signal(signal.SIGTERM)
    await waitForExit(duplicate)
    await waitForStatus(port, "twin.localhost", "/bytes?n=10", 200, timeout=15.0)

    async def oneTunnel() -> bool:
        return bool((await adminJSON(admin, "/health"))["tunnels"] == 1)

    await eventually(oneTunnel, 10, 0.1, "one tunnel in /health")
    assert (await fetch(port, "twin.localhost", f"/bytes?n={SMALL}")).status() == 200
    assert genuine.proc.poll() is None
    assert "not reconnecting" not in genuine.log()
    assertNoTraceback(routing, genuine, duplicate)
