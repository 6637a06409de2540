"""
The streams that carry changes out of this portal process, each subscribed
to the bus (:mod:`dit4c.portal.events`):

- :class:`EventStreams`: the pages' Server-Sent Events (``GET /events``).
  Each event is checked, when it is sent, against what the person may see
  then, not when the stream opened; a stream ends when its portal session
  does (logout, a disabled person, expiry); a person has at most
  ``perPerson`` streams open.
- :class:`InstanceWatches`: the auth helpers' watches
  (``GET /oauth/watch``, docs/protocols.md 6.6). A helper is told that an
  access to its instance changed, and asks the portal again (6.5) about
  the sessions it holds open.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from dit4c.common.life import State
from dit4c.portal.culling import idleDeadline
from dit4c.portal.events import AccessChange, EventBus
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.errors import StoreClosed
from dit4c.portal.store.ids import hashToken
from dit4c.portal.store.interfaces import IInstances, IStore
from dit4c.portal.store.model import Instance
from dit4c.portal.web import finishStream, served, startStream

__all__ = [
    "EventStreams",
    "InstanceWatches",
    "STREAMS_PER_PERSON",
    "STREAM_KEEPALIVE",
    "STREAM_RETRY_REPLACED",
    "WATCHES_PER_INSTANCE",
    "WATCH_KEEPALIVE",
]

T = TypeVar("T")

#: Event streams one person may hold open at once (tabs, windows, browsers).
STREAMS_PER_PERSON = 8
#: Seconds between comment lines on a quiet event stream (proxies close silent ones).
STREAM_KEEPALIVE = 15.0
#: What a stream closed to make room asks its browser to wait before it comes back (ms).
STREAM_RETRY_REPLACED = 60000
#: Checks a stream may have waiting before it is judged stuck and closed.
STREAM_MAX_PENDING = 256

#: Watches one instance may hold open at once (a helper reconnecting while
#: the portal still holds its old, silently dropped one).
WATCHES_PER_INSTANCE = 2
#: Seconds between keepalive lines on a watch; a helper that hears nothing
#: for three times this reconnects.
WATCH_KEEPALIVE = 5.0


async def _stream(request: IRequest, contentType: bytes, first: bytes) -> None:
    """
    Start a streamed answer of ``contentType`` with ``first``, and wait
    until it ends: finished here, or its reader gone (that is how a stream
    ends, not an error).
    """
    startStream(request, contentType, first)
    await _untilFinished(request)


async def _untilFinished(request: IRequest) -> None:
    """Wait until a streamed answer ends: finished here, or its reader gone."""
    if served(request).finished or served(request)._disconnected:
        # Ended already (its first check closed it): ``notifyFinish`` asked
        # now would never fire, and the stream would be held for ever.
        return
    try:
        await served(request).notifyFinish()
    except Exception:
        pass


class _Held(Generic[T]):
    """Open streams by key (a person, an instance), at most ``cap`` per key, oldest first."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._byKey: dict[str, list[T]] = {}

    def add(self, key: str, item: T) -> list[T]:
        """Hold ``item`` under ``key``; the oldest ones it displaces, for the caller to close."""
        held = self._byKey.setdefault(key, [])
        displaced = []
        while len(held) >= self.cap:
            displaced.append(held.pop(0))
        held.append(item)
        return displaced

    def remove(self, key: str, item: T) -> None:
        held = self._byKey.get(key)
        if held is not None and item in held:
            held.remove(item)
            if not held:
                del self._byKey[key]

    def of(self, key: str) -> list[T]:
        return list(self._byKey.get(key, ()))

    def all(self) -> list[T]:
        return [item for held in self._byKey.values() for item in held]

    def __len__(self) -> int:
        return sum(len(held) for held in self._byKey.values())


# -- the pages' event streams ----------------------------------------------------------------------


class _Stream:
    """
    One page's ``GET /events``, and what it may show now:

    - an instance shared with the person: looked up in the store for every
      event, when it is sent (an unshare made through another portal
      process holds from its next event);
    - the person's own instance: sent at once, as long as their portal
      session is known to live: checked in the store when the stream opens,
      at every keepalive (15 s), and at once on every access change of
      theirs; an event that comes while a check is under way waits for it.
      (A store question per event would hold the page's own action back:
      the event that shows a started instance would reach the page after
      the request that started it, and the page, reloading on an instance
      it does not show, would abort that request.)

    Checks and the events behind them run in order, at most
    ``STREAM_MAX_PENDING`` waiting.
    """

    log = Logger()

    def __init__(self, hub: EventStreams, request: IRequest, who: LoggedIn) -> None:
        self.hub = hub
        self.request = request
        self.user: str = who.user.id
        self.name: str = who.user.name
        self.sessionToken: str = who.token
        self.sessionHash = hashToken(who.token)
        #: Instances shared with the person (their own are known by owner).
        self.visible: set[str] = set()
        #: Whether ``visible`` has been read (by the snapshot) yet.
        self.known = False
        self.closed = False
        self._tail: Deferred[None] = succeed(None)
        self._pending = 0

    # -- what arrives ----------------------------------------------------------------------------

    def instanceChanged(self, instance: Instance) -> None:
        if self.closed:
            return
        if instance.owner_id == self.user:
            if instance.state is State.RUNNING:
                self._then(lambda: self._writeRunning(instance))  # with when it is culled if unused
            elif self._pending:
                self._then(lambda: self._write(instance))
            else:
                self._write(instance)
        elif instance.id in self.visible or not self.known:
            # Before the snapshot has read what is shared, any instance may
            # be: the check in turn after it says (a change committed while
            # the snapshot read is not lost between the two).
            self._then(lambda: self._sendShared(instance))

    def keepalive(self) -> None:
        """A comment line (proxies close quiet streams), and the session looked up again."""
        if not self.closed:
            self.request.write(b": keepalive\n\n")
            self._then(self._checkSession)

    def accessChanged(self, change: AccessChange) -> None:
        if self.closed or change.user not in (None, self.user):
            return
        if change.session is not None:
            if change.session == self.sessionHash:
                self.close("its portal session ended")
            return
        if change.instance is None:
            self._then(self._checkSession)
        elif change.user is not None or change.instance in self.visible:
            instanceId = change.instance
            self._then(lambda: self._refresh(instanceId))

    # -- checks, in order ----------------------------------------------------------------------------

    def _then(self, work: Callable[[], Awaitable[object] | None]) -> None:
        if self._pending >= STREAM_MAX_PENDING:
            self.close("too many events waiting")
            return
        self._pending += 1

        async def step(_: object) -> None:
            try:
                if not self.closed:
                    done = work()
                    if isawaitable(done):
                        await done
            finally:
                self._pending -= 1

        def failed(failure: Failure) -> None:
            if self.closed:
                # Ended meanwhile (the browser left, the portal is
                # stopping): what the check would have decided no longer matters.
                return
            if failure.check(StoreClosed):
                # The store closed before the streams were told: the
                # portal is stopping, which is no error of this stream.
                self.close("the portal is stopping")
                return
            self.log.failure("event stream check failed", failure)
            self.close("a check failed")

        self._tail = self._tail.addCallback(lambda r: Deferred.fromCoroutine(step(r))).addErrback(failed)

    async def _checkSession(self) -> bool:
        if await self.hub.store.sessionLive(self.sessionHash):
            return True
        self.close("its portal session ended")
        return False

    async def _refresh(self, instanceId: str) -> None:
        if await self.hub.store.mayUseInstance(self.user, instanceId):
            self.visible.add(instanceId)
        else:
            self.visible.discard(instanceId)

    async def _sendShared(self, instance: Instance) -> None:
        if not await self._checkSession():
            return
        if not await self.hub.store.mayUseInstance(self.user, instance.id):
            self.visible.discard(instance.id)
            return
        self._write(instance)

    async def snapshot(self) -> None:
        """
        Where every instance the person may see stands now, as ``event:
        snapshot``, then ``event: snapshot-end`` with their ids: what changed
        between the page's load and this stream's start (or while the
        browser was away, reconnecting) is not lost, nor what ended meanwhile.
        """
        own = await self.hub.store.listInstancesOf(self.user)
        shared = await self.hub.store.listInstancesSharedWith(self.user)
        self.visible = {i.id for i in shared}
        self.known = True
        for instance in own:
            await self._writeRunning(instance, b"snapshot")
        for instance in shared:
            self._write(instance, b"snapshot")
        # Which instances stand at all: a page's row that is not among them
        # was discarded (or unshared) before the stream started.
        if not self.closed:
            ids = [i.id for i in [*own, *shared]]
            self.request.write(b"event: snapshot-end\ndata: " + json.dumps({"ids": ids}).encode() + b"\n\n")

    async def _writeRunning(self, instance: Instance, event: bytes = b"instance") -> None:
        """One of the person's own instances; if it runs, with when it is stopped or saved unused (its image's idle limit)."""
        idle = None
        if instance.state is State.RUNNING:
            image = await self.hub.store.imageById(instance.image_id)
            deadline = idleDeadline(instance, image.limits) if image is not None else None
            if image is not None and deadline is not None:
                idle = {"at": deadline, "action": image.limits.idleAction, "minutes": image.limits.idle}
        self._write(instance, event, idle)

    def _write(self, instance: Instance, event: bytes = b"instance", idle: dict[str, object] | None = None) -> None:
        if self.closed:
            return
        body = {"id": instance.id, "state": instance.state, "reason": instance.reason, "url": instance.url, "idle": idle}
        self.request.write(b"event: " + event + b"\ndata: " + json.dumps(body).encode() + b"\n\n")

    # -- the end ---------------------------------------------------------------------------------------

    def close(self, why: str, retry: int | None = None) -> None:
        """End the stream now; ``retry`` (ms) asks the browser to wait that long before it comes back."""
        if self.closed:
            return
        self.closed = True
        self.log.info("event stream of {name} closed: {why}", name=self.name, why=why)
        if retry is not None and not served(self.request).finished:
            self.request.write(b"retry: %d\n\n" % retry)
        finishStream(self.request)


class EventStreams:
    """
    The pages' Server-Sent Events (``GET /events``): every change to an
    instance the person owns or may use, as ``event: instance`` with a JSON
    body, while they watch and while they may.

    A person has at most ``perPerson`` streams; opening one more closes
    their oldest (which is told to wait a minute before it comes back). The
    oldest, not the newest: a stream whose browser went away silently (a
    laptop closed, a network lost) is only found out when a write fails,
    minutes later, and refusing the newest would lock the person's live tab
    out in favour of such dead ones. A person with more live tabs than the
    cap sees one of them catch up a minute later, never all of them cycle.
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        events: EventBus,
        clock: IReactorTime,
        *,
        perPerson: int = STREAMS_PER_PERSON,
        keepalive: float = STREAM_KEEPALIVE,
    ) -> None:
        self.store = store
        self.events = events
        self.clock = clock
        self.perPerson = perPerson
        self.keepalive = keepalive
        self._byPerson: _Held[_Stream] = _Held(perPerson)

    def open(self, user: str) -> int:
        """How many streams ``user`` holds open now."""
        return len(self._byPerson.of(user))

    def count(self) -> int:
        """How many streams are open now, everyone's."""
        return len(self._byPerson)

    def closeAll(self, why: str) -> None:
        """End every stream (the portal is stopping: its browsers come back to another, or to it later)."""
        for stream in self._byPerson.all():
            stream.close(why)

    async def serve(self, request: IRequest, who: LoggedIn) -> None:
        """Stream to ``request`` for ``who`` (a ``LoggedIn``) until the browser goes or access ends."""
        stream = _Stream(self, request, who)
        for old in self._byPerson.add(stream.user, stream):
            old.close(f"more than {self.perPerson} streams open", retry=STREAM_RETRY_REPLACED)
        keepalive = LoopingCall(stream.keepalive)
        keepalive.clock = self.clock
        keepalive.start(self.keepalive, now=False)
        expiry: IDelayedCall = self.clock.callLater(
            max(who.session.expires - self.clock.seconds(), 0), stream.close, "its portal session expired"
        )
        unsubscribe = self.events.subscribe(stream.instanceChanged)
        unsubscribeAccess = self.events.subscribeAccess(stream.accessChanged)
        try:
            startStream(request, b"text/event-stream", b"retry: 3000\n: watching\n\n")
            # Heard from now on, and first where everything stands: the
            # snapshot goes before any change heard after it was asked for.
            stream._then(stream.snapshot)
            await _untilFinished(request)
        finally:
            stream.closed = True
            unsubscribe()
            unsubscribeAccess()
            keepalive.stop()
            if expiry.active():
                expiry.cancel()
            self._byPerson.remove(stream.user, stream)


# -- the auth helpers' watches -----------------------------------------------------------------------


class InstanceWatches:
    """
    The open ``GET /oauth/watch`` answers, by instance: each hears, as one
    JSON line, every access change to its instance (docs/protocols.md 6.6).
    One keepalive timer serves them all; an instance holds at most
    ``perInstance`` watches, its oldest closed to make room (a helper that
    reconnects after a silent drop must get in; its old watch is dead).
    """

    log = Logger()

    def __init__(
        self,
        store: IInstances,
        events: EventBus,
        clock: IReactorTime,
        *,
        perInstance: int = WATCHES_PER_INSTANCE,
        keepalive: float = WATCH_KEEPALIVE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.perInstance = perInstance
        self.keepalive = keepalive
        self._byInstance: _Held[IRequest] = _Held(perInstance)
        self._keepalive: LoopingCall | None = None
        events.subscribeAccess(self._accessChanged)

    def watching(self, instanceId: str) -> int:
        """How many watches ``instanceId`` holds open now."""
        return len(self._byInstance.of(instanceId))

    @staticmethod
    def _encode(message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"

    def _line(self, request: IRequest, message: dict[str, Any]) -> None:
        request.write(self._encode(message))

    async def serve(self, request: IRequest, instanceId: str) -> None:
        """Hold ``request`` open as a watch of ``instanceId`` until the helper goes."""
        for old in self._byInstance.add(instanceId, request):
            self.log.info("closing the oldest watch of instance {instance}", instance=instanceId)
            finishStream(old)
        if self._keepalive is None:
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = self.clock
            self._keepalive.start(self.keepalive, now=False)
        try:
            first = self._encode({"type": "watching", "keepalive": self.keepalive})
            await _stream(request, b"application/x-ndjson", first)
        finally:
            self._byInstance.remove(instanceId, request)
            if not self._byInstance and self._keepalive is not None:
                self._keepalive.stop()
                self._keepalive = None

    def _ping(self) -> None:
        for request in self._byInstance.all():
            self._line(request, {"type": "keepalive"})

    def _notify(self, instanceId: str, user: str | None) -> None:
        message: dict[str, Any] = {"type": "changed"}
        if user is not None:
            message["sub"] = user
        for request in self._byInstance.of(instanceId):
            self._line(request, message)

    def _accessChanged(self, change: AccessChange) -> None:
        if not self._byInstance:
            return
        if change.instance is not None:
            self._notify(change.instance, change.user)
        elif change.user is not None:
            user = change.user

            async def theirs() -> None:
                # Every instance the person owns or may use; those are the
                # only helpers that can hold a session of theirs.
                owned = await self.store.listInstancesOf(user)
                shared = await self.store.listInstancesSharedWith(user)
                for instanceId in {i.id for i in owned} | {i.id for i in shared}:
                    self._notify(instanceId, user)

            Deferred.fromCoroutine(theirs()).addErrback(
                lambda f: self.log.failure("could not tell the helpers of an access change", f)
            )
