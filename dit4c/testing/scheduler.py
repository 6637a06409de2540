"""
A stand-in scheduler that speaks the real scheduler channel
(``docs/protocols.md``, section 7), for tests of a portal and of what talks
to one (see :mod:`dit4c.testing`):

- :class:`TestingScheduler`, a scheduler stand-in that speaks the real
  channel (:class:`dit4c.scheduler.channel.ChannelClient`) and simulates
  instance life, with controllable delays and failures:
  ``start``: requested → starting → running (with a URL and a fresh
  instance key); ``stop``: stopping → stopped; ``save``: stopping → saving →
  uploading → saved (a stopped one: saving → uploading → saved); ``discard``: discarded. A failing step ends in
  ``errored`` with the reason given.
- :class:`RawChannel`, a bare channel client that sends whatever it is told
  and records what comes back, for tests of the protocol itself.
- :func:`registerScheduler`, a scheduler and its key in a portal store.

    scheduler, key = await registerScheduler(store, "hpc")
    sim = TestingScheduler(reactor, delays={"start": 0.2})
    await sim.connect("ws://127.0.0.1:8001", scheduler.id, key).whenConnected()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.channel.handshake import signProof
from dit4c.channel.wire import (
    AUDIENCE,
    PROOF_LIFETIME,
    SUBPROTOCOL,
    Command,
    InstanceStatus,
    LogChunk,
    decode,
    encode,
)
from dit4c.common.keys import PrivateKey, generatePrivateKey, publicJWK
from dit4c.common.life import State
from dit4c.common.websocket import webSocketEndpoint
from dit4c.listener.service import backoff
from dit4c.portal.store import ISchedulers, Scheduler
from dit4c.scheduler.channel import ChannelClient, ISchedulerHandler, channelURL

__all__ = ["RawChannel", "TestingScheduler", "registerScheduler"]

#: States after which a ``start`` begins a new life rather than repeating itself.
_AT_REST = frozenset({State.STOPPED, State.SAVED, State.DISCARDED, State.ERRORED})


@implementer(ISchedulerHandler)
class TestingScheduler:
    """A scheduler that runs nothing: its instances live only in its memory."""

    __test__ = False  # not a pytest test class, whatever its name
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        delays: Mapping[str, float] | None = None,
        failures: Mapping[str, str] | None = None,
        url: str = "http://{instance}.localhost/",
        instanceKeys: bool = True,
    ) -> None:
        """
        :param delays: seconds each step of an op takes, by op (``start``,
            ``stop``, ``save``, ``discard``); 0 by default (the next turn of
            the reactor). Change ``self.delays`` at any time.
        :param failures: op → reason: that op's last step ends in
            ``errored`` with the reason. Change ``self.failures`` at any time.
        :param url: the URL a running instance gets (``{instance}`` is its id).
        :param instanceKeys: give each started instance a fresh key pair and
            publish its public key.
        """
        self.reactor = reactor
        self.delays: dict[str, float] = {"start": 0.0, "stop": 0.0, "save": 0.0, "discard": 0.0, **(delays or {})}
        self.failures: dict[str, str] = dict(failures or {})
        self.urlTemplate = url
        self.instanceKeys = instanceKeys
        #: What this scheduler believes about each instance (what it reports).
        self.instances: dict[str, InstanceStatus] = {}
        #: Each instance's private key.
        self.keys: dict[str, PrivateKey] = {}
        #: Every command handled, in order (duplicates are not handled twice).
        self.handled: list[Command] = []
        #: Called with each command after it is handled and before it is
        #: acknowledged: a test can drop the connection here.
        self.beforeAck: Callable[[Command], object] | None = None
        #: Every state this scheduler sent, in order: (instance, state).
        self.history: list[tuple[str, str]] = []
        self.client: ChannelClient | None = None
        #: What each instance's tool "wrote": its output, for ``logs``.
        self.output: dict[str, bytes] = {}
        self._timers: dict[str, list[IDelayedCall]] = {}
        self._watchers: list[tuple[str, str, Deferred[InstanceStatus]]] = []

    # -- the channel --------------------------------------------------------------------

    def connect(
        self, portal: str | IStreamClientEndpoint, scheduler_id: str, private_key: PrivateKey, **options: Any
    ) -> ChannelClient:
        """
        Start a channel client for this scheduler, to the portal's URL (or
        endpoint), with fast retries unless ``retryPolicy`` is given;
        ``options`` are :class:`ChannelClient`'s. The client is also
        ``self.client``; its ``whenConnected()`` fires once it is up.
        """
        options.setdefault("retryPolicy", backoff(initial=0.05, maximum=0.5))
        self.client = ChannelClient(self.reactor, portal, scheduler_id, private_key, self, **options)
        self.client.startService()
        return self.client

    async def stop(self) -> None:
        """Cancel every simulated step and close the channel."""
        for timers in self._timers.values():
            for timer in timers:
                if timer.active():
                    timer.cancel()
        self._timers.clear()
        if self.client is not None and self.client.running:
            await self.client.stopService()

    # -- ISchedulerHandler ----------------------------------------------------------------

    def report(self) -> list[InstanceStatus]:
        return list(self.instances.values())

    def command(self, command: Command) -> Deferred[None]:
        self.handled.append(command)
        getattr(self, f"_{command.op}")(command)
        if self.beforeAck is not None:
            self.beforeAck(command)
        return succeed(None)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """What ``self.output`` holds for the instance (its tool "wrote" it); nothing if unknown."""
        if instance not in self.instances:
            return fail(LookupError(f"No compute node of this scheduler holds instance {instance}."))
        return succeed(LogChunk.of(self.output.get(instance, b""), offset, limit))

    # -- controlling the simulation ------------------------------------------------------

    def whenState(self, instance: str, state: str) -> Deferred[InstanceStatus]:
        """Fires when the instance reaches ``state`` here (at once if it is in it)."""
        current = self.instances.get(instance)
        if current is not None and current.state == state:
            return succeed(current)
        d: Deferred[InstanceStatus] = Deferred()
        self._watchers.append((instance, state, d))
        return d

    def setState(self, instance: str, state: State | str, reason: str | None = None, url: str | None = None) -> None:
        """Put an instance in a state and tell the portal (as a node would)."""
        status = InstanceStatus(instance, State(state), reason, url)
        if state == State.DISCARDED:
            self.instances.pop(instance, None)
            self.keys.pop(instance, None)
        else:
            self.instances[instance] = status
        self.history.append((instance, state))
        if self.client is not None:
            self.client.sendState(instance, state, reason, url)
        for watcher in list(self._watchers):
            if watcher[:2] == (instance, state):
                self._watchers.remove(watcher)
                watcher[2].callback(status)

    def forget(self, instance: str) -> None:
        """The node lost an instance without a word: it is no longer reported."""
        self._cancel(instance)
        self.instances.pop(instance, None)
        self.keys.pop(instance, None)

    def crash(self, instance: str, reason: str = "the tool exited") -> None:
        """An instance fails on its own."""
        self._cancel(instance)
        self.setState(instance, State.ERRORED, reason)

    # -- the ops ------------------------------------------------------------------------------

    def _later(self, instance: str, op: str, step: Callable[[], None]) -> None:
        def run() -> None:
            timers = self._timers.get(instance, [])
            if call in timers:
                timers.remove(call)
            step()

        call = self.reactor.callLater(self.delays.get(op, 0.0), run)
        self._timers.setdefault(instance, []).append(call)

    def _cancel(self, instance: str) -> None:
        for timer in self._timers.pop(instance, []):
            if timer.active():
                timer.cancel()

    def _start(self, command: Command) -> None:
        instance = command.instance
        current = self.instances.get(instance)
        if current is not None and current.state not in _AT_REST:
            return  # under way already: a start is idempotent
        self._cancel(instance)
        self.setState(instance, State.STARTING)

        def started() -> None:
            if "start" in self.failures:
                self.setState(instance, State.ERRORED, self.failures["start"])
                return
            if self.instanceKeys:
                key = generatePrivateKey()
                self.keys[instance] = key
                if self.client is not None:
                    self.client.sendInstanceKey(instance, key)
            self.setState(instance, State.RUNNING, url=self.urlTemplate.format(instance=instance))

        self._later(instance, "start", started)

    def _stop(self, command: Command) -> None:
        instance = command.instance
        current = self.instances.get(instance)
        self._cancel(instance)
        if current is None or current.state in (State.STOPPED, State.ERRORED):
            self.setState(instance, State.STOPPED)
            return
        if current.state == State.SAVED:
            self.setState(instance, State.SAVED)
            return
        self.setState(instance, State.STOPPING)

        def stopped() -> None:
            if "stop" in self.failures:
                self.setState(instance, State.ERRORED, self.failures["stop"])
            else:
                self.setState(instance, State.STOPPED)

        self._later(instance, "stop", stopped)

    def _resume(self, command: Command) -> None:
        instance = command.instance
        current = self.instances.get(instance)
        if current is None or current.state != State.STOPPED:
            self.setState(instance, State.ERRORED, "there is no stopped pod to resume")
            return
        self.setState(instance, State.STARTING)
        self._later(
            instance, "start", lambda: self.setState(instance, State.RUNNING, url=self.urlTemplate.format(instance=instance))
        )

    def _save(self, command: Command) -> None:
        instance = command.instance
        current = self.instances.get(instance)
        if current is not None and current.state in (State.STOPPING, State.SAVING, State.UPLOADING, State.SAVED):
            return  # under way already, or done
        self._cancel(instance)
        if current is None or current.state not in (State.STARTING, State.RUNNING, State.STOPPED):
            self.setState(instance, State.ERRORED, "there is nothing to save")
            return

        def saving() -> None:
            self.setState(instance, State.SAVING)
            self._later(instance, "save", uploading)

        def uploading() -> None:
            if "save" in self.failures:
                self.setState(instance, State.ERRORED, self.failures["save"])
                return
            self.setState(instance, State.UPLOADING)
            self._later(instance, "save", lambda: self.setState(instance, State.SAVED))

        if current.state is State.STOPPED:
            saving()  # saved as it is, with no stop first
            return
        self.setState(instance, State.STOPPING)
        self._later(instance, "save", saving)

    def _discard(self, command: Command) -> None:
        instance = command.instance
        self._cancel(instance)
        if "discard" in self.failures:
            self.setState(instance, State.ERRORED, self.failures["discard"])
        else:
            self.setState(instance, State.DISCARDED)


# -- a bare client, for tests of the protocol ----------------------------------------------


class _RawProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        channel: RawChannel = self.factory.channel
        channel.protocol = self
        if not channel.opened.called:
            channel.opened.callback(channel)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.channel._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        channel: RawChannel = self.factory.channel
        if not channel.opened.called:
            channel.opened.errback(Failure(ConnectionLost(f"WebSocket not opened: {code} {reason}")))
        if not channel.closed.called:
            channel.closed.callback((code, reason))


class _RawFactory(WebSocketClientFactory):
    channel: RawChannel


class RawChannel:
    """A bare client of the scheduler channel: sends what it is told, records what comes."""

    def __init__(self) -> None:
        #: Every message received, decoded (raw payloads that are not JSON as bytes).
        self.messages: list[Any] = []
        self.protocol: _RawProtocol | None = None
        self.opened: Deferred[RawChannel] = Deferred()
        #: Fires with (close code, reason) when the channel closes.
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self._read = 0
        self._waiting: list[Deferred[Any]] = []

    @classmethod
    async def connect(
        cls, reactor: Any, url: str, *, protocols: list[str] | None = None, **options: Any
    ) -> RawChannel:
        """Open a WebSocket to ``url`` (with the channel's subprotocol unless told otherwise)."""
        channel = cls()
        url = channelURL(url)
        factory = _RawFactory(url, protocols=[SUBPROTOCOL] if protocols is None else protocols, reactor=reactor)
        factory.protocol = _RawProtocol
        factory.channel = channel
        factory.noisy = False
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0, **options)
        await webSocketEndpoint(reactor, url).connect(factory)
        return await channel.opened

    def _received(self, payload: bytes, isBinary: bool) -> None:
        try:
            self.messages.append(decode(payload, isBinary))
        except Exception:
            self.messages.append(payload)
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._read < len(self.messages):
            message = self.messages[self._read]
            self._read += 1
            self._waiting.pop(0).callback(message)

    def next(self) -> Deferred[Any]:
        """The next message not yet read (waiting for it if need be)."""
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        self._wake()
        return d

    def send(self, message: Mapping[str, Any] | str | bytes, *, isBinary: bool = False) -> None:
        """Send a message: a mapping as JSON, or text/bytes as they are."""
        assert self.protocol is not None
        if isinstance(message, Mapping):
            payload = encode(message)
        elif isinstance(message, str):
            payload = message.encode("utf-8")
        else:
            payload = message
        self.protocol.sendMessage(payload, isBinary=isBinary)

    async def hello(
        self,
        scheduler_id: str,
        key: PrivateKey,
        *,
        nonce: str | None = None,
        portal: str | None = None,
        clock: IReactorTime | None = None,
        lifetime: float = PROOF_LIFETIME,
        audience: str = AUDIENCE,
        sub: str | None = None,
    ) -> dict[str, Any]:
        """
        Read the challenge and answer it with a proof made as told (by
        default a good one); fires with the challenge.
        """
        challenge: dict[str, Any] = await self.next()
        assert challenge.get("type") == "challenge", challenge
        proof = signProof(
            key,
            sub if sub is not None else scheduler_id,
            nonce if nonce is not None else challenge["nonce"],
            portal if portal is not None else challenge["portal"],
            clock=clock,
            lifetime=lifetime,
            audience=audience,
        )
        self.send({"type": "hello", "scheduler": scheduler_id, "proof": proof})
        return challenge

    def abort(self) -> None:
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)

    async def close(self) -> None:
        """Close (if still open) and wait until closed."""
        if not self.closed.called and self.protocol is not None:
            self.protocol.sendClose(1000)
        await self.closed


async def registerScheduler(
    store: ISchedulers, name: str, key: PrivateKey | None = None
) -> tuple[Scheduler, PrivateKey]:
    """
    Register a scheduler (and the public half of ``key``, a fresh key by
    default) in a portal store: its record (``.id`` is what it connects
    as) and its private key.
    """
    key = key if key is not None else generatePrivateKey()
    scheduler = await store.createScheduler(name, json.dumps(publicJWK(key)))
    return scheduler, key
