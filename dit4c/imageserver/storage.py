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
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from dit4c.imageserver.errors import BadDigest, DigestMismatch, NotFound

__all__ = [
    "DirectoryStorage",
    "IImageStorage",
    "IImageWriter",
    "Committed",
    "ImageInfo",
    "NEW_IMAGE",
    "SpoolingWriter",
    "ThreadedReader",
    "parseDigest",
]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


#: What a writer is begun with for an image whose digest is known only once it is in
#: (``POST /images``, docs/protocols.md 12.1): it is stored under the SHA-256 of what arrived.
NEW_IMAGE = "new"


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
        """Store (locally, never in memory) and hash the next bytes of the image."""

    def commit() -> Deferred[Committed]:
        """
        Check the SHA-256 of everything written against :attr:`digest` and,
        if it matches, make the image readable under that digest, atomically.
        An image stored already is kept as it is (``created`` False).

        Fails with :class:`DigestMismatch` (the bytes are another image;
        nothing is stored) or :class:`OSError` (the store failed; nothing is
        stored). The writer is over either way.
        """

    def abort() -> None:
        """Drop everything written; idempotent, and a no-op after a commit."""


class IImageStorage(Interface):
    """
    Images, by digest (``sha256:<hex>``). Nothing here asks who may do what.

    Every method that may touch a remote store returns a Deferred; nothing
    here blocks the reactor's thread (blocking work runs in a thread pool).
    """

    def prepare() -> Deferred[None]:
        """Get ready to serve (create what is missing, drop uploads that a crash left behind)."""

    def close() -> Deferred[None]:
        """Release what :meth:`prepare` (or use) took: threads, connections."""

    def exists(digest: str) -> Deferred[bool]:
        """Whether the image is stored."""

    def stat(digest: str) -> Deferred[ImageInfo | None]:
        """The image's size and modification time, or None if it is not stored."""

    def size(digest: str) -> Deferred[int | None]:
        """The image's size in bytes, or None if it is not stored."""

    def read(digest: str, consumer: IConsumer, offset: int, length: int) -> Deferred[None]:
        """
        Write ``length`` bytes of the image from ``offset`` on to ``consumer``,
        registered with it as a streaming producer (so it pauses when the
        consumer is full; at most one chunk is held at a time). Fires when all
        is written, the producer unregistered. Cancelling it stops reading.

        Fails with :class:`NotFound` if the image is not stored, and with
        :class:`OSError` if the store fails.
        """

    def begin(digest: str) -> IImageWriter:
        """
        Start storing an image that should have this digest (or, with
        :data:`NEW_IMAGE`, whatever its digest turns out to be). :raises OSError:
        """

    def delete(digest: str) -> Deferred[bool]:
        """Remove the image; False if it was not stored."""


class ImageInfo:
    """What is known of a stored image without reading it."""

    def __init__(self, size: int, modified: float | None) -> None:
        self.size = size
        #: POSIX time of the last modification, if the store knows it.
        self.modified = modified


#: How much a reader reads at a time.
READ_CHUNK = 256 * 1024


class _Source(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


@implementer(IPushProducer)
class ThreadedReader:
    """
    Copy ``length`` bytes from a blocking source (a file, an HTTP body) into
    a consumer, as a streaming producer: each chunk is read in a thread of
    ``pool``, and the next read starts only once the chunk was written and
    the consumer is not paused. At most one chunk is in memory.

    :param open: called in a thread; the source, positioned at the first byte.
    """

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        open: Callable[[], _Source],
        consumer: IConsumer,
        length: int,
        chunk: int = READ_CHUNK,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._open = open
        self._consumer = consumer
        self._remaining = length
        self._chunk = chunk
        self._source: _Source | None = None
        self._paused = False
        self._busy = False
        self._stopped = False
        self._registered = False
        self._done: Deferred[None] = Deferred(lambda _: self.stopProducing())

    def start(self) -> Deferred[None]:
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, self._open)
        d.addCallbacks(self._opened, self._failed)
        return self._done

    def _opened(self, source: _Source) -> None:
        self._busy = False
        self._source = source
        if self._stopped:
            self._close()
            return
        self._consumer.registerProducer(self, True)
        self._registered = True
        self._next()

    def _next(self) -> None:
        if self._stopped or self._paused or self._busy:
            return
        if self._remaining <= 0:
            self._finish(None)
            return
        assert self._source is not None
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, self._source.read, min(self._chunk, self._remaining))
        d.addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self._busy = False
        if self._stopped:
            self._close()
            return
        if not data:
            self._finish(Failure(OSError("the image ended before its size")))
            return
        data = data[: self._remaining]
        self._remaining -= len(data)
        self._consumer.write(data)
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        if self._stopped:
            self._close()
            return
        self._finish(failure)

    def _finish(self, result: Failure | None) -> None:
        self._stopped = True
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()
        self._close()
        if not self._done.called:
            if result is None:
                self._done.callback(None)
            else:
                self._done.errback(result)

    def _close(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            deferToThreadPool(self._reactor, self._pool, source.close).addErrback(lambda _: None)

    # -- IPushProducer ----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()
        if not self._busy:
            self._close()
        if not self._done.called:
            self._done.errback(Failure(CancelledError("the reader stopped producing")))


class SpoolingWriter:
    """
    The part every writer shares: the bytes go to a temporary file in
    ``directory`` (never memory) while being hashed, and :meth:`verified`
    checks the hash when they are all in.
    """

    def __init__(self, directory: Path, digest: str) -> None:
        self.digest = digest
        self.received = 0
        self._hex = "0" * 16 if digest == NEW_IMAGE else parseDigest(digest)
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix=self._hex[:16] + ".", suffix=".part", dir=directory)
        self._temporary: Path | None = Path(name)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("the upload is over")
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def verified(self, sync: bool) -> Path:
        """
        The temporary file, closed (and ``fsync``ed if ``sync``), once its
        SHA-256 is the digest; the writer is over.

        :raises DigestMismatch: it is not; the temporary file is removed.
        """
        if self._file is None or self._temporary is None:
            raise ValueError("the upload is over")
        actual = "sha256:" + self._hash.hexdigest()
        if self.digest == NEW_IMAGE:
            self.digest = actual
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(digest=self.digest, received=actual, size=self.received)
        file, self._file = self._file, None
        temporary, self._temporary = self._temporary, None
        try:
            file.flush()
            if sync:
                os.fsync(file.fileno())
        finally:
            file.close()
        return temporary

    def abort(self) -> None:
        file, self._file = self._file, None
        temporary, self._temporary = self._temporary, None
        if file is not None:
            file.close()
        if temporary is not None:
            temporary.unlink(missing_ok=True)


@implementer(IImageWriter)
class _FileWriter(SpoolingWriter):
    log = Logger()

    def __init__(self, storage: DirectoryStorage, digest: str) -> None:
        super().__init__(storage.temporaries, digest)
        self._storage = storage

    def commit(self) -> Deferred[Committed]:
        try:
            temporary = self.verified(sync=False)
        except Exception:
            return fail()
        return deferToThreadPool(self._storage.reactor, self._storage.pool, self._place, temporary)

    def _place(self, temporary: Path) -> Committed:
        """In a thread: make the file durable and link it into place."""
        try:
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
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
        finally:
            temporary.unlink(missing_ok=True)
        if created:
            self._storage.syncDirectory()
        return Committed(self.digest, self.received, created)


@implementer(IImageStorage)
class DirectoryStorage:
    """
    Images as files: ``<directory>/sha256/<hex>``. Uploads go to
    ``<directory>/tmp/`` first (the same file system, so the final step is
    a link or rename), and whatever is left there is removed by
    :meth:`prepare`, at start-up. File system calls that may take long
    (``fsync``, reads) run in the reactor's thread pool.
    """

    log = Logger()

    def __init__(self, directory: str | Path, reactor: Any = None) -> None:
        self.directory = Path(directory)
        self.images = self.directory / "sha256"
        self.temporaries = self.directory / "tmp"
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def pool(self) -> Any:
        return self.reactor.getThreadPool()

    def prepare(self) -> Deferred[None]:
        # At once (start-up, before listening): no upload can be under way.
        try:
            self.images.mkdir(parents=True, exist_ok=True)
            if self.temporaries.exists():
                left = list(self.temporaries.iterdir())
                if left:
                    self.log.info("removing {n} unfinished upload(s) from {path}", n=len(left), path=str(self.temporaries))
                shutil.rmtree(self.temporaries)
            self.temporaries.mkdir(parents=True)
        except Exception:
            return fail()
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def path(self, digest: str) -> Path:
        """The file that holds (or would hold) the image."""
        return self.images / parseDigest(digest)

    def _stat(self, digest: str) -> ImageInfo | None:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ImageInfo(st.st_size, st.st_mtime)

    def stat(self, digest: str) -> Deferred[ImageInfo | None]:
        return maybeDeferred(self._stat, digest)

    def exists(self, digest: str) -> Deferred[bool]:
        return self.stat(digest).addCallback(lambda info: info is not None)

    def size(self, digest: str) -> Deferred[int | None]:
        return self.stat(digest).addCallback(lambda info: None if info is None else info.size)

    def open(self, digest: str) -> IO[bytes]:
        """The image for reading (blocking). :raises FileNotFoundError: it is not stored."""
        return self.path(digest).open("rb")

    def read(self, digest: str, consumer: IConsumer, offset: int, length: int) -> Deferred[None]:
        path = self.path(digest)

        def opener() -> IO[bytes]:
            try:
                f = path.open("rb")
            except FileNotFoundError:
                raise NotFound() from None
            f.seek(offset)
            return f

        return ThreadedReader(self.reactor, self.pool, opener, consumer, length).start()

    def begin(self, digest: str) -> IImageWriter:
        return _FileWriter(self, digest)

    def delete(self, digest: str) -> Deferred[bool]:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return succeed(False)
        except Exception:
            return fail()
        return succeed(True)

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
