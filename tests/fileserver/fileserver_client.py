"""
A real SFTP client for the file server's tests (twisted.conch): log in as an
instance with a key, check the server's host key, open the SFTP subsystem.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, fail, succeed

FXF_READ = filetransfer.FXF_READ
FXF_WRITE = filetransfer.FXF_WRITE
FXF_CREAT = filetransfer.FXF_CREAT
FXF_TRUNC = filetransfer.FXF_TRUNC


class LoginRefused(Exception):
    """The server closed the connection before the SFTP session started."""


class _Channel(channel.SSHChannel):
    name = b"session"

    def channelOpen(self, data: bytes) -> None:
        d = self.conn.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._started, self._refused)

    def _started(self, _: Any) -> None:
        client = filetransfer.FileTransferClient()
        client.makeConnection(self)
        self.dataReceived = client.dataReceived  # type: ignore[method-assign]
        self.conn.factory.sftp = client
        ready = self.conn.factory.ready
        if not ready.called:
            ready.callback(client)

    def _refused(self, f: Any) -> None:
        ready = self.conn.factory.ready
        if not ready.called:
            ready.errback(LoginRefused("subsystem refused"))


class _Connection(connection.SSHConnection):
    def __init__(self, factory: Any) -> None:
        super().__init__()
        self.factory = factory

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.factory.loggedIn = True
        self.openChannel(_Channel(conn=self))


class _Auth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, conn: Any, key: keys.Key) -> None:
        super().__init__(user, conn)
        self.key = key
        self.tried = False

    def getPublicKey(self) -> keys.Key | None:
        if self.tried:
            return None
        self.tried = True
        return self.key.public()

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return succeed(self.key)


class _Transport(transport.SSHClientTransport):
    factory: Any

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        if keys.Key.fromString(hostKey) != self.factory.hostKey:
            return fail(Exception("host key mismatch"))
        return succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(_Auth(self.factory.user, _Connection(self.factory), self.factory.key))

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.factory.ready.called:
            self.factory.ready.errback(LoginRefused("connection closed"))
        self.factory.closed.callback(None)


class SFTPSession(protocol.ClientFactory):
    protocol = _Transport

    def __init__(self, user: str, key: Any, hostKey: keys.Key) -> None:
        self.user = user.encode()
        self.key = keys.Key(key) if not isinstance(key, keys.Key) else key
        self.hostKey = hostKey
        self.ready: Deferred[filetransfer.FileTransferClient] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.loggedIn = False
        self.sftp: filetransfer.FileTransferClient | None = None
        self.connector: Any = None

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        self.closed.callback(None)

    async def close(self) -> None:
        if self.connector is not None and not self.closed.called:
            self.connector.disconnect()
        await self.closed


async def connect(port: int, user: str, key: Any, hostKey: keys.Key) -> tuple[SFTPSession, filetransfer.FileTransferClient]:
    """Log in as ``user`` with ``key``; fails with LoginRefused if the server says no."""
    session = SFTPSession(user, key, hostKey)
    session.connector = reactor.connectTCP("127.0.0.1", port, session, timeout=10)
    try:
        client = await session.ready
    except BaseException:
        await session.closed
        raise
    return session, client


async def writeFile(client: Any, path: str, data: bytes) -> None:
    f = await client.openFile(path.encode(), FXF_WRITE | FXF_CREAT | FXF_TRUNC, {})
    await f.writeChunk(0, data)
    await f.close()


async def readFile(client: Any, path: str) -> bytes:
    f = await client.openFile(path.encode(), FXF_READ, {})
    chunks = []
    offset = 0
    try:
        while True:
            try:
                chunk = await f.readChunk(offset, 65536)
            except EOFError:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        await f.close()
    return b"".join(chunks)


async def listDirectory(client: Any, path: str) -> list[str]:
    d = await client.openDirectory(path.encode())
    names: list[str] = []
    try:
        while True:
            try:
                batch = await d.read()
            except EOFError:
                break
            names.extend(name.decode() for name, _, _ in batch)
    finally:
        await d.close()
    return sorted(names)


async def symlink(client: Any, target: str, link: str) -> None:
    """A symbolic link ``link`` -> ``target``, sent in OpenSSH's order (target first) as sshfs does."""
    await client.makeLink(target.encode(), link.encode())
