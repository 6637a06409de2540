"""
The SSH server of the file server: SFTP only, public-key login as an
instance, each connection jailed in its owner's directory
``<data dir>/users/<user id>/``.

The portal may also log in, for one person, with a token it signed
(:mod:`dit4c.fileserver.personlogin`): the same directory, the same limits.

Limits: at most ``maxConnections`` connections at once (more are closed
before the SSH banner), ``loginTimeout`` seconds to log in, five failed
login attempts, ``idleTimeout`` seconds without a byte from the client
(sshfs sends a keep-alive every 15 s), at most four SFTP sessions per
connection and :data:`~dit4c.fileserver.sftp.MAX_HANDLES` open files per
session. No shell, no command, no port forwarding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import connection, factory, keys, session, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred.portal import IRealm, Portal
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from dit4c.common.keys import loadOrCreatePrivateKey
from dit4c.fileserver.access import Access, InstanceKeyChecker
from dit4c.fileserver.jail import Jail
from dit4c.fileserver.metrics import FileServerMetrics
from dit4c.fileserver.personlogin import PERSON_PREFIX, PersonAccess, PortalTokenChecker
from dit4c.fileserver.sftp import MAX_HANDLES, JailedSFTPServer, SFTPSubsystem

__all__ = ["FileServerFactory", "StorageRealm", "loadHostKey"]

#: SFTP sessions one connection may open.
MAX_SESSIONS = 4


def loadHostKey(dataDir: Path) -> keys.Key:
    """
    The server's SSH host key (EC P-256), made on first start as
    ``<data dir>/host_key.pem``; its public half is written to
    ``host_key.pub`` (an OpenSSH public key line) for the storage helpers.
    """
    key = keys.Key(loadOrCreatePrivateKey(dataDir / "host_key.pem"))
    public = key.public().toString("openssh").decode("ascii") + "\n"
    pub = dataDir / "host_key.pub"
    if not pub.exists() or pub.read_text() != public:
        pub.write_text(public)
    return key


class _Session(session.SSHSession):
    """A session channel that runs the SFTP subsystem and nothing else."""

    def request_subsystem(self, data: bytes) -> int:
        name, _ = getNS(data)
        if name != b"sftp":
            return 0
        return super().request_subsystem(data)

    def request_shell(self, data: bytes) -> int:
        return 0

    def request_exec(self, data: bytes) -> int:
        return 0

    def request_pty_req(self, data: bytes) -> int:
        return 0

    def request_env(self, data: bytes) -> int:
        return 0

    def request_window_change(self, data: bytes) -> int:
        return 0


class StorageUser(ConchUser):
    """A logged-in instance: SFTP sessions in its owner's directory."""

    log = Logger()

    def __init__(self, access: Access | PersonAccess, jail: Jail, *, maxHandles: int = MAX_HANDLES, metrics: FileServerMetrics | None = None) -> None:
        super().__init__()
        self.access = access
        self.jail = jail
        self.maxHandles = maxHandles
        self.metrics = metrics if metrics is not None else FileServerMetrics()
        self.sessions = 0
        self.channelLookup[b"session"] = _Session
        access.onRevoke.append(self.disconnect)

    def lookupSubsystem(self, subsystem: bytes, data: bytes) -> Any:
        if subsystem != b"sftp" or self.sessions >= MAX_SESSIONS:
            return None
        self.sessions += 1
        return SFTPSubsystem(
            JailedSFTPServer(self.jail, self.access, maxHandles=self.maxHandles, metrics=self.metrics),
            onClosed=self._sessionEnded,
        )

    def _sessionEnded(self) -> None:
        """A session closed: the limit counts those open at once, not those ever opened."""
        self.sessions -= 1

    def disconnect(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None and conn.transport is not None:
            conn.transport.loseConnection()

    def logout(self) -> None:
        self.access.revoked = True


@implementer(IRealm)
class StorageRealm:
    """
    Each access's person's directory, made (mode 0700) on first use. A
    login is counted as accepted here, once its avatar exists: the checker
    said yes and the person's directory is usable.
    """

    log = Logger()

    def __init__(self, dataDir: Path, *, maxHandles: int = MAX_HANDLES, metrics: FileServerMetrics | None = None) -> None:
        self.users = Path(dataDir) / "users"
        self.maxHandles = maxHandles
        self.metrics = metrics if metrics is not None else FileServerMetrics()

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, StorageUser, Any]:
        if IConchUser not in interfaces or not isinstance(avatarId, Access | PersonAccess):
            raise NotImplementedError("only SSH logins of instances and of the portal for a person")
        self.users.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.users / avatarId.user
        try:
            home.mkdir(mode=0o700)
        except FileExistsError:
            pass
        if home.is_symlink() or not home.is_dir():
            raise NotImplementedError("the person's storage is not a directory")
        avatar = StorageUser(avatarId, Jail(home), maxHandles=self.maxHandles, metrics=self.metrics)
        self.metrics.login("accepted")
        self.log.info(
            "{who} logged in to the storage of user {user}",
            who=avatarId.who if isinstance(avatarId, PersonAccess) else f"instance {avatarId.instance}", user=avatarId.user,
        )  # fmt: skip
        return IConchUser, avatar, avatar.logout


class _UserAuth(userauth.SSHUserAuthServer):
    """
    Each user name gets its one way in: ``user:<id>`` (the portal, for a
    person) a password, any other (an instance) a public key. So an
    instance's client is never offered a password (an SSH client may try
    one, or ask for it), and a password sent in an instance's name is
    refused before any checker sees it.
    """

    attemptsBeforeDisconnect = 5

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        user, _ = getNS(packet)
        offered = [b"password"] if user.startswith(PERSON_PREFIX.encode()) else [b"publickey"]
        self.supportedAuthentications = [m for m in offered if m in self._allowed]
        return super().ssh_USERAUTH_REQUEST(packet)

    def serviceStarted(self) -> None:
        super().serviceStarted()
        #: What the portal's checkers and the transport allow at all (no password unencrypted).
        self._allowed = list(self.supportedAuthentications)


class _Transport(transport.SSHServerTransport, TimeoutMixin):
    """The SSH transport, closed after ``idleTimeout`` seconds without data from the client."""

    factory: FileServerFactory

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater  # type: ignore[method-assign]
        self.setTimeout(self.factory.idleTimeout)
        # Key exchange and login together: a client that stalls in either is closed.
        self._loginDeadline = self.factory.clock.callLater(self.factory.loginTimeout, self._loginExpired)
        self.factory.live.add(self)
        self.factory.metrics.connectionOpened()
        super().connectionMade()

    def _loginExpired(self) -> None:
        if getattr(self, "avatar", None) is None:
            peer = self.transport.getPeer() if self.transport is not None else None
            self.factory.log.info("closing a connection from {peer} that did not log in in time", peer=peer)
            self.factory.metrics.login("timed_out")
            self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def timeoutConnection(self) -> None:
        peer = self.transport.getPeer() if self.transport is not None else None
        self.factory.log.info("closing an idle connection from {peer}", peer=peer)
        self.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        if self._loginDeadline.active():
            self._loginDeadline.cancel()
        if self in self.factory.live:
            self.factory.live.discard(self)
            self.factory.metrics.connectionClosed()
        super().connectionLost(reason)


class FileServerFactory(factory.SSHFactory):
    """
    SSH for storage helpers: log in with ``checker`` (an
    :class:`~dit4c.fileserver.access.InstanceKeyChecker`), SFTP in the
    person's directory under ``dataDir``; what happens is counted in
    ``metrics`` (give the checker the same one).
    """

    protocol = _Transport
    services = {b"ssh-userauth": _UserAuth, b"ssh-connection": connection.SSHConnection}
    log = Logger()

    def __init__(
        self,
        clock: Any,
        dataDir: Path,
        checker: InstanceKeyChecker,
        *,
        hostKey: keys.Key | None = None,
        maxConnections: int = 100,
        idleTimeout: float = 300.0,
        loginTimeout: float = 30.0,
        maxHandles: int = MAX_HANDLES,
        metrics: FileServerMetrics | None = None,
        personChecker: PortalTokenChecker | None = None,
    ) -> None:
        """:param personChecker: the portal's logins for a person; none: only instances log in."""
        self.clock = clock
        self.metrics = metrics if metrics is not None else FileServerMetrics()
        self.dataDir = Path(dataDir)
        self.dataDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dataDir, 0o700)
        self.hostKey = hostKey if hostKey is not None else loadHostKey(self.dataDir)
        self.privateKeys = {self.hostKey.sshType(): self.hostKey}
        self.publicKeys = {self.hostKey.sshType(): self.hostKey.public()}
        self.primes = None
        self.portal = Portal(StorageRealm(self.dataDir, maxHandles=maxHandles, metrics=self.metrics), [checker] + ([personChecker] if personChecker else []))
        self.maxConnections = maxConnections
        self.idleTimeout = idleTimeout
        self.loginTimeout = loginTimeout
        self.live: set[_Transport] = set()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.live) >= self.maxConnections:
            self.log.warn(
                "refused a connection from {address}: {count} connections already",
                address=addr, count=len(self.live),
            )  # fmt: skip
            self.metrics.login("over_limit")
            return None
        return super().buildProtocol(addr)
