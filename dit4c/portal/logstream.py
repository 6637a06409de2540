"""
A tool's output followed as it grows (``GET /api/v1/instances/{id}/logs?follow=1``):
its last part first, then each new piece, asked of the instance's cluster
once a second, as plain text, until the instance stops running or the
reader goes. A reader slower than the tool holds the asking back (it is the
request's producer), so nothing piles up in the portal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest
from zope.interface import implementer

from dit4c.channel.wire import MAX_LOG_CHUNK, LogChunk
from dit4c.portal.web import finishStream, served, startStream

__all__ = ["DOWNLOAD", "FOLLOW_INTERVAL", "TAIL", "follow", "lastOf"]

#: Seconds between two questions while nothing new came.
FOLLOW_INTERVAL = 1.0
#: How much of the output a follow starts with (bytes).
TAIL = 16 * 1024
#: How much of the output a download holds at most: its last part (bytes).
DOWNLOAD = 4 * 1024 * 1024


async def lastOf(ask: Callable[[int | None, int], Awaitable[LogChunk]], most: int = DOWNLOAD) -> tuple[str, str | None]:
    """The last ``most`` bytes of the output, as text, read a chunk at a time; and why not all, if so."""
    end = (await ask(None, 0)).next
    offset = max(end - most, 0)
    pieces: list[str] = []
    while offset < end:
        chunk = await ask(offset, MAX_LOG_CHUNK)
        if chunk.error or chunk.next <= offset:
            return "".join(pieces), chunk.error
        pieces.append(chunk.text)
        offset = chunk.next
    return "".join(pieces), None


@implementer(IPushProducer)
class _Reader:
    """The reader's pace: paused while the connection's buffer is full."""

    def __init__(self) -> None:
        self.resumed: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        if self.resumed is None:
            self.resumed = Deferred()

    def resumeProducing(self) -> None:
        resumed, self.resumed = self.resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()


async def follow(
    request: IRequest,
    ask: Callable[[int | None, int], Awaitable[LogChunk]],
    running: Callable[[], Awaitable[bool]],
    clock: IReactorTime,
) -> None:
    """
    Stream the output ``ask(offset, limit)`` reads to ``request`` while
    ``running()`` says the tool may still write, then finish.
    """
    web = served(request)
    gone = False

    def left(_: object) -> None:
        nonlocal gone
        gone = True

    web.notifyFinish().addBoth(left)
    # The head now: the reader knows the follow began, before the tool says anything.
    startStream(request, b"text/plain; charset=utf-8", b"")
    reader = _Reader()
    web.registerProducer(reader, True)
    offset: int | None = None
    limit = TAIL
    try:
        while not gone:
            chunk = await ask(offset, limit)
            if chunk.error:
                request.write(f"\n[{chunk.error}]\n".encode())
                return
            offset, limit = chunk.next, MAX_LOG_CHUNK
            if chunk.text:
                request.write(chunk.text.encode())
                if reader.resumed is not None:
                    await reader.resumed
                continue
            if not await running():
                return
            await deferLater(clock, FOLLOW_INTERVAL)
    finally:
        if not gone:
            web.unregisterProducer()
            finishStream(request)
