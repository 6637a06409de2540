"""
The portal's HTTP channel: the Klein app served through
:class:`dit4c.common.httpsite.FrontSite`, with the body limit of every
route and the secrets kept out of the access log.

Every route of the portal (``dit4c/portal/*.py``) and the largest body it
takes; a request whose ``Content-Length`` is larger is answered ``413``
before any of its body is read, and a chunked body is cut at the limit
(docs/security.md lists them with the tests that prove them):

=================================  ==========  ===================================================
route (path prefix)                limit       what the body is
=================================  ==========  ===================================================
``POST /api/v1/images``            20 GiB      a saved image's file, streamed to the image server
                                               (``--upload-limit``; ``dit4c.portal.uploads``)
``POST /files/upload``,            32 MiB      a file for the person's storage, kept in memory
``PUT /api/v1/files/content``      + 64 KiB    (``dit4c.portal.files.filesBodyLimit``)
``/api/v1/``                       64 KiB      JSON (``dit4c.portal.api.MAX_BODY``)
``/oauth/token``                   8 KiB       the token request form (``oauth.MAX_TOKEN_REQUEST``)
``/reports/``                      16 KiB      a report token (``reports.MAX_BODY``)
``/admin/``                        64 KiB      the administrator's forms (user lists)
``/.dit4c/channel``                0           none: the scheduler channel's WebSocket upgrade
``/events``                        0           none: the Server-Sent Events stream
anything else                      16 KiB      a page's form (log in, start, share ...)
=================================  ==========  ===================================================

The limit is looked up on the target's path percent-decoded, with repeated
slashes as one; the route's own code still checks what it reads.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

from dit4c.common.httpsite import SECRET_PARAMETERS, FrontSite, SiteLimits
from dit4c.portal import api, oauth, reports
from dit4c.portal.uploads import ImageUploads, UploadRequest, uploadBodyLimit
from dit4c.portal.web import SECRET_PATHS

__all__ = ["BODY_LIMITS", "FORM_BODY", "bodyLimit", "portalSite"]

#: A page's form: log in, start an instance, share it ... (a few hundred bytes each).
FORM_BODY = 16 * 1024

#: ``(path prefix, largest body)``, the most specific first; :data:`FORM_BODY` for any other path.
BODY_LIMITS: tuple[tuple[bytes, int], ...] = (
    (b"/api/v1/", api.MAX_BODY),
    (b"/oauth/token", oauth.MAX_TOKEN_REQUEST),
    (b"/reports/", reports.MAX_BODY),
    (b"/admin/", 64 * 1024),
    (b"/.dit4c/channel", 0),
    (b"/events", 0),
)


def bodyLimit(method: bytes, target: bytes) -> int:
    """The largest body the portal takes for a request to ``target`` (any method)."""
    path = target.partition(b"?")[0]
    path = re.sub(rb"/+", b"/", unquote_to_bytes(path))
    for prefix, limit in BODY_LIMITS:
        base = prefix.rstrip(b"/")
        if path == base or path.startswith(base + b"/"):
            return limit
    return FORM_BODY


def portalSite(
    resource: IResource, reactor: IReactorTime, limits: SiteLimits | None = None, uploads: ImageUploads | None = None
) -> FrontSite:
    """
    The portal's site: ``resource`` (the Klein app's) behind the portal's
    HTTP channel; with ``uploads``, ``POST /api/v1/images`` streams its body
    to them, up to their limit (``dit4c.portal.uploads``).
    """
    site = FrontSite(
        resource,
        reactor=reactor,
        bodyLimit=bodyLimit if uploads is None else uploadBodyLimit(bodyLimit),
        requestFactory=UploadRequest,
        limits=limits,
        serverName="DIT4C portal",
        secretPaths=SECRET_PATHS,
        secretParameters=SECRET_PARAMETERS,
    )
    site.displayTracebacks = False
    site.uploads = uploads  # type: ignore[attr-defined]
    return site
