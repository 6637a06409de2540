"""
The image server's Prometheus figures (``twistd dit4c-imageserver
--metrics ENDPOINT``, ``/metrics`` and ``/health`` there): uploads, downloads
and deletes by how each ended, the bytes that went in and out, and the
uploads under way.

Everything here is counted in memory as it happens, at the one place each
outcome is decided (:mod:`dit4c.imageserver.uploads` for an upload,
:mod:`dit4c.imageserver.web` for a download or a delete); a scrape only
reads the numbers, so it never waits on the storage or the portal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from dit4c.imageserver.errors import (
    DigestMismatch,
    ImageServerError,
    NotFound,
    PortalUnavailable,
    Refused,
    TooLarge,
)

__all__ = [
    "DELETE_OUTCOMES",
    "DOWNLOAD_OUTCOMES",
    "UPLOAD_OUTCOMES",
    "CountingConsumer",
    "ImageServerMetrics",
    "outcomeOf",
]

#: How an upload (``PUT /images/...``) ended. ``stored``: under its digest
#: (new, or a copy of an image stored before); ``refused``: the portal said
#: no; ``too_large``: over ``--max-size`` (said in the head, or found on the
#: way); ``cut_off``: the client went away before the body was in;
#: ``portal_unavailable``: the portal could not be asked; ``failed``: the
#: storage failed; ``invalid``: not an image's address (a malformed digest).
UPLOAD_OUTCOMES = (
    "stored", "refused", "digest_mismatch", "too_large", "cut_off", "portal_unavailable", "failed", "invalid",
)  # fmt: skip
#: How a ``GET`` or ``HEAD`` of an image ended. ``sent``: all of it (or the
#: range asked for; for ``HEAD``, the headers); ``not_modified``: 304;
#: ``range_not_satisfiable``: 416; ``cut_off``: the client went away first.
DOWNLOAD_OUTCOMES = (
    "sent", "not_modified", "range_not_satisfiable", "refused", "not_found", "portal_unavailable", "cut_off", "failed",
)  # fmt: skip
DOWNLOAD_METHODS = ("GET", "HEAD")
#: How a ``DELETE`` of an image ended.
DELETE_OUTCOMES = ("deleted", "refused", "not_found", "portal_unavailable", "cut_off", "failed")

_KINDS: tuple[tuple[type[ImageServerError], str], ...] = (
    (Refused, "refused"),
    (DigestMismatch, "digest_mismatch"),
    (TooLarge, "too_large"),
    (PortalUnavailable, "portal_unavailable"),
    (NotFound, "not_found"),
)


def outcomeOf(error: BaseException) -> str:
    """The outcome a refusal stands for; ``failed`` for anything else (the storage, a bug)."""
    for kind, outcome in _KINDS:
        if isinstance(error, kind):
            return outcome
    return "failed"


class ImageServerMetrics:
    """The image server's figures since it started; a ``prometheus_client`` collector."""

    def __init__(self) -> None:
        self.uploads: Counter[str] = Counter()
        self.downloads: Counter[tuple[str, str]] = Counter()
        self.deletes: Counter[str] = Counter()
        #: Body bytes of every upload the portal allowed, as they arrived.
        self.bytesReceived = 0
        #: Bytes of the uploads that ended stored, counted when stored.
        self.bytesStored = 0
        #: Image bytes handed to downloads' connections, as they were.
        self.bytesSent = 0
        #: Uploads whose head is in and whose end is not yet decided.
        self.uploadsInProgress = 0

    # -- what the server says -----------------------------------------------------------------------

    def uploadStarted(self) -> None:
        self.uploadsInProgress += 1

    def uploadEnded(self, outcome: str, *, started: bool = True) -> None:
        """An upload ended; ``started`` False: refused at its head, never under way."""
        self.uploads[outcome] += 1
        if started:
            self.uploadsInProgress -= 1

    def answered(self, method: bytes, outcome: str) -> None:
        """A ``GET``, ``HEAD`` or ``DELETE`` of an image ended."""
        if method == b"DELETE":
            self.deletes[outcome] += 1
        else:
            self.downloads[(method.decode("ascii"), outcome)] += 1

    # -- the collector --------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        uploads = CounterMetricFamily(
            "dit4c_images_uploads", "Uploads (PUT) by how they ended, since the image server started.", labels=["outcome"]
        )
        for outcome in _withOthers(UPLOAD_OUTCOMES, self.uploads):
            uploads.add_metric([outcome], self.uploads.get(outcome, 0))
        yield uploads
        yield GaugeMetricFamily(
            "dit4c_images_uploads_in_progress", "Uploads under way: head in, end not yet decided.", value=self.uploadsInProgress
        )
        yield CounterMetricFamily(
            "dit4c_images_upload_bytes_received",
            "Body bytes of allowed uploads, as they arrived (whatever came of the upload).",
            value=self.bytesReceived,
        )
        yield CounterMetricFamily(
            "dit4c_images_upload_bytes_stored", "Bytes of uploads that ended stored, counted when stored.", value=self.bytesStored
        )
        downloads = CounterMetricFamily(
            "dit4c_images_downloads", "GET and HEAD of images by how they ended.", labels=["method", "outcome"]
        )
        keys = [(m, o) for m in DOWNLOAD_METHODS for o in DOWNLOAD_OUTCOMES]
        for key in keys + sorted(set(self.downloads) - set(keys)):
            downloads.add_metric(list(key), self.downloads.get(key, 0))
        yield downloads
        yield CounterMetricFamily(
            "dit4c_images_download_bytes_sent", "Image bytes handed to downloads' connections.", value=self.bytesSent
        )
        deletes = CounterMetricFamily("dit4c_images_deletes", "DELETE of images by how they ended.", labels=["outcome"])
        for outcome in _withOthers(DELETE_OUTCOMES, self.deletes):
            deletes.add_metric([outcome], self.deletes.get(outcome, 0))
        yield deletes


def _withOthers(known: tuple[str, ...], counted: Counter[str]) -> list[str]:
    """Every known outcome (so that a rate starts at 0), then any other counted."""
    return list(known) + sorted(set(counted) - set(known))


@implementer(IConsumer)
class CountingConsumer:
    """A download's connection, counting the image bytes written to it."""

    def __init__(self, consumer: Any, metrics: ImageServerMetrics) -> None:
        self.consumer = consumer
        self.metrics = metrics

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.metrics.bytesSent += len(data)
        self.consumer.write(data)
