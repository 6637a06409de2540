"""
A listener given several routing servers uses the nearest: at every
(re)connect it opens a connection to each at once, and dials the one
that answered first, as soon as it has; the others follow, fastest
first, only if that dial fails; one that does not answer is tried last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["NearestEndpoint"]


@implementer(IStreamClientEndpoint)
class NearestEndpoint:
    """An endpoint that is whichever of several answers a connection fastest, now."""

    log = Logger()

    def __init__(
        self, reactor: Any, endpoints: Sequence[tuple[str, IStreamClientEndpoint]], *, probeTimeout: float = 5.0
    ) -> None:
        """
        :param endpoints: (description, endpoint) of each routing server's tunnel port.
        :param probeTimeout: seconds after which a server that has not
            answered the probe goes to the back of the line.
        """
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.reactor = reactor
        self.endpoints = list(endpoints)
        self.probeTimeout = probeTimeout
        #: The description of the endpoint last dialled.
        self.chosen: str | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        if len(self.endpoints) == 1:
            self.chosen = self.endpoints[0][0]
            return await self.endpoints[0][1].connect(factory)
        # The first to answer is dialled at once: a server whose host has
        # gone silent (no refusal, only the probe's timeout) holds nothing up.
        timings: list[float | None] = [None] * len(self.endpoints)
        firstAnswer: Deferred[int | None] = Deferred()

        def answered(timing: float | None, i: int) -> None:
            timings[i] = timing
            if timing is not None and not firstAnswer.called:
                firstAnswer.callback(i)

        probes = [
            Deferred.fromCoroutine(self._probe(e)).addCallback(answered, i) for i, (_, e) in enumerate(self.endpoints)
        ]
        everyProbe = gatherResults(probes)
        everyProbe.addCallback(lambda _: None if firstAnswer.called else firstAnswer.callback(None))
        first = await firstAnswer
        failure: BaseException | None = None
        if first is not None:
            self.log.info(
                "routing server {chosen} answered first, in {ms:.1f} ms",
                chosen=self.endpoints[first][0],
                ms=(timings[first] or 0.0) * 1000,
            )
            try:
                return await self._dial(first, factory)
            except Exception as e:
                failure = e
        await everyProbe
        answered_ = sorted((t, i) for i, t in enumerate(timings) if t is not None and i != first)
        order = [i for _, i in answered_] + [i for i, t in enumerate(timings) if t is None]
        self.log.info(
            "routing servers by connect time: {timings}",
            timings=", ".join(_timing(self.endpoints[i][0], timings[i]) for i in order),
        )
        for i in order:
            try:
                return await self._dial(i, factory)
            except Exception as e:
                failure = e
        assert failure is not None
        raise failure

    async def _dial(self, i: int, factory: IProtocolFactory) -> IProtocol:
        protocol = await self.endpoints[i][1].connect(factory)
        self.chosen = self.endpoints[i][0]
        return protocol

    async def _probe(self, endpoint: IStreamClientEndpoint) -> float | None:
        began = self.reactor.seconds()
        d = connectProtocol(endpoint, Protocol())
        d.addTimeout(self.probeTimeout, self.reactor)
        try:
            protocol = await d
        except Exception:
            return None
        elapsed: float = self.reactor.seconds() - began
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return elapsed


def _timing(description: str, seconds: float | None) -> str:
    return f"{description} {seconds * 1000:.1f} ms" if seconds is not None else f"{description} (no answer)"
