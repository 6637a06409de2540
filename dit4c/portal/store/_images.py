"""
Images in ``SQLStore``: the catalogue, people's own images, and the
images shared with them.
"""

from __future__ import annotations

from zope.interface import implementer

from dit4c.common.limits import ToolLimits

from ._core import _IMAGE, SQLCore, _cols, _deferred, _image, _marks, _Txn
from .errors import NotFound
from .ids import newId
from .interfaces import IImages
from .model import Image


def catalogue(t: _Txn) -> list[Image]:
    """The images anyone may start, by name."""
    rows = t.all(
        f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id IS NULL AND deleted = 0 ORDER BY name, id"
    )
    return [_image(row) for row in rows]


def imagesOf(t: _Txn, user_id: str) -> list[Image]:
    """``user_id``'s own images, oldest first."""
    rows = t.all(
        f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND deleted = 0 ORDER BY created, id",
        (user_id,),
    )
    return [_image(row) for row in rows]


def imagesSharedWith(t: _Txn, user_id: str) -> list[Image]:
    """The images others shared with ``user_id``, oldest first."""
    rows = t.all(
        f"SELECT {_cols(_IMAGE, 'i')} FROM images i JOIN image_shares s ON s.image_id = i.id"
        " WHERE s.user_id = ? AND i.deleted = 0 ORDER BY i.created, i.id",
        (user_id,),
    )
    return [_image(row) for row in rows]


@implementer(IImages)
class SQLImages(SQLCore):
    """``IImages`` in SQL."""

    # -- images ---------------------------------------------------------------------------------------

    @_deferred
    async def createImage(
        self,
        name: str,
        ref: str,
        *,
        owner_id: str | None = None,
        digest: str | None = None,
        port: int | None = None,
        limits: ToolLimits | None = None,
    ) -> Image:
        image = Image(newId(), name, ref, digest, owner_id, port, self._now(), False, limits or ToolLimits())

        def work(t: _Txn) -> Image:
            t.execute(
                f"INSERT INTO images ({_cols(_IMAGE)}) VALUES ({_marks(len(_IMAGE))})",
                (image.id, name, ref, digest, owner_id, port, image.created, 0, image.limits.dumps()),
            )
            return image

        return await self._run(work, missing=f"there is no user {owner_id!r}")

    @_deferred
    async def listCatalogue(self) -> list[Image]:
        return await self._run(lambda t: catalogue(t))

    @_deferred
    async def listImagesOf(self, user_id: str) -> list[Image]:
        return await self._run(lambda t: imagesOf(t, user_id))

    @_deferred
    async def listImagesSharedWith(self, user_id: str) -> list[Image]:
        return await self._run(lambda t: imagesSharedWith(t, user_id))

    @_deferred
    async def imageById(self, image_id: str) -> Image | None:
        def work(t: _Txn) -> Image | None:
            row = t.one(f"SELECT {_cols(_IMAGE)} FROM images WHERE id = ?", (image_id,))
            return _image(row) if row else None

        return await self._run(work)

    @_deferred
    async def deleteImage(self, image_id: str) -> None:
        def work(t: _Txn) -> None:
            if not t.execute("UPDATE images SET deleted = 1 WHERE id = ?", (image_id,)):
                raise NotFound(f"there is no image {image_id!r}")

        await self._run(work)

    @_deferred
    async def renameImage(self, image_id: str, name: str) -> Image:
        def work(t: _Txn) -> Image:
            if not t.execute("UPDATE images SET name = ? WHERE id = ? AND deleted = 0", (name, image_id)):
                raise NotFound(f"there is no image {image_id!r}")
            return _image(t.must(f"SELECT {_cols(_IMAGE)} FROM images WHERE id = ?", (image_id,)))

        return await self._run(work)

    @_deferred
    async def setImageLimits(self, image_id: str, limits: ToolLimits) -> Image:
        def work(t: _Txn) -> Image:
            if not t.execute("UPDATE images SET limits = ? WHERE id = ? AND deleted = 0", (limits.dumps(), image_id)):
                raise NotFound(f"there is no image {image_id!r}")
            return _image(t.must(f"SELECT {_cols(_IMAGE)} FROM images WHERE id = ?", (image_id,)))

        return await self._run(work)

    @_deferred
    async def shareImage(self, image_id: str, user_id: str) -> None:
        now = self._now()

        def work(t: _Txn) -> None:
            t.execute(
                "INSERT INTO image_shares (image_id, user_id, created) VALUES (?, ?, ?)"
                " ON CONFLICT (image_id, user_id) DO NOTHING",
                (image_id, user_id, now),
            )

        await self._run(work, missing=f"there is no image {image_id!r} or no user {user_id!r}")

    @_deferred
    async def unshareImage(self, image_id: str, user_id: str) -> None:
        def work(t: _Txn) -> None:
            t.execute("DELETE FROM image_shares WHERE image_id = ? AND user_id = ?", (image_id, user_id))

        await self._run(work)

    @_deferred
    async def mayUseImage(self, user_id: str, image_id: str) -> bool:
        def work(t: _Txn) -> bool:
            row = t.one(
                "SELECT 1 FROM images i WHERE i.id = ? AND i.deleted = 0 AND ("
                " i.owner_id IS NULL OR i.owner_id = ?"
                " OR EXISTS (SELECT 1 FROM image_shares s WHERE s.image_id = i.id AND s.user_id = ?))",
                (image_id, user_id, user_id),
            )
            return row is not None

        return await self._run(work)
