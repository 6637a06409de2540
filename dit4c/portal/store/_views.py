"""
A person's page in ``SQLStore`` (``IPageViews``): who they are and what
``GET /`` or ``GET /api/v1/instances`` lists, in one read-only transaction
instead of a transaction per part (and one per instance for its shares).
"""

from __future__ import annotations

from zope.interface import implementer

from dit4c.common.life import State

from ._core import (
    _IMAGE,
    _INSTANCE,
    _USER,
    SQLCore,
    _cols,
    _deferred,
    _image,
    _instance,
    _Txn,
    _user,
)
from ._instances import sharedCounts
from ._schedulers import schedulersFor
from .ids import hashToken
from .interfaces import IPageViews
from .model import Image, Instance, PageView, Session, User

#: An API token's ``last_used`` is written when it is older than this (seconds): a page
#: view stays a read, and a client calling many times a second writes once a minute.
LAST_USED_EVERY = 60.0


# Each statement is a round trip to PostgreSQL and a hand-over between the
# pool's threads: the page's lists come in as few as the SQL allows, each
# equal to the list its area's own call (``_instances``, ``_images``) gives.


def instances(t: _Txn, user_id: str) -> tuple[list[Instance], list[Instance]]:
    """``user_id``'s own instances and those shared with them (as ``instancesOf`` and ``sharedWith``)."""
    rows = t.all(
        f"SELECT 0, {_cols(_INSTANCE)} FROM instances WHERE owner_id = ? AND state <> ?"
        f" UNION ALL SELECT 1, {_cols(_INSTANCE, 'i')} FROM instances i"
        " WHERE i.id IN ("
        "  SELECT s.instance_id FROM instance_shares s WHERE s.user_id = ?"
        "  UNION SELECT l.instance_id FROM share_link_grants g JOIN share_links l ON l.id = g.link_id"
        "  WHERE g.user_id = ? AND l.revoked = 0)"
        " AND i.state <> ? AND i.owner_id <> ?"
        " ORDER BY 1, 2",
        (user_id, State.DISCARDED.value, user_id, user_id, State.DISCARDED.value, user_id),
    )
    return [_instance(r[1:]) for r in rows if r[0] == 0], [_instance(r[1:]) for r in rows if r[0] == 1]


def allImages(t: _Txn, user_id: str) -> list[Image]:
    """The catalogue, ``user_id``'s own images, and those shared with them (as ``catalogue`` + ``imagesOf`` + ``imagesSharedWith``)."""
    rows = t.all(
        f"SELECT 0, name, 0, {_cols(_IMAGE)} FROM images WHERE owner_id IS NULL AND deleted = 0"
        f" UNION ALL SELECT 1, '', created, {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND deleted = 0"
        f" UNION ALL SELECT 2, '', i.created, {_cols(_IMAGE, 'i')} FROM images i"
        " JOIN image_shares s ON s.image_id = i.id WHERE s.user_id = ? AND i.deleted = 0"
        " ORDER BY 1, 2, 3, 4",
        (user_id, user_id),
    )
    return [_image(r[3:]) for r in rows]


@implementer(IPageViews)
class SQLPageViews(SQLCore):
    """``IPageViews`` in SQL."""

    @_deferred
    async def pageView(
        self,
        *,
        sessionToken: str | None = None,
        apiToken: str | None = None,
        user_id: str | None = None,
        full: bool = True,
    ) -> PageView | None:
        if [sessionToken, apiToken, user_id].count(None) != 2:
            raise ValueError("a page view is of one person: give one of sessionToken, apiToken, user_id")
        now = self._now()
        token: list[tuple[str, float | None]] = []

        def who(t: _Txn) -> tuple[User, Session | None] | None:
            if sessionToken is not None:
                row = t.one(
                    f"SELECT s.csrf, s.created, s.expires, s.last_seen, {_cols(_USER, 'u')}"
                    " FROM sessions s JOIN users u ON u.id = s.user_id"
                    " WHERE s.token_hash = ? AND s.expires > ? AND u.disabled = 0",
                    (hashToken(sessionToken), now),
                )
                if row is None:
                    return None
                user = _user(row[4:])
                return user, Session(sessionToken, user.id, row[0], row[1], row[2], row[3])
            if apiToken is not None:
                row = t.one(
                    f"SELECT t.id, t.last_used, {_cols(_USER, 'u')} FROM api_tokens t JOIN users u ON u.id = t.user_id"
                    " WHERE t.token_hash = ? AND t.revoked = 0 AND u.disabled = 0",
                    (hashToken(apiToken),),
                )
                if row is None:
                    return None
                token.append((row[0], row[1]))
                return _user(row[2:]), None
            row = t.one(f"SELECT {_cols(_USER)} FROM users WHERE id = ? AND disabled = 0", (user_id,))
            return (_user(row), None) if row else None

        def work(t: _Txn) -> PageView | None:
            found = who(t)
            if found is None:
                return None
            user, session = found
            view = PageView(user, session, *instances(t, user.id))
            if not full:
                return view
            images = allImages(t, user.id)
            names = {image.id: image.name for image in images}
            # Images no longer offered (deleted, or unshared) that instances still run from.
            missing = sorted({i.image_id for i in view.instances} - names.keys())
            if missing:
                rows = t.all(f"SELECT {_cols(_IMAGE)} FROM images WHERE id IN ({', '.join('?' * len(missing))})", missing)
                names.update({image.id: image.name for image in map(_image, rows)})
            return PageView(
                user, session, view.instances, view.shared,
                images=images, imageNames=names, schedulers=schedulersFor(t, user.id),
                sharedCounts=sharedCounts(t, user.id),
            )  # fmt: skip

        view = await self._run(work, readOnly=True)
        if view is not None and token:
            [(token_id, last_used)] = token
            if last_used is None or last_used < now - LAST_USED_EVERY:
                await self._run(
                    lambda t: t.execute(
                        "UPDATE api_tokens SET last_used = ? WHERE id = ? AND (last_used IS NULL OR last_used < ?)",
                        (now, token_id, now),
                    )
                )
        return view
