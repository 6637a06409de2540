"""
A saved image downloaded through the portal (``dit4c.portal.downloads``):
only by whoever may use it; read from the image server with the portal's
own read token; a reader that stops reading pauses the image server
instead of filling the portal's memory; a truncated image is never
finished as if whole; an image server that is away is a 502.

A stand-in image server on loopback streams a large image under a push
producer (``support.backend.PatternProducer``) and checks the read token as the real one's portal would. The
whole path with the real image server is in ``tests/e2e/test_cli_session.py``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq
from portal_client import Client, tokenFor
from support.backend import PatternProducer, patternDigest
from support.sockets import RawClient, refusedPort
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from dit4c.common.tokens import TokenVerifier
from dit4c.portal.app import Portal
from dit4c.portal.keys import KeyRingKeySource
from dit4c.portal.reportrules import READ_AUDIENCE

#: Far more than every socket buffer on the way can hold.
SIZE = 128 * 1024 * 1024


class StandInImages(Resource):
    """``GET /images/<digest>`` with a read token the portal signed for the image."""

    isLeaf = True

    def __init__(self, portal: Portal) -> None:
        super().__init__()
        self.portal = portal
        self.streams: list[PatternProducer] = []
        self.tokens: list[dict[str, Any]] = []

    def render_GET(self, request: Any) -> Any:
        auth = (request.getHeader(b"authorization") or b"").decode()
        verifier = TokenVerifier(KeyRingKeySource(self.portal.keys), audience=READ_AUDIENCE, clock=self.portal.clock)

        def allowed(claims: dict[str, Any]) -> None:
            self.tokens.append(claims)
            request.setHeader(b"content-length", str(SIZE).encode())
            producer = PatternProducer(request, SIZE, cutAfter=SIZE // 64 if b"cut" in request.path else None)
            self.streams.append(producer)
            producer.start()

        def refused(failure: Any) -> None:
            request.setResponseCode(403)
            request.finish()

        verifier.verify(auth.removeprefix("Bearer ")).addCallbacks(allowed, refused)
        return NOT_DONE_YET


async def savedImage(api: Portal, server: int, name: str = "alice's work", path: str = "whole") -> str:
    alice = await api.store.userByName("alice")
    digest = "sha256:" + patternDigest(SIZE)
    image = await api.store.createImage(
        name, f"http://127.0.0.1:{server}/images/{path}", digest=digest, owner_id=alice.id  # type: ignore[union-attr]
    )
    return image.id


@pytest_twisted.async_yield_fixture
async def images(api: Portal) -> Any:
    resource = StandInImages(api)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(resource))
    resource.port = port.getHost().port  # type: ignore[attr-defined]
    yield resource
    for stream in resource.streams:
        stream.stopProducing()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_only_whoever_may_use_it_downloads_it(api: Portal, images: Any) -> None:
    imageId = await savedImage(api, images.port)
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    code, body = await bob.call("GET", f"/images/{imageId}/download")
    assert (code, body["error"]) == (404, "not_found") and images.tokens == []
    assert (await Client(api, None).call("GET", f"/images/{imageId}/download"))[0] == 401


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_reading_pauses_the_image_server(api: Portal, images: Any) -> None:
    imageId = await savedImage(api, images.port, name="my work: v2/final")
    token = await tokenFor(api, "alice", "correct horse battery")
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(api.testURL.rsplit(":", 1)[1])), client)  # type: ignore[attr-defined]
    host = api.testURL.split("//", 1)[1]  # type: ignore[attr-defined]
    client.transport.write(
        f"GET /api/v1/images/{imageId}/download HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    client.transport.pauseProducing()  # type: ignore[attr-defined]  # reads nothing more
    [stream] = await eventually(lambda: images.streams, 10)
    await eventually(lambda: stream.paused and stream.sent > 0, 30, what="the image server paused")
    sent = stream.sent
    assert sent < SIZE // 4, sent  # held in socket buffers, not in the portal
    assert images.tokens[0]["image"] == imageId
    # Read again: the rest comes, every byte.
    client.transport.resumeProducing()  # type: ignore[attr-defined]
    await eventually(lambda: len(client.received) >= SIZE, 60, what="the whole image")
    head = bytes(client.received).split(b"\r\n\r\n", 1)[0].decode()
    assert "HTTP/1.1 200" in head and f"content-length: {SIZE}" in head.lower()
    assert 'filename="my-work-v2-final.oci.tar"' in head
    assert "x-dit4c-digest: sha256:" in head.lower() and "repr-digest: sha-256=:" in head.lower()
    await eventually(lambda: len(client.received) - len(head) - 4 == SIZE, 60, what="the whole image")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_truncated_image_is_cut_and_an_absent_image_server_is_a_502(api: Portal, images: Any) -> None:
    token = await tokenFor(api, "alice", "correct horse battery")
    cut = await savedImage(api, images.port, path="cut")
    response = await treq.get(
        f"{api.testURL}/api/v1/images/{cut}/download",  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {token}"}, unbuffered=True,
    )  # fmt: skip
    assert response.code == 200
    try:
        await treq.content(response)
    except Exception as e:
        assert "PotentialDataLoss" in repr(e) or "ResponseFailed" in repr(e) or "ConnectionLost" in repr(e), repr(e)
    else:
        raise AssertionError("a truncated image was finished as if whole")

    with refusedPort() as away:
        gone = await savedImage(api, away, name="away")
        code, body = await Client(api, token).call("GET", f"/images/{gone}/download")
    assert (code, body["error"]) == (502, "unavailable")
