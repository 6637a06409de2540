"""
The storage helper: mount the instance owner's storage from the file server
with ``sshfs`` (FUSE), keep it mounted, and unmount it when stopped.

``sshfs`` runs in the foreground as a child process, logging in as the
instance (user name = instance id) with the instance's own key, converted
to the OpenSSH format in a private temporary directory (mode 0700, the key
0600). The file server's host key is pinned: a ``known_hosts`` file holding
only that key under the alias ``dit4c-fileserver``, and
``StrictHostKeyChecking=yes``; no other ssh configuration is read
(``-F /dev/null``). If sshfs exits while the helper runs (the file server
went away for longer than sshfs's own ``reconnect`` could bridge, or
refused it), a stale mount is removed (``fusermount -u -z``) and sshfs is
started again after a back-off (1 s doubling to 60 s; reset once a mount
has lasted a minute). On stop: ``fusermount -u``, which ends sshfs; SIGTERM
then SIGKILL if it does not end; a lazy unmount if anything is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.keys import PrivateKey
from dit4c.storage.errors import StorageConfigError

__all__ = ["HOST_ALIAS", "FileServerAddress", "SSHFSMount", "isMounted", "parseFileServer", "parseHostKey"]

#: The name the file server's host key is pinned under (``HostKeyAlias``).
HOST_ALIAS = "dit4c-fileserver"
#: A mount that lasted this long resets the back-off.
STABLE_AFTER = 60.0
#: Seconds to wait for sshfs to end after ``fusermount -u``, then after SIGTERM.
STOP_GRACE = 5.0

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class FileServerAddress:
    host: str
    port: int

    @property
    def sshHost(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parseFileServer(value: str) -> FileServerAddress:
    """``host:port``, ``[v6]:port`` or a client endpoint ``tcp:host=H:port=P``."""
    value = value.strip()
    if value.startswith(("tcp:", "tcp6:")):
        fields: dict[str, str] = {}
        positional: list[str] = []
        for part in re.split(r"(?<!\\):", value)[1:]:
            key, sep, rest = part.partition("=")
            if sep:
                fields[key] = rest.replace("\\:", ":")
            else:
                positional.append(part.replace("\\:", ":"))
        host = fields.get("host") or (positional[0] if positional else "")
        port = fields.get("port") or (positional[1] if len(positional) > 1 else "")
    else:
        match = _HOST_PORT.fullmatch(value)
        if match is None:
            raise StorageConfigError(f"DIT4C_FILE_SERVER must be host:port or tcp:host=H:port=P, not {value!r}")
        host = match.group("v6") or match.group("host")
        port = match.group("port")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise StorageConfigError(f"DIT4C_FILE_SERVER must be host:port or tcp:host=H:port=P, not {value!r}")
    return FileServerAddress(host, int(port))


def parseHostKey(value: str) -> str:
    """
    The file server's host key as ``<type> <base64>``, from an OpenSSH
    public key line, a ``known_hosts`` line, or a file holding one (the
    first usable line).
    """
    text = value
    if "\n" not in value and (value.startswith("/") or Path(value).is_file()):
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise StorageConfigError(f"DIT4C_FILE_SERVER_HOST_KEY: {e.strerror}: {value}") from None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        for i, word in enumerate(words[:-1]):
            if word.startswith(("ssh-", "ecdsa-sha2-")):
                candidate = f"{word} {words[i + 1]}"
                try:
                    key = keys.Key.fromString(candidate.encode("ascii"))
                except (keys.BadKeyError, ValueError, UnicodeEncodeError):
                    continue
                if key.isPublic():
                    return key.toString("openssh").decode("ascii")
    raise StorageConfigError("DIT4C_FILE_SERVER_HOST_KEY holds no SSH public key")


def isMounted(path: str | Path, mounts: str = "/proc/self/mounts") -> bool:
    """Whether something is mounted at ``path`` (by ``/proc/self/mounts``)."""
    # Never stat the mount point itself: a FUSE mount whose server does not
    # answer (or is served by this very process) would block.
    absolute = os.path.abspath(path)
    wanted = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    try:
        text = Path(mounts).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1 and _unescape(fields[1]) == wanted:
            return True
    return False


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class _SSHFSProtocol(ProcessProtocol):
    def __init__(self, mount: SSHFSMount) -> None:
        self.mount = mount
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def errReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines[-20:]:
            if line.strip():
                self.mount.log.info("sshfs: {line}", line=line.decode("utf-8", "replace")[:500])

    outReceived = errReceived

    def processEnded(self, reason: Failure) -> None:
        self.mount._ended(self, reason)
        self.ended.callback(None)


class SSHFSMount(Service):
    """
    Keep the storage of ``instance``'s owner mounted at ``mountPoint``.

    :param key: the instance's private key (what ``DIT4C_INSTANCE_KEY`` holds).
    :param hostKey: the file server's host key, ``<type> <base64>``.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        instance: str,
        key: PrivateKey,
        server: FileServerAddress,
        hostKey: str,
        mountPoint: str | Path,
        sshfs: str = "sshfs",
        fusermount: str = "fusermount3",
        allowOther: bool = False,
        owner: tuple[int, int] | None = None,
        workDir: str | Path | None = None,
        clock: Any = None,
        policy: Any = None,
    ) -> None:
        """
        :param owner: the uid and gid of the tool that uses the storage, when
            it is not the helper's own (a root node runs its tools as uids of
            their own): every file shows as theirs, mode 0700 (``umask=077``),
            and the kernel lets only them, and root, in (``allow_other``
            with ``default_permissions``).
        :param policy: attempt number → seconds to wait (default: 1 s doubling to 60 s, plus up to 1 s of jitter).
        """
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.instance = instance
        self.key = key
        self.server = server
        self.hostKey = hostKey
        self.mountPoint = os.path.abspath(mountPoint)
        self.sshfs = shutil.which(sshfs) or sshfs
        self.fusermount = shutil.which(fusermount) or shutil.which("fusermount") or fusermount
        self.allowOther = allowOther
        self.owner = owner
        self.workDirBase = workDir
        self.workDir: Path | None = None
        self.policy = policy if policy is not None else backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0)
        self.failures = 0
        self.process: Any = None
        self.protocol: _SSHFSProtocol | None = None
        self.startedAt = 0.0
        self.pending: Any = None
        self._stopping = False
        for path in (self.mountPoint, str(workDir or "")):
            if "," in path:
                raise StorageConfigError(f"{path!r}: sshfs cannot take a path with a comma")

    # -- files ----------------------------------------------------------------------------------------

    def _prepare(self) -> Path:
        base = None if self.workDirBase is None else str(self.workDirBase)
        if base is not None:
            os.makedirs(base, mode=0o700, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="dit4c-storage-", dir=base))  # mode 0700
        identity = work / "id"
        fd = os.open(identity, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
                )
            )
        (work / "known_hosts").write_text(f"{HOST_ALIAS} {self.hostKey}\n")
        os.makedirs(self.mountPoint, exist_ok=True)
        return work

    def command(self) -> list[str]:
        """sshfs's arguments (after the program name)."""
        assert self.workDir is not None
        options = [
            f"IdentityFile={self.workDir / 'id'}",
            f"UserKnownHostsFile={self.workDir / 'known_hosts'}",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            f"HostKeyAlias={HOST_ALIAS}",
            "IdentitiesOnly=yes",
            "BatchMode=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            f"port={self.server.port}",
            "reconnect",
            "ServerAliveInterval=15",
            "ServerAliveCountMax=3",
            "ConnectTimeout=20",
            "idmap=user",
            # Several instances share the storage: keep caches short.
            "dcache_timeout=5",
        ]
        if self.owner is not None:
            uid, gid = self.owner
            options += ["allow_other", "default_permissions", f"uid={uid}", f"gid={gid}", "umask=077"]
        elif self.allowOther:
            options.append("allow_other")
        return [
            "-f", "-F", "/dev/null", "-o", ",".join(options),
            f"{self.instance}@{self.server.sshHost}:/", self.mountPoint,
        ]  # fmt: skip

    # -- life -----------------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.workDir = self._prepare()
        self._spawn()

    def _spawn(self) -> None:
        self.pending = None
        if self._stopping:
            return
        if isMounted(self.mountPoint):
            self.log.warn("{path} is still mounted: unmounting it first", path=self.mountPoint)
            Deferred.fromCoroutine(self._unmount(lazy=True)).addBoth(lambda _: self._spawnNow())
            return
        self._spawnNow()

    def _spawnNow(self) -> None:
        if self._stopping:
            return
        environment = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if name in os.environ}
        self.protocol = _SSHFSProtocol(self)
        self.startedAt = self.clock.seconds()
        self.log.info(
            "mounting the storage from {host}:{port} at {path}",
            host=self.server.host, port=self.server.port, path=self.mountPoint,
        )  # fmt: skip
        self.process = self.reactor.spawnProcess(
            self.protocol, self.sshfs, [self.sshfs, *self.command()], env=environment
        )

    def _ended(self, protocol: _SSHFSProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.process = None
        if self._stopping:
            return
        how = "ended" if reason.check(ProcessDone) else str(reason.value)
        if self.clock.seconds() - self.startedAt >= STABLE_AFTER:
            self.failures = 0
        self.failures += 1
        delay = self.policy(self.failures - 1)
        self.log.warn("sshfs {how}: mounting again in {delay:.1f} s", how=how, delay=delay)
        self.pending = self.clock.callLater(delay, self._spawn)

    async def _unmount(self, *, lazy: bool = False) -> int:
        args = ["-u", "-z", self.mountPoint] if lazy else ["-u", self.mountPoint]
        out, err, code = await getProcessOutputAndValue(self.fusermount, args, env=dict(os.environ), reactor=self.reactor)
        if code != 0 and isMounted(self.mountPoint):
            self.log.warn("fusermount {args} failed: {err}", args=" ".join(args), err=err.decode("utf-8", "replace").strip()[:300])
        return int(code)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        protocol, process = self.protocol, self.process
        if isMounted(self.mountPoint):
            await self._unmount()
        if process is not None and protocol is not None and not protocol.ended.called:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        process.signalProcess({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}[sig])
                    except Exception:
                        break
                if await self._waitFor(protocol.ended, STOP_GRACE):
                    break
        if isMounted(self.mountPoint):
            await self._unmount(lazy=True)
        self.log.info("unmounted the storage at {path}", path=self.mountPoint)
        if self.workDir is not None:
            shutil.rmtree(self.workDir, ignore_errors=True)
            self.workDir = None

    async def _waitFor(self, d: Deferred[None], timeout: float) -> bool:
        if d.called:
            return True
        waiter: Deferred[bool] = Deferred()

        def expired() -> None:
            if not waiter.called:
                waiter.callback(False)

        call = self.clock.callLater(timeout, expired)

        def done(_: object) -> object:
            if not waiter.called:
                call.cancel()
                waiter.callback(True)
            return _

        d.addBoth(done)
        return await waiter
