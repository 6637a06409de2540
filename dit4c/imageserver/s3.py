"""
Images in an S3-compatible object store (AWS S3, MinIO, Ceph RGW...):
:class:`S3Storage`, the image server's storage for more than one machine.

An image is the object ``<prefix>sha256/<hex>`` of one bucket. An upload
is spooled to a local temporary file while it is hashed (never held in
memory, as with the directory storage); only once the digest matched is it
sent to the store, as a multipart upload straight to its final key, so no
object under an image's name ever holds other bytes. Reads stream the
object (a ranged ``GetObject``) through, a chunk at a time.

boto3 is blocking: every call runs in this storage's own thread pool, never
on the reactor's thread. boto3 is an optional dependency (the ``s3``
extra), imported only when an :class:`S3Storage` is made.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dit4c.imageserver.errors import NotFound, S3Error
from dit4c.imageserver.storage import (
    Committed,
    IImageStorage,
    IImageWriter,
    ImageInfo,
    SpoolingWriter,
    ThreadedReader,
    parseDigest,
)

__all__ = ["S3Storage"]

MiB = 1024 * 1024
#: Parts of a multipart upload: at least this large...
PART_SIZE = 16 * MiB
#: ... and never more than this many (S3 allows 10,000).
MAX_PARTS = 9000


def _missing(error: Exception) -> bool:
    """Whether a botocore error says the object (or key) is not there."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def _safe(error: Exception) -> S3Error:
    """An :class:`S3Error` naming what failed (botocore's messages hold no secret)."""
    return S3Error(f"{type(error).__name__}: {error}")


@implementer(IImageWriter)
class _ObjectWriter(SpoolingWriter):
    def __init__(self, storage: S3Storage, digest: str) -> None:
        super().__init__(storage.spool, digest)
        self._storage = storage

    def commit(self) -> Deferred[Committed]:
        try:
            temporary = self.verified(sync=False)
        except Exception:
            return fail()
        return self._storage._call(self._storage._put, temporary, self.digest, self.received)


@implementer(IImageStorage)
class S3Storage:
    """
    Images as objects ``<prefix>sha256/<hex>`` of ``bucket`` at
    ``endpoint`` (None: AWS's own endpoint for ``region``). Uploads are
    spooled in ``spool``, emptied by :meth:`prepare`.

    :param threads: the most blocking S3 calls at once (a commit holds one
        for the whole upload; a download, one per chunk read).
    :param client: a boto3 S3 client to use instead of making one (tests).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        bucket: str,
        spool: str | Path,
        endpoint: str | None = None,
        accessKey: str | None = None,
        secretKey: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        threads: int = 16,
        partSize: int = PART_SIZE,
        client: Any = None,
    ) -> None:
        self.reactor = reactor
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.spool = Path(spool)
        self.partSize = partSize
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="dit4c-imageserver-s3")
        self._shutdownTrigger: Any = None
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                aws_access_key_id=accessKey,
                aws_secret_access_key=secretKey,
                config=Config(
                    # Path-style addressing: what every S3-compatible store understands.
                    s3={"addressing_style": "path"},
                    retries={"mode": "standard", "max_attempts": 5},
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=threads * 2,
                    # Checksums only where S3 requires them: not every
                    # S3-compatible store knows the newer ones.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        self.client = client

    def __repr__(self) -> str:
        return f"<S3Storage {self.endpoint or 'aws'} bucket={self.bucket!r} prefix={self.prefix!r}>"

    def key(self, digest: str) -> str:
        """The object's key."""
        return f"{self.prefix}sha256/{parseDigest(digest)}"

    # -- threads ---------------------------------------------------------------------------

    def _threads(self) -> ThreadPool:
        """The thread pool, started (and stopped with the reactor, unless :meth:`close` does first)."""
        if not self.pool.started:
            self.pool.start()
            self._shutdownTrigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stopPool)
        return self.pool

    def _call(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """``f(*args, **kwargs)`` in this storage's thread pool."""
        return deferToThreadPool(self.reactor, self._threads(), f, *args, **kwargs)

    def _stopPool(self) -> None:
        if self.pool.started:
            self.pool.stop()

    # -- IImageStorage ---------------------------------------------------------------------

    def prepare(self) -> Deferred[None]:
        try:
            if self.spool.exists():
                left = list(self.spool.iterdir())
                if left:
                    self.log.info("removing {n} unfinished upload(s) from {path}", n=len(left), path=str(self.spool))
                shutil.rmtree(self.spool)
            self.spool.mkdir(parents=True)
        except Exception:
            return fail()
        d = self._call(self._checkBucket)

        def unreachable(failure: Any) -> None:
            self.log.error(
                "the image store {storage} cannot be used ({error}): image requests will fail until it can",
                storage=repr(self), error=str(failure.value),
            )  # fmt: skip

        d.addErrback(unreachable)
        return d

    def _checkBucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise _safe(e) from None
        self.log.info("storing images in {storage}", storage=repr(self))

    def close(self) -> Deferred[None]:
        if self._shutdownTrigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        # Waits for calls under way (an upload to the store included).
        self._stopPool()
        return succeed(None)

    def _head(self, digest: str) -> ImageInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except Exception as e:
            if _missing(e):
                return None
            raise _safe(e) from None
        modified = head.get("LastModified")
        return ImageInfo(int(head["ContentLength"]), modified.timestamp() if modified is not None else None)

    def stat(self, digest: str) -> Deferred[ImageInfo | None]:
        try:
            parseDigest(digest)
        except Exception:
            return fail()
        return self._call(self._head, digest)

    def exists(self, digest: str) -> Deferred[bool]:
        return self.stat(digest).addCallback(lambda info: info is not None)

    def size(self, digest: str) -> Deferred[int | None]:
        return self.stat(digest).addCallback(lambda info: None if info is None else info.size)

    def read(self, digest: str, consumer: IConsumer, offset: int, length: int) -> Deferred[None]:
        key = self.key(digest)

        def opener() -> Any:
            arguments: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if length > 0:
                arguments["Range"] = f"bytes={offset}-{offset + length - 1}"
            try:
                return self.client.get_object(**arguments)["Body"]
            except Exception as e:
                if _missing(e):
                    raise NotFound() from None
                raise _safe(e) from None

        if length <= 0:
            return succeed(None)
        return ThreadedReader(self.reactor, self._threads(), opener, consumer, length).start()

    def begin(self, digest: str) -> IImageWriter:
        return _ObjectWriter(self, digest)

    def delete(self, digest: str) -> Deferred[bool]:
        try:
            parseDigest(digest)
        except Exception:
            return fail()
        return self._call(self._delete, digest)

    def _delete(self, digest: str) -> bool:
        # S3's DeleteObject succeeds for a missing key too: ask first.
        if self._head(digest) is None:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except Exception as e:
            raise _safe(e) from None
        return True

    # -- the end of an upload, in a thread ---------------------------------------------------

    def _put(self, temporary: Path, digest: str, size: int) -> Committed:
        """Send the spooled, verified image to its key, unless it is there already."""
        from boto3.s3.transfer import TransferConfig

        try:
            if self._head(digest) is not None:
                return Committed(digest, size, created=False)
            part = max(self.partSize, -(-size // MAX_PARTS))
            config = TransferConfig(
                multipart_threshold=part,
                multipart_chunksize=part,
                max_concurrency=4,
                use_threads=True,
                preferred_transfer_client="classic",
            )
            try:
                self.client.upload_file(
                    str(temporary), self.bucket, self.key(digest),
                    ExtraArgs={"ContentType": "application/octet-stream"}, Config=config,
                )  # fmt: skip
            except Exception as e:
                raise _safe(e) from None
            stored = self._head(digest)
            if stored is None or stored.size != size:
                raise S3Error(f"the store holds {stored and stored.size} bytes under {self.key(digest)}, not {size}")
            return Committed(digest, size, created=True)
        finally:
            temporary.unlink(missing_ok=True)
