"""
The portal as a client of the file server, for one person at a time (the
Files page, :mod:`dit4c.portal.files`; docs/protocols.md 13.6).

Each request opens its own SSH connection (``twisted.conch``): the file
server's host key pinned (no trust on first use), a password login as
``user:<user id>`` whose password is a token the portal signs with its
current key for that person (audience ``dit4c-fileserver``, 60 s), then
the SFTP subsystem (``FileTransferClient``). One connection per request
keeps no state between requests and lets the file server's limits apply as
they are; a page's request costs one key exchange more, which is small
beside what a person waits for anyway. Every step has a deadline, and the
connection is closed however the request ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.portal.errors import InstanceError
from dit4c.portal.keys import KeyRing

__all__ = ["FILE_SERVER_AUDIENCE", "FileClient", "FileSession", "Unavailable", "fileServerEndpoint", "hostKeyFrom"]

#: The ``aud`` of the portal's tokens for the file server (``dit4c.fileserver.personlogin``).
FILE_SERVER_AUDIENCE = "dit4c-fileserver"
#: Seconds a login token lives: it is used at once.
TOKEN_LIFETIME = 60.0

_T = TypeVar("_T")


class Unavailable(InstanceError):
    """The file server could not be reached, or refused the portal (502)."""

    status = 502
    code = "storage_unavailable"


def hostKeyFrom(value: str) -> keys.Key:
    """
    The file server's host key from an OpenSSH public key line, a
    ``known_hosts`` line, or the path of a file holding one.

    :raises ValueError: none of these.
    """
    text = value.strip()
    if not text.startswith(("ssh-", "ecdsa-")) and Path(text).is_file():
        text = Path(text).read_text().strip()
    for line in text.splitlines():
        fields = line.split()
        for start in range(min(2, len(fields))):
            try:
                key: keys.Key = keys.Key.fromString(" ".join(fields[start : start + 2]).encode("ascii"))
                return key
            except (keys.BadKeyError, ValueError, IndexError, UnicodeEncodeError):
                continue
    raise ValueError("not an SSH public key line, a known_hosts line, or a file holding one")


def fileServerEndpoint(value: str) -> str:
    """
    A client endpoint string for the file server given as ``host:port``,
    ``[v6]:port`` or an endpoint string (``tcp:host=H:port=P``).

    :raises ValueError: none of these.
    """
    value = value.strip()
    if value.startswith(("tcp:", "tcp6:", "unix:", "ssl:", "tls:")):
        return value
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("give the file server as host:port or an endpoint such as tcp:host=H:port=P")
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


class _Channel(channel.SSHChannel):
    name = b"session"

    @property
    def setup(self) -> _Setup:
        return cast(_Connection, self.conn).setup

    def channelOpen(self, data: bytes) -> None:
        d = cast(_Connection, self.conn).sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._started, lambda _: self.setup.failed("the file server refused SFTP"))

    def _started(self, _: object) -> None:
        client = filetransfer.FileTransferClient()
        client.makeConnection(self)
        self.dataReceived = client.dataReceived  # type: ignore[method-assign]
        self.setup.ready(client)

    def openFailed(self, reason: Any) -> None:
        self.setup.failed("the file server refused a session")


class _Connection(connection.SSHConnection):
    def __init__(self, setup: _Setup) -> None:
        super().__init__()
        self.setup = setup

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.openChannel(_Channel(conn=self))


class _Auth(userauth.SSHUserAuthClient):
    preferredOrder = [b"password"]

    def __init__(self, user: bytes, conn: _Connection, password: bytes) -> None:
        super().__init__(user, conn)
        self.password: bytes | None = password

    def getPublicKey(self) -> None:
        return None

    def getPassword(self, prompt: bytes | None = None) -> Deferred[bytes] | None:
        # Offered once; then None, so that the client gives up at once (a refusal is final).
        password, self.password = self.password, None
        return succeed(password) if password is not None else None


class _Transport(transport.SSHClientTransport):
    factory: _Setup

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        if keys.Key.fromString(hostKey) != self.factory.hostKey:
            self.factory.failed("the file server's host key is not the one configured")
            return fail(Exception("host key mismatch"))
        return succeed(True)

    def connectionSecure(self) -> None:
        setup = self.factory
        self.requestService(_Auth(setup.user, _Connection(setup), setup.password))

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.factory.failed("the file server closed the connection (login refused?)")


class _Setup(Factory):
    """One connection's making: fires :attr:`done` with the SFTP client, or fails with :class:`Unavailable`."""

    protocol = _Transport  # type: ignore[assignment]

    def __init__(self, hostKey: keys.Key, user: str, password: str) -> None:
        self.hostKey = hostKey
        self.user = user.encode("ascii")
        self.password = password.encode("ascii")
        self.done: Deferred[filetransfer.FileTransferClient] = Deferred()

    def ready(self, client: filetransfer.FileTransferClient) -> None:
        if not self.done.called:
            self.done.callback(client)

    def failed(self, why: str) -> None:
        if not self.done.called:
            self.done.errback(Unavailable(f"Your storage could not be reached: {why}."))


class FileSession:
    """One SFTP session for one person; every call has the client's deadline."""

    def __init__(self, sftp: filetransfer.FileTransferClient, reactor: Any, timeout: float) -> None:
        self.sftp = sftp
        self.reactor = reactor
        self.timeout = timeout

    def within(self, d: Deferred[_T]) -> Deferred[_T]:
        """``d``, failed with ``TimeoutError`` if the file server takes longer than the deadline."""
        return d.addTimeout(self.timeout, self.reactor)

    async def listdir(self, path: str) -> list[tuple[str, dict[str, Any]]]:
        """The names in directory ``path`` with their attributes (``.`` and ``..`` left out)."""
        directory = await self.within(self.sftp.openDirectory(path))
        entries: list[tuple[str, dict[str, Any]]] = []
        try:
            while True:
                try:
                    batch = await self.within(directory.read())
                except EOFError:
                    break
                for name, _, attrs in batch:
                    text = name.decode("utf-8", "replace")
                    if text not in (".", ".."):
                        entries.append((text, attrs))
        finally:
            await self.within(directory.close())
        return entries

    async def stat(self, path: str) -> dict[str, Any]:
        attrs: dict[str, Any] = await self.within(self.sftp.getAttrs(path))
        return attrs

    async def mkdir(self, path: str) -> None:
        await self.within(self.sftp.makeDirectory(path, {}))

    async def remove(self, path: str) -> None:
        await self.within(self.sftp.removeFile(path))

    async def rmdir(self, path: str) -> None:
        await self.within(self.sftp.removeDirectory(path))

    async def openRead(self, path: str) -> Any:
        return await self.within(self.sftp.openFile(path, filetransfer.FXF_READ, {}))

    async def write(self, path: str, data: bytes, *, chunk: int = 32 * 1024, inFlight: int = 8) -> None:
        """``data`` as the file ``path`` (made or truncated), ``inFlight`` chunks on their way at once."""
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_TRUNC
        handle = await self.within(self.sftp.openFile(path, flags, {"permissions": 0o600}))
        try:
            for start in range(0, len(data), chunk * inFlight):
                writes = [
                    self.within(handle.writeChunk(offset, data[offset : offset + chunk]))
                    for offset in range(start, min(len(data), start + chunk * inFlight), chunk)
                ]
                for d in writes:
                    await d
        finally:
            await self.within(handle.close())


class FileClient:
    """The file server at ``endpoint`` (a client endpoint string), its host key pinned."""

    log = Logger()

    def __init__(self, reactor: Any, endpoint: str, hostKey: keys.Key, keys: KeyRing, *, timeout: float = 15.0) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.hostKey = hostKey
        self.keys = keys
        self.timeout = timeout

    def token(self, userId: str) -> str:
        """The login token for ``userId``: the portal's current key, 60 s."""
        token: str = self.keys.signer().sign({"sub": userId}, audience=FILE_SERVER_AUDIENCE, lifetime=TOKEN_LIFETIME)
        return token

    def session(self, userId: str) -> Any:
        """An SFTP session in ``userId``'s storage (``async with``), its connection closed when the block ends."""
        return self.loggedIn(f"user:{userId}", self.token(userId))

    @asynccontextmanager
    async def loggedIn(self, user: str, password: str) -> AsyncIterator[FileSession]:
        """An SFTP session of SSH user ``user`` with ``password``; :class:`Unavailable` if refused."""
        setup = _Setup(self.hostKey, user, password)
        connecting = clientFromString(self.reactor, self.endpoint).connect(setup)
        connecting.addTimeout(self.timeout, self.reactor)
        try:
            ssh: _Transport = await connecting
        except Exception as e:
            self.log.warn("the file server at {endpoint} is away: {error}", endpoint=self.endpoint, error=str(e) or type(e).__name__)
            raise Unavailable("Your storage could not be reached; try again later.") from None
        try:
            setup.done.addTimeout(self.timeout, self.reactor)
            try:
                sftp = await setup.done
            except TimeoutError:
                raise Unavailable("The file server did not answer in time.") from None
            yield FileSession(sftp, self.reactor, self.timeout)
        finally:
            ssh.loseConnection()
