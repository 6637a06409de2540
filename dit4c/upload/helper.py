"""
``twistd dit4c-helper-upload``: the upload helper, run by the node once it
has captured a saved instance's image (an archive, and its digest).

1. ``PUT <image server>/images/<digest>``, the archive streamed from its
   file, with ``Authorization: Bearer <upload token>``: a token it signs with
   the instance's key (``aud`` ``dit4c-image-upload``, the digest as a
   claim, 300 s), which the portal accepts for this one upload while the
   instance is saving (docs/protocols.md 8.4).
2. ``POST <portal>/reports/image``, signed with the instance's key: the
   image's URL and digest (8.3). The portal makes the saved image then,
   never before the bytes are stored.

Transient failures (the image server or portal away, a 5xx) are retried
with back-off; anything else ends it. Unlike the other helpers it is a
service that ends by itself (:class:`UploadService`): exit status 0 means
the portal has the image; the node reports ``saved`` only then. Before it
exits the helper leaves its verdict beside the image (:func:`resultFile` on
success, :func:`failureFile` with the reason otherwise), so a node
restarted while it ran can tell how it ended.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from dit4c.common.errors import KeyFileError
from dit4c.common.helperenv import HelperEnvironment
from dit4c.common.keys import loadPrivateKey
from dit4c.common.portalhttp import portalHTTP
from dit4c.common.tokens import TokenSigner
from dit4c.listener.report import REPORT_AUDIENCE
from dit4c.listener.service import backoff
from dit4c.upload.errors import UploadFailed

__all__ = ["upload", "UploadService", "UPLOAD_AUDIENCE", "failureFile", "progressFile", "resultFile"]

UPLOAD_AUDIENCE = "dit4c-image-upload"
UPLOAD_TOKEN_LIFETIME = 300

log = Logger()


class _Retry(Exception):
    pass


def progressFile(imageFile: str) -> Path:
    """Where the helper keeps ``{"sent": bytes, "total": bytes}`` for the node to show."""
    return Path(imageFile + ".progress")


def resultFile(imageFile: str) -> Path:
    """Where the helper leaves ``{"url": ...}`` once the portal has the image."""
    return Path(imageFile + ".done")


def failureFile(imageFile: str) -> Path:
    """Where the helper leaves why it failed (text)."""
    return Path(imageFile + ".failed")


def _leave(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


class _Counting:
    """A file whose reads are counted into the progress file (at most twice a second)."""

    def __init__(self, f: Any, progress: Path, clock: Any) -> None:
        self._f = f
        self._progress = progress
        self._clock = clock
        self._total = os.fstat(f.fileno()).st_size
        self._sent = 0
        self._written = -1.0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        self._sent += len(data)
        now = self._clock.seconds()
        if not data or now - self._written >= 0.5:
            self._written = now
            temporary = self._progress.with_suffix(".tmp")
            temporary.write_text(json.dumps({"sent": self._sent, "total": self._total}))
            temporary.replace(self._progress)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        result: int = self._f.seek(offset, whence)
        return result

    def tell(self) -> int:
        result: int = self._f.tell()
        return result

    def close(self) -> None:
        self._f.close()


async def _attempt(reactor: Any, env: HelperEnvironment, signer: TokenSigner, timeout: float) -> str:
    assert env.imageServer and env.imageFile and env.imageDigest
    images, base = portalHTTP(reactor, env.imageServer, timeout=timeout, persistent=False)
    token = signer.sign(
        {"sub": env.instance, "digest": env.imageDigest}, audience=UPLOAD_AUDIENCE, lifetime=UPLOAD_TOKEN_LIFETIME
    )
    with open(env.imageFile, "rb") as image:
        try:
            response = await images.put(
                f"{base}/images/{env.imageDigest}",
                data=FileBodyProducer(_Counting(image, progressFile(env.imageFile), reactor), readSize=256 * 1024),
                headers=Headers({"Authorization": [f"Bearer {token}"], "Content-Type": ["application/octet-stream"]}),
            )
        except Exception as e:
            raise _Retry(f"the image server could not be reached: {e}") from None
        body = await response.content()
    if response.code >= 500:
        raise _Retry(f"the image server answered {response.code}")
    if response.code not in (200, 201):
        raise UploadFailed(f"the image server refused the image: {response.code} {body[:300]!r}")
    try:
        imageURL = str(json.loads(body)["url"])
    except (ValueError, KeyError, TypeError):
        raise UploadFailed("the image server's answer made no sense") from None
    log.info("image {digest} stored at {url}", digest=env.imageDigest, url=imageURL)

    portal, portalBase = portalHTTP(reactor, env.portalBase, timeout=timeout, persistent=False)
    report = signer.sign(
        {"sub": env.instance, "image_url": imageURL, "digest": env.imageDigest, "jti": secrets.token_urlsafe(16)},
        audience=REPORT_AUDIENCE,
        lifetime=120,
    )
    try:
        response = await portal.post(
            portalBase + "/reports/image",
            data=report.encode("ascii"),
            headers=Headers({"Content-Type": ["application/jwt"]}),
        )
    except Exception as e:
        raise _Retry(f"the portal could not be reached: {e}") from None
    body = await response.content()
    if response.code >= 500:
        raise _Retry(f"the portal answered {response.code}")
    if response.code not in (200, 201):
        raise UploadFailed(f"the portal refused the image: {response.code} {body[:300]!r}")
    return imageURL


async def upload(
    reactor: Any, env: HelperEnvironment, *, attempts: int = 6, timeout: float = 600.0, retryPolicy: Any = None
) -> str:
    """Store the image and report it; its URL. :raises UploadFailed: it could not."""
    if not (env.imageServer and env.imageFile and env.imageDigest):
        raise UploadFailed("DIT4C_IMAGE_SERVER, DIT4C_IMAGE_FILE and DIT4C_IMAGE_DIGEST must be set")
    if not Path(env.imageFile).is_file():
        raise UploadFailed(f"no image at {env.imageFile}")
    try:
        key = loadPrivateKey(env.keyFile)
    except (OSError, KeyFileError) as e:
        raise UploadFailed(f"DIT4C_INSTANCE_KEY: {getattr(e, 'strerror', None) or e}") from None
    signer = TokenSigner(key, clock=reactor)
    policy = retryPolicy or backoff(initial=1.0, maximum=30.0)
    for attempt in range(attempts):
        try:
            return await _attempt(reactor, env, signer, timeout)
        except _Retry as e:
            if attempt + 1 == attempts:
                raise UploadFailed(str(e)) from None
            delay = policy(attempt)
            log.warn("{why}; trying again in {delay:.1f} s", why=e, delay=delay)
            await deferLater(reactor, delay)
    raise UploadFailed("no attempt made")


class UploadService(Service):
    """
    One upload, then the end of the process: started, it runs
    :func:`upload`, leaves its verdict beside the image, and stops the
    reactor; the process then exits with status 0 if the portal has the
    image, 1 otherwise (the node reads either, :mod:`dit4c.node.node`).
    Stopped before that (the node gave the upload up), the process ends as
    any stopped helper does.
    """

    def __init__(self, reactor: Any, env: HelperEnvironment, **options: Any) -> None:
        """:param options: passed to :func:`upload` (``attempts``, ``timeout``, ``retryPolicy``)."""
        self.reactor = reactor
        self.env = env
        self.options = options
        #: The exit status, once the verdict is left.
        self.status: int | None = None
        #: Fires with the exit status once the verdict is left.
        self.finished: Deferred[int] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit)
        Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        env = self.env
        try:
            url = await upload(self.reactor, env, **self.options)
        except Exception as e:
            if isinstance(e, UploadFailed):
                log.error("upload failed: {why}", why=e)
            else:
                log.failure("upload failed")
            if env.imageFile:
                _leave(failureFile(env.imageFile), str(e))
            self._end(1)
            return
        assert env.imageFile
        _leave(resultFile(env.imageFile), json.dumps({"url": url}))
        log.info("saved image at {url}", url=url)
        self._end(0)

    def _end(self, status: int) -> None:
        self.status = status
        self.finished.callback(status)
        # twistd starts the service before its reactor runs: an upload that
        # ends at once (no image) stops the reactor once it is running.
        self.reactor.callWhenRunning(self.reactor.stop)

    def _exit(self) -> None:
        """
        After the reactor's shutdown: a failed upload ends the process with
        status 1 (twistd itself would exit with 0 once its reactor stops).
        """
        if self.status:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.status)
