"""
Between portal processes (docs/protocols.md 16): what one process changed,
told to every other one that shares its store, so that none of them polls.

Several portal processes behind a load balancer share one PostgreSQL
database. Each keeps its own in-process bus (:mod:`dit4c.portal.events`),
its own scheduler channels and its own signing key; :class:`IPeers` carries
the few things the others must hear at once:

- ``instance``: an instance changed (the others read it from the store and
  publish it on their buses: the pages they serve show it);
- ``access``: someone's leave to use instances changed (their event streams
  and auth helpers' watches look again);
- ``command``: a command was stored for a scheduler (the process holding
  that scheduler's channel sends it down);
- ``keys``: a portal process's public signing keys changed (the others read
  them again);
- ``ask`` and ``answer``: a question for a scheduler whose channel another
  process holds (a tool's output, the compute nodes), relayed to that
  process and answered through the store
  (:mod:`dit4c.portal.channelrelay`).

A message says only where to look; the store holds what is true. What is
missed while a process's link is down is made good when it comes back
(:meth:`IPeers.onJoined`): channels are pumped, keys read, and pages'
streams closed so that browsers come back for a fresh snapshot.

:class:`NoPeers` is a process alone with its store (SQLite, the embedded
default). ``dit4c.portal.store.PostgresPeers`` is PostgreSQL's
LISTEN/NOTIFY.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from dit4c.portal.events import AccessChange, InstanceEvents, Subscribers
from dit4c.portal.store.interfaces import IInstances

__all__ = ["CHANNEL", "EventRelay", "IPeers", "KINDS", "NoPeers", "PeerMessages", "decode", "encode"]

#: The PostgreSQL notification channel every portal process listens on.
CHANNEL = "dit4c_portal"
#: The kinds of message, each with its members (besides ``v``, ``from`` and ``kind``).
KINDS: dict[str, tuple[str, ...]] = {
    "instance": ("id", "keys"),
    "access": ("user", "instance", "session"),
    "command": ("scheduler",),
    "keys": (),
    "ask": ("id", "holder", "scheduler", "question"),
    "answer": ("id",),
}
#: PostgreSQL's limit on a notification's payload is 8000 bytes; ours are far smaller.
MAX_PAYLOAD = 7900


def encode(sender: str, kind: str, body: Mapping[str, Any]) -> str:
    """One message as its JSON text, refused if its kind is unknown or it is too long."""
    if kind not in KINDS:
        raise ValueError(f"no such kind of message between portals: {kind!r}")
    members = {name: body.get(name) for name in KINDS[kind]}
    text = json.dumps({"v": 1, "from": sender, "kind": kind, **members}, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_PAYLOAD:
        raise ValueError(f"a {kind} message between portals is too long ({len(text)} characters)")
    return text


def decode(text: str) -> tuple[str, str, dict[str, Any]] | None:
    """``(sender, kind, body)`` of a message, or None for anything that is not one of ours."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("v") != 1:
        return None
    sender, kind = message.get("from"), message.get("kind")
    if not isinstance(sender, str) or kind not in KINDS:
        return None
    body = {name: message.get(name) for name in KINDS[kind]}
    if any(value is not None and not isinstance(value, (str, bool)) for value in body.values()):
        return None
    return sender, kind, body


class IPeers(Interface):
    """The other portal processes sharing this one's store."""

    alone = Attribute("True when there can be no other process (nothing is ever told or heard).")
    id = Attribute("This process, as its messages name it (random, new at every start).")

    def tell(kind: str, body: Mapping[str, Any]) -> None:
        """Tell every other process (after the change is committed; never waited for, never fails)."""

    def hear(kind: str, callback: Callable[[dict[str, Any]], object]) -> Callable[[], None]:
        """Call ``callback`` with the body of every ``kind`` message from another process."""

    def onJoined(callback: Callable[[], object]) -> Callable[[], None]:
        """
        Call ``callback`` each time the link to the others comes back after
        it was lost: messages may have been missed meanwhile.
        """

    def live(process: str) -> Deferred[bool]:
        """Whether the portal process with that id (``id``) is running now, and linked to the others."""


class PeerMessages:
    """What every ``IPeers`` shares: this process's id, and its listeners by kind."""

    log = Logger()

    def __init__(self) -> None:
        #: This process, as its messages name it (its own are not heard back).
        self.id = secrets.token_urlsafe(9)
        self._hearers: dict[str, Subscribers[dict[str, Any]]] = {kind: Subscribers(f"{kind} message") for kind in KINDS}
        self._joined: Subscribers[None] = Subscribers("rejoin")

    def hear(self, kind: str, callback: Callable[[dict[str, Any]], object]) -> Callable[[], None]:
        return self._hearers[kind].subscribe(callback)

    def onJoined(self, callback: Callable[[], object]) -> Callable[[], None]:
        return self._joined.subscribe(lambda _: callback())

    def received(self, text: str) -> None:
        """A message arrived: handed to those who hear its kind, unless it is our own or not ours."""
        message = decode(text)
        if message is None:
            self.log.warn("ignored a message between portals that is not one: {text!r}", text=text[:200])
            return
        sender, kind, body = message
        if sender != self.id:
            self._hearers[kind].publish(body)

    def rejoined(self) -> None:
        self._joined.publish(None)


@implementer(IPeers)
class NoPeers(PeerMessages):
    """A portal process alone with its store: nothing to tell, nothing to hear."""

    alone = True

    def tell(self, kind: str, body: Mapping[str, Any]) -> None:
        encode(self.id, kind, body)  # the same checks as where it would be sent

    def live(self, process: str) -> Deferred[bool]:
        return succeed(process == self.id)


class EventRelay:
    """
    The bus's changes told to the other portal processes, and theirs put on
    this process's bus: each instance they name is read from the store, one
    at a time in the order heard, so that a page never sees an older state
    after a newer one.
    """

    log = Logger()

    def __init__(self, events: InstanceEvents, peers: IPeers, instances: IInstances) -> None:
        self.events = events
        self.peers = peers
        self.instances = instances
        self._reading = DeferredLock()
        events.relay = peers.tell
        peers.hear("instance", self._instance)
        peers.hear("access", self._access)

    def _instance(self, body: dict[str, Any]) -> Deferred[None]:
        instanceId = body.get("id")
        if not isinstance(instanceId, str):
            return succeed(None)
        return self._reading.run(lambda: Deferred.fromCoroutine(self._read(instanceId, bool(body.get("keys")))))

    async def _read(self, instanceId: str, keys: bool) -> None:
        try:
            instance = await self.instances.instanceById(instanceId)
        except Exception as e:
            self.log.warn("could not read instance {id}, changed by another portal: {error}", id=instanceId, error=e)
            return
        if instance is not None:
            self.events.heard(instance, keys=keys)

    def _access(self, body: dict[str, Any]) -> None:
        self.events.heardAccess(AccessChange(user=body.get("user"), instance=body.get("instance"), session=body.get("session")))
