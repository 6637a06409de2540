"""
Where the image server keeps the bytes: one interface,
:class:`IImageStorage`, and the embedded default, :class:`DirectoryStorage`.

Images are content-addressed: an image is stored under its SHA-256, and is
stored only once the SHA-256 of what arrived equals the digest it was
uploaded as. A writer hashes as it writes, so nothing reads an image twice
and nothing holds one in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO

from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from dit4c.imageserver.errors import BadDigest, DigestMismatch

__all__ = ["DirectoryStorage", "IImageStorage", "IImageWriter", "Committed", "parseDigest"]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def parseDigest(value: str) -> str:
    """
    The 64 hexadecimal digits of ``sha256:<hex>``.

    :raises BadDigest: for anything else (upper-case digits included).
    """
    match = _DIGEST.fullmatch(value)
    if match is None:
        raise BadDigest()
    return match.group(1)


class Committed:
    """What a writer's commit stored."""

    def __init__(self, digest: str, size: int, created: bool) -> None:
        #: ``sha256:<hex>``
        self.digest = digest
        self.size = size
        #: False: the image was stored already, and this copy was dropped.
        self.created = created


class IImageWriter(Interface):
    """One image on its way in: bytes are written, then committed or aborted."""

    digest = Attribute("The digest the image is uploaded as (sha256:<hex>).")
    received = Attribute("How many bytes were written so far.")

    def write(data: bytes) -> None:
        """Store and hash the next bytes of the image."""

    def commit() -> Committed:
        """
        Check the SHA-256 of everything written against :attr:`digest` and,
        if it matches, make the image readable under that digest, atomically.
        An image stored already is kept as it is (``created`` False).

        :raises DigestMismatch: the bytes are another image; nothing is stored.
        """

    def abort() -> None:
        """Drop everything written; idempotent, and a no-op after a commit."""


class IImageStorage(Interface):
    """Images, by digest (``sha256:<hex>``). Nothing here asks who may do what."""

    def prepare() -> None:
        """Get ready to serve (create what is missing, drop uploads that a crash left behind)."""

    def exists(digest: str) -> bool:
        """Whether the image is stored."""

    def size(digest: str) -> int | None:
        """The image's size in bytes, or None if it is not stored."""

    def path(digest: str) -> Path:
        """A local file holding the image, for serving (it need not exist)."""

    def open(digest: str) -> IO[bytes]:
        """The image for reading. :raises FileNotFoundError: it is not stored."""

    def begin(digest: str) -> IImageWriter:
        """Start storing an image that should have this digest."""

    def delete(digest: str) -> bool:
        """Remove the image; False if it was not stored."""


@implementer(IImageWriter)
class _FileWriter:
    log = Logger()

    def __init__(self, storage: DirectoryStorage, digest: str) -> None:
        self.digest = digest
        self.received = 0
        self._storage = storage
        self._hex = parseDigest(digest)
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=self._hex[:16] + ".", suffix=".part", dir=storage.temporaries)
        self._temporary: Path | None = Path(name)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("the upload is over")
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> Committed:
        if self._file is None or self._temporary is None:
            raise ValueError("the upload is over")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(digest=self.digest, received=actual, size=self.received)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        temporary, self._temporary = self._temporary, None
        target = self._storage.path(self.digest)
        created = True
        try:
            # A hard link fails if the image is there already: no second copy,
            # and never a half-written file under the image's name.
            os.link(temporary, target)
        except FileExistsError:
            created = False
        except OSError:
            # A file system without hard links: rename, which may replace an
            # identical copy that another upload stored meanwhile.
            created = not target.exists()
            os.replace(temporary, target)
        temporary.unlink(missing_ok=True)
        if created:
            self._storage.syncDirectory()
        return Committed(self.digest, self.received, created)

    def abort(self) -> None:
        file, self._file = self._file, None
        temporary, self._temporary = self._temporary, None
        if file is not None:
            file.close()
        if temporary is not None:
            temporary.unlink(missing_ok=True)


@implementer(IImageStorage)
class DirectoryStorage:
    """
    Images as files: ``<directory>/sha256/<hex>``. Uploads go to
    ``<directory>/tmp/`` first (the same file system, so the final step is
    a link or rename), and whatever is left there is removed by
    :meth:`prepare`, at start-up.
    """

    log = Logger()

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.images = self.directory / "sha256"
        self.temporaries = self.directory / "tmp"

    def prepare(self) -> None:
        self.images.mkdir(parents=True, exist_ok=True)
        if self.temporaries.exists():
            left = list(self.temporaries.iterdir())
            if left:
                self.log.info("removing {n} unfinished upload(s) from {path}", n=len(left), path=str(self.temporaries))
            shutil.rmtree(self.temporaries)
        self.temporaries.mkdir(parents=True)

    def path(self, digest: str) -> Path:
        return self.images / parseDigest(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str) -> IO[bytes]:
        return self.path(digest).open("rb")

    def begin(self, digest: str) -> IImageWriter:
        return _FileWriter(self, digest)

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def syncDirectory(self) -> None:
        """Make a new name in the image directory durable."""
        try:
            fd = os.open(self.images, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
