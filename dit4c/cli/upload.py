"""
``dit4c upload FILE [--name NAME] [--tool TOOL]``: a saved image's file (as
``dit4c download`` wrote it) sent to the portal as a new saved image of
yours (``POST /api/v1/images``, the file as the body).

The file is streamed, a block at a time, never read whole. Between blocks
the connection is watched for an early answer: the portal refuses a file
over its limit, a token it does not take or a tool it does not know before
reading the rest, and the refusal is what is shown, not a broken pipe.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import select
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit

from .registry import command, printJSON
from .remote import NOT_FOUND, NOT_LOGGED_IN, TIMEOUT, Portal, RemoteError, _common, _run

__all__ = ["sendFile"]

#: The bytes sent at a time.
BLOCK = 1 << 20


def sendFile(portal: Portal, path: Path, params: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The new image's JSON, and the SHA-256 of what was sent, or a ``RemoteError`` that says why not."""
    base = urlsplit(portal.url)
    target = f"{base.path}/api/v1/images?{urlencode(params)}"
    connection: http.client.HTTPConnection
    if base.scheme == "https":
        connection = http.client.HTTPSConnection(base.netloc, timeout=TIMEOUT)
    else:
        connection = http.client.HTTPConnection(base.netloc, timeout=TIMEOUT)
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            connection.putrequest("POST", target)
            for name, value in (
                ("Authorization", f"Bearer {portal.token}"),
                ("Content-Type", "application/x-tar"),
                ("Content-Length", str(size)),
                ("Accept", "application/json"),
            ):
                connection.putheader(name, value)
            connection.endheaders()
            sock = connection.sock
            while piece := f.read(BLOCK):
                if select.select([sock], [], [], 0)[0]:
                    break  # the portal answered before the whole file: a refusal
                sha.update(piece)
                try:
                    connection.send(piece)
                except OSError:
                    break  # closed under us: its answer, if it came, says why
        # No timeout for the answer: the portal answers once the image server stored it all.
        if sock is not None:
            sock.settimeout(None)
        response = connection.getresponse()
        body = response.read()
    except FileNotFoundError:
        raise RemoteError(f"there is no file {path}", 2) from None
    except (OSError, http.client.HTTPException) as e:
        raise RemoteError(f"cannot upload to {portal.url}: {e}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if response.status != 201 or not isinstance(answer, dict):
        reason = answer.get("reason") if isinstance(answer, dict) else None
        reason = str(reason or f"the portal answered {response.status} {response.reason}")
        if response.status == 401:
            raise RemoteError(
                f"{portal.url} refused the token ({reason}): run 'dit4c login {portal.url}' with a new one",
                NOT_LOGGED_IN,
            )
        raise RemoteError(reason, NOT_FOUND if response.status == 404 else 1)
    return answer, f"sha256:{sha.hexdigest()}"


def _uploadArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a saved image's file, as 'dit4c download' wrote it")
    parser.add_argument("--name", help="the new image's name (default: the file's name, without .oci.tar)")
    parser.add_argument(
        "--tool", help="the catalogue's tool it is for (dit4c images); needed only when the file does not say"
    )
    _common(parser)


@command("upload", help="a saved image's file as a new saved image of yours", arguments=_uploadArguments)
@_run
def upload(args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.file)
    params = {"filename": path.name}
    if args.name:
        params["name"] = args.name
    if args.tool:
        params["tool"] = args.tool
    image, sent = sendFile(Portal.chosen(args), path, params)
    if image.get("digest") != sent:
        raise RemoteError(f"the portal kept {image.get('digest')}, but {sent} was sent: the file changed meanwhile?")
    if args.json:
        printJSON(image, out)
    else:
        out.write(f"{image['id']}  {image['name']}  {image['digest']}\n")
    return 0
