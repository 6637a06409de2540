"""
What the portal processes sharing a database keep for each other, in
``SQLStore`` (``IPortals``): their public signing keys (a token one signed
verifies at every other), which one holds each scheduler's channel, and
the answers to the questions they relay to each other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from zope.interface import implementer

from ._core import SQLCore, _deferred, _Txn
from .interfaces import IPortals

#: Seconds a relayed answer its asker never took is kept (the asker waits far less).
ANSWERS_KEPT = 60.0


@implementer(IPortals)
class SQLPortals(SQLCore):
    """``IPortals`` in SQL."""

    @_deferred
    async def publishPortalKeys(self, keys: Mapping[str, str]) -> None:
        now = self._now()
        given = sorted(keys.items())

        def work(t: _Txn) -> None:
            for kid, jwk in given:
                t.execute(
                    "INSERT INTO portal_keys (kid, public_jwk, published) VALUES (?, ?, ?)"
                    " ON CONFLICT (kid) DO UPDATE SET public_jwk = excluded.public_jwk",
                    (kid, jwk, now),
                )

        await self._run(work)

    @_deferred
    async def retirePortalKeys(self, kids: Collection[str]) -> None:
        gone = sorted(kids)

        def work(t: _Txn) -> None:
            for kid in gone:
                t.execute("DELETE FROM portal_keys WHERE kid = ?", (kid,))

        await self._run(work)

    @_deferred
    async def portalKeys(self) -> dict[str, str]:
        def work(t: _Txn) -> dict[str, str]:
            return {row[0]: row[1] for row in t.all("SELECT kid, public_jwk FROM portal_keys ORDER BY published, kid")}

        return await self._run(work)

    @_deferred
    async def holdChannel(self, scheduler_id: str, holder: str) -> None:
        now = self._now()

        def work(t: _Txn) -> None:
            t.execute(
                "INSERT INTO scheduler_links (scheduler_id, holder, since) VALUES (?, ?, ?)"
                " ON CONFLICT (scheduler_id) DO UPDATE SET holder = excluded.holder, since = excluded.since",
                (scheduler_id, holder, now),
            )

        await self._run(work, missing="no such scheduler")

    @_deferred
    async def releaseChannel(self, scheduler_id: str, holder: str) -> None:
        def work(t: _Txn) -> None:
            t.execute("DELETE FROM scheduler_links WHERE scheduler_id = ? AND holder = ?", (scheduler_id, holder))

        await self._run(work)

    @_deferred
    async def channelHolder(self, scheduler_id: str) -> str | None:
        def work(t: _Txn) -> str | None:
            row = t.one("SELECT holder FROM scheduler_links WHERE scheduler_id = ?", (scheduler_id,))
            return str(row[0]) if row else None

        return await self._run(work)

    @_deferred
    async def putAnswer(self, id: str, body: str) -> None:
        now = self._now()

        def work(t: _Txn) -> None:
            t.execute("DELETE FROM relayed_answers WHERE created < ?", (now - ANSWERS_KEPT,))
            t.execute("INSERT INTO relayed_answers (id, body, created) VALUES (?, ?, ?)", (id, body, now))

        await self._run(work, conflict="an answer with that id is kept already")

    @_deferred
    async def takeAnswer(self, id: str) -> str | None:
        def work(t: _Txn) -> str | None:
            row = t.one("SELECT body FROM relayed_answers WHERE id = ?", (id,))
            if row is None:
                return None
            t.execute("DELETE FROM relayed_answers WHERE id = ?", (id,))
            return str(row[0])

        return await self._run(work)
