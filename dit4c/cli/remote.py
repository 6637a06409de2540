"""
A person's daily use of a portal from the command line, on its REST API
(``/api/v1/``, described at ``/api/v1/openapi.json``) with a personal API
token made on the portal's account page: ``dit4c login URL``, then ``ls``,
``images``, ``start``, ``stop``, ``save``, ``discard``, ``share``,
``unshare``, ``access``, ``logs``, ``open`` and ``download``. Every listing takes ``--json`` for
programs.

The token is kept in ``$XDG_CONFIG_HOME/dit4c/portals.json`` (or the file
``DIT4C_CONFIG`` names), readable by its owner only; ``DIT4C_PORTAL`` and
``DIT4C_TOKEN`` take its place for a script.

Exit status: 0 done; 1 the portal refused or failed (it says why); 2 a
usage error; 3 not logged in, or the token was refused; 4 no such thing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from email.message import Message
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from dit4c.common.life import State

from .registry import CommandError, command, printJSON

__all__ = ["NOT_FOUND", "NOT_LOGGED_IN", "Portal", "configPath"]

#: Exit status: not logged in, or the token was refused.
NOT_LOGGED_IN = 3
#: Exit status: no such instance, image or person.
NOT_FOUND = 4

#: How long one request may take.
TIMEOUT = 30.0


class RemoteError(CommandError):
    """A refusal with its own exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def configPath() -> Path:
    """Where the portals and their tokens are kept."""
    named = os.environ.get("DIT4C_CONFIG")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dit4c" / "portals.json"


def _readConfig() -> dict[str, Any]:
    try:
        document = json.loads(configPath().read_text())
    except FileNotFoundError:
        return {"portals": {}}
    except (OSError, ValueError) as e:
        raise RemoteError(f"cannot read {configPath()}: {e}") from None
    return document if isinstance(document, dict) else {"portals": {}}


def _writeConfig(document: dict[str, Any]) -> None:
    path = configPath()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".new")
    # Owner-only from its first byte: it holds tokens.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _portalURL(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"{url!r} is not a portal's address (http:// or https://)", 2)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class Portal:
    """The REST API of one portal, as one person (their token)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    @classmethod
    def chosen(cls, args: argparse.Namespace) -> Portal:
        """The portal named by ``--portal``, ``DIT4C_PORTAL`` or the last login, with its token."""
        config = _readConfig()
        url = args.portal or os.environ.get("DIT4C_PORTAL") or config.get("default")
        if not url:
            raise RemoteError("not logged in to any portal: run 'dit4c login URL'", NOT_LOGGED_IN)
        url = _portalURL(url)
        token = os.environ.get("DIT4C_TOKEN") or config.get("portals", {}).get(url, {}).get("token")
        if not token:
            raise RemoteError(f"not logged in to {url}: run 'dit4c login {url}'", NOT_LOGGED_IN)
        return cls(url, token)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The API's answer to ``method path`` (JSON), or a ``RemoteError`` that says why not."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + "/api/v1" + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise self._refusal(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RemoteError(f"cannot reach {self.url}: {reason}") from None

    def stream(self, path: str, out: TextIO) -> None:
        """Copy a growing plain-text answer to ``out`` as it comes, until it ends."""
        request = urllib.request.Request(self.url + "/api/v1" + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        try:
            # No timeout between pieces: a quiet tool writes nothing for a long time.
            with urllib.request.urlopen(request) as response:
                while piece := response.read1(65536):
                    out.write(piece.decode("utf-8", "replace"))
                    out.flush()
        except urllib.error.HTTPError as e:
            raise self._refusal(e) from None
        except (urllib.error.URLError, OSError) as e:
            raise RemoteError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None

    def download(self, path: str, output: str | None) -> tuple[Path, str, int]:
        """
        The file the API answers ``path`` with, written to ``output`` (or the
        name the answer gives, here) as it comes; its path, SHA-256 and size.
        It is written beside as ``.partial`` and takes its name only once
        every byte came and its SHA-256 is the one the portal named.
        """
        request = urllib.request.Request(self.url + "/api/v1" + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        partial: Path | None = None
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                target = Path(output or _attachmentName(response.headers.get("Content-Disposition")))
                partial = target.with_name(target.name + ".partial")
                sha, size = hashlib.sha256(), 0
                with open(partial, "wb") as f:
                    while piece := response.read1(1 << 20):
                        sha.update(piece)
                        f.write(piece)
                        size += len(piece)
                expected = response.headers.get("Content-Length")
                if expected is not None and expected.isdigit() and int(expected) != size:
                    raise RemoteError(f"the download ended after {size} of {expected} bytes; try again")
                digest, named = f"sha256:{sha.hexdigest()}", response.headers.get("X-DIT4C-Digest")
                if named and named != digest:
                    raise RemoteError(f"what arrived is {digest}, not {named}: it was damaged on the way; try again")
                partial.replace(target)
                partial = None
                return target, digest, size
        except urllib.error.HTTPError as e:
            raise self._refusal(e) from None
        except (urllib.error.URLError, OSError) as e:
            raise RemoteError(f"cannot download from {self.url}: {getattr(e, 'reason', e)}") from None
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)

    def _refusal(self, error: urllib.error.HTTPError) -> RemoteError:
        try:
            reason = str(json.loads(error.read()).get("reason") or error.reason)
        except (ValueError, AttributeError, OSError):
            reason = str(error.reason)
        if error.code == 401:
            return RemoteError(
                f"{self.url} refused the token ({reason}): run 'dit4c login {self.url}' with a new one",
                NOT_LOGGED_IN,
            )
        return RemoteError(reason, NOT_FOUND if error.code == 404 else 1)


def _attachmentName(disposition: str | None) -> str:
    """The file name a ``Content-Disposition`` gives, as a name in this directory (never a path)."""
    header = Message()
    header["Content-Disposition"] = disposition or "attachment"
    name = os.path.basename(header.get_filename() or "").strip()
    return name if name not in ("", ".", "..") else "image.oci.tar"


# -- arguments --------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, listing: bool = True) -> None:
    parser.add_argument("--portal", help="the portal's address (default: the one logged in to last)")
    if listing:
        parser.add_argument("--json", action="store_true", help="print JSON, for programs")


def _withInstance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", metavar="ID", help="the instance's id (dit4c ls)")
    _common(parser)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _run(run: Any) -> Any:
    """Turn a ``RemoteError`` into its exit status (with the message on stderr)."""

    def wrapped(args: argparse.Namespace, out: TextIO) -> int:
        try:
            status: int = run(args, out)
        except RemoteError as e:
            if e.status == 1:
                raise
            sys.stderr.write(f"dit4c {args.command}: error: {e}\n")
            return e.status
        return status

    wrapped.__doc__ = run.__doc__
    return wrapped


# -- login -------------------------------------------------------------------------------------------


def _loginArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the portal's address, e.g. https://portal.example.org")
    parser.add_argument(
        "--token-stdin", action="store_true", help="read the token from standard input instead of asking"
    )


@command("login", help="log in to a portal with a personal API token (made on its account page)", arguments=_loginArguments)
@_run
def login(args: argparse.Namespace, out: TextIO) -> int:
    url = _portalURL(args.url)
    if args.token_stdin or not sys.stdin.isatty():
        token = sys.stdin.readline().strip()
    else:
        import getpass

        out.write(f"Make a token on {url}/account/ and paste it here.\n")
        out.flush()
        token = getpass.getpass("Token: ").strip()
    if not token:
        raise RemoteError("no token given", 2)
    me = Portal(url, token).call("GET", "/me")
    config = _readConfig()
    config.setdefault("portals", {})[url] = {"token": token, "name": me.get("name")}
    config["default"] = url
    _writeConfig(config)
    out.write(f"Logged in to {url} as {me.get('name')}.\n")
    return 0


def _logoutArguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, listing=False)


@command("logout", help="forget this portal's token here (revoke it on the account page)", arguments=_logoutArguments)
@_run
def logout(args: argparse.Namespace, out: TextIO) -> int:
    config = _readConfig()
    url = _portalURL(args.portal or config.get("default") or "")
    config.get("portals", {}).pop(url, None)
    if config.get("default") == url:
        config.pop("default")
    _writeConfig(config)
    out.write(f"Forgot the token of {url}; revoke it at {url}/account/ if it may have leaked.\n")
    return 0


# -- what there is -------------------------------------------------------------------------------


def _listArguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)


@command("ls", help="your instances and those shared with you", arguments=_listArguments)
@_run
def listInstances(args: argparse.Namespace, out: TextIO) -> int:
    portal = Portal.chosen(args)
    instances = portal.call("GET", "/instances")
    if args.json:
        printJSON(instances, out)
        return 0
    names = {image["id"]: image["name"] for image in portal.call("GET", "/images")}
    if not instances:
        out.write("No instances.\n")
        return 0
    rows = [["ID", "TOOL", "STATE", "URL", ""]]
    for i in instances:
        url = i["url"] if i["state"] == State.RUNNING and i["url"] else ""
        rows.append([i["id"], names.get(i["image"], i["image"]), i["state"], url, "shared with you" if i["shared"] else ""])
    _table(rows, out)
    return 0


@command("images", help="the tools you may start: the catalogue and your saved images", arguments=_listArguments)
@_run
def listImages(args: argparse.Namespace, out: TextIO) -> int:
    images = Portal.chosen(args).call("GET", "/images")
    if args.json:
        printJSON(images, out)
        return 0
    rows = [["ID", "NAME", ""]] + [[i["id"], i["name"], "saved by you" if i.get("mine") else ""] for i in images]
    _table(rows, out)
    return 0


# -- starting and the other actions ----------------------------------------------------------------


def _startArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", metavar="TOOL", help="an image's id or name (or the start of one name)")
    parser.add_argument("--where", metavar="SCHEDULER", help="the scheduler (cluster) to run on")
    parser.add_argument("--wait", action="store_true", help="wait until it runs, then print its URL")
    parser.add_argument("--timeout", type=float, default=300.0, help="how long --wait waits (seconds)")
    _common(parser)


def _image(portal: Portal, tool: str) -> dict[str, Any]:
    images: list[dict[str, Any]] = portal.call("GET", "/images")
    for matches in (
        [i for i in images if i["id"] == tool],
        [i for i in images if i["name"].lower() == tool.lower()],
        [i for i in images if i["name"].lower().startswith(tool.lower())],
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise RemoteError(f"{tool!r} could be any of: {', '.join(i['name'] for i in matches)}", 2)
    raise RemoteError(f"there is no tool {tool!r}: 'dit4c images' lists them", NOT_FOUND)


def _waitFor(portal: Portal, instance: dict[str, Any], wanted: set[str], timeout: float) -> dict[str, Any]:
    """The instance once its state is one of ``wanted``; an error if it errs or the time runs out."""
    deadline = time.monotonic() + timeout
    while instance["state"] not in wanted:
        if instance["state"] == State.ERRORED:
            raise RemoteError(f"instance {instance['id']} errored: {instance.get('reason') or 'no reason given'}")
        if time.monotonic() > deadline:
            raise RemoteError(f"instance {instance['id']} is still {instance['state']} after {timeout:.0f} s")
        time.sleep(0.5)
        instance = portal.call("GET", f"/instances/{quote(instance['id'], safe='')}")
    return instance


def _show(instance: dict[str, Any], args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        printJSON(instance, out)
    elif instance["state"] == State.RUNNING and instance.get("url"):
        out.write(f"{instance['id']} is running at {instance['url']}\n")
    else:
        out.write(f"{instance['id']} is {instance['state']}\n")


@command("start", help="start a tool; prints the new instance (its URL with --wait)", arguments=_startArguments)
@_run
def start(args: argparse.Namespace, out: TextIO) -> int:
    portal = Portal.chosen(args)
    image = _image(portal, args.tool)
    body = {"image": image["id"]}
    if args.where:
        body["scheduler"] = args.where
    instance = portal.call("POST", "/instances", body)
    if args.wait:
        instance = _waitFor(portal, instance, {State.RUNNING}, args.timeout)
    _show(instance, args, out)
    return 0


def _actionArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", metavar="ID", help="the instance's id (dit4c ls)")
    parser.add_argument("--wait", action="store_true", help="wait until it is done")
    parser.add_argument("--timeout", type=float, default=600.0, help="how long --wait waits (seconds)")
    _common(parser)


def _action(name: str, done: set[str]) -> Any:
    def act(args: argparse.Namespace, out: TextIO) -> int:
        portal = Portal.chosen(args)
        instance = portal.call("POST", f"/instances/{quote(args.instance, safe='')}/{name}")
        if args.wait:
            instance = _waitFor(portal, instance, done, args.timeout)
        _show(instance, args, out)
        return 0

    return _run(act)


command("stop", help="stop an instance, keeping its files", arguments=_actionArguments)(
    _action("stop", {State.STOPPED})
)
command("save", help="save an instance as an image of yours (a running one is stopped first)", arguments=_actionArguments)(
    _action("save", {State.SAVED})
)
command("resume", help="start a stopped instance again, its files as they were", arguments=_actionArguments)(
    _action("resume", {State.RUNNING})
)
command("discard", help="remove a stopped, saved or errored instance: nothing of it is left", arguments=_actionArguments)(
    _action("discard", {State.DISCARDED})
)


# -- sharing ------------------------------------------------------------------------------------------


def _shareArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", metavar="ID", help="the instance's id (dit4c ls)")
    parser.add_argument("name", metavar="NAME", help="the person's login name")
    _common(parser)


def _showAccess(access: dict[str, Any], args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        printJSON(access, out)
        return
    people = access["shared_with"]
    if not people:
        out.write("Only you.\n")
        return
    rows = [["NAME", "HOW"]] + [[g["name"], f"share link {g['link']}" if g["link"] else "named by you"] for g in people]
    _table(rows, out)


@command("share", help="let another person use an instance of yours", arguments=_shareArguments)
@_run
def share(args: argparse.Namespace, out: TextIO) -> int:
    access = Portal.chosen(args).call("POST", f"/instances/{quote(args.instance, safe='')}/shares", {"user": args.name})
    _showAccess(access, args, out)
    return 0


@command("unshare", help="take an instance back from a person, however they came to use it", arguments=_shareArguments)
@_run
def unshare(args: argparse.Namespace, out: TextIO) -> int:
    path = f"/instances/{quote(args.instance, safe='')}/shares/{quote(args.name, safe='')}"
    _showAccess(Portal.chosen(args).call("DELETE", path), args, out)
    return 0


@command("access", help="who may use an instance of yours, and how", arguments=_withInstance)
@_run
def access(args: argparse.Namespace, out: TextIO) -> int:
    _showAccess(Portal.chosen(args).call("GET", f"/instances/{quote(args.instance, safe='')}/shares"), args, out)
    return 0


def _logsArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", metavar="ID", help="the instance's id (dit4c ls)")
    parser.add_argument("-f", "--follow", action="store_true", help="go on printing what the tool writes until it stops")
    _common(parser)


@command("logs", help="what an instance's tool wrote (its last part; -f follows it)", arguments=_logsArguments)
@_run
def logs(args: argparse.Namespace, out: TextIO) -> int:
    portal = Portal.chosen(args)
    path = f"/instances/{quote(args.instance, safe='')}/logs"
    if args.follow:
        portal.stream(path + "?follow=1", out)
        return 0
    piece = portal.call("GET", path)
    if args.json:
        printJSON(piece, out)
    else:
        out.write(piece["text"])
        if piece.get("error"):
            raise RemoteError(piece["error"])
    return 0


def _openArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", metavar="ID", help="the instance's id (dit4c ls)")
    parser.add_argument("--print", action="store_true", help="print its URL instead of opening a browser")
    _common(parser, listing=False)


@command("open", help="open a running instance in the web browser", arguments=_openArguments)
@_run
def openInstance(args: argparse.Namespace, out: TextIO) -> int:
    instance = Portal.chosen(args).call("GET", f"/instances/{quote(args.instance, safe='')}")
    if instance["state"] != State.RUNNING or not instance.get("url"):
        raise RemoteError(f"{instance['id']} is {instance['state']}, not running: it has no address now")
    if args.print or not webbrowser.open(instance["url"]):
        out.write(instance["url"] + "\n")
    return 0


def _downloadArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the saved image's id (dit4c images)")
    parser.add_argument("-o", "--output", help="the file to write (default: the image's name, here)")
    _common(parser)


@command("download", help="a saved image as a file (an OCI archive), its SHA-256 checked", arguments=_downloadArguments)
@_run
def download(args: argparse.Namespace, out: TextIO) -> int:
    target, digest, size = Portal.chosen(args).download(f"/images/{quote(args.image, safe='')}/download", args.output)
    if args.json:
        printJSON({"file": str(target), "digest": digest, "size": size}, out)
    else:
        out.write(f"{target}: {size} bytes, {digest}\n")
    return 0
