"""
Where a person's access ends: a logout, a person disabled. The sessions go
and every watcher (event streams, auth helpers through ``/oauth/watch``)
is told, in one step that runs to its end once begun
(:func:`~dit4c.common.completes.completes`): a browser that goes away
half-way does not leave a session ended that no helper heard of.
"""

from __future__ import annotations

from typing import Any

from dit4c.common.completes import completes
from dit4c.portal.events import AccessChange, EventBus
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.ids import hashToken
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import User

__all__ = ["changePerson", "endSession"]


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
