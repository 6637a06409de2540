"""The directory storage, the routing of request targets, and the plugin's options, without a network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import pytest_twisted
from imageserver_client import readAll
from twisted.python import usage
from zope.interface.verify import verifyObject

from dit4c.imageserver.errors import BadDigest, DigestMismatch, MethodNotAllowed, NotFound
from dit4c.imageserver.storage import DirectoryStorage, IImageStorage, IImageWriter, parseDigest
from dit4c.imageserver.tap import Options
from dit4c.imageserver.web import route


def digestOf(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_directory_storage(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "images")
    verifyObject(IImageStorage, storage)
    (tmp_path / "images" / "tmp").mkdir(parents=True)
    (tmp_path / "images" / "tmp" / "crashed.part").write_bytes(b"x")
    await storage.prepare()
    assert list((tmp_path / "images" / "tmp").iterdir()) == []

    data = b"an image" * 1000
    digest = digestOf(data)
    assert not await storage.exists(digest) and await storage.size(digest) is None
    writer = storage.begin(digest)
    verifyObject(IImageWriter, writer)
    writer.write(data[:100])
    writer.write(data[100:])
    # Not readable until committed.
    assert not await storage.exists(digest)
    committed = await writer.commit()
    assert (committed.digest, committed.size, committed.created) == (digest, len(data), True)
    assert storage.path(digest) == tmp_path / "images" / "sha256" / digest[7:]
    with storage.open(digest) as f:
        assert f.read() == data
    assert await storage.size(digest) == len(data)
    info = await storage.stat(digest)
    assert info is not None and info.size == len(data) and info.modified
    # Read through a consumer, all or part.
    assert await readAll(storage, digest, 0, len(data)) == data
    assert await readAll(storage, digest, 5, 10) == data[5:15]
    with pytest.raises(NotFound):
        await readAll(storage, digestOf(b"missing"), 0, 1)

    # Again: kept as it is, the copy dropped.
    writer = storage.begin(digest)
    writer.write(data)
    assert (await writer.commit()).created is False
    # Another image's bytes: nothing stored.
    writer = storage.begin(digestOf(b"other"))
    writer.write(b"not other")
    with pytest.raises(DigestMismatch):
        await writer.commit()
    assert not await storage.exists(digestOf(b"other"))
    # Aborted: nothing stored.
    writer = storage.begin(digestOf(b"other"))
    writer.write(b"other")
    writer.abort()
    writer.abort()
    assert list(storage.temporaries.iterdir()) == []
    assert not await storage.exists(digestOf(b"other"))

    assert await storage.delete(digest) is True
    assert await storage.delete(digest) is False
    assert not await storage.exists(digest)
    await storage.close()


def test_digests_and_routes() -> None:
    good = "sha256:" + "0a" * 32
    assert parseDigest(good) == "0a" * 32
    for bad in ("sha256:" + "0A" * 32, "sha256:" + "0a" * 31, "sha512:" + "0a" * 64, "0a" * 32, "", good + "/"):
        with pytest.raises(BadDigest):
            parseDigest(bad)
    assert route(b"GET", b"/health") == ("health", None)
    assert route(b"GET", f"/images/{good}?x=1".encode()) == ("image", good)
    assert route(b"PUT", f"/images/sha256%3A{'0a' * 32}".encode()) == ("image", good)
    with pytest.raises(NotFound):
        route(b"GET", b"/images")
    with pytest.raises(MethodNotAllowed):
        route(b"POST", f"/images/{good}".encode())
    with pytest.raises(BadDigest):
        route(b"GET", b"/images/../etc/passwd")


def test_options(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 16 + "\n")
    options = Options()
    options.parseOptions(["--portal", "http://127.0.0.1:8000", "--secret-file", str(secret)])
    assert options["listen"] == ["tcp:8600:interface=127.0.0.1"]
    assert options["public-url"] == "http://127.0.0.1:8600"
    assert options["secret"] == "s" * 16
    assert options["max-size"] == 20 * 1024**3
    options = Options()
    options.parseOptions([
        "--portal", "https://portal.example.org/", "--secret-file", str(secret), "--listen", "tcp:9000",
        "--listen", "tcp:9001", "--max-size", "1000", "--portal-timeout", "2.5",
    ])  # fmt: skip
    assert (options["public-url"], options["max-size"], options["portal-timeout"]) == ("http://127.0.0.1:9000", 1000, 2.5)
    options = Options()
    options.parseOptions(["--portal", "http://p", "--secret-file", str(secret), "--listen", "tcp:0"])
    assert options["public-url"] is None

    short = tmp_path / "short"
    short.write_text("too short")
    for args in (
        [],
        ["--secret-file", str(secret)],
        ["--portal", "http://p"],
        ["--portal", "ftp://p", "--secret-file", str(secret)],
        ["--portal", "http://p", "--secret-file", str(short)],
        ["--portal", "http://p", "--secret-file", str(tmp_path / "missing")],
        ["--portal", "http://p", "--secret-file", str(secret), "--listen", "nonsense:1"],
        ["--portal", "http://p", "--secret-file", str(secret), "--max-size", "0"],
        ["--portal", "http://p", "--secret-file", str(secret), "--public-url", "images.example.org"],
    ):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(args)
