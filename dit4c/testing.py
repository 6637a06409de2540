"""
Public test doubles, for the tests of every component (and of anyone
building on DIT4C): a small web tool that streams, sinks and echoes.

The backend never holds a body in memory: uploads are hashed as they arrive
and downloads are produced as the client reads, so a test that moves
hundreds of megabytes through a tunnel measures the tunnel, not this.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from dit4c.common.keys import jwks
from dit4c.common.tokens import StaticKeySource, TokenSigner, TokenVerifier
from dit4c.listener.service import ListenerService, backoff
from dit4c.routing.front import FrontLimits
from dit4c.routing.server import RoutingServer
from dit4c.tunnel.session import Settings

#: One block of the download pattern; downloads are this block repeated.
PATTERN = bytes(range(256)) * 256


def patternDigest(n: int) -> str:
    """The sha256 of the first ``n`` bytes of ``/bytes?n=...``."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(PATTERN))
    for _ in range(full):
        h.update(PATTERN)
    h.update(PATTERN[:rest])
    return h.hexdigest()


class HashingRequest(Request):
    """A request whose body is hashed and counted on arrival, never stored."""

    def gotLength(self, length: int | None) -> None:
        super().gotLength(0)
        self.bodyHash = hashlib.sha256()
        self.bodyLength = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.bodyHash.update(data)
        self.bodyLength += len(data)


@implementer(IPushProducer)
class _PatternProducer:
    def __init__(self, request: Request, n: int) -> None:
        self.request = request
        self.remaining = n
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.remaining > 0:
            chunk = PATTERN if self.remaining >= len(PATTERN) else PATTERN[: self.remaining]
            self.remaining -= len(chunk)
            self.request.write(chunk)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


class _Bytes(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        n = int(request.args.get(b"n", [b"0"])[0])
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(n).encode())
        _PatternProducer(request, n).start()
        return NOT_DONE_YET


class _Sink(Resource):
    isLeaf = True

    def render_POST(self, request: HashingRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"length": request.bodyLength, "sha256": request.bodyHash.hexdigest()}).encode()

    render_PUT = render_POST


class _Headers(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        headers = {k.decode(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        body = {
            "method": request.method.decode(),
            "path": request.uri.decode(),
            "headers": headers,
            "client": request.getClientAddress().host,
        }
        return json.dumps(body).encode()

    render_POST = render_GET


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


@dataclass
class Backend:
    port: IListeningPort
    site: Site

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.portNumber}"

    def stop(self) -> Deferred[Any]:
        return defer.maybeDeferred(self.port.stopListening)


def backendSite() -> Site:
    """``/bytes?n=N`` (streamed), ``/sink`` (hash a body), ``/headers``, ``/ws`` (echo)."""
    root = Resource()
    root.putChild(b"bytes", _Bytes())
    root.putChild(b"sink", _Sink())
    root.putChild(b"headers", _Headers())
    ws = WebSocketServerFactory()
    ws.protocol = EchoProtocol
    ws.setProtocolOptions(maxMessagePayloadSize=16 * 1024 * 1024)
    root.putChild(b"ws", WebSocketResource(ws))
    site = Site(root, requestFactory=HashingRequest)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def startBackend(reactor: Any, interface: str = "127.0.0.1") -> Backend:
    site = backendSite()
    port = reactor.listenTCP(0, site, interface=interface, backlog=4096)
    return Backend(port, site)




# -- tokens, a routing server and listeners in one process ------------------------

@dataclass
class Signing:
    """A portal-like signing key, its JWKS on disk, and a way to mint tokens."""

    key: Any
    keyPath: Path
    jwksPath: Path
    signer: TokenSigner
    audience: str = "dit4c-routing"

    def token(self, instance: str, lifetime: float = 120, **claims: Any) -> str:
        """A single-use routing token (a fresh ``jti`` unless ``claims`` has one)."""
        claims.setdefault("jti", secrets.token_urlsafe(16))
        return self.signer.sign(dict(claims, sub=instance), audience=self.audience, lifetime=lifetime)

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(StaticKeySource(jwks(self.key)), audience=self.audience)



@dataclass
class Routing:
    server: RoutingServer
    tunnelPort: int
    httpPort: int
    listeners: list[ListenerService] = field(default_factory=list)

    def tunnelEndpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.tunnelPort}"

    def url(self, instance: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.httpPort}{path}"

    async def listen(
        self,
        token: str | Any,
        target: str,
        *,
        routing: str | None = None,
        settings: Settings | None = None,
        wait: bool = True,
    ) -> ListenerService:
        """Start a listener in this process and wait until it is registered."""
        from twisted.internet import reactor

        tokenSource = token if callable(token) else (lambda: token)
        listener = ListenerService(
            reactor,
            clientFromString(reactor, routing or self.tunnelEndpoint()),
            clientFromString(reactor, target),
            tokenSource,
            settings=settings,
            retryPolicy=backoff(initial=0.05, maximum=0.5),
        )
        listener.startService()
        self.listeners.append(listener)
        if wait:
            await listener.whenRegistered().addTimeout(15, reactor)
        return listener


async def startRouting(
    signing: Signing,
    *,
    settings: Settings | None = None,
    limits: FrontLimits | None = None,
    websocket: bool = False,
) -> Routing:
    from twisted.internet import reactor

    server = RoutingServer(
        reactor, signing.verifier(), "localhost", settings=settings, limits=limits, drainTimeout=2.0
    )
    tunnel = server.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    if websocket:
        server.addTunnelWebSocketEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    public = server.addPublicEndpoint(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=4096"), "http"
    )
    server.startService()
    return Routing(server, tunnel.port.getHost().port, public.port.getHost().port)  # type: ignore[union-attr]


async def stopRouting(routing: Routing) -> None:
    for listener in routing.listeners:
        await defer.maybeDeferred(listener.stopService)
    await routing.server.stopService()


def deferLater(seconds: float) -> defer.Deferred[None]:
    """Wait on the global reactor (for tests on real sockets)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater as _deferLater

    return _deferLater(reactor, seconds, lambda: None)


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] | None = None,
) -> Any:
    """
    Wait (without blocking the reactor) until ``predicate()`` is true, and
    return what it returned; ``predicate`` may return an awaitable, whose
    result counts. A test waits for the event it needs this way rather
    than sleeping for a guessed time: fast when the event comes soon, and
    a clear failure (``what`` was awaited, or its text now) at the
    deadline when it never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not so within {timeout} s: {detail}")
        await deferLater(interval)



class RawClient(Protocol):
    """Sends bytes as given and collects everything until the server closes."""

    transport: ITransport

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


async def rawRequest(port: int | Path, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` to ``host:port`` (or to the Unix socket at a path) and return all that comes back until close."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol

    client = RawClient()
    endpoint: Any = (
        UNIXClientEndpoint(reactor, str(port), timeout=5) if isinstance(port, Path) else TCP4ClientEndpoint(reactor, host, port)
    )
    await connectProtocol(endpoint, client)
    client.transport.write(data)
    return await client.done


@contextmanager
def refusedPort(host: str = "127.0.0.1") -> Iterator[int]:
    """
    A port on ``host`` that refuses every connection while the block runs:
    bound by this process and never listening (without ``SO_REUSEADDR``,
    so no other socket can bind it meanwhile), for a test of what happens
    when nobody answers.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((host, 0))
        yield int(held.getsockname()[1])


def makeCertificate(directory: Path, *names: str) -> tuple[Path, Path]:
    """
    A self-signed certificate (its own CA) for ``names`` (wildcards allowed),
    written as ``server.key`` and ``cert.pem`` in ``directory``; the directory
    then also serves as a ``trustRoots`` directory holding just that cert.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    keyPath = directory / "server.key"  # not .pem: trustRoots loads every .pem
    certPath = directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class RecordingCommands:
    """
    An ``ICommandSink`` that records the instance commands the portal sends
    (for tests of the portal without a scheduler); ``connectedIds`` says
    which schedulers count as connected.
    """

    def __init__(self, connectedIds: set[str] | None = None) -> None:
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []
        self.connectedIds = connectedIds or set()

    def send(self, scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Deferred[str]:
        self.sent.append((scheduler_id, op, instance_id, params))
        return defer.succeed(f"cmd{len(self.sent)}")

    def connected(self, scheduler_id: str) -> bool:
        return scheduler_id in self.connectedIds


# -- real processes --------------------------------------------------------------------


#: Puts the listening sockets it is given (``argv[1]``: how many, then
#: their descriptors) at descriptors 3, 4, ... with ``LISTEN_PID`` and
#: ``LISTEN_FDS`` set, as systemd's socket activation does, and becomes the
#: command that follows (the same process: ``LISTEN_PID`` stays true).
_HANDOVER = """
import fcntl, os, sys
count = int(sys.argv[1])
given, argv = [int(fd) for fd in sys.argv[2:2 + count]], sys.argv[2 + count:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + count) for fd in given]
for fd in given:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(count),
    LISTEN_FDNAMES=":".join(f"socket{index}" for index in range(count)),
)
os.execvp(argv[0], argv)
"""


def _announced(what: str, host: str | None) -> str:
    """The log line of a server listening on a TCP port (:class:`dit4c.common.service.ListeningService`'s)."""
    address = re.escape(host) if host is not None else "[^']*"
    return rf"{what} listening on IPv4Address\(type='TCP', host='{address}', port=(\d+)\)"


def announcedPort(log: str, what: str, start: int = 0, host: str | None = None) -> int | None:
    """
    The port a server announced in ``log`` (``<what> listening on
    IPv4Address(type='TCP', host=..., port=N)``, as every server here logs
    it), from ``start`` on; the first, or the first on ``host``; None if
    none. ``what`` is a regular expression.
    """
    match = re.compile(_announced(what, host)).search(log, start)
    return int(match.group(1)) if match else None


class Process:
    """A ``twistd -n`` child (or any command), its log, and the addresses it announced."""

    def __init__(
        self,
        args: list[str],
        logPath: Path,
        env: dict[str, str] | None = None,
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        """
        :param sockets: listening sockets handed to the child as systemd
            would (socket activation: it serves the first on the endpoint
            ``systemd:domain=INET:index=0``, the next on ``index=1``...),
            for a server whose own arguments name its port. They are closed
            here once the child holds them: the port closes when it ends.
        """
        self.args = args
        self.logPath = logPath
        self._log = open(logPath, "ab")
        command = args
        descriptors = [sock.fileno() for sock in sockets]
        if descriptors:
            command = [sys.executable, "-c", _HANDOVER, str(len(descriptors)), *map(str, descriptors), *args]
        try:
            self.proc = subprocess.Popen(
                command,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **(env or {})),
                start_new_session=True,
                pass_fds=descriptors,
            )
        finally:
            for sock in sockets:
                sock.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    async def waitForLog(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """Wait (without blocking the reactor) until the log matches ``pattern``."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while True:
            match = compiled.search(self.log(), start)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[:4]} exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} in:\n{self.log()}")
            await deferLater(0.05)

    def port(self, what: str, start: int = 0, host: str | None = None) -> int:
        """The port the server announced (:func:`announcedPort`) in its log."""
        port = announcedPort(self.log(), what, start, host)
        assert port is not None, f"no {what} port{f' on {host}' if host else ''} in log:\n{self.log()}"
        return port

    async def waitForPort(self, what: str, timeout: float = 20.0, host: str | None = None) -> int:
        """:meth:`port`, once the server has announced it (waiting, as :meth:`waitForLog` does)."""
        return int((await self.waitForLog(_announced(what, host), timeout)).group(1))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def peakRSS(self) -> int:
        """The process's peak resident set (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


#: ``twistd`` as a user runs it, with this interpreter.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
