"""
Helpers for the image server's tests: the world the fixtures build (a real
portal, people, instances with keys, image servers asking it), bodies
produced as the connection takes them, and clients that hash downloads as
they arrive.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import treq
from support.backend import PATTERN, patternDigest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from dit4c.common.tokens import TokenSigner
from dit4c.imageserver.service import ImageServerService
from dit4c.portal.app import Portal
from dit4c.portal.reports import UPLOAD_AUDIENCE

BASE = "http://portal.test"
SECRET = "image-server-" + secrets.token_urlsafe(24)


class World:
    """A portal, alice and bob, instance ``a`` (uploading, ``keyA``) and ``b`` (running, ``keyB``)."""

    portal: Portal
    clock: Clock
    portalURL: str
    alice: Any
    bob: Any
    source: Any
    a: Any
    b: Any
    keyA: Any
    keyB: Any
    tmp: Path
    servers: list[ImageServerService]

    @property
    def store(self) -> Any:
        return self.portal.store

    def uploadToken(self, digest: str, key: Any = None, instance: Any = None, lifetime: float = 120) -> str:
        """An upload token as the upload helper signs it (docs/protocols.md 8.4)."""
        instance = instance if instance is not None else self.a
        claims = {"sub": instance if isinstance(instance, str) else instance.id, "digest": digest}
        signer = TokenSigner(key if key is not None else self.keyA, clock=self.clock)
        return signer.sign(claims, audience=UPLOAD_AUDIENCE, lifetime=lifetime)

    async def imageServer(self, portal: str | None = None, name: str = "images", **kwargs: Any) -> ImageServerService:
        """An image server in this process on a loopback port, asking this portal."""
        service = ImageServerService(
            reactor,
            endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
            portal=portal or self.portalURL,
            secret=SECRET,
            dataDir=self.tmp / name,
            **kwargs,
        )
        service.startService()
        self.servers.append(service)
        return service


# -- bodies and requests ----------------------------------------------------------------------------


@implementer(IBodyProducer)
class PatternBody:
    """
    ``n`` bytes of :data:`support.backend.PATTERN`, produced as the
    connection takes them (never held in memory); ``chunked`` sends them
    with no length. ``produced`` counts what was handed to the connection.
    """

    def __init__(self, n: int, chunked: bool = False) -> None:
        self.n = n
        self.length = UNKNOWN_LENGTH if chunked else n
        self.produced = 0
        self._task: Any = None

    @property
    def digest(self) -> str:
        return "sha256:" + patternDigest(self.n)

    def _chunks(self, consumer: Any) -> Iterator[None]:
        remaining = self.n
        while remaining > 0:
            chunk = PATTERN if remaining >= len(PATTERN) else PATTERN[:remaining]
            remaining -= len(chunk)
            self.produced += len(chunk)
            consumer.write(chunk)
            yield None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._task = task.cooperate(self._chunks(consumer))
        d: Deferred[Any] = self._task.whenDone()

        def stopped(reason: Any) -> Deferred[None]:
            reason.trap(task.TaskStopped)
            return Deferred()

        d.addCallbacks(lambda _: None, stopped)
        return d

    def pauseProducing(self) -> None:
        self._task.pause()

    def resumeProducing(self) -> None:
        self._task.resume()

    def stopProducing(self) -> None:
        try:
            self._task.stop()
        except (task.TaskDone, task.TaskFailed, task.TaskStopped):
            pass


def urlOf(server: ImageServerService | str, path: str = "") -> str:
    """``path`` at an image server in this process, or at a base URL."""
    base = server if isinstance(server, str) else server.server.publicURL
    return f"{base}{path}"


async def put(
    server: ImageServerService | str, digest: str, body: Any, token: str | None = None, **headers: str
) -> tuple[Any, Any]:
    """PUT ``body`` as image ``digest``: the response and its JSON."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = await treq.put(urlOf(server, f"/images/{digest}"), data=body, headers=headers)
    return response, json.loads(await response.text())


async def get(server: ImageServerService | str, digest: str, method: str = "GET", **headers: str) -> tuple[Any, str, int]:
    """A download, hashed as it arrives: the response, ``sha256:<hex>`` and the size."""
    response = await treq.request(method, urlOf(server, f"/images/{digest}"), headers=headers, unbuffered=True)
    hashed = hashlib.sha256()
    size = 0

    def take(data: bytes) -> None:
        nonlocal size
        hashed.update(data)
        size += len(data)

    await treq.collect(response, take)
    return response, "sha256:" + hashed.hexdigest(), size


def peakRSS(pid: int | str = "self") -> int:
    """A process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def resetPeakRSS(pid: int | str = "self") -> bool:
    """Start counting a process's peak resident set afresh (Linux 4.0 and later)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stored(server: ImageServerService | Any) -> list[str]:
    """
    The images a server (or a storage) holds, and anything left in its
    temporaries, by name: files of a directory storage, objects (and the
    local spool) of an S3 storage.
    """
    storage = getattr(server, "storage", server)
    if hasattr(storage, "directory"):
        directory = storage.directory
        return sorted(p.name for p in (directory / "sha256").iterdir()) + sorted(
            "tmp/" + p.name for p in (directory / "tmp").iterdir()
        )
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix)
    names = []
    for item in listed.get("Contents", []):
        key = item["Key"]
        assert key.startswith(storage.prefix + "sha256/"), key
        names.append(key.rsplit("/", 1)[1])
    return sorted(names) + sorted("tmp/" + p.name for p in storage.spool.iterdir())


@implementer(IConsumer)
class HashingConsumer:
    """
    A consumer that hashes what it is given (and keeps it if ``keep``), and
    pauses its producer after every write, resuming it on the next turn of
    the reactor, as a slow connection would.
    """

    def __init__(self, keep: bool = False) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.chunks: list[bytes] | None = [] if keep else None
        self.producer: Any = None
        self.pauses = 0
        self.largestWrite = 0

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self.largestWrite = max(self.largestWrite, len(data))
        if self.chunks is not None:
            self.chunks.append(data)
        if self.producer is not None:
            producer = self.producer
            producer.pauseProducing()
            self.pauses += 1
            reactor.callLater(0, producer.resumeProducing)


async def readAll(storage: Any, digest: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a stored image from ``offset`` on, read through a consumer."""
    consumer = HashingConsumer(keep=True)
    await storage.read(digest, consumer, offset, length)
    assert consumer.producer is None
    assert consumer.chunks is not None
    return b"".join(consumer.chunks)
