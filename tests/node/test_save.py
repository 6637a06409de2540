"""
Saving and restoring on a node (process runtime): the working directory
captured as an archive, the upload helper run with what it needs, and an
instance started again from the archive, fetched and checked by digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import HELPERS, TOOLS, Watcher
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.node import Node
from dit4c.node.nodestart import UNPACKING, FetchProgress
from dit4c.node.process import IMAGE_METADATA, ProcessRuntime, _unpack

#: A stand-in upload helper: keeps a copy of the archive and what it was told, and succeeds.
UPLOAD = [
    sys.executable, "-c",
    "import json, os, shutil, pathlib;"
    "d = pathlib.Path(os.environ['DIT4C_IMAGE_FILE']).parent;"
    "shutil.copy(os.environ['DIT4C_IMAGE_FILE'], d / 'uploaded.tar');"
    "(d / 'upload.env').write_text(json.dumps(dict(os.environ)))",
]  # fmt: skip


def makeNode(directory: Path, **options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
    runtime = ProcessRuntime(reactor, directory, TOOLS, helpers=HELPERS, stopGrace=2)
    node = Node(reactor, runtime, directory, portal="http://localhost:8000", **options)
    watcher = Watcher()
    node.subscribe(watcher.observer())
    node.startService()
    return node, runtime, watcher


@pytest_twisted.async_yield_fixture
async def made(tmp_path: Path) -> Any:
    runtimes: list[ProcessRuntime] = []

    def make(**options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
        node, runtime, watcher = makeNode(tmp_path / "node", **options)
        runtimes.append(runtime)
        return node, runtime, watcher

    yield make
    for runtime in runtimes:
        for instance in list(runtime._pods):
            await runtime.discard(instance)


@pytest_twisted.ensureDeferred
async def test_save_captures_the_work_and_runs_the_upload_helper(made: Any, tmp_path: Path) -> None:
    node, runtime, watcher = made(imageServer="http://images.example:8600", uploadCommand=UPLOAD)
    await node.start("abc1", "web", None)
    await watcher.waitFor("abc1", "running")
    pod = tmp_path / "node" / "abc1"
    (pod / "work" / "results.csv").write_text("1,2,3\n")

    await node.save("abc1")
    await watcher.waitFor("abc1", "saved")
    assert watcher.history("abc1")[-4:] == ["stopping", "saving", "uploading", "saved"]

    told = json.loads((pod / "upload.env").read_text())
    uploaded = (pod / "uploaded.tar").read_bytes()
    assert told["DIT4C_IMAGE_SERVER"] == "http://images.example:8600"
    assert told["DIT4C_IMAGE_DIGEST"] == "sha256:" + hashlib.sha256(uploaded).hexdigest()
    assert told["DIT4C_INSTANCE"] == "abc1" and told["DIT4C_INSTANCE_KEY"] == str(pod / "instance.key")
    assert not Path(told["DIT4C_IMAGE_FILE"]).exists(), "the archive is removed once uploaded"
    with tarfile.open(fileobj=io.BytesIO(uploaded)) as tar:
        assert json.loads(tar.extractfile(IMAGE_METADATA).read())["tool"] == "web"  # type: ignore[union-attr]
        assert tar.extractfile("results.csv").read() == b"1,2,3\n"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_is_saved_as_it_is(made: Any, tmp_path: Path) -> None:
    node, runtime, watcher = made(imageServer="http://images.example:8600", uploadCommand=UPLOAD)
    await node.start("abc8", "web", None)
    await watcher.waitFor("abc8", "running")
    pod = tmp_path / "node" / "abc8"
    (pod / "work" / "results.csv").write_text("written before the stop\n")
    await node.stop("abc8")
    await watcher.waitFor("abc8", "stopped")

    await node.save("abc8")
    await watcher.waitFor("abc8", "saved")
    assert watcher.history("abc8")[-4:] == ["stopped", "saving", "uploading", "saved"]
    with tarfile.open(fileobj=io.BytesIO((pod / "uploaded.tar").read_bytes())) as tar:
        assert tar.extractfile("results.csv").read() == b"written before the stop\n"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_on_a_node_without_an_image_server_stays_stopped(made: Any) -> None:
    node, runtime, watcher = made()
    await node.start("abc9", "web", None)
    await watcher.waitFor("abc9", "running")
    await node.stop("abc9")
    await watcher.waitFor("abc9", "stopped")
    await node.save("abc9")
    stopped = watcher.states[-1]
    assert (stopped.instance, stopped.state) == ("abc9", "stopped")
    assert stopped.reason == "This compute node has no image server to save to."
    await node.resume("abc9")  # its files kept: it can still be resumed
    await eventually(lambda: watcher.history("abc9")[-1] == "running", 20, what=lambda: str(watcher.history("abc9")))


@pytest_twisted.ensureDeferred
async def test_a_failed_upload_errors_the_instance(made: Any) -> None:
    node, runtime, watcher = made(imageServer="http://images.example:8600", uploadCommand=[sys.executable, "-c", "raise SystemExit(3)"])
    await node.start("abc2", "web", None)
    await watcher.waitFor("abc2", "running")
    await node.save("abc2")
    errored = await watcher.waitFor("abc2", "errored")
    assert errored.reason is not None and "could not be uploaded" in errored.reason
    assert "exited with status 3" in errored.reason


@pytest_twisted.ensureDeferred
async def test_no_image_server_no_save(made: Any) -> None:
    node, runtime, watcher = made()
    await node.start("abc3", "web", None)
    await watcher.waitFor("abc3", "running")
    await node.save("abc3")
    errored = await watcher.waitFor("abc3", "errored")
    assert errored.reason == "This compute node has no image server to save to; the instance is stopped."


async def serveFiles(directory: Path) -> Any:
    root = Resource()
    root.putChild(b"images", File(str(directory)))
    return await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))


@pytest_twisted.ensureDeferred
async def test_restore_fetches_checks_and_unpacks(made: Any, tmp_path: Path) -> None:
    node, runtime, watcher = made(imageServer="http://unused", uploadCommand=UPLOAD)
    await node.start("abc4", "web", None)
    await watcher.waitFor("abc4", "running")
    (tmp_path / "node" / "abc4" / "work" / "notes.txt").write_text("written before the save")
    await node.save("abc4")
    await watcher.waitFor("abc4", "saved")
    served = tmp_path / "served"
    served.mkdir()
    archive = (tmp_path / "node" / "abc4" / "uploaded.tar").read_bytes()
    (served / "saved.tar").write_bytes(archive)
    digest = "sha256:" + hashlib.sha256(archive).hexdigest()
    port = await serveFiles(served)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/images/saved.tar"
        # A fresh instance from the saved image: the file is there, the tool runs.
        await node.start("abc5", url, None, digest, "read-token")
        await watcher.waitFor("abc5", "running")
        assert (tmp_path / "node" / "abc5" / "work" / "notes.txt").read_text() == "written before the save"
        # While it started, the person was told how far it had come.
        told = [s.reason for s in watcher.states if s.instance == "abc5" and s.state == "starting"]
        assert told == [None, "Fetching the saved image: 0.0 of 0.0 MB (100 %).", UNPACKING]  # a small image: one chunk
        assert [s.reason for s in watcher.states if s.instance == "abc5" and s.state == "running"] == [None]
        assert not (tmp_path / "node" / "abc5" / "work" / IMAGE_METADATA).exists()
        # Stopped and resumed: its own files as they were, the saved image neither fetched again nor unpacked over them.
        (tmp_path / "node" / "abc5" / "work" / "notes.txt").write_text("written since the restore")
        await node.stop("abc5")
        await watcher.waitFor("abc5", "stopped")
        (served / "saved.tar").rename(served / "away.tar")
        await node.resume("abc5")
        await eventually(
            lambda: [s.state for s in watcher.states if s.instance == "abc5"][-1] == "running",
            20,
            what=lambda: f"resumed: {watcher.history('abc5')}",
        )
        assert (tmp_path / "node" / "abc5" / "work" / "notes.txt").read_text() == "written since the restore"
        (served / "away.tar").rename(served / "saved.tar")
        # A digest that does not match: not started.
        await node.start("abc6", url, None, "sha256:" + "0" * 64, "read-token")
        errored = await watcher.waitFor("abc6", "errored")
        assert errored.reason == "The saved image does not match its digest; it was not started."
        # Not there at all.
        await node.start("abc7", url + "-gone", None, digest, "read-token")
        errored = await watcher.waitFor("abc7", "errored")
        assert errored.reason == "The image server would not give the saved image (404)."
    finally:
        await port.stopListening()


def evilArchive(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    with tarfile.open(path, "w") as tar:
        metadata = json.dumps({"format": "dit4c-process-archive/1", "tool": "web"}).encode()
        info = tarfile.TarInfo(IMAGE_METADATA)
        info.size = len(metadata)
        tar.addfile(info, io.BytesIO(metadata))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


@pytest.mark.parametrize(
    "name, kind, target",
    [
        ("../escaped", tarfile.REGTYPE, ""),
        ("/tmp/dit4c-absolute-escape", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard", tarfile.LNKTYPE, "/etc/passwd"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_a_saved_archive_cannot_write_outside_its_directory(tmp_path: Path, name: str, kind: bytes, target: str) -> None:
    archive = tmp_path / "evil.tar"
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = target
    evilArchive(archive, member)
    work = tmp_path / "pod" / "work"
    work.mkdir(parents=True)
    if name.startswith("/"):
        # An absolute name is made relative: it lands inside.
        _unpack(archive, work)
        assert (work / name.lstrip("/")).is_file()
    else:
        with pytest.raises(RuntimeError_, match="could not be unpacked"):
            _unpack(archive, work)
    assert not (tmp_path / "pod" / "escaped").exists()
    assert not Path("/tmp/dit4c-absolute-escape").exists()


def test_an_archive_without_its_tool_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("file")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(RuntimeError_, match="says nothing of its tool"):
        _unpack(archive, tmp_path)


def test_runtime_spec_carries_the_archive(tmp_path: Path) -> None:
    spec = PodSpec("abc", "web", None, tmp_path, archive=tmp_path / "a.tar")
    assert spec.archive == tmp_path / "a.tar"


@pytest_twisted.ensureDeferred
async def test_upload_progress_is_shown(made: Any, tmp_path: Path) -> None:
    """The helper's count of bytes sent reaches the person, as the state's reason."""
    done = tmp_path / "sent"  # the stand-in helper ends once the test has seen its progress
    slow = [
        sys.executable, "-c",
        "import json, os, pathlib, sys, time;"
        "open(os.environ['DIT4C_IMAGE_FILE'] + '.progress', 'w').write(json.dumps({'sent': 5000000, 'total': 10000000}));"
        "done = pathlib.Path(sys.argv[1])\n"
        "while not done.exists(): time.sleep(0.05)",
        str(done),
    ]  # fmt: skip
    node, runtime, watcher = made(imageServer="http://images.example:8600", uploadCommand=slow)
    await node.start("abc8", "web", None)
    await watcher.waitFor("abc8", "running")
    saving = node.save("abc8")  # fires once the upload has ended

    def shown() -> bool:
        reasons = [s.reason for s in watcher.states if s.instance == "abc8" and s.state == "uploading"]
        return "5.0 of 10.0 MB sent to the image server" in reasons

    await eventually(shown, what=lambda: f"the progress shown: {watcher.states}")
    done.touch()
    await saving
    await watcher.waitFor("abc8", "saved")


def test_fetch_progress_is_told_at_first_and_then_at_most_every_second() -> None:
    from twisted.internet.task import Clock

    clock, told = Clock(), []
    progress = FetchProgress(clock, told.append, 400_000_000)
    progress.received(65_536)
    progress.received(1_000_000)  # the same second: not told
    clock.advance(1)
    progress.received(120_000_000)
    assert told == [
        "Fetching the saved image: 0.1 of 400 MB (0 %).",
        "Fetching the saved image: 120 of 400 MB (30 %).",
    ]
    unknown = FetchProgress(clock, told.append, object())  # no Content-Length
    unknown.received(5_500_000)
    assert told[-1] == "Fetching the saved image: 5.5 MB so far."


def test_a_save_leaves_the_link_to_the_persons_storage_out(tmp_path: Path) -> None:
    from dit4c.node.processarchive import packArchive, unpackArchive
    from dit4c.node.processlaunch import linkStorage

    work, storage = tmp_path / "pod" / "work", tmp_path / "pod" / "mnt"
    work.mkdir(parents=True)
    (storage / "results").mkdir(parents=True)
    (storage / "results" / "big.csv").write_text("the person's, not the instance's")
    (work / "notes.txt").write_text("the instance's")
    linkStorage(work)
    linkStorage(work)  # again (a resume): the link as it was
    assert (work / "storage" / "results" / "big.csv").exists()
    packArchive(work, tmp_path / "saved.tar", "web")
    with tarfile.open(tmp_path / "saved.tar") as tar:
        assert sorted(tar.getnames()) == [IMAGE_METADATA, "notes.txt"]
    # Restored elsewhere, with a link of its own again.
    other = tmp_path / "other" / "work"
    other.mkdir(parents=True)
    assert unpackArchive(tmp_path / "saved.tar", other) == "web"
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # A folder of the person's own called storage is theirs: neither replaced nor left out.
    (other / "storage").mkdir()
    linkStorage(other)
    assert not (other / "storage").is_symlink()
