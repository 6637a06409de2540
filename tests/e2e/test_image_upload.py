"""
A saved image taken away as a file and brought back, from the command line,
against a real ``dit4c-dev``: ``dit4c download`` writes it, ``dit4c upload``
makes it a new saved image (the same digest, its own id, named for the
file), and an instance started from that image has the files of the one
that was saved. A truncated file and an unknown tool are refused, and the
images are as they were.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
from flows import startDev
from test_cli_session import CLI, Person


@pytest_twisted.ensureDeferred
async def test_a_downloaded_image_uploaded_again_restores(processes: Any, tmp_path: Path, devDir: Path) -> None:
    dev = await startDev(processes, devDir)
    token = await Person(dev.portal).token("admin", await dev.adminPassword())
    cli = CLI(tmp_path / "config" / "portals.json")
    await cli.run("login", dev.portal, "--token-stdin", stdin=token)

    instance = await cli.json("start", "notes", "--wait")
    work = devDir / "node" / instance["id"] / "work"
    assert work.is_dir(), sorted(p.name for p in (devDir / "node").iterdir())
    (work / "kept.txt").write_text("written before the save\n")
    assert (await cli.json("save", instance["id"], "--wait"))["state"] == "saved"
    [saved] = [i for i in await cli.json("images") if i["mine"]]
    file = tmp_path / "my work.oci.tar"
    await cli.json("download", saved["id"], "-o", str(file))

    uploaded = await cli.json("upload", str(file))
    assert uploaded == {
        "id": uploaded["id"], "name": "my work", "ref": uploaded["ref"], "port": saved["port"],
        "digest": saved["digest"], "mine": True, "limits": saved["limits"],
    }  # fmt: skip
    assert uploaded["id"] != saved["id"]
    mine = [i for i in await cli.json("images") if i["mine"]]
    assert sorted(i["id"] for i in mine) == sorted([saved["id"], uploaded["id"]])
    printed = await cli.run("upload", str(file), "--name", "my copy")
    assert re.fullmatch(rf"\S+  my copy  {saved['digest']}\n", printed), printed

    restored = await cli.json("start", uploaded["id"], "--wait")
    assert restored["state"] == "running" and restored["image"] == uploaded["id"]
    assert (devDir / "node" / restored["id"] / "work" / "kept.txt").read_text() == "written before the save\n"

    # What is not a whole saved image, or names no tool of the catalogue, is refused; nothing is added.
    before = await cli.json("images")
    truncated = tmp_path / "truncated.oci.tar"
    truncated.write_bytes(file.read_bytes()[:1100])  # in the second member's header
    assert "not a whole saved image" in await cli.run("upload", str(truncated), status=1)
    assert "no tool 'nosuch'" in await cli.run("upload", str(file), "--tool", "nosuch", status=1)
    assert "no file" in await cli.run("upload", str(tmp_path / "absent.tar"), status=2)
    assert await cli.json("images") == before
