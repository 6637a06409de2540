"""
The process runtime's saved images: a pod's working directory as a tar
archive whose first member (``.dit4c-image.json``) names the tool, written
and hashed in one pass; and such an archive unpacked into a new pod's
working directory, only plain files and directories, only inside it. Both
block: the runtime runs them in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from dit4c.node.errors import RuntimeError_

__all__ = ["IMAGE_FORMAT", "IMAGE_METADATA", "STORAGE_LINK", "packArchive", "unpackArchive"]

#: The member of a saved archive that says which tool it is.
IMAGE_METADATA = ".dit4c-image.json"
#: What ``capture`` writes: a tar of the working directory.
IMAGE_FORMAT = "dit4c-process-archive/1"
#: The link to the person's storage in a working directory: never saved (the storage is not the instance's).
STORAGE_LINK = "storage"


def packArchive(work: Path, archive: Path, tool: str) -> str:
    """Blocking: a tar of ``work`` with the metadata first (runs in a thread); its digest."""
    import io
    import tarfile

    temporary = archive.with_suffix(".partial")
    hashing = _Hashing(temporary.open("wb"))
    with hashing.raw, tarfile.open(fileobj=cast(Any, hashing), mode="w") as tar:
        metadata = json.dumps({"format": IMAGE_FORMAT, "tool": tool}).encode()
        info = tarfile.TarInfo(IMAGE_METADATA)
        info.size = len(metadata)
        info.mode = 0o600
        tar.addfile(info, io.BytesIO(metadata))
        for path in sorted(work.rglob("*")):
            if path.parent == work and (path.name == IMAGE_METADATA or (path.name == STORAGE_LINK and path.is_symlink())):
                continue
            tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
        tar.close()
    digest = f"sha256:{hashing.digest.hexdigest()}"
    temporary.replace(archive)
    return digest


class _Hashing:
    """A file written through, hashed on the way (one pass over a big archive, not two)."""

    def __init__(self, raw: Any) -> None:
        import hashlib

        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        written: int = self.raw.write(data)
        return written

    def tell(self) -> int:
        position: int = self.raw.tell()
        return position

    def close(self) -> None:
        pass  # the raw file is closed by its own context


def unpackArchive(archive: Path, work: Path) -> str:
    """
    Blocking: a saved archive into ``work``; the tool's name. Only plain
    files and directories inside ``work`` come out (tarfile's ``data``
    filter: no absolute paths, no ``..``, no links out, no devices).
    """
    import tarfile

    try:
        with tarfile.open(archive, "r") as tar:
            try:
                member = tar.extractfile(IMAGE_METADATA)
            except KeyError:
                member = None
            if member is None:
                raise RuntimeError_("The saved image says nothing of its tool.")
            metadata = json.loads(member.read())
            if metadata.get("format") != IMAGE_FORMAT or not isinstance(metadata.get("tool"), str):
                raise RuntimeError_("The saved image is not one this node can start.")
            tar.extractall(work, filter="data")
    except (tarfile.TarError, ValueError, KeyError) as e:
        raise RuntimeError_(f"The saved image could not be unpacked: {e}.") from None
    (work / IMAGE_METADATA).unlink(missing_ok=True)
    return str(metadata["tool"])
