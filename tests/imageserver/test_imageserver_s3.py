"""
The image server with its images in an S3-compatible object store
(:class:`dit4c.imageserver.s3.S3Storage`), against moto's S3 server in a
subprocess, through a real image server asking a real portal: the same
behaviours as the directory storage's, and the plugin's S3 options.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_twisted
import treq
from imageserver_client import (
    SECRET,
    HashingConsumer,
    PatternBody,
    World,
    bearer,
    get,
    peakRSS,
    put,
    readAll,
    resetPeakRSS,
    stored,
    urlOf,
)
from support.backend import PATTERN, patternDigest
from support.sockets import RawClient, refusedPort
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from zope.interface.verify import verifyObject

from dit4c.imageserver.errors import DigestMismatch, NotFound
from dit4c.imageserver.s3 import S3Storage
from dit4c.imageserver.storage import IImageStorage, IImageWriter
from dit4c.imageserver.tap import Options, makeService

MiB = 1024 * 1024
ACCESS_KEY = "dit4c-access-" + uuid.uuid4().hex
SECRET_KEY = "dit4c-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="session")
def s3endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server, in its own process (its memory is not this process's), on the port it got."""
    logPath = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(logPath, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # A plain (session) fixture: the wait blocks, with a deadline.
        deadline = time.monotonic() + 30
        while not (running := re.search(r"Running on (http://127\.0\.0\.1:\d+)", logPath.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start:\n{logPath.read_text(errors='replace')}")
            time.sleep(0.1)
        yield running.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def newBucket(endpoint: str) -> str:
    bucket = "dit4c-images-" + uuid.uuid4().hex[:12]
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)
    return bucket


class RecordingClient:
    """A boto3 client that notes the thread of every call."""

    def __init__(self, client: Any) -> None:
        self.raw = client
        self.calls: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.raw, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.current_thread() is threading.main_thread()))
            return attribute(*args, **kwargs)

        return call


@pytest.fixture
def s3(s3endpoint: str, tmp_path: Path) -> Iterator[Any]:
    """Make S3 storages, each with a bucket of its own; closed at the end."""
    made: list[S3Storage] = []

    def make(**kwargs: Any) -> S3Storage:
        kwargs.setdefault("prefix", "images/")
        storage = S3Storage(
            reactor, bucket=newBucket(s3endpoint), spool=tmp_path / f"spool{len(made)}", endpoint=s3endpoint,
            accessKey=ACCESS_KEY, secretKey=SECRET_KEY, **kwargs,
        )  # fmt: skip
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


# -- the storage on its own ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_s3_storage(s3: Any) -> None:
    storage: S3Storage = s3(partSize=5 * MiB)
    verifyObject(IImageStorage, storage)
    storage.spool.mkdir(parents=True)
    (storage.spool / "crashed.part").write_bytes(b"x")
    await storage.prepare()
    assert stored(storage) == []

    data = PATTERN * 200  # 12.5 MiB: three parts of a multipart upload
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not await storage.exists(digest) and await storage.size(digest) is None
    writer = storage.begin(digest)
    verifyObject(IImageWriter, writer)
    for i in range(0, len(data), MiB):
        writer.write(data[i : i + MiB])
    # Spooled locally; not in the store until committed.
    assert stored(storage) == [f"tmp/{p.name}" for p in storage.spool.iterdir()] and len(stored(storage)) == 1
    committed = await writer.commit()
    assert (committed.digest, committed.size, committed.created) == (digest, len(data), True)
    assert stored(storage) == [digest[7:]]
    head = storage.client.head_object(Bucket=storage.bucket, Key=f"images/sha256/{digest[7:]}")
    assert head["ContentLength"] == len(data)
    assert await storage.size(digest) == len(data)
    assert await readAll(storage, digest, 0, len(data)) == data
    assert await readAll(storage, digest, MiB - 3, 10) == data[MiB - 3 : MiB + 7]
    with pytest.raises(NotFound):
        await readAll(storage, "sha256:" + "0" * 64, 0, 1)

    # Again: kept as it is (no second upload), the spooled copy dropped.
    writer = storage.begin(digest)
    writer.write(data)
    assert (await writer.commit()).created is False
    assert stored(storage) == [digest[7:]]
    # Another image's bytes, or aborted: nothing stored.
    other = "sha256:" + hashlib.sha256(b"other").hexdigest()
    writer = storage.begin(other)
    writer.write(b"not other")
    with pytest.raises(DigestMismatch):
        await writer.commit()
    writer = storage.begin(other)
    writer.write(b"other")
    writer.abort()
    writer.abort()
    assert stored(storage) == [digest[7:]]

    assert await storage.delete(digest) is True
    assert await storage.delete(digest) is False
    assert stored(storage) == []


@pytest_twisted.ensureDeferred
async def test_a_50_mib_image_goes_in_and_out_without_being_held_in_memory(s3: Any) -> None:
    storage: S3Storage = s3()
    await storage.prepare()
    n = 50 * MiB
    digest = "sha256:" + patternDigest(n)
    fresh = resetPeakRSS()
    if not fresh:
        pytest.skip("the peak resident set cannot be reset here")
    before = peakRSS()
    writer = storage.begin(digest)
    for _ in range(n // len(PATTERN)):
        writer.write(PATTERN)
    committed = await writer.commit()
    assert committed.created and committed.size == n
    consumer = HashingConsumer()
    await storage.read(digest, consumer, 0, n)
    assert (consumer.digest, consumer.size) == (digest, n)
    # It paused after every chunk: at most one chunk at a time.
    assert consumer.pauses >= n // consumer.largestWrite
    after = peakRSS()
    assert after - before < 24 * MiB, (before, after)


# -- through the image server ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upload_download_range_and_delete(world: World, s3: Any, logged: list[str]) -> None:
    w = world
    storage: S3Storage = s3(partSize=5 * MiB)
    recording = RecordingClient(storage.client)
    storage.client = recording
    server = await w.imageServer(storage=storage)
    body = PatternBody(12 * MiB + 5)
    token = w.uploadToken(body.digest)
    response, answer = await put(server, body.digest, body, token)
    assert response.code == 201, answer
    url = urlOf(server, f"/images/{body.digest}")
    assert answer == {"digest": body.digest, "size": 12 * MiB + 5, "url": url}
    assert stored(server) == [body.digest[7:]]
    head = recording.raw.head_object(Bucket=storage.bucket, Key=f"images/sha256/{body.digest[7:]}")
    assert head["ContentLength"] == 12 * MiB + 5

    # The same image again: 200, no second copy.
    response, again = await put(server, body.digest, PatternBody(12 * MiB + 5), w.uploadToken(body.digest))
    assert (response.code, again) == (200, answer)
    assert stored(server) == [body.digest[7:]]

    await w.store.createImage("Saved", url, owner_id=w.alice.id, digest=body.digest)
    _, aliceToken = await w.store.createApiToken(w.alice.id, "cli")
    response, digest, size = await get(server, body.digest, **bearer(aliceToken))
    assert (response.code, digest, size) == (200, body.digest, 12 * MiB + 5)
    assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert response.headers.getRawHeaders("x-dit4c-digest") == [body.digest]
    assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]
    assert response.headers.getRawHeaders("last-modified")
    assert response.length == 12 * MiB + 5
    response, _, size = await get(server, body.digest, "HEAD", **bearer(aliceToken))
    assert (response.code, size) == (200, 0)
    assert response.headers.getRawHeaders("content-length") == [str(12 * MiB + 5)]
    # Ranges: one, from the end, past the end.
    response = await treq.get(url, headers={**bearer(aliceToken), "Range": "bytes=65536-65545"})
    assert response.code == 206
    assert response.headers.getRawHeaders("content-range") == [f"bytes 65536-65545/{12 * MiB + 5}"]
    assert await response.content() == PATTERN[:10]
    response = await treq.get(url, headers={**bearer(aliceToken), "Range": "bytes=-5"})
    assert (response.code, await response.content()) == (206, PATTERN[:5])
    response = await treq.get(url, headers={**bearer(aliceToken), "Range": f"bytes={12 * MiB + 5}-"})
    assert response.code == 416
    assert response.headers.getRawHeaders("content-range") == [f"bytes */{12 * MiB + 5}"]
    await response.content()

    # A download broken off midway stops reading the object.
    client = RawClient()
    port = server.listeners[0].port.getHost().port  # type: ignore[union-attr]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"GET /images/{body.digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {aliceToken}\r\n\r\n".encode()
    )
    await eventually(lambda: len(client.received) > MiB)
    client.transport.abortConnection()  # type: ignore[attr-defined]
    await client.done

    # The owner deletes it: the object is gone, then 404.
    response = await treq.delete(url, headers=bearer(aliceToken))
    assert response.code == 204
    assert stored(server) == []
    response, _, _ = await get(server, body.digest, **bearer(aliceToken))
    assert response.code == 404
    response = await treq.delete(url, headers=bearer(aliceToken))
    assert response.code == 404

    # Every call the server made to the store ran off the reactor's thread
    # (list_objects_v2 is this test's own, in stored()).
    calls = [(name, main) for name, main in recording.calls if name != "list_objects_v2"]
    assert {"head_object", "upload_file", "get_object", "delete_object"} <= {name for name, _ in calls}
    assert not [name for name, main in calls if main], calls
    text = "\n".join(logged)
    for secret in (SECRET, SECRET_KEY, token, aliceToken):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_a_digest_mismatch_stores_nothing(world: World, s3: Any) -> None:
    w = world
    server = await w.imageServer(storage=s3())
    claimed = PatternBody(MiB).digest
    response, answer = await put(server, claimed, PatternBody(MiB + 1), w.uploadToken(claimed))
    assert (response.code, answer["error"]) == (400, "digest_mismatch")
    assert answer["received"] == PatternBody(MiB + 1).digest
    assert stored(server) == []


@pytest_twisted.ensureDeferred
async def test_an_upload_that_breaks_off_stores_nothing(world: World, s3: Any, logged: list[str]) -> None:
    w = world
    server = await w.imageServer(storage=s3())
    digest = PatternBody(10 * MiB).digest
    client = RawClient()
    port = server.listeners[0].port.getHost().port  # type: ignore[union-attr]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"PUT /images/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n"
        f"Authorization: Bearer {w.uploadToken(digest)}\r\n\r\n".encode()
    )
    for _ in range(32):
        client.transport.write(PATTERN)
    # The upload is under way: spooled to a local temporary file.
    await eventually(lambda: any(name.startswith("tmp/") for name in stored(server)))
    client.transport.abortConnection()  # type: ignore[attr-defined]
    await client.done
    await eventually(lambda: stored(server) == [])
    assert any("broke off after" in line for line in logged)


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_be_reached_is_a_500(world: World, tmp_path: Path, logged: list[str]) -> None:
    w = world
    with refusedPort() as closed:
        storage = S3Storage(
            reactor, bucket="dit4c-images", spool=tmp_path / "spool", endpoint=f"http://127.0.0.1:{closed}",
            accessKey=ACCESS_KEY, secretKey=SECRET_KEY,
        )  # fmt: skip
        try:
            server = await w.imageServer(storage=storage)
            # Start-up says so (and serves anyway: the store may come back).
            await eventually(lambda: any("cannot be used" in line for line in logged))
            body = PatternBody(1000)
            response, answer = await put(server, body.digest, body, w.uploadToken(body.digest))
            assert (response.code, answer["error"]) == (500, "server_error")
            assert list(storage.spool.iterdir()) == []
        finally:
            storage.close()
    text = "\n".join(logged)
    assert SECRET_KEY not in text


# -- the plugin's options --------------------------------------------------------------------------


def test_s3_options(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 16 + "\n")
    access = tmp_path / "access"
    access.write_text(ACCESS_KEY + "\n")
    secretKey = tmp_path / "secret-key"
    secretKey.write_text(f"  {SECRET_KEY}\n")
    base = ["--portal", "http://p", "--secret-file", str(secret)]
    s3 = [
        "--storage", "s3", "--s3-endpoint", "http://127.0.0.1:9000/", "--s3-bucket", "dit4c-images",
        "--s3-access-key-file", str(access), "--s3-secret-key-file", str(secretKey),
    ]  # fmt: skip
    options = Options()
    options.parseOptions(base + s3)
    assert options["storage"] == "s3"
    assert (options["s3-endpoint"], options["s3-bucket"], options["s3-region"]) == ("http://127.0.0.1:9000", "dit4c-images", "us-east-1")
    assert (options["s3-access-key"], options["s3-secret-key"], options["s3-prefix"]) == (ACCESS_KEY, SECRET_KEY, "")
    options = Options()
    options.parseOptions(base + s3 + ["--s3-region", "eu-west-1", "--s3-prefix", "images"])
    assert (options["s3-region"], options["s3-prefix"]) == ("eu-west-1", "images/")
    # The default stays the directory.
    options = Options()
    options.parseOptions(base)
    assert options["storage"] == "directory"

    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args in (
        ["--storage", "s3"],
        ["--storage", "s3", "--s3-bucket", "b", "--s3-access-key-file", str(access)],
        ["--storage", "s3", "--s3-bucket", "b", "--s3-secret-key-file", str(secretKey)],
        ["--storage", "s3", "--s3-access-key-file", str(access), "--s3-secret-key-file", str(secretKey)],
        s3 + ["--s3-access-key-file", str(tmp_path / "missing")],
        s3 + ["--s3-secret-key-file", str(empty)],
        s3 + ["--s3-endpoint", "127.0.0.1:9000"],
        ["--storage", "tape"],
        ["--s3-bucket", "b"],
    ):
        with pytest.raises(usage.UsageError) as raised:
            Options().parseOptions(base + args)
        assert SECRET_KEY not in str(raised.value) and ACCESS_KEY not in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_the_plugin_serves_from_s3(world: World, s3endpoint: str, logged: list[str]) -> None:
    w = world
    bucket = newBucket(s3endpoint)
    secret = w.tmp / "image-server.secret"
    secret.write_text(SECRET + "\n")
    access = w.tmp / "access"
    access.write_text(ACCESS_KEY + "\n")
    secretKey = w.tmp / "secret-key"
    secretKey.write_text(SECRET_KEY + "\n")
    options = Options()
    options.parseOptions([
        "--portal", w.portalURL, "--secret-file", str(secret), "--listen", "tcp:0:interface=127.0.0.1",
        "--data-dir", str(w.tmp / "images"), "--storage", "s3", "--s3-endpoint", s3endpoint,
        "--s3-bucket", bucket, "--s3-access-key-file", str(access), "--s3-secret-key-file", str(secretKey),
        "--s3-prefix", "images/",
    ])  # fmt: skip
    service: Any = makeService(options, reactor)
    assert isinstance(service.storage, S3Storage)
    assert SECRET_KEY not in repr(service.storage)
    service.startService()
    w.servers.append(service)
    await eventually(lambda: any("storing images in" in line for line in logged))
    body = PatternBody(MiB + 1)
    response, answer = await put(service, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201, answer
    assert stored(service) == [body.digest[7:]]
    assert (w.tmp / "images" / "tmp").is_dir() and not (w.tmp / "images" / "sha256").exists()
    text = "\n".join(logged)
    for value in (SECRET, SECRET_KEY):
        assert value not in text
