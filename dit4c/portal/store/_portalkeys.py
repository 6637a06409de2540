"""
The portal processes' public signing keys in ``SQLStore`` (``IPortalKeys``):
what lets a token one portal process signed verify at every other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from zope.interface import implementer

from ._core import SQLCore, _deferred, _Txn
from .interfaces import IPortalKeys


@implementer(IPortalKeys)
class SQLPortalKeys(SQLCore):
    """``IPortalKeys`` in SQL."""

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
