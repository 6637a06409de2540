"""
The compute node with the ``process`` runtime: real processes, real ports.

The helpers here are stand-ins (a program that records its environment and
waits), so these tests are about the node and the runtime: instance life,
keys, the helper environment, and what is left after stop and discard. (The
real pod helper, forked, is tested in tests/podhelper.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from confined import (
    NOBODY,
    asUser,
    listeningInodes,
    snoopTool,
    socketInodes,
    systemPython,
    toolPid,
    treeOf,
)
from standins import HELPERS, POD_HELPER, RECORD_ENV, TOOLS, Watcher
from support.sockets import rawRequest
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.helperenv import fromEnvironment
from dit4c.common.keys import loadPrivateKey, publicJWK
from dit4c.node.node import Node
from dit4c.node.process import ProcessRuntime, Tool
from dit4c.node.processes import startTime


def makeNode(directory: Path, **options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
    runtime = ProcessRuntime(reactor, directory, TOOLS, helpers=POD_HELPER, stopGrace=2)
    node = Node(
        reactor,
        runtime,
        directory,
        portal="http://localhost:8000",
        portalInternal="http://127.0.0.1:8000",
        routing=("tcp:host=127.0.0.1:port=8001",),
        **options,
    )
    watcher = Watcher()
    node.subscribe(watcher.observer())
    node.startService()
    return node, runtime, watcher


def podPids(directory: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in directory.glob("*.pid")]


def alive(pid: int) -> bool:
    return startTime(pid) is not None


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path) -> Any:
    made: list[ProcessRuntime] = []

    def make(**options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
        node, runtime, watcher = makeNode(tmp_path / "node", **options)
        made.append(runtime)
        return node, runtime, watcher

    yield make
    for runtime in made:
        for instance in list(runtime._pods):
            await runtime.discard(instance)


async def fetch(port: int) -> bytes:
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}/", timeout=5)
    return bytes(await response.content())


@pytest_twisted.ensureDeferred
async def test_start_runs_the_tool_and_its_helpers(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("abc1", "web", None)
    running = await watcher.waitFor("abc1", "running")
    assert running.reason is None
    assert watcher.history("abc1") == ["starting", "running"]
    pod = tmp_path / "node" / "abc1"

    # The key pair: the private half in the pod, mode 0600; the public half went to the observer.
    keyFile = pod / "instance.key"
    assert stat.S_IMODE(keyFile.stat().st_mode) == 0o600
    assert watcher.keys["abc1"] == publicJWK(loadPrivateKey(keyFile))
    assert "d" not in watcher.keys["abc1"]

    # The one helper process got the helper environment (docs/protocols.md section 9).
    await eventually(lambda: (pod / "helpers.argv").exists(), what="the helper wrote its arguments")
    auth = json.loads((pod / "helpers.env").read_text())
    helper = fromEnvironment(auth)
    assert helper.instance == "abc1"
    assert helper.keyFile == str(keyFile)
    assert helper.portal == "http://localhost:8000"
    assert helper.portalBase == "http://127.0.0.1:8000"
    assert helper.routing == ("tcp:host=127.0.0.1:port=8001",)
    # It answers where the node checks it, fronts the tool, and waits for the tool before unmounting storage.
    assert auth["DIT4C_AUTH_LISTEN"] == f"unix:address={pod / 'auth.sock'}:mode=600:lockfile=0"
    assert auth["DIT4C_AUTH"] == f"unix:path={pod / 'auth.sock'}"
    assert json.loads((pod / "pod.json").read_text())["auth"] == str(pod / "auth.sock")
    assert json.loads((pod / "helpers.argv").read_text()) == ["--tool-pid-file", str(pod / "tool.pid"), "--hold", "7.0"]
    assert sorted(p.name for p in pod.glob("*.pid")) == ["helpers.pid", "tool.pid"]
    toolPort = int(helper.tool.rsplit("=", 1)[1])  # type: ignore[union-attr]
    assert b"Directory listing" in await fetch(toolPort)


@pytest_twisted.ensureDeferred
async def test_stop_and_discard_leave_nothing(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("abc2", "web", None)
    await watcher.waitFor("abc2", "running")
    pod = tmp_path / "node" / "abc2"
    pids = podPids(pod)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)

    await node.stop("abc2")
    assert watcher.history("abc2")[-2:] == ["stopping", "stopped"]
    assert not any(alive(pid) for pid in pids)
    assert pod.exists(), "a stopped instance keeps its files"

    await node.discard("abc2")
    assert watcher.history("abc2")[-1] == "discarded"
    assert not pod.exists()
    assert node.instances() == []
    await node.discard("abc2")  # again: nothing to do, still "discarded"
    assert watcher.history("abc2")[-1] == "discarded"


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_resumes_with_its_files_and_its_key(nodes: Any, tmp_path: Path) -> None:
    """
    Resumed: the pod runs again from its working directory as it was left,
    under the key the routing and file servers know it by; a resume of what is not stopped here changes nothing
    but is answered with where it stands.
    """
    node, runtime, watcher = nodes()
    await node.start("abc9", "web", None)
    await watcher.waitFor("abc9", "running")
    firstKey = watcher.keys["abc9"]
    pod = tmp_path / "node" / "abc9"
    (pod / "work" / "written-before.txt").write_text("kept")
    await node.stop("abc9")
    await watcher.waitFor("abc9", "stopped")

    await node.resume("abc9")
    await eventually(
        lambda: watcher.history("abc9")[-3:] == ["stopped", "starting", "running"],
        what=lambda: f"resumed: {watcher.history('abc9')}",
    )
    assert (pod / "work" / "written-before.txt").read_text() == "kept"
    assert watcher.keys["abc9"] == firstKey
    pids = podPids(pod)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)

    await node.resume("abc9")  # running: it says so, and nothing else happens
    assert watcher.history("abc9")[-1] == "running" and podPids(pod) == pids
    await node.resume("nothere1")
    assert watcher.history("nothere1") == ["errored"]
    await node.stop("abc9")
    await node.discard("abc9")


@pytest_twisted.ensureDeferred
async def test_a_tool_that_exits_errors_the_instance(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes(startTimeout=30)
    await node.start("abc3", "quits", None)
    errored = await watcher.waitFor("abc3", "errored")
    assert errored.reason == "The tool exited with status 0."
    await eventually(
        lambda: not any(alive(pid) for pid in podPids(tmp_path / "node" / "abc3")), what="its helpers were stopped too"
    )


@pytest_twisted.ensureDeferred
async def test_unknown_tool_and_start_timeout(nodes: Any) -> None:
    node, runtime, watcher = nodes(startTimeout=1)
    await node.start("abc4", "no-such-tool", None)
    assert (await watcher.waitFor("abc4", "errored")).reason == "This compute node has no tool called 'no-such-tool'."
    await node.start("abc5", "silent", None)
    assert (await watcher.waitFor("abc5", "errored")).reason == "The tool did not answer within 1 s."


@pytest_twisted.ensureDeferred
async def test_capacity(nodes: Any) -> None:
    from dit4c.channel.errors import NodeFull

    node, runtime, watcher = nodes(capacity=1)
    await node.start("abc6", "web", None)
    with pytest.raises(NodeFull):
        node.start("abc7", "web", None)
    await node.start("abc6", "web", None)  # the same command again is no new instance
    assert node.load() == 1


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_finds_its_instances(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("abc8", "web", None)
    await node.start("abc9", "web", None)
    await watcher.waitFor("abc8", "running")
    await watcher.waitFor("abc9", "running")
    await node.stopService()
    # abc9's tool dies while no node watches it.
    toolPid = json.loads((tmp_path / "node" / "abc9" / "tool.pid").read_text())["pid"]
    os.killpg(toolPid, 9)
    await eventually(lambda: not alive(toolPid), what="abc9's tool ended")

    again, runtime2, watcher2 = nodes()
    await eventually(lambda: len(watcher2.states) >= 2, what=lambda: f"the new node told of both: {watcher2.states}")
    assert {s.instance: s.state for s in again.instances()} == {"abc8": "running", "abc9": "errored"}
    assert (await watcher2.waitFor("abc9", "errored")).reason == (
        "The instance stopped while its compute node was restarting. Not running: tool."
    )
    # The found instance is under the new node's control: it stops it.
    pids = podPids(tmp_path / "node" / "abc8")
    await again.stop("abc8")
    assert not any(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in podPids(tmp_path / "node" / "abc9"))


def test_removing_a_pod_never_deletes_through_a_mount(tmp_path: Path) -> None:
    """A pod's directory holds the person's storage, mounted: removing the pod must not empty it."""
    import subprocess

    from dit4c.node.processes import removePodDirectory

    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    storage = tmp_path / "persons-storage"
    storage.mkdir()
    (storage / "thesis.tex").write_text("years of work")
    pod = tmp_path / "pod"
    (pod / "mnt").mkdir(parents=True)
    (pod / "work").mkdir()
    (pod / "work" / "scratch").write_text("x")
    subprocess.run(["mount", "--bind", str(storage), str(pod / "mnt")], check=True)
    try:
        removePodDirectory(pod)
    finally:
        if os.path.ismount(pod / "mnt"):
            subprocess.run(["umount", "-l", str(pod / "mnt")])
    assert not pod.exists()
    assert (storage / "thesis.tex").read_text() == "years of work"


def test_a_discard_cut_short_leaves_the_nodes_record_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node dies half way through removing a pod: its record of the instance is still there."""
    import shutil

    from dit4c.node.processes import RECORD, removePodDirectory

    pod = tmp_path / "pod"
    for name in ("work", "state", "sock"):
        (pod / name).mkdir(parents=True)
    (pod / "pod.json").write_text("{}")
    (pod / RECORD).write_text('{"state": "discarding"}')
    removed: list[str] = []
    real = shutil.rmtree

    def dies(path: Any, *args: Any, **kwargs: Any) -> None:
        if removed:
            raise KeyboardInterrupt("the node is killed")
        removed.append(Path(path).name)
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies)
    with pytest.raises(KeyboardInterrupt):
        removePodDirectory(pod)
    assert (pod / RECORD).read_text() == '{"state": "discarding"}'
    monkeypatch.setattr(shutil, "rmtree", real)
    removePodDirectory(pod)  # the restarted node discards it again
    assert not pod.exists()


def test_only_a_pods_own_pid_files_name_what_is_killed(tmp_path: Path) -> None:
    """
    A tool writes in its working directory: a pid file it plants there,
    naming another process (with the right start time), must not make the
    node kill that process.
    """
    import json
    import signal
    import subprocess

    from dit4c.node.processes import killRecorded, startTime

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pod = tmp_path / "pods" / "abc"
        (pod / "work").mkdir(parents=True)
        (pod / "pod.json").write_text("{}")
        for path, pid in ((pod / "work" / "innocent.pid", bystander.pid), (pod / "tool.pid", ours.pid)):
            path.write_text(json.dumps({"pid": pid, "started": startTime(pid)}))
        assert killRecorded(tmp_path / "pods") == [ours.pid]
        assert ours.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for process in (bystander, ours):
            process.kill()
            process.wait()


def test_a_pod_of_the_same_instance_on_another_node_is_not_this_ones(tmp_path: Path) -> None:
    """
    Two nodes on one machine may each hold a pod of the same instance (one
    saved on the first and restored on the second): a process whose
    environment names the instance is this pod's only if it also names
    this pod's directory, so that a discard on one node never kills the
    other's helpers.
    """
    import subprocess

    from dit4c.node.processes import podProcesses

    mine, theirs = tmp_path / "n1" / "abc", tmp_path / "n2" / "abc"
    helpers = {}
    for pod in (mine, theirs):
        pod.mkdir(parents=True)
        environment = {**os.environ, "DIT4C_INSTANCE": "abc", "DIT4C_INSTANCE_KEY": str(pod / "instance.key")}
        helpers[pod] = subprocess.Popen(["sleep", "60"], cwd=tmp_path, env=environment)
    try:
        assert podProcesses(mine, "abc") == [helpers[mine].pid]
        assert podProcesses(theirs, "abc") == [helpers[theirs].pid]
    finally:
        for process in helpers.values():
            process.kill()
            process.wait()


@pytest_twisted.ensureDeferred
async def test_running_only_once_the_auth_helper_answers_too(tmp_path: Path) -> None:
    """A tool that answers behind an auth helper that does not is not running: nobody could reach it."""
    deaf = {"helpers": [sys.executable, "-c", "import time; time.sleep(3600)"]}
    runtime = ProcessRuntime(reactor, tmp_path / "node", TOOLS, helpers=deaf, stopGrace=2)
    node = Node(reactor, runtime, tmp_path / "node", portal="http://localhost:8000", startTimeout=1.5)
    watcher = Watcher()
    node.subscribe(watcher.observer())
    node.startService()
    try:
        await node.start("abc9", "web", None)
        errored = await watcher.waitFor("abc9", "errored")
        assert errored.reason == "The tool did not answer within 1.5 s."
        assert "running" not in watcher.history("abc9")
    finally:
        await runtime.discard("abc9")


# -- confined tools --------------------------------------------------------------------------


def confinedNode(tmp_path: Path, tools: dict[str, Any], **options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
    runtime = ProcessRuntime(reactor, tmp_path / "node", tools, helpers=POD_HELPER, stopGrace=2)
    node = Node(reactor, runtime, tmp_path / "node", portal="http://localhost:8000", **options)
    watcher = Watcher()
    node.subscribe(watcher.observer())
    node.startService()
    return node, runtime, watcher


async def discardAll(runtime: ProcessRuntime) -> None:
    for instance in list(runtime._pods):
        await runtime.discard(instance)


@pytest_twisted.ensureDeferred
async def test_the_tool_cannot_reach_the_key_or_the_nodes_files(tmp_path: Path) -> None:
    """A tool that tries: the key, the pod's other files, the node's processes, writing outside its own files."""
    pod = tmp_path / "node" / "snp1"
    # Writable by anyone, and not under /tmp (the tool's /tmp is its own): only the read-only file system stops it.
    outside = Path(tempfile.mkdtemp(prefix="dit4c-outside-", dir="/var/tmp"))
    outside.chmod(0o777)
    node, runtime, watcher = confinedNode(tmp_path, {"snoop": snoopTool(pod / "instance.key", outside)})
    try:
        await node.start("snp1", "snoop", None)
        await watcher.waitFor("snp1", "running")
        seen = json.loads((pod / "work" / "snoop.json").read_text())
        assert seen["key"][0] == "refused", seen
        # The pod's directory holds only what was bound back: not the key, logs or helpers' state.
        assert seen["pod"] == ["ok", ["sock", "work"]]
        assert seen["outside"] == ["refused", errno.EROFS] and not (outside / "planted").exists()
        assert seen["work"][0] == "ok" and seen["tmp"][0] == "ok"
        assert not Path("/tmp/scratch").exists() or Path("/tmp/scratch").stat().st_uid != seen["uid"]
        # Its /proc shows its own processes only: the launcher's init, and itself.
        assert seen["pids"] == [1, 2]
        if os.geteuid() == 0:
            record = json.loads((pod / "pod.json").read_text())
            assert seen["uid"] == seen["gid"] == record["uid"] and seen["uid"] in runtime.toolUids
            assert seen["groups"] == []
            assert (pod / "work").stat().st_uid == seen["uid"]
            assert (pod / "work" / "written-by-the-tool").stat().st_uid == seen["uid"]
    finally:
        await discardAll(runtime)
        shutil.rmtree(outside)


@pytest_twisted.ensureDeferred
async def test_only_the_auth_helper_reaches_the_tool(tmp_path: Path) -> None:
    """Notes listens on a socket the auth helper is pointed at; nobody else connects, and no TCP port answers."""
    from dit4c.node.process import builtinTools

    node, runtime, watcher = confinedNode(tmp_path, builtinTools())
    try:
        await node.start("nts1", "dit4c/notes", None)
        await watcher.waitFor("nts1", "running")
        pod = tmp_path / "node" / "nts1"
        socketPath = pod / "sock" / "tool.sock"
        await eventually(lambda: (pod / "helpers.env").exists(), what="the helper wrote its environment")
        auth = json.loads((pod / "helpers.env").read_text())
        assert auth["DIT4C_TOOL"] == f"unix:path={socketPath}"
        assert stat.S_IMODE((pod / "sock").stat().st_mode) == 0o700
        assert stat.S_IMODE(pod.stat().st_mode) == 0o700
        # The node's user (the auth helper's) reaches it ...
        page = await rawRequest(socketPath, b"GET / HTTP/1.0\r\nHost: tool\r\nX-DIT4C-User: alice\r\n\r\n")
        assert b"200 OK" in page.split(b"\r\n")[0] and b"Hello, alice." in page
        # ... another local user does not, even knowing the path.
        tried = asUser(
            NOBODY,
            [systemPython(), "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({str(socketPath)!r})"],
        )
        assert tried.returncode != 0 and "PermissionError" in tried.stderr, tried.stderr
        # No process of the tool listens on any TCP port.
        tool = treeOf(toolPid(pod))
        assert len(tool) >= 3  # the launcher, its init, the tool
        assert socketInodes(tool) & listeningInodes() == set()
    finally:
        await discardAll(runtime)


@pytest_twisted.ensureDeferred
async def test_a_tool_that_exits_at_once_says_why(tmp_path: Path) -> None:
    """The reason names the status and ends with the tool's last lines, within the channel's 1000 characters."""
    script = "import sys\nfor i in range(200): print(f'line {i}: ' + 'x' * 40)\nprint('Error: no such notebook', file=sys.stderr)\nsys.exit(3)"
    node, runtime, watcher = confinedNode(
        tmp_path, {"fails": Tool("fails", ("{python}", "-u", "-c", script, "{socket}"))}, startTimeout=30
    )
    try:
        await node.start("ext1", "fails", None)
        errored = await watcher.waitFor("ext1", "errored")
        assert errored.reason is not None
        assert errored.reason.startswith("The tool exited with status 3. Its last output:\n")
        assert errored.reason.endswith("line 199: " + "x" * 40 + "\nError: no such notebook")
        assert len(errored.reason) <= 1000
        assert "line 0:" not in errored.reason
    finally:
        await discardAll(runtime)


@pytest_twisted.ensureDeferred
async def test_a_restored_archive_is_handed_to_the_tool(tmp_path: Path) -> None:
    """Files unpacked from a saved image belong to the tool's uid, which differs from instance to instance."""
    import io
    import tarfile

    from dit4c.node.interfaces import PodSpec
    from dit4c.node.process import IMAGE_METADATA, builtinTools

    if os.geteuid() != 0:
        pytest.skip("tools run as uids of their own only under a root node")
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in ((IMAGE_METADATA, b'{"format": "dit4c-process-archive/1", "tool": "dit4c/static"}'),
                           ("results/run1.csv", b"a,b\n1,2\n")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    runtime = ProcessRuntime(reactor, tmp_path / "node", builtinTools(), helpers=POD_HELPER, stopGrace=2)
    try:
        for instance in ("rst1", "rst2"):
            directory = tmp_path / "node" / instance
            directory.mkdir(parents=True, mode=0o700)
            environment = {"DIT4C_INSTANCE_KEY": str(directory / "instance.key")}
            await runtime.start(PodSpec(instance, "", None, directory, environment, archive=archive))
        uids = [json.loads((tmp_path / "node" / i / "pod.json").read_text())["uid"] for i in ("rst1", "rst2")]
        assert uids[0] != uids[1]

        async def bothReady() -> bool:
            return [await runtime.ready(i) for i in ("rst1", "rst2")] == [True, True]

        await eventually(bothReady, what="both restored tools answer")
        for instance, uid in zip(("rst1", "rst2"), uids, strict=True):
            work = tmp_path / "node" / instance / "work"
            assert {p.stat().st_uid for p in [work, *work.rglob("*")]} == {uid}
            page = await rawRequest(tmp_path / "node" / instance / "sock" / "tool.sock", b"GET /results/run1.csv HTTP/1.0\r\n\r\n")
            assert page.endswith(b"\r\n\r\na,b\n1,2\n")
    finally:
        await discardAll(runtime)


def test_a_tool_table_names_where_the_tool_listens(tmp_path: Path) -> None:
    from dit4c.node.process import toolsFromFile

    table = tmp_path / "tools.json"
    table.write_text(
        json.dumps(
            {
                "tools": {
                    "socket": {"command": ["serve", "--socket={socket}", '{"json": true}'], "environment": {"H": "{dir}"}},
                    "tcp": {"command": ["serve", "--port={port}"]},
                }
            }
        )
    )
    tools = toolsFromFile(table)
    assert tools["socket"].socket and not tools["tcp"].socket
    # Only the placeholders are filled in: other braces (a script, JSON) stay as they are.
    assert tools["socket"].argv(None, Path("/w"), Path("/p/sock/tool.sock")) == [
        "serve", "--socket=/p/sock/tool.sock", '{"json": true}',
    ]  # fmt: skip
    assert tools["socket"].env(None, Path("/w"), Path("/p/sock/tool.sock")) == {"H": "/w"}
    assert tools["tcp"].argv(8080, Path("/w")) == ["serve", "--port=8080"]
    table.write_text(json.dumps({"tools": {"bad": {"command": ["serve"], "environment": {"N": 1}}}}))
    with pytest.raises(ValueError, match="environment must map names to strings"):
        toolsFromFile(table)


# -- pods whose helpers are three processes -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pod_with_separate_helpers_is_found_again_and_stopped(tmp_path: Path) -> None:
    """
    A pod an older node started (no ``roles`` in its pod.json: the auth
    helper, the listener and the storage helper as processes of their own)
    is watched and stopped by a node that starts one helper process per pod.
    """
    from dit4c.node.interfaces import PodSpec

    directory = tmp_path / "node"
    standIns = {**HELPERS, "storage": [sys.executable, "-c", RECORD_ENV, "storage"]}
    before = ProcessRuntime(reactor, directory, TOOLS, helpers=standIns, podHelpers="separate", stopGrace=2)
    pod = directory / "old1"
    pod.mkdir(parents=True, mode=0o700)
    environment = {"DIT4C_INSTANCE_KEY": str(pod / "instance.key"), "DIT4C_FILE_SERVER": "127.0.0.1:1"}
    await before.start(PodSpec("old1", "web", None, pod, environment))
    record = json.loads((pod / "pod.json").read_text())
    assert record["roles"] == ["tool", "auth", "listener", "storage"]
    del record["roles"]  # as an older node wrote it
    (pod / "pod.json").write_text(json.dumps(record))
    before.forget()
    pids = {role: json.loads((pod / f"{role}.pid").read_text())["pid"] for role in ("tool", "auth", "listener", "storage")}

    # The stand-in helpers are up (each wrote its environment): the listener is in a process group of its own.
    await eventually(
        lambda: all((pod / f"{role}.env").exists() for role in ("auth", "listener", "storage")), what="the helpers started"
    )

    after = ProcessRuntime(reactor, directory, TOOLS, helpers=POD_HELPER, stopGrace=2)
    try:
        assert [(s.instance, s.running) for s in await after.pods()] == [("old1", True)]
        os.killpg(pids["listener"], 9)
        await eventually(lambda: not alive(pids["listener"]), what="the listener ended")
        assert [s.reason for s in await after.pods()] == ["Not running: listener."]
        await after.stop("old1")
        assert not any(alive(pid) for pid in pids.values())
    finally:
        await after.discard("old1")
        after.forget()
    assert not pod.exists()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_no_helper_of_a_pod_listens_on_tcp(tmp_path: Path) -> None:
    """
    A pod of the real helper process (forked, with its listener dialling a
    routing server): it answers on its Unix socket, mode 0600, and through
    its tunnel; no process of its helpers listens on any TCP port.
    """
    from twisted.internet.endpoints import serverFromString

    from dit4c.common.keys import generatePrivateKey, savePrivateKey
    from dit4c.common.tokens import StaticKeySource, TokenVerifier
    from dit4c.node.interfaces import PodSpec
    from dit4c.routing.server import RoutingServer

    instance = "tcp0"
    pod = tmp_path / "node" / instance
    pod.mkdir(parents=True, mode=0o700)
    key = generatePrivateKey()
    savePrivateKey(key, pod / "instance.key")
    # A routing server that trusts the instance's key, as the portal would publish it.
    verifier = TokenVerifier(
        StaticKeySource({"keys": [{**publicJWK(key), "kid": f"instance:{instance}"}]}), audience="dit4c-routing"
    )
    routing = RoutingServer(reactor, verifier, "localhost")
    tunnel = routing.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    public = routing.addPublicEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), "http")
    routing.startService()
    environment = {
        "DIT4C_INSTANCE": instance,
        "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
        "DIT4C_PORTAL": "http://localhost:8000",
        "DIT4C_ROUTING": f"tcp:host=127.0.0.1:port={tunnel.port.getHost().port}",  # type: ignore[union-attr]
    }
    runtime = ProcessRuntime(reactor, tmp_path / "node", {"dit4c/notes": builtinNotes()}, stopGrace=2)
    try:
        await runtime.start(PodSpec(instance, "dit4c/notes", None, pod, environment))

        async def up() -> bool:
            return await runtime.ready(instance) and routing.registry.hostFor(instance) is not None

        await eventually(up, timeout=30, what=lambda: (pod / "helpers.log").read_text()[-3000:])
        socket = pod / "auth.sock"
        assert json.loads((pod / "pod.json").read_text())["auth"] == str(socket)
        assert stat.S_ISSOCK(socket.stat().st_mode) and stat.S_IMODE(socket.stat().st_mode) == 0o600
        # The auth helper answers on its socket (a stranger without a session is refused) ...
        request = f"GET / HTTP/1.0\r\nHost: {instance}.localhost\r\n\r\n".encode()
        answer = await rawRequest(socket, request)
        assert answer.startswith(b"HTTP/1.1 401 ") and b'WWW-Authenticate: DIT4C realm="dit4c"' in answer, answer[:300]
        # ... and through the tunnel, the same way.
        answer = await rawRequest(public.port.getHost().port, request)  # type: ignore[union-attr]
        assert answer.startswith(b"HTTP/1.1 401 ") and b'WWW-Authenticate: DIT4C realm="dit4c"' in answer, answer[:300]
        # No process of the pod's helpers listens on TCP (nor does the tool).
        helpers = treeOf(int(json.loads((pod / "helpers.pid").read_text())["pid"]))
        assert socketInodes(helpers), "the helper process holds no socket at all"
        assert socketInodes(helpers) & listeningInodes() == set()
        assert socketInodes(treeOf(toolPid(pod))) & listeningInodes() == set()
    finally:
        await runtime.discard(instance)
        runtime.forget()
        await routing.stopService()


def builtinNotes() -> Tool:
    from dit4c.node.process import builtinTools

    return builtinTools()["dit4c/notes"]
