"""
A person's directory, and every path a client names resolved inside it.

The client sees its person's directory as ``/``. A path is resolved one
component at a time through directory file descriptors (``openat`` with
``O_NOFOLLOW``), the way ``openat2(RESOLVE_IN_ROOT)`` would: ``..`` is
taken from the descriptors already held (never from the file system), a
symbolic link is read and its target resolved again from the jail's root
(absolute targets) or from the link's directory (relative ones), and
nothing ever leaves the root. So a symbolic link that points out of the
directory (one planted by hand, or one a rename moved to where its relative
target climbs out) is never followed out, and a directory swapped for a
link between two steps makes the step fail rather than escape.

``..`` above the root is refused (``EACCES``), not clamped: a client that
asks for ``/../x`` is told no.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from dit4c.fileserver.errors import Escape

__all__ = ["Jail", "Resolved", "MAX_LINKS", "MAX_PATH", "checkLinkTarget", "splitPath"]

#: Symbolic links followed while resolving one path (Linux's own limit).
MAX_LINKS = 40
#: The longest path (bytes) and path component accepted.
MAX_PATH = 4096
MAX_NAME = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def splitPath(path: bytes) -> list[bytes]:
    """
    The components of ``path`` (``.`` and empty ones dropped, ``..`` kept).

    :raises PermissionError: a NUL byte, or a path or component too long.
    """
    if b"\0" in path:
        raise Escape("A path may not hold a NUL byte.")
    if len(path) > MAX_PATH:
        raise Escape(f"A path may have at most {MAX_PATH} bytes.")
    parts = [part for part in path.split(b"/") if part not in (b"", b".")]
    if any(len(part) > MAX_NAME for part in parts):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    return parts


def checkLinkTarget(parent: list[bytes], target: bytes) -> None:
    """
    Refuse a symbolic link target that leads out of the jail when read from
    a link in directory ``parent`` (components from the root): a relative
    target whose ``..`` climbs above the root. Absolute targets are read
    from the jail's root, so they stay in it.
    """
    if not target:
        raise OSError(errno.ENOENT, "A link needs a target.")
    where = [] if target.startswith(b"/") else list(parent)
    for part in splitPath(target):
        if part == b"..":
            if not where:
                raise Escape("The link would point out of your storage.")
            where.pop()
        else:
            where.append(part)


class Resolved:
    """
    Where a path led: an open descriptor of the directory holding the last
    component, and that component's name (``.`` for the directory itself).
    Close it (or use it as a context manager).
    """

    def __init__(self, dirfd: int, name: bytes, parents: list[bytes]) -> None:
        self.dirfd = dirfd
        self.name = name
        #: The directory's path from the root, as components.
        self.parents = parents

    @property
    def path(self) -> bytes:
        """The path from the jail's root, as the client sees it (``/a/b``)."""
        parts = self.parents if self.name == b"." else [*self.parents, self.name]
        return b"/" + b"/".join(parts)

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Jail:
    """Paths inside ``root`` (which must exist)."""

    def __init__(self, root: str | Path) -> None:
        self.root = os.fsencode(os.path.realpath(root))

    def resolve(self, path: bytes, *, follow: bool = True) -> Resolved:
        """
        Resolve ``path`` (a client path: ``/`` is the jail's root, relative
        paths are taken from the root too) to the directory that holds its
        last component. With ``follow``, a last component that is a symbolic
        link is followed (inside the jail) too. The last component need not
        exist; every other one must be a directory.

        :raises Escape: ``..`` above the root.
        :raises OSError: a component is missing, not a directory, or there
            are more than :data:`MAX_LINKS` links.
        """
        stack = list(reversed(splitPath(path)))
        fds = [os.open(self.root, _DIR_FLAGS)]
        names: list[bytes] = []
        links = 0
        kept = -1
        try:
            while stack:
                part = stack.pop()
                if part == b"..":
                    if not names:
                        raise Escape()
                    os.close(fds.pop())
                    names.pop()
                    continue
                last = not stack
                if last and not follow:
                    kept = fds[-1]
                    return Resolved(kept, part, list(names))
                try:
                    info = os.stat(part, dir_fd=fds[-1], follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        kept = fds[-1]
                        return Resolved(kept, part, list(names))
                    raise
                if stat.S_ISLNK(info.st_mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    target = os.readlink(part, dir_fd=fds[-1])
                    if target.startswith(b"/"):
                        while len(fds) > 1:
                            os.close(fds.pop())
                        names.clear()
                    stack.extend(reversed(splitPath(target)))
                    continue
                if last:
                    kept = fds[-1]
                    return Resolved(kept, part, list(names))
                if not stat.S_ISDIR(info.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                # O_NOFOLLOW: if it became a link since the stat, this fails.
                fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                names.append(part)
            kept = fds[-1]
            return Resolved(kept, b".", list(names))
        finally:
            for fd in fds:
                if fd != kept:
                    os.close(fd)

    def listing(self, dirfd: int) -> Iterator[tuple[bytes, os.stat_result]]:
        """The entries of the open directory ``dirfd`` (not ``.``, ``..``), not following links."""
        for name in os.listdir(dirfd):
            raw = os.fsencode(name)
            try:
                yield raw, os.stat(raw, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing
