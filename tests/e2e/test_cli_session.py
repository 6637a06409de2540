"""
A person's whole session from the command line against a real
``dit4c-dev``: a token made on the account page, ``dit4c login``, the
tools, a start that waits until it runs, sharing, a save and a discard,
each answer read as JSON; and the exit statuses a script relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from flows import startDev
from twisted.internet import threads


async def downloadsWhole(portal: str, token: str, image: dict[str, Any]) -> None:
    """The saved image as a file through the portal's API: every byte, its SHA-256 the one named."""
    response = await treq.get(
        f"{portal}/api/v1/images/{image['id']}/download", headers={"Authorization": f"Bearer {token}"}, unbuffered=True
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("x-dit4c-digest") == [image["digest"]]
    assert response.headers.getRawHeaders("content-disposition")[0].startswith("attachment; filename=")
    sha = hashlib.sha256()
    size = 0

    def chunk(data: bytes) -> None:
        nonlocal size
        sha.update(data)
        size += len(data)

    await treq.collect(response, chunk)
    assert size > 0 and f"sha256:{sha.hexdigest()}" == image["digest"]


class Person:
    """A person at the portal over HTTP (keeping cookies), as a browser would be."""

    def __init__(self, portal: str) -> None:
        self.portal = portal
        self.cookies: dict[str, str] = {}

    async def request(self, method: str, path: str, data: dict[str, str] | None = None) -> str:
        response = await treq.request(
            method, self.portal + path, data=data, allow_redirects=False,
            headers={"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())},
        )  # fmt: skip
        for raw in response.headers.getRawHeaders("set-cookie", []):
            name, _, rest = raw.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return str(await response.text())

    async def token(self, name: str, password: str) -> str:
        """Log in and make an API token on the account page, as the page tells a person to."""
        page = await self.request("GET", "/login")
        form = {"csrf": csrfOf(page), "username": name, "password": password, "next": "/"}
        await self.request("POST", "/login", form)
        page = await self.request("GET", "/account/")
        page = await self.request("POST", "/account/tokens", {"csrf": csrfOf(page), "name": "command line"})
        match = re.search(r'<code id="new-token">([^<]+)</code>', page)
        assert match, page
        return match.group(1)


def csrfOf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


class CLI:
    """``dit4c`` run as a person runs it, with its own configuration file."""

    def __init__(self, config: Path) -> None:
        self.env = dict(os.environ, DIT4C_CONFIG=str(config))
        self.env.pop("DIT4C_TOKEN", None)
        self.env.pop("DIT4C_PORTAL", None)

    async def run(self, *args: str, stdin: str = "", status: int = 0) -> str:
        result = await threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "dit4c", *args],
            input=stdin, capture_output=True, text=True, env=self.env, timeout=120,
        )  # fmt: skip
        assert result.returncode == status, (args, result.returncode, result.stdout, result.stderr)
        return str(result.stdout if status == 0 else result.stderr)

    async def json(self, *args: str) -> Any:
        return json.loads(await self.run(*args, "--json"))


@pytest_twisted.ensureDeferred
async def test_a_whole_session_from_the_command_line(processes: Any, tmp_path: Path, devDir: Path) -> None:
    dev = await startDev(processes, devDir)
    admin = Person(dev.portal)
    token = await admin.token("admin", await dev.adminPassword())
    cli = CLI(tmp_path / "config" / "portals.json")

    assert "not logged in" in await cli.run("ls", status=3)
    assert f"Logged in to {dev.portal} as admin" in await cli.run("login", dev.portal, "--token-stdin", stdin=token)
    assert (tmp_path / "config" / "portals.json").stat().st_mode & 0o077 == 0  # it holds the token

    images = await cli.json("images")
    assert "Notes (a shared notepad)" in [i["name"] for i in images]
    instance = await cli.json("start", "notes", "--wait")
    assert instance["state"] == "running" and instance["url"].startswith("http://")
    assert [(i["id"], i["state"]) for i in await cli.json("ls")] == [(instance["id"], "running")]
    assert instance["id"] in await cli.run("ls")

    # Sharing, by name (bob is added through the API with the same token).
    await cli.run("user-add", "--help")  # the administrative commands are still there
    assert "nobody called" in await cli.run("share", instance["id"], "bob", status=4)
    await cli.run("unshare", instance["id"], "bob")
    bobAdded = await treq.post(
        dev.portal + "/api/v1/admin/users", json.dumps({"name": "bob"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert bobAdded.code == 201
    access = await cli.json("share", instance["id"], "bob")
    assert [(g["name"], g["link"]) for g in access["shared_with"]] == [("bob", None)]
    assert "Only you" in await cli.run("unshare", instance["id"], "bob")

    # Stopped and resumed, from the command line.
    assert (await cli.json("stop", instance["id"], "--wait"))["state"] == "stopped"
    assert (await cli.json("resume", instance["id"], "--wait"))["state"] == "running"

    # What the tool wrote: its last part, and followed until the save stops it.
    written = await cli.run("logs", instance["id"])
    assert written.strip(), "the tool wrote nothing"
    follower = subprocess.Popen(
        [sys.executable, "-m", "dit4c", "logs", "-f", instance["id"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env,
    )  # fmt: skip
    saved = await cli.json("save", instance["id"], "--wait")
    followed, complaints = await threads.deferToThread(follower.communicate, timeout=60)
    assert follower.returncode == 0, complaints
    assert followed.startswith(written[: len(followed)][:200]) or written in followed, (written, followed)
    assert saved["state"] == "saved"
    [mine] = [i for i in await cli.json("images") if i["mine"]]
    await downloadsWhole(dev.portal, token, mine)
    got = await cli.json("download", mine["id"], "-o", str(tmp_path / "saved.oci.tar"))
    assert got == {"file": str(tmp_path / "saved.oci.tar"), "digest": mine["digest"], "size": got["size"]}
    assert (tmp_path / "saved.oci.tar").stat().st_size == got["size"] > 0
    assert not (tmp_path / "saved.oci.tar.partial").exists()
    assert (await cli.json("discard", instance["id"], "--wait"))["state"] == "discarded"
    assert await cli.json("ls") == []

    # What a script tells apart: no such instance (4), refused (1), a revoked token (3).
    assert "no such instance" in (await cli.run("stop", "nosuchinstance", status=4)).lower()
    assert "not running" in await cli.run("open", instance["id"], status=1)
    page = await admin.request("GET", "/account/")
    [tokenId] = re.findall(r'data-token="([^"]+)"', page)
    await admin.request("POST", f"/account/tokens/{tokenId}/revoke", {"csrf": csrfOf(page)})
    assert "refused the token" in await cli.run("ls", status=3)
