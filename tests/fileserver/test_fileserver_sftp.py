"""
The file server over real SSH on loopback, with a real portal: who may log
in, whose storage they see, and paths that try to leave it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from fileserver_client import LoginRefused, connect, listDirectory, readFile, symlink, writeFile
from fileserver_world import World
from twisted.conch.ssh import filetransfer

from dit4c.common.keys import generatePrivateKey

FX_NO_SUCH_FILE = filetransfer.FX_NO_SUCH_FILE
FX_PERMISSION_DENIED = filetransfer.FX_PERMISSION_DENIED


async def refused(coroutine: Any) -> int:
    """The SFTP status code the operation failed with."""
    with pytest.raises(filetransfer.SFTPError) as info:
        await coroutine
    return int(info.value.code)


@pytest_twisted.ensureDeferred
async def test_one_persons_instances_share_storage_and_others_do_not_see_it(world: World) -> None:
    w = world
    sa, a = await connect(w.port, w.a.id, w.keyA, w.hostKey)
    await a.makeDirectory(b"notes", {})
    await writeFile(a, "notes/hello.txt", b"written by instance A")
    await sa.close()

    sb, b = await connect(w.port, w.b.id, w.keyB, w.hostKey)
    assert await readFile(b, "/notes/hello.txt") == b"written by instance A"
    assert await listDirectory(b, "/") == ["notes"]
    await sb.close()

    sc, c = await connect(w.port, w.c.id, w.keyC, w.hostKey)
    assert await listDirectory(c, "/") == []
    assert await refused(readFile(c, "notes/hello.txt")) == FX_NO_SUCH_FILE
    await writeFile(c, "bob.txt", b"bob's")
    await sc.close()

    # On disk: one directory per person, private.
    assert (w.home(w.alice) / "notes" / "hello.txt").read_bytes() == b"written by instance A"
    assert (w.home(w.bob) / "bob.txt").read_bytes() == b"bob's"
    assert not (w.home(w.alice) / "bob.txt").exists()
    assert os.stat(w.home(w.alice)).st_mode & 0o777 == 0o700


@pytest_twisted.ensureDeferred
async def test_a_key_that_is_not_the_instances_is_refused(world: World) -> None:
    w = world
    with pytest.raises(LoginRefused):
        await connect(w.port, w.a.id, generatePrivateKey(), w.hostKey)
    # Bob's instance's key in the name of alice's instance, and alice's key
    # in the name of bob's instance.
    with pytest.raises(LoginRefused):
        await connect(w.port, w.a.id, w.keyC, w.hostKey)
    with pytest.raises(LoginRefused):
        await connect(w.port, w.c.id, w.keyA, w.hostKey)
    # A user name that is no instance.
    with pytest.raises(LoginRefused):
        await connect(w.port, "root", w.keyA, w.hostKey)
    with pytest.raises(LoginRefused):
        await connect(w.port, "nosuchinstance", w.keyA, w.hostKey)


@pytest_twisted.ensureDeferred
async def test_an_instance_that_is_not_active_is_refused(world: World) -> None:
    w = world
    with pytest.raises(LoginRefused):
        await connect(w.port, w.d.id, w.keyD, w.hostKey)
    # Stopped after the JWKS was fetched: the portal's answer still says no.
    sa, a = await connect(w.port, w.a.id, w.keyA, w.hostKey)
    await sa.close()
    await w.store.updateInstance(w.a.id, state="stopped")
    with pytest.raises(LoginRefused):
        await connect(w.port, w.a.id, w.keyA, w.hostKey)


@pytest_twisted.ensureDeferred
async def test_an_open_connection_loses_access_when_the_instance_stops(world: World) -> None:
    w = world
    from fileserver_world import portOf
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    clock = Clock()  # the file server's: how long its answer on access stands
    clock.advance(1_800_000_000)
    server = w.startServer(accessCache=0.2, clock=clock)
    session, a = await connect(portOf(server), w.a.id, w.keyA, w.hostKey)
    await writeFile(a, "x", b"1")
    await w.store.updateInstance(w.a.id, state="stopped")
    clock.advance(0.2)  # the answer is due to be asked again
    assert await refused(readFile(a, "x")) == FX_PERMISSION_DENIED
    await session.closed.addTimeout(10, reactor)  # the server closes the connection


@pytest_twisted.ensureDeferred
async def test_paths_out_of_the_storage_are_refused(world: World) -> None:
    w = world
    sa, a = await connect(w.port, w.a.id, w.keyA, w.hostKey)
    sc, c = await connect(w.port, w.c.id, w.keyC, w.hostKey)
    await writeFile(c, "secret.txt", b"bob's secret")
    await a.makeDirectory(b"a", {})
    bobs = f"../{w.bob.id}/secret.txt"
    for path in ("../x", "/../x", "..", "a/../../x", bobs, "../../../../etc/passwd", "/../../etc/passwd"):
        assert await refused(readFile(a, path)) == FX_PERMISSION_DENIED, path
        assert await refused(writeFile(a, path, b"x")) == FX_PERMISSION_DENIED, path
    assert await refused(a.getAttrs(b"/..")) == FX_PERMISSION_DENIED
    assert await refused(a.makeDirectory(b"../escape", {})) == FX_PERMISSION_DENIED
    assert await refused(a.renameFile(b"x", b"../x")) in (FX_PERMISSION_DENIED, FX_NO_SUCH_FILE)
    assert await refused(listDirectory(a, "..")) == FX_PERMISSION_DENIED
    # Absolute paths are paths in the storage: /etc/passwd is not the host's.
    assert await refused(readFile(a, "/etc/passwd")) == FX_NO_SUCH_FILE
    assert await a.realPath(b".") == "/"
    assert await a.realPath(b"a/..") == "/"
    assert await a.realPath(b"a/./") == "/a"
    assert not (w.tmp / "files" / "users" / "x").exists()
    assert not (w.tmp / "files" / "x").exists()
    await sa.close()
    await sc.close()


@pytest_twisted.ensureDeferred
async def test_symbolic_links_never_lead_out(world: World) -> None:
    w = world
    sa, a = await connect(w.port, w.a.id, w.keyA, w.hostKey)
    sc, c = await connect(w.port, w.c.id, w.keyC, w.hostKey)
    await writeFile(c, "secret.txt", b"bob's secret")
    await a.makeDirectory(b"d", {})
    await writeFile(a, "d/file", b"alice's")

    # Links whose target climbs out are not made.
    for target in ("..", "../x", "d/../../x", f"../{w.bob.id}", "../../../../etc/passwd"):
        assert await refused(symlink(a, target, "out")) == FX_PERMISSION_DENIED, target
    assert not os.path.lexists(w.home(w.alice) / "out")
    # Links inside work, relative or absolute (read from the storage's root).
    await symlink(a, "d/file", "rel")
    await symlink(a, "/d/file", "abs")
    assert await readFile(a, "rel") == b"alice's"
    assert await readFile(a, "abs") == b"alice's"
    assert await a.readLink(b"rel") == "d/file"
    # An absolute link to /etc/passwd means the storage's /etc/passwd.
    await symlink(a, "/etc/passwd", "passwd")
    assert await refused(readFile(a, "passwd")) == FX_NO_SUCH_FILE

    # A link made inside, then moved to where its relative target climbs out.
    await a.makeDirectory(b"d/e", {})
    await symlink(a, f"../../{w.bob.id}", "d/e/up")  # resolves to /d/<bob id>: inside
    await a.renameFile(b"d/e/up", b"up")  # now ../../<bob id> from the root: out
    assert await refused(readFile(a, "up/secret.txt")) == FX_PERMISSION_DENIED
    assert await refused(listDirectory(a, "up")) == FX_PERMISSION_DENIED

    # Links planted on disk (by hand, or by anything else) are not followed out.
    home = w.home(w.alice)
    os.symlink("/etc", home / "etc-abs")
    os.symlink(str(w.home(w.bob)), home / "bob-abs")
    os.symlink(f"../{w.bob.id}", home / "bob-rel")
    assert await refused(readFile(a, "etc-abs/passwd")) == FX_NO_SUCH_FILE
    assert await refused(readFile(a, "bob-abs/secret.txt")) == FX_NO_SUCH_FILE
    assert await refused(readFile(a, "bob-rel/secret.txt")) == FX_PERMISSION_DENIED
    assert await refused(writeFile(a, "bob-rel/new.txt", b"x")) == FX_PERMISSION_DENIED
    assert await refused(a.setAttrs(b"bob-rel/secret.txt", {"permissions": 0o777})) == FX_PERMISSION_DENIED
    assert await refused(a.makeDirectory(b"bob-rel/dir", {})) == FX_PERMISSION_DENIED
    assert not (w.home(w.bob) / "new.txt").exists()
    assert (w.home(w.bob) / "secret.txt").stat().st_mode & 0o777 != 0o777
    # The links themselves may be looked at, renamed and removed.
    assert (await a.getAttrs(b"bob-rel", 0))["size"] > 0
    await a.removeFile(b"bob-rel")
    assert (w.home(w.bob) / "secret.txt").read_bytes() == b"bob's secret"
    # A loop of links ends.
    os.symlink("loop2", home / "loop1")
    os.symlink("loop1", home / "loop2")
    assert await refused(readFile(a, "loop1")) == filetransfer.FX_FAILURE
    await sa.close()
    await sc.close()


@pytest_twisted.ensureDeferred
async def test_ordinary_file_operations(world: World) -> None:
    w = world
    sa, a = await connect(w.port, w.a.id, w.keyA, w.hostKey)
    await writeFile(a, "one", b"1")
    await writeFile(a, "two", b"22")
    # SFTP's rename does not replace; OpenSSH's posix-rename does.
    assert await refused(a.renameFile(b"one", b"two")) == filetransfer.FX_FILE_ALREADY_EXISTS
    await a.extendedRequest(b"posix-rename@openssh.com", filetransfer.NS(b"one") + filetransfer.NS(b"two"))
    assert await readFile(a, "two") == b"1"
    attrs = await a.getAttrs(b"two")
    assert attrs["size"] == 1
    await a.setAttrs(b"two", {"permissions": 0o640})
    assert (await a.getAttrs(b"two"))["permissions"] & 0o777 == 0o640
    statvfs = await a.extendedRequest(b"statvfs@openssh.com", filetransfer.NS(b"/"))
    assert len(statvfs) == 88
    await a.removeFile(b"two")
    await a.makeDirectory(b"dir", {})
    await a.removeDirectory(b"dir")
    assert await listDirectory(a, "/") == []
    await sa.close()
