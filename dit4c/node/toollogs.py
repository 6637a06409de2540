"""
A tool's output, read in chunks for the portal's log view (docs/protocols.md
7.6): from a byte offset on, or the last so many bytes. The process runtime
reads the pod's ``tool.log``; the podman runtime asks podman for the tool
container's output and reads the same way from that.
"""

from __future__ import annotations

import os
from pathlib import Path

from dit4c.channel.wire import LogChunk

__all__ = ["mergeTimestamped", "readChunk"]


def readChunk(path: Path, offset: int | None, limit: int) -> LogChunk:
    """
    Up to ``limit`` bytes of the file at ``path`` from ``offset`` (None: its
    last ``limit`` bytes). A file that is not there yet is empty. Blocking:
    call it in a thread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return LogChunk(0, 0, "")
    try:
        start = LogChunk.startOf(os.fstat(fd).st_size, offset, limit)
        return LogChunk.fromBytes(start, os.pread(fd, limit, start))
    finally:
        os.close(fd)


def mergeTimestamped(out: bytes, err: bytes) -> bytes:
    """
    Standard output and standard error, each line led by an RFC 3339
    timestamp (``podman logs --timestamps``), as one output in time order
    with the timestamps taken off: what a terminal would have shown.
    """
    lines = [(line.split(b" ", 1) + [b""])[:2] for line in (out.splitlines() + err.splitlines()) if line]
    lines.sort(key=lambda pair: pair[0])  # the same width and zone for every line of one podman
    return b"".join(text + b"\n" for _, text in lines)
