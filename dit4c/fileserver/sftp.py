"""
The SFTP server (protocol version 3, as OpenSSH and sshfs speak it) over a
:class:`~dit4c.fileserver.jail.Jail`.

Every operation first asks the connection's :class:`IAccess` whether the
instance may still reach the storage (the portal's answer, cached briefly),
then works through the jail's descriptors only. Extensions offered, the
ones sshfs uses: ``posix-rename@openssh.com`` (rename over an existing
file) and ``statvfs@openssh.com`` (``df``). ``SSH_FXP_SYMLINK`` takes its
arguments in OpenSSH's order (target first, then the link's path), which is
what sshfs and OpenSSH's ``sftp`` send.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.common import getNS
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from zope.interface import Interface, implementer

from dit4c.fileserver.jail import Jail, Resolved, checkLinkTarget
from dit4c.fileserver.metrics import FileServerMetrics

__all__ = ["IAccess", "JailedSFTPServer", "SFTPSubsystem", "MAX_CHUNK", "MAX_HANDLES"]

#: The most bytes one read answers with (clients ask for 32-64 KiB).
MAX_CHUNK = 256 * 1024
#: Open files and directories per SFTP session.
MAX_HANDLES = 256

FXF_READ = filetransfer.FXF_READ
FXF_WRITE = filetransfer.FXF_WRITE
FXF_APPEND = filetransfer.FXF_APPEND
FXF_CREAT = filetransfer.FXF_CREAT
FXF_TRUNC = filetransfer.FXF_TRUNC
FXF_EXCL = filetransfer.FXF_EXCL

_T = TypeVar("_T")


class IAccess(Interface):
    """Whether the connection's instance may still reach its storage."""

    def check() -> Deferred[None]:
        """Fires when it may; fails with ``PermissionError`` when it may no longer."""


def _attrs(info: os.stat_result) -> dict[str, int]:
    return {
        "size": info.st_size,
        "uid": info.st_uid,
        "gid": info.st_gid,
        "permissions": info.st_mode,
        "atime": int(info.st_atime) & 0xFFFFFFFF,
        "mtime": int(info.st_mtime) & 0xFFFFFFFF,
    }


def _mode(attrs: dict[str, Any], default: int) -> int:
    return int(attrs.get("permissions", default)) & 0o777


def _applyAttrs(fd: int, attrs: dict[str, Any]) -> None:
    """Apply SFTP attributes to an open descriptor; ownership only to what it is."""
    if "uid" in attrs or "gid" in attrs:
        info = os.fstat(fd)
        if attrs.get("uid", info.st_uid) != info.st_uid or attrs.get("gid", info.st_gid) != info.st_gid:
            raise PermissionError(errno.EPERM, "Files here cannot change owner.")
    if "size" in attrs:
        os.ftruncate(fd, int(attrs["size"]))
    if "permissions" in attrs:
        os.fchmod(fd, int(attrs["permissions"]) & 0o7777 & ~0o6000)  # no set-id bits
    if "atime" in attrs and "mtime" in attrs:
        os.utime(fd, (int(attrs["atime"]), int(attrs["mtime"])))


@implementer(ISFTPFile)
class JailedFile:
    """An open regular file."""

    def __init__(self, server: JailedSFTPServer, fd: int) -> None:
        self.server = server
        self.fd = fd

    def readChunk(self, offset: int, length: int) -> Deferred[bytes]:
        return self.server._guard(self._read, offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, min(length, MAX_CHUNK), offset)
        if not data and length:
            raise EOFError("")
        self.server.metrics.read(len(data))
        return data

    def writeChunk(self, offset: int, data: bytes) -> Deferred[None]:
        return self.server._guard(self._write, offset, data)

    def _write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            self.server.metrics.written(written)
            view, offset = view[written:], offset + written

    def getAttrs(self) -> Deferred[dict[str, int]]:
        return self.server._guard(lambda: _attrs(os.fstat(self.fd)))

    def setAttrs(self, attrs: dict[str, Any]) -> Deferred[None]:
        return self.server._guard(_applyAttrs, self.fd, attrs)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.server._released()
            os.close(fd)


class JailedDirectory:
    """An open directory: iterates ``(name, long name, attributes)``."""

    def __init__(self, server: JailedSFTPServer, fd: int) -> None:
        self.server = server
        self.fd = fd
        self._entries: Iterator[tuple[bytes, os.stat_result]] = server.jail.listing(fd)

    def __iter__(self) -> JailedDirectory:
        return self

    def __next__(self) -> tuple[bytes, bytes, dict[str, int]]:
        name, info = next(self._entries)
        return name, lsLine(os.fsdecode(name), info).encode("utf-8", "replace"), _attrs(info)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.server._released()
            os.close(fd)


@implementer(ISFTPServer)
class JailedSFTPServer:
    """
    SFTP over ``jail``; ``access`` is asked before every operation.

    File operations are ordinary (blocking) system calls in the reactor's
    thread: local disk, small requests.
    """

    log = Logger()
    #: ISFTPServer's: the avatar (the connection's ``StorageUser``), set by whoever knows it.
    avatar: Any = None

    def __init__(self, jail: Jail, access: IAccess, *, maxHandles: int = MAX_HANDLES, metrics: FileServerMetrics | None = None) -> None:
        self.jail = jail
        self.access = access
        self.maxHandles = maxHandles
        self.handles = 0
        #: Where bytes read and written and files removed are counted.
        self.metrics = metrics if metrics is not None else FileServerMetrics()

    # -- helpers ---------------------------------------------------------------------------------------

    def _guard(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        d = self.access.check()
        d.addCallback(lambda _: work(*args))
        return d  # type: ignore[return-value]

    def _taken(self) -> None:
        if self.handles >= self.maxHandles:
            raise OSError(errno.EMFILE, f"At most {self.maxHandles} files may be open at once.")
        self.handles += 1

    def _released(self) -> None:
        self.handles -= 1

    def _resolve(self, path: bytes, follow: bool = True) -> Resolved:
        return self.jail.resolve(path, follow=follow)

    # -- ISFTPServer ---------------------------------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return {b"posix-rename@openssh.com": b"1", b"statvfs@openssh.com": b"2"}

    def openFile(self, filename: bytes, flags: int, attrs: dict[str, Any]) -> Deferred[JailedFile]:
        return self._guard(self._openFile, filename, flags, attrs)

    def _openFile(self, filename: bytes, flags: int, attrs: dict[str, Any]) -> JailedFile:
        if flags & FXF_READ and flags & FXF_WRITE:
            osFlags = os.O_RDWR
        elif flags & FXF_WRITE:
            osFlags = os.O_WRONLY
        else:
            osFlags = os.O_RDONLY
        if flags & FXF_APPEND:
            osFlags |= os.O_APPEND
        if flags & FXF_CREAT:
            osFlags |= os.O_CREAT
        if flags & FXF_TRUNC:
            osFlags |= os.O_TRUNC
        if flags & FXF_EXCL:
            osFlags |= os.O_EXCL
        osFlags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        self._taken()
        try:
            with self._resolve(filename) as where:
                fd = os.open(where.name, osFlags, _mode(attrs, 0o666), dir_fd=where.dirfd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise IsADirectoryError(errno.EISDIR, "Not a regular file.")
        except BaseException:
            self._released()
            raise
        return JailedFile(self, fd)

    def removeFile(self, filename: bytes) -> Deferred[None]:
        def work() -> None:
            with self._resolve(filename, follow=False) as where:
                os.unlink(where.name, dir_fd=where.dirfd)
            self.metrics.removed()

        return self._guard(work)

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred[None]:
        return self._guard(self._rename, oldpath, newpath, False)

    def _rename(self, oldpath: bytes, newpath: bytes, replace: bool) -> None:
        with self._resolve(oldpath, follow=False) as old, self._resolve(newpath, follow=False) as new:
            if not replace:
                try:
                    os.stat(new.name, dir_fd=new.dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise FileExistsError(errno.EEXIST, "The new name exists.")
            os.rename(old.name, new.name, src_dir_fd=old.dirfd, dst_dir_fd=new.dirfd)

    def makeDirectory(self, path: bytes, attrs: dict[str, Any]) -> Deferred[None]:
        def work() -> None:
            with self._resolve(path, follow=False) as where:
                os.mkdir(where.name, _mode(attrs, 0o777), dir_fd=where.dirfd)

        return self._guard(work)

    def removeDirectory(self, path: bytes) -> Deferred[None]:
        def work() -> None:
            with self._resolve(path, follow=False) as where:
                os.rmdir(where.name, dir_fd=where.dirfd)

        return self._guard(work)

    def openDirectory(self, path: bytes) -> Deferred[JailedDirectory]:
        def work() -> JailedDirectory:
            self._taken()
            try:
                with self._resolve(path) as where:
                    fd = os.open(where.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where.dirfd)
            except BaseException:
                self._released()
                raise
            return JailedDirectory(self, fd)

        return self._guard(work)

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred[dict[str, int]]:
        def work() -> dict[str, int]:
            with self._resolve(path, follow=bool(followLinks)) as where:
                return _attrs(os.stat(where.name, dir_fd=where.dirfd, follow_symlinks=False))

        return self._guard(work)

    def setAttrs(self, path: bytes, attrs: dict[str, Any]) -> Deferred[None]:
        def work() -> None:
            flags = (os.O_WRONLY if "size" in attrs else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
            with self._resolve(path) as where:
                fd = os.open(where.name, flags, dir_fd=where.dirfd)
            try:
                _applyAttrs(fd, attrs)
            finally:
                os.close(fd)

        return self._guard(work)

    def readLink(self, path: bytes) -> Deferred[bytes]:
        def work() -> bytes:
            with self._resolve(path, follow=False) as where:
                return os.readlink(where.name, dir_fd=where.dirfd)

        return self._guard(work)

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> Deferred[None]:
        # OpenSSH's order, which sshfs and sftp send: the target first.
        target, link = linkPath, targetPath

        def work() -> None:
            with self._resolve(link, follow=False) as where:
                checkLinkTarget(where.parents, target)
                os.symlink(target, where.name, dir_fd=where.dirfd)

        return self._guard(work)

    def realPath(self, path: bytes) -> Deferred[bytes]:
        def work() -> bytes:
            with self._resolve(path) as where:
                return where.path

        return self._guard(work)

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> Deferred[bytes | None]:
        if extendedName == b"posix-rename@openssh.com":
            old, rest = getNS(extendedData)
            new, _ = getNS(rest)
            return self._guard(lambda: self._rename(old, new, True))
        if extendedName == b"statvfs@openssh.com":
            path, _ = getNS(extendedData)
            return self._guard(self._statvfs, path)
        raise NotImplementedError(f"extension {extendedName.decode('ascii', 'replace')} is not supported")

    def _statvfs(self, path: bytes) -> bytes:
        with self._resolve(path) as where:
            fd = os.open(where.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=where.dirfd)
        try:
            v = os.fstatvfs(fd)
        finally:
            os.close(fd)
        return struct.pack(
            "!11Q", v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree,
            v.f_favail, v.f_fsid, v.f_flag & 3, v.f_namemax,
        )  # fmt: skip


# Conch's server logs every packet at info level: keep only its warnings.
_quiet = FilteringLogObserver(globalLogPublisher, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])


class SFTPSubsystem(filetransfer.FileTransferServer):
    """Conch's SFTP protocol, over a given server, quiet, answering extensions as OpenSSH does."""

    _log = Logger(namespace="dit4c.fileserver.sftp", observer=_quiet)

    def __init__(self, server: JailedSFTPServer, onClosed: Callable[[], object] = lambda: None) -> None:
        """:param onClosed: called once when the session ends (its connection's count of sessions)."""
        filetransfer.FileTransferBase.__init__(self)
        self.client = server
        self.openFiles = {}
        self.openDirs = {}
        self._metrics = server.metrics
        self._open = False
        self._onClosed: Callable[[], object] | None = onClosed

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self._open:
            self._open = True
            self._metrics.sessionOpened()

    def connectionLost(self, reason: Any = None) -> None:
        # Conch can say so twice (the channel closed by the server, then its close confirmed).
        if self._open:
            self._open = False
            self._metrics.sessionClosed()
        if self._onClosed is not None:
            ended, self._onClosed = self._onClosed, None
            ended()
        super().connectionLost(reason)

    def _cbExtended(self, data: bytes | None, requestId: bytes) -> None:
        if data is None:
            # posix-rename and the like answer with a status, as OpenSSH does.
            self._sendStatus(requestId, filetransfer.FX_OK, b"ok")
        else:
            self.sendPacket(filetransfer.FXP_EXTENDED_REPLY, requestId + data)

    def _ebStatus(self, reason: Any, requestId: bytes, msg: bytes = b"request failed") -> None:
        value = reason.value
        if isinstance(value, OSError) and value.errno not in (errno.ENOENT, errno.EACCES, errno.EEXIST):
            # Expected refusals (not a directory, not empty, ...): a status
            # with the reason, not a logged traceback.
            code = filetransfer.FX_PERMISSION_DENIED if value.errno == errno.EPERM else filetransfer.FX_FAILURE
            self._sendStatus(requestId, code, (value.strerror or msg.decode()).encode("utf-8", "replace"))
            return
        super()._ebStatus(reason, requestId, msg)

