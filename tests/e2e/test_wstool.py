"""
The WebSocket tool for end-to-end tests (``tests/e2e/tool/wstool.c``) in its
image, run with plain ``podman run -p 127.0.0.1::8080`` (podman chooses the port): its page
greets ``X-DIT4C-User``, ``/ws`` echoes text and binary messages (7-, 16- and
64-bit lengths, fragmented, up to 1 MiB), and no malformed request or frame
stops it from serving the next one.

One container serves the whole module (the ``wstool`` fixture removes it,
even after a failed test). Skipped where podman or gcc cannot run; under CI
(``CI`` set) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.podman import (
    WSTOOL_PORT,
    buildWebSocketToolImage,
    compileWebSocketToolSync,
    gccUnavailable,
    podmanEnv,
    podmanUnavailable,
    requirePodman,
)
from support.waiting import eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

requirePodman("the WebSocket tool's tests", podmanUnavailable() or gccUnavailable())

#: The key and accept value of RFC 6455, section 1.3.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MIB = 1024 * 1024


async def podman(*args: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue("podman", list(args), env=podmanEnv())
    return out.decode(), err.decode(), code


async def page(port: int, headers: dict[str, str] | None = None, method: str = "GET", path: str = "/") -> Any:
    """The response to a plain request, and its body."""
    response = await treq.request(
        method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=5, persistent=False
    )
    return response, await response.content()


class Tool:
    def __init__(self, name: str, image: str, port: int) -> None:
        self.name = name
        self.image = image
        self.port = port

    async def running(self) -> bool:
        out, _, code = await podman("inspect", "--format", "{{.State.Running}}", self.name)
        return code == 0 and out.strip() == "true"


@pytest_twisted.async_yield_fixture(scope="module")
async def wstool() -> AsyncIterator[Tool]:
    image = await buildWebSocketToolImage()
    name = f"dit4c-test-wstool-{os.getpid()}-{secrets.token_hex(2)}"
    _, err, code = await podman(
        "run", "--detach", "--pull=never", "--name", name, "-p", f"127.0.0.1::{WSTOOL_PORT}", image
    )
    try:
        assert code == 0, f"podman run failed: {err}"
        # The host port podman chose: "127.0.0.1:<port>".
        out, err, code = await podman("port", name, f"{WSTOOL_PORT}/tcp")
        assert code == 0, f"podman port failed: {err}"
        port = int(out.strip().rsplit(":", 1)[1])
        tool = Tool(name, image, port)
        failed: list[Exception] = []

        async def serves() -> bool:
            try:
                response, _ = await page(port)
            except Exception as e:  # not up yet
                failed[:] = [e]
                return False
            return bool(response.code == 200)

        await eventually(serves, 20, interval=0.1, what=lambda: f"the tool answers 200 on port {port}: {failed}")
        yield tool
    finally:
        await podman("rm", "--force", "--time", "0", name)


# -- a raw TCP client: for what no well-behaved client sends ----------------------------------------


class Raw(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


async def exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request``, close our side, and return all the server sent before it closed."""
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), Raw())
    protocol.transport.write(request)  # type: ignore[union-attr]
    protocol.transport.loseWriteConnection()  # type: ignore[union-attr]
    return await protocol.done.addTimeout(timeout, reactor)


def upgrade(key: str = RFC_KEY, version: str = "13", path: str = "/ws") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    ).encode()


def maskedFrame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client's frame (masked, as clients' must be)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def afterHandshake(response: bytes) -> bytes:
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), response[:200]
    assert f"Sec-WebSocket-Accept: {RFC_ACCEPT}".encode() in head
    return rest


def closeFrame(code: int) -> bytes:
    return b"\x88\x02" + code.to_bytes(2, "big")


# -- a real WebSocket client: autobahn ----------------------------------------------------------------


class EchoClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[bool, int | None]] = defer.Deferred()
        self.messages: defer.DeferredQueue[tuple[bytes, bool]] = defer.DeferredQueue()
        self.pongs: defer.DeferredQueue[bytes] = defer.DeferredQueue()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onPong(self, payload: bytes) -> None:
        self.pongs.put(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(AssertionError(f"closed before opening: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((wasClean, code))

    async def next(self) -> tuple[bytes, bool]:
        return await self.messages.get().addTimeout(10, reactor)


async def connectClient(port: int) -> EchoClient:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws")
    factory.protocol = EchoClient
    factory.setProtocolOptions(closeHandshakeTimeout=5, serverConnectionDropTimeout=5)
    client: EchoClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)
    await client.opened.addTimeout(10, reactor)
    return client


# -- the image and the program ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_image_runs_wstool_on_its_exposed_port(wstool: Tool) -> None:
    assert wstool.image.startswith("localhost/dit4c-test-wstool:")
    assert await buildWebSocketToolImage() == wstool.image  # cached
    out, _, code = await podman("image", "inspect", "--format", "json", wstool.image)
    assert code == 0
    config = json.loads(out)[0]["Config"]
    assert config["Cmd"] == ["/bin/wstool", str(WSTOOL_PORT)]
    assert list(config["ExposedPorts"]) == [f"{WSTOOL_PORT}/tcp"]


def test_sha1_and_base64_self_test() -> None:
    result = subprocess.run([str(compileWebSocketToolSync()), "--self-test"], capture_output=True, timeout=10)
    assert (result.returncode, result.stdout) == (0, b"self-test ok\n"), result.stderr


# -- the page ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_page_greets_the_user(wstool: Tool) -> None:
    response, body = await page(wstool.port, {"X-DIT4C-User": "alice"})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    text = body.decode()
    assert "<title>WS tool</title>" in text
    assert '<p id="greeting">Hello, alice.</p>' in text
    for element in ('<p id="status">', '<input id="message"', '<button id="send"', '<ul id="echoes">'):
        assert element in text
    assert 'location.host + "/ws"' in text

    # Any path but /ws is the page; the header's value is escaped.
    response, body = await page(wstool.port, {"X-DIT4C-User": '<b>"eve" & co\'</b>'}, path="/some/where?x=1")
    assert response.code == 200
    assert '<p id="greeting">Hello, &lt;b&gt;&quot;eve&quot; &amp; co&#39;&lt;/b&gt;.</p>' in body.decode()

    _, body = await page(wstool.port)
    assert '<p id="greeting">Hello, stranger.</p>' in body.decode()

    response, body = await page(wstool.port, method="HEAD")
    assert (response.code, body) == (200, b"")
    response, _ = await page(wstool.port, method="POST")
    assert response.code == 405


# -- the WebSocket -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_echoes_text_and_binary(wstool: Tool) -> None:
    client = await connectClient(wstool.port)
    try:
        client.sendMessage("hello, wstool ✓".encode())
        assert await client.next() == ("hello, wstool ✓".encode(), False)

        medium = ("x" * 300).encode()  # a 16-bit length
        client.sendMessage(medium)
        assert await client.next() == (medium, False)

        large = os.urandom(70_000)  # a 64-bit length
        client.sendMessage(large, isBinary=True)
        assert await client.next() == (large, True)

        fragmented = os.urandom(50_000)  # in 4 frames; echoed as one message
        client.sendMessage(fragmented, isBinary=True, fragmentSize=16_000)
        assert await client.next() == (fragmented, True)

        largest = os.urandom(MIB)
        client.sendMessage(largest, isBinary=True)
        assert await client.next() == (largest, True)

        client.sendMessage(b"", isBinary=True)
        assert await client.next() == (b"", True)

        client.sendPing(b"are you there?")
        assert await client.pongs.get().addTimeout(10, reactor) == b"are you there?"
    finally:
        client.sendClose(1000)
    assert await client.closed.addTimeout(10, reactor) == (True, 1000)


@pytest_twisted.ensureDeferred
async def test_websocket_refuses_a_message_over_1_mib(wstool: Tool) -> None:
    client = await connectClient(wstool.port)
    client.sendMessage(b"x" * (MIB + 1), isBinary=True)
    wasClean, code = await client.closed.addTimeout(10, reactor)
    assert code == 1009


@pytest_twisted.ensureDeferred
async def test_websocket_handshake_per_rfc_6455(wstool: Tool) -> None:
    # The accept value of the RFC's example; a frame sent with the handshake is read.
    response = await exchange(wstool.port, upgrade() + maskedFrame(0x1, b"hi") + maskedFrame(0x8, b"\x03\xe8"))
    assert afterHandshake(response) == b"\x81\x02hi" + closeFrame(1000)

    response = await exchange(wstool.port, upgrade(version="8"))
    assert response.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in response
    response = await exchange(wstool.port, upgrade(key="too short"))
    assert response.startswith(b"HTTP/1.1 400 ")
    response = await exchange(wstool.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")


# -- robustness ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_garbage_does_not_stop_the_server(wstool: Tool) -> None:
    port = wstool.port
    assert (await exchange(port, b"\x00\xff\xfe garbage \x01\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(port, os.urandom(3000) + b"\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(port, b"GET / HTTP/1.1\r\nX: \x00\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await exchange(port, b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20_000)).startswith(b"HTTP/1.1 431 ")
    assert await exchange(port, b"GET / HT") == b""  # cut short
    assert await exchange(port, b"") == b""

    # Frames no client may send: each gets a close with 1002 (protocol error),
    # 1007 (text that is not UTF-8) or 1009 (too big), and the connection ends.
    badFrames = {
        b"\x81\x02hi": 1002,  # not masked
        b"\xf1\x80" + b"\0" * 4: 1002,  # reserved bits
        b"\x83\x80" + b"\0" * 4: 1002,  # reserved opcode
        b"\x80\x80" + b"\0" * 4: 1002,  # a continuation of nothing
        b"\x09\x80" + b"\0" * 4: 1002,  # a fragmented ping
        b"\x89\xfe\x00\x7e" + b"\0" * 4 + b"p" * 126: 1002,  # a ping over 125 bytes
        b"\x88\x81" + b"\0" * 5: 1002,  # a close with a 1-byte payload
        b"\x82\xff\x80" + b"\0" * 11: 1002,  # a 64-bit length with its top bit set
        b"\x82\xff\x00\x00\x01" + b"\0" * 9: 1009,  # 2^40 bytes
        maskedFrame(0x1, b"\xc3\x28"): 1007,
        maskedFrame(0x1, b"\xed\xa0\x80"): 1007,  # a surrogate
        maskedFrame(0x1, b"ab", fin=False) + maskedFrame(0x2, b"cd"): 1002,  # a new message mid-message
    }
    for frame, code in badFrames.items():
        rest = afterHandshake(await exchange(port, upgrade() + frame))
        assert rest == closeFrame(code), (frame[:16], rest)
    rest = afterHandshake(await exchange(port, upgrade() + b"\xf2" + os.urandom(5000)))
    assert rest == closeFrame(1002)
    assert afterHandshake(await exchange(port, upgrade() + b"\x82")) == b""  # cut short

    assert await wstool.running()
    response, body = await page(port, {"X-DIT4C-User": "alice"})
    assert response.code == 200 and b"Hello, alice." in body
    client = await connectClient(port)
    client.sendMessage(b"still here")
    assert await client.next() == (b"still here", False)
    client.sendClose(1000)
    await client.closed.addTimeout(10, reactor)
