"""
What instances and the image server report to ``SQLStore``: token ids
spent (so a report is never replayed), images found by reference, and the
images instances save.
"""

from __future__ import annotations

from collections.abc import Collection

from zope.interface import implementer

from dit4c.common.limits import ToolLimits

from ._core import _IMAGE, SQLCore, _checkState, _cols, _deferred, _image, _marks, _Txn
from .errors import Conflict, NotFound
from .ids import newId
from .interfaces import IReports
from .model import Image


@implementer(IReports)
class SQLReports(SQLCore):
    """``IReports`` in SQL."""

    # -- reports from instances and the image server -----------------------------------------------------

    #: The longest token id (``jti``) remembered.
    MAX_TOKEN_ID = 255

    @_deferred
    async def spendTokenId(self, issuer: str, jti: str, expires: float) -> bool:
        if not jti or len(jti) > self.MAX_TOKEN_ID:
            raise ValueError(f"a token id must have 1 to {self.MAX_TOKEN_ID} characters")
        now = self._now()

        def work(t: _Txn) -> bool:
            # Ids live minutes: forgetting the expired ones here keeps the
            # table small without a separate clean-up job.
            t.execute("DELETE FROM used_token_ids WHERE expires <= ?", (now,))
            # The compare-and-set: the primary key lets one insert win.
            return bool(
                t.execute(
                    "INSERT INTO used_token_ids (issuer, jti, expires) VALUES (?, ?, ?)"
                    " ON CONFLICT (issuer, jti) DO NOTHING",
                    (issuer, jti, max(expires, now)),
                )
            )

        return await self._run(work)

    @_deferred
    async def findImages(self, reference: str) -> list[Image]:
        def work(t: _Txn) -> list[Image]:
            rows = t.all(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE deleted = 0 AND (id = ? OR ref = ? OR digest = ?)"
                " ORDER BY created, id",
                (reference, reference, reference),
            )
            return [_image(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def saveInstanceImage(
        self,
        instance_id: str,
        name: str,
        ref: str,
        digest: str,
        *,
        states: Collection[str],
    ) -> tuple[Image, bool]:
        expected = tuple(states)
        for each in expected:
            _checkState(each)
        if not expected:
            raise ValueError("states must name at least one state")
        now = self._now()
        imageId = newId()

        def work(t: _Txn) -> tuple[Image, bool]:
            # A no-op write to the instance's row locks it (PostgreSQL; on
            # SQLite the transaction is the only writer anyway): concurrent
            # reports for one instance see each other's image.
            if not t.execute(
                f"UPDATE instances SET state = state WHERE id = ? AND state IN ({_marks(len(expected))})",
                (instance_id, *expected),
            ):
                row = t.one("SELECT state FROM instances WHERE id = ?", (instance_id,))
                if row is None:
                    raise NotFound(f"there is no instance {instance_id!r}")
                raise Conflict(f"instance {instance_id} is {row[0]}, not {' or '.join(expected)}")
            ownerId, port, limits = t.must(
                "SELECT i.owner_id, m.port, m.limits FROM instances i JOIN images m ON m.id = i.image_id WHERE i.id = ?",
                (instance_id,),
            )
            row = t.one(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND digest = ? AND deleted = 0"
                " ORDER BY created, id",
                (ownerId, digest),
            )
            if row is not None:
                return _image(row), False
            # A saved image keeps its tool's limits.
            image = Image(imageId, name, ref, digest, ownerId, port, now, False, ToolLimits.loads(limits))
            t.execute(
                f"INSERT INTO images ({_cols(_IMAGE)}) VALUES ({_marks(len(_IMAGE))})",
                (image.id, name, ref, digest, ownerId, port, now, 0, limits),
            )
            return image, True

        return await self._run(work)
