"""
Where a person's access ends: a logout, a person disabled or removed. The sessions go
and every watcher (event streams, auth helpers through ``/oauth/watch``)
is told, in one step that runs to its end once begun
(:func:`~dit4c.common.completes.completes`): a browser that goes away
half-way does not leave a session ended that no helper heard of.
"""

from __future__ import annotations

from typing import Any

from dit4c.common.completes import completes
from dit4c.common.errors import IllegalMove
from dit4c.common.life import Life
from dit4c.portal.errors import WrongState
from dit4c.portal.events import AccessChange, EventBus
from dit4c.portal.instances import Instances, Sharing
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.ids import hashToken
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Removed, User

__all__ = ["changePerson", "endInstancesOf", "endSession", "removePerson"]


@completes
async def endSession(store: IStore, events: EventBus, who: LoggedIn) -> None:
    """A logout: the session is gone, and its event streams and helpers are told."""
    await store.deleteSession(who.token)
    events.accessChanged(AccessChange(user=who.user.id, session=hashToken(who.token)))


@completes
async def changePerson(store: IStore, events: EventBus, userId: str, **changes: Any) -> User:
    """
    An administrator's change to a person; one disabled loses every
    session, and their streams and helpers are told.
    """
    user = await store.updateUser(userId, **changes)
    if changes.get("disabled"):
        await store.deleteSessionsOfUser(userId)
        events.accessChanged(AccessChange(user=userId))
    return user


async def endInstancesOf(instances: Instances, admin: User, userId: str) -> tuple[int, int]:
    """
    Every instance of a person that is not discarded, one step towards its
    end, as if they had clicked: a running one stopped, one at rest
    discarded (one in between is left to finish). How many were stopped,
    and how many discarded; a second call, once the stopped ones are at
    rest, discards those.
    """
    stopped = discarded = 0
    for instance in await instances.store.listInstancesOf(userId):
        for action in ("discard", "stop"):
            try:
                Life(instance.state).act(action)
            except IllegalMove:
                continue
            try:
                await instances.act(admin, instance.id, action)
            except WrongState:
                break  # it moved meanwhile: the next call sees where to
            if action == "stop":
                stopped += 1
            else:
                discarded += 1
            break
    return stopped, discarded


@completes
async def removePerson(store: IStore, events: EventBus, sharing: Sharing, userId: str) -> Removed:
    """
    A disabled person whose instances are all discarded, removed (see
    ``IPeople.removeUser``); watchers are told, and their saved images'
    bytes leave the image server unless another saved image has them.
    Their storage on the file server (a directory named by their id, which
    no new person is ever given) is left for an administrator to remove.
    """
    removed = await store.removeUser(userId)
    events.accessChanged(AccessChange(user=userId))
    for image in removed.images:
        await sharing.removeBytesOf(image)
    return removed
