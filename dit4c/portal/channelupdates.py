"""
What schedulers report about their instances, applied to the portal's
store (docs/protocols.md 7.4): a state, if it is a legal move of the
instance's life, with a compare-and-set on the state found; an instance's
public key; and, after a (re)connect, the whole report reconciled with what
the store holds. Every change is published on the portal's event bus as an
``InstanceEvent``.

The scheduler channel (``dit4c.portal.channel.ChannelHub``) checks each
message and hands it here, one at a time per channel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from dit4c.channel.wire import InstanceStatus, privateMembers
from dit4c.common.errors import IllegalMove
from dit4c.common.keys import publicJWK
from dit4c.common.life import ACTIVE, Life, State
from dit4c.common.tokens import parseJWKS
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.store.errors import Conflict, NotFound
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import UNSET, Instance, Unset

__all__ = ["LOST_REASON", "InstanceUpdates", "publishableKey"]

_log = Logger()

#: The reason an active instance gets when its scheduler's report leaves it out.
LOST_REASON = "the compute node lost this instance"

#: States in which an instance keeps the URL it had, when an update names none.
_URL_STATES = frozenset({State.STARTING, State.RUNNING})
#: States a stop or a save asked for moves through, and those it ends in:
#: the reason it was asked for (if any) is kept from one to the next.
_ASKED = frozenset({State.STOPPING, State.SAVING, State.UPLOADING})
_KEEPS_WHY = _ASKED | {State.STOPPED, State.SAVED}


def publishableKey(schedulerId: str, instanceId: str, jwk: dict[str, Any]) -> dict[str, Any] | None:
    """
    The public JWK to publish for an instance, from what its scheduler sent;
    None (logged, without any private value) for a key with private members
    or one that is no EC P-256 or Ed25519 signing key.
    """
    leaked = privateMembers(jwk)
    if leaked:
        _log.warn(
            "refused the key of instance {instance} from scheduler {scheduler}: it carries "
            "private key members ({members}); only public keys are published",
            instance=instanceId, scheduler=schedulerId, members=", ".join(sorted(leaked)),
        )  # fmt: skip
        return None
    usable = parseJWKS({"keys": [jwk]})
    if not usable:
        _log.warn(
            "refused the key of instance {instance} from scheduler {scheduler}: "
            "not an EC P-256 or Ed25519 public key for signing",
            instance=instanceId, scheduler=schedulerId,
        )  # fmt: skip
        return None
    return publicJWK(next(iter(usable.values())).key)


class InstanceUpdates:
    """A scheduler's reports about its instances, applied to ``store`` and published on ``events``."""

    log = Logger()

    def __init__(self, store: IStore, events: InstanceEvents) -> None:
        self.store = store
        self.events = events

    async def _ours(self, schedulerId: str, instanceId: str, what: str) -> Instance | None:
        """The instance if it is this scheduler's; otherwise None (logged)."""
        instance: Instance | None = await self.store.instanceById(instanceId)
        if instance is None:
            self.log.info(
                "scheduler {scheduler} sent {what} for unknown instance {instance}; ignored",
                scheduler=schedulerId,
                what=what,
                instance=instanceId,
            )
            return None
        if instance.scheduler_id != schedulerId:
            self.log.warn(
                "scheduler {scheduler} sent {what} for instance {instance}, which is not placed on it; ignored",
                scheduler=schedulerId,
                what=what,
                instance=instanceId,
            )
            return None
        return instance

    async def applyStatus(self, schedulerId: str, status: InstanceStatus, known: Instance | None = None) -> None:
        """Apply a state the scheduler reported, if it is a legal move (compare-and-set)."""
        for _ in range(5):
            instance = known or await self._ours(schedulerId, status.instance, f"state {status.state}")
            known = None
            if instance is None:
                return
            try:
                # The portal's record of the instance is its life, in the state stored.
                Life(instance.state).move(status.state)
            except IllegalMove:
                self.log.info(
                    "scheduler {scheduler} moved instance {instance} from {old} to {new}: not allowed; ignored",
                    scheduler=schedulerId,
                    instance=instance.id,
                    old=instance.state,
                    new=status.state,
                )
                return
            # A state that keeps the URL, reported without one, leaves the
            # stored URL alone: the listener's report of it may have come
            # since ``instance`` was read (the compare-and-set is on the
            # state only), and must not be overwritten with what was read.
            url: str | None | Unset = status.url
            if url is None and status.state in _URL_STATES:
                url = UNSET
            # Why a stop or save was asked for (unused past its limit, a
            # drain) stays with the instance it ends in, unless the node says why.
            reason = status.reason
            if reason is None and status.state in _KEEPS_WHY and instance.state in _ASKED:
                reason = instance.reason
            if (instance.state, instance.reason) == (status.state, reason) and url in (UNSET, instance.url):
                return
            try:
                updated = await self.store.updateInstance(
                    instance.id, state=status.state, reason=reason, url=url, expected_state=instance.state
                )
            except Conflict:
                continue  # it changed meanwhile: judge the move again
            except NotFound:
                return
            self.events.changed(InstanceEvent(updated, instance, "state"))
            return
        self.log.warn("instance {instance} kept changing; state {state} not applied", instance=status.instance, state=status.state)

    async def applyKey(self, schedulerId: str, instanceId: str, jwk: dict[str, Any]) -> None:
        instance = await self._ours(schedulerId, instanceId, "a key")
        if instance is None:
            return
        if instance.state == State.DISCARDED:
            self.log.info("key for discarded instance {instance} ignored", instance=instanceId)
            return
        serialized = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
        if instance.public_jwk == serialized:
            return
        try:
            updated = await self.store.updateInstance(instanceId, public_jwk=serialized)
        except NotFound:
            return
        self.log.info("instance {instance} has key {kid}", instance=instanceId, kid=jwk.get("kid"))
        self.events.changed(InstanceEvent(updated, instance, "key"))

    async def reconcile(self, schedulerId: str, statuses: Iterable[InstanceStatus]) -> None:
        """
        After a (re)connect: apply what the scheduler reports, and mark
        errored every active instance it left out, unless it cannot know of
        it yet: a command about it is still on its way, or (``requested``)
        it was never told of it. An instance being discarded that it left
        out is discarded: no node holds anything of it, and the node's word
        that it finished was lost (it came while the scheduler or its link
        to the portal was away).
        """
        instances = {i.id: i for i in await self.store.listInstancesOfScheduler(schedulerId)}
        reported: set[str] = set()
        for status in statuses:
            reported.add(status.instance)
            await self.applyStatus(schedulerId, status, known=instances.get(status.instance))
        commanded = await self.store.commandedInstances(schedulerId)
        lost = [
            i
            for i in instances.values()
            if i.state in ACTIVE
            and i.id not in reported
            and not commanded.get(i.id, False)  # a command about it still on its way
            and (i.state != State.REQUESTED or i.id in commanded)  # never told of it
        ]
        gone = [
            i
            for i in instances.values()
            if i.state == State.DISCARDING and i.id not in reported and not commanded.get(i.id, False)
        ]
        for instance, state, reason in [(i, State.ERRORED, LOST_REASON) for i in lost] + [
            (i, State.DISCARDED, None) for i in gone
        ]:
            try:
                updated = await self.store.updateInstance(
                    instance.id, state=state, reason=reason, url=None, expected_state=instance.state
                )
            except (Conflict, NotFound):
                continue  # changed meanwhile: whatever changed it knows better
            self.log.warn(
                "instance {instance} ({old}) is missing from scheduler {scheduler}'s report: {new}",
                instance=instance.id,
                old=instance.state,
                scheduler=schedulerId,
                new=state.value,
            )
            self.events.changed(InstanceEvent(updated, instance, "state"))
        self.log.info(
            "scheduler {scheduler} reported {count} instances ({lost} lost)",
            scheduler=schedulerId,
            count=len(reported),
            lost=len(lost),
        )
