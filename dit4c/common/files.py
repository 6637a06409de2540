"""
Big files without blocking the reactor.

A saved image is several GB: writing it, and hashing it, on the reactor
thread would stop every other connection of the process for seconds (in
``dit4c-dev`` that is the portal too). :class:`ThreadedFileWriter` takes the
bytes as they arrive, writes and hashes them in a thread, one batch at a
time and in order, and pauses its producer while too much waits, so a
slow disk slows the sender instead of filling memory.
:func:`receiveToFile` pours an HTTP response body into one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

__all__ = ["ThreadedFileWriter", "receiveToFile", "removeFile"]

#: Bytes waiting to be written above which the producer is paused, and below which it is resumed.
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 1024 * 1024


class ThreadedFileWriter:
    """
    A new file at ``path`` (mode 0600, replacing any), written and hashed
    (SHA-256) in the reactor's thread pool.
    """

    def __init__(self, reactor: Any, path: Path, *, highWater: int = HIGH_WATER, lowWater: int = LOW_WATER) -> None:
        self.reactor = reactor
        self.path = path
        self.highWater = highWater
        self.lowWater = lowWater
        self.written = 0
        self._hash = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._busy = False
        self._producer: IPushProducer | None = None
        self._paused = False
        self._failure: Failure | None = None
        self._closing: Deferred[str] | None = None
        self._aborted = False
        self._inflight: Deferred[Any] | None = None

    def registerProducer(self, producer: IPushProducer) -> None:
        """The producer to pause while the disk falls behind."""
        self._producer = producer

    def write(self, data: bytes) -> None:
        if self._closing is not None or self._aborted:
            raise ValueError("the file is closed")
        if self._failure is not None:
            return  # the error is given by close()
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize >= self.highWater and self._producer is not None and not self._paused:
            self._paused = True
            self._producer.pauseProducing()
        self._next()

    def _next(self) -> None:
        if self._busy or self._aborted:
            return
        if not self._pending:
            if self._closing is not None:
                self._finish()
            return
        batch, self._pending, self._pendingSize = b"".join(self._pending), [], 0
        self._busy = True
        self._inflight = threads.deferToThread(self._writeBatch, batch)
        self._inflight.addCallbacks(self._written, self._writeFailed)

    def _writeBatch(self, batch: bytes) -> int:
        # In a thread: the only one touching the file and the hash until it returns.
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb")
        self._file.write(batch)
        self._hash.update(batch)
        return len(batch)

    def _written(self, count: int) -> None:
        self._busy = False
        self.written += count
        if self._paused and self._pendingSize < self.lowWater and self._producer is not None:
            self._paused = False
            self._producer.resumeProducing()
        self._next()

    def _writeFailed(self, failure: Failure) -> None:
        self._busy = False
        self._failure = failure
        self._pending, self._pendingSize = [], 0
        if self._producer is not None:
            self._producer.stopProducing()
        if self._closing is not None:
            self._finish()

    def close(self) -> Deferred[str]:
        """Fires with the file's digest (``sha256:<hex>``) once every byte is written and the file closed."""
        if self._closing is None:
            self._closing = Deferred()
            if not self._busy:
                self._next()
        return self._closing

    def _finish(self) -> None:
        closing = self._closing
        assert closing is not None
        if self._failure is not None:
            failure = self._failure
            threads.deferToThread(self._discard).addBoth(lambda _: closing.errback(failure))
            return

        def closed() -> str:
            if self._file is None:
                # Nothing came: an empty file.
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                os.close(fd)
            else:
                self._file.close()
            return f"sha256:{self._hash.hexdigest()}"

        threads.deferToThread(closed).chainDeferred(closing)

    def abort(self) -> Deferred[None]:
        """Stop writing and remove the file (fires once it is gone)."""
        self._aborted = True
        self._pending, self._pendingSize = [], 0

        def gone(_: object) -> Deferred[None]:
            return threads.deferToThread(self._discard)

        if self._busy and self._inflight is not None:
            # The batch under way first: then nothing else touches the file.
            settled: Deferred[None] = Deferred()
            self._inflight.addBoth(lambda result: settled.callback(None))
            return settled.addCallback(gone)
        return gone(None)

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)


class _ToWriter(Protocol):
    """An HTTP response body into a :class:`ThreadedFileWriter`, its transport paused when the disk lags."""

    def __init__(self, writer: ThreadedFileWriter, done: Deferred[None], progress: Callable[[int], object] | None) -> None:
        self.writer = writer
        self.done = done
        self.progress = progress
        self.received = 0

    def connectionMade(self) -> None:
        self.writer.registerProducer(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.writer.write(data)
        self.received += len(data)
        if self.progress is not None:
            self.progress(self.received)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


async def receiveToFile(
    reactor: Any, response: Any, path: Path, progress: Callable[[int], object] | None = None
) -> str:
    """
    A response's body into a new file at ``path``; its digest
    (``sha256:<hex>``). On any failure the file is removed and the failure
    raised. ``progress`` is told the bytes received so far, as they come.
    """
    writer = ThreadedFileWriter(reactor, path)
    done: Deferred[None] = Deferred()
    response.deliverBody(_ToWriter(writer, done, progress))
    try:
        await done
    except BaseException:
        await writer.abort()
        raise
    return await writer.close()


def removeFile(path: Path) -> Deferred[None]:
    """Remove a file (perhaps a big one: a thread), if it is there."""
    if not path.name:
        return succeed(None)
    return threads.deferToThread(path.unlink, True)
