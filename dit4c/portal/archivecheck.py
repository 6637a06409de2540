"""
Whether a file a person uploads is a saved image, read as it streams past
(:class:`ArchiveCheck`), without holding it: only the tar headers, and the
few small members that say what the image is, are looked at.

A saved image is what a node's runtime captured (docs/protocols.md 9.2) and
a download gives back:

- the ``process`` runtime's archive: a tar whose first member is
  ``.dit4c-image.json`` (``{"format": "dit4c-process-archive/1", "tool":
  <the catalogue entry's ref>}``), which names its tool;
- the ``podman`` runtime's OCI archive (``podman save --format
  oci-archive``): a tar with ``oci-layout`` and ``index.json``, which names
  no catalogue entry (the uploader chooses it).

Every header's checksum is checked, and the archive must end as a tar ends
(a zero block, then only zeros, in whole blocks): a truncated file, or one
whose headers were damaged, is refused. Damage inside a member's bytes
shows only in the digest (the uploader may send the one the download named).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["PROCESS_FORMAT", "ArchiveCheck", "NotAnImage", "SavedImageKind"]

BLOCK = 512
#: The format the process runtime writes (dit4c.node.processarchive.IMAGE_FORMAT).
PROCESS_FORMAT = "dit4c-process-archive/1"
PROCESS_METADATA = ".dit4c-image.json"
#: Members read whole (they say what the archive is); anything larger is skipped.
_KEPT = {PROCESS_METADATA: 64 * 1024, "oci-layout": 4096, "index.json": 1024 * 1024}
#: Types whose size is the length of data that follows the header (tarfile's rule: links and devices have none).
_NO_DATA = frozenset(b"123456")
#: GNU long names and pax headers: the next member's name may be in their data.
_NAME_CARRIERS = frozenset(b"LxX")


class NotAnImage(Exception):
    """The file is not a saved image; ``reason`` says why, for the person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SavedImageKind:
    """What the archive turned out to be: ``process`` (and its tool's ref) or ``oci``."""

    format: str
    tool: str | None


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise NotAnImage(f"The file is not a saved image: a tar header's {what} is damaged.") from None


class ArchiveCheck:
    """Feed it the file's bytes in order (:meth:`feed`), then :meth:`finish`; either raises :class:`NotAnImage`."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: Bytes of the current member's data still to come (padded to whole blocks).
        self._skip = 0
        self._member: str | None = None
        self._memberSize = 0
        self._kept: bytearray | None = None
        self._longName: str | None = None
        self._carrier: int | None = None
        self._members = 0
        self._ended = False
        #: The first member (not a long name's or pax header's) was read whole: ``kind`` is set if it says so.
        self.firstMember = False
        self.size = 0
        self._found: dict[str, bytes] = {}
        self.kind: SavedImageKind | None = None

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self._ended:
            if data.strip(b"\0"):
                raise NotAnImage("The file is not a saved image: something follows the end of the archive.")
            return
        self._buffer += data
        while len(self._buffer) >= BLOCK or (self._skip and self._buffer):
            if self._skip:
                n = min(self._skip, len(self._buffer))
                if self._kept is not None:
                    self._kept += self._buffer[:n]
                del self._buffer[:n]
                self._skip -= n
                if self._skip == 0:
                    self._memberDone()
                continue
            block = bytes(self._buffer[:BLOCK])
            del self._buffer[:BLOCK]
            if not block.strip(b"\0"):
                self._ended = True
                rest = bytes(self._buffer)
                self._buffer.clear()
                self.size -= len(rest)
                self.feed(rest)
                return
            self._header(block)

    def _header(self, block: bytes) -> None:
        stored = _octal(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 32 * 8 + sum(block[156:])
        signed = sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 32 * 8
        if stored not in (unsigned, signed):
            raise NotAnImage("The file is not a saved image: a tar header is damaged (its checksum does not match).")
        size = _octal(block[124:136], "size")
        kind = block[156]
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345:500].strip(b"\0") and block[262:263] == b"\0":
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        text = self._longName or name.decode("utf-8", "replace")
        self._longName = None
        self._carrier = kind if kind in _NAME_CARRIERS else None
        self._member = text.removeprefix("./")
        data = 0 if kind in _NO_DATA else size
        self._memberSize = data
        keep = self._carrier is not None or (kind in b"07\0" and data <= _KEPT.get(self._member, -1))
        self._kept = bytearray() if keep else None
        if self._carrier is None:
            self._members += 1
        self._skip = (data + BLOCK - 1) // BLOCK * BLOCK
        if self._skip == 0:
            self._memberDone()

    def _memberDone(self) -> None:
        kept = bytes(self._kept[: self._memberSize]) if self._kept is not None else None
        self._kept = None
        if self._carrier is not None:
            if kept is not None:
                self._longName = self._nameFrom(self._carrier, kept)
            self._carrier = None
            return
        if kept is not None and self._member is not None:
            self._found.setdefault(self._member, kept)
        if self._members == 1 and self._member == PROCESS_METADATA:
            self.kind = self._process(kept)
        self.firstMember = True

    @staticmethod
    def _nameFrom(kind: int, data: bytes) -> str | None:
        if kind == ord("L"):
            return data.split(b"\0", 1)[0].decode("utf-8", "replace")
        for record in data.decode("utf-8", "replace").split("\n"):  # pax: "<len> key=value"
            _, _, pair = record.partition(" ")
            key, _, value = pair.partition("=")
            if key == "path":
                return value
        return None

    @staticmethod
    def _process(metadata: bytes | None) -> SavedImageKind:
        try:
            described = json.loads(metadata or b"")
        except ValueError:
            described = None
        if not isinstance(described, dict) or described.get("format") != PROCESS_FORMAT:
            raise NotAnImage(f"The file is not a saved image this portal knows: its {PROCESS_METADATA} is not one.")
        tool = described.get("tool")
        if not isinstance(tool, str) or not tool:
            raise NotAnImage("The saved image does not say which tool it is.")
        return SavedImageKind("process", tool)

    def finish(self) -> SavedImageKind:
        """What the whole file is; :class:`NotAnImage` if it is not a whole saved image."""
        if not self._ended or self._buffer or self._skip or self.size % BLOCK:
            raise NotAnImage(
                "The file is not a whole saved image: it ends before its archive does (truncated or damaged)."
            )
        if self.kind is not None:
            return self.kind
        layout = self._found.get("oci-layout")
        if layout is not None and "index.json" in self._found:
            try:
                version = json.loads(layout).get("imageLayoutVersion")
            except (ValueError, AttributeError):
                version = None
            if isinstance(version, str):
                self.kind = SavedImageKind("oci", None)
                return self.kind
        raise NotAnImage("The file is a tar archive, but not a saved image (no tool description, no OCI layout).")
