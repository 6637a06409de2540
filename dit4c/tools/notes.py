"""
``python -m dit4c.tools.notes --socket PATH`` (or ``--port PORT``): a shared
notepad, the tool that works on any machine DIT4C runs on.

The page lists notes and takes new ones; every browser that has it open
sees each new note at once over a WebSocket (``/ws``), and the notes are
kept in ``notes.txt`` in the working directory, so they survive a restart
and a save. It greets the person the auth helper says is at the browser
(``X-DIT4C-User``).
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dit4c.tools.serve import addListenOptions, serve

log = Logger()

#: The longest note taken, in characters.
MAX_NOTE = 4000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Notes</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }}
#notes li {{ margin: .3rem 0; }} #status {{ color: #666; font-size: .9em; }}
</style></head>
<body>
<h1>Notes</h1>
<p id="greeting">Hello, {user}.</p>
<form id="add"><input id="note" name="note" maxlength="{limit}" autocomplete="off" autofocus
 aria-label="New note"> <button>Add</button></form>
<p id="status">connecting…</p>
<ul id="notes">{notes}</ul>
<script>
const list = document.getElementById("notes"), status = document.getElementById("status");
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => {{ status.textContent = "connected"; }};
ws.onclose = () => {{ status.textContent = "disconnected"; }};
ws.onmessage = (event) => {{
  const li = document.createElement("li");
  li.textContent = JSON.parse(event.data).note;
  list.appendChild(li);
}};
document.getElementById("add").onsubmit = (event) => {{
  event.preventDefault();
  const input = document.getElementById("note");
  if (input.value) {{ ws.send(JSON.stringify({{note: input.value}})); input.value = ""; }}
}};
</script>
</body></html>
"""


class Notes:
    """The notes, on disk, and the browsers watching them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.watchers: set[NotesProtocol] = set()

    def all(self) -> list[str]:
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line]
        except (OSError, ValueError):
            return []

    def add(self, note: str) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(note) + "\n")
        message = json.dumps({"note": note}).encode()
        for watcher in list(self.watchers):
            watcher.sendMessage(message)


class NotesProtocol(WebSocketServerProtocol):
    notes: Notes

    def onOpen(self) -> None:
        self.notes.watchers.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            note = json.loads(payload.decode("utf-8"))["note"]
        except (ValueError, KeyError, TypeError):
            self.sendClose(1003, "send {\"note\": \"...\"}")
            return
        if isinstance(note, str) and 0 < len(note) <= MAX_NOTE:
            self.notes.add(note)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.notes.watchers.discard(self)


class Page(Resource):
    isLeaf = True

    def __init__(self, notes: Notes) -> None:
        super().__init__()
        self.notes = notes

    def render_GET(self, request: Request) -> bytes:
        user = (request.getHeader("x-dit4c-user") or "stranger").strip()
        items = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes.all())
        request.setHeader("content-type", "text/html; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        return PAGE.format(user=html.escape(user), notes=items, limit=MAX_NOTE).encode("utf-8")


def site(directory: Path) -> Site:
    notes = Notes(directory / "notes.txt")
    factory = WebSocketServerFactory()
    protocol: type[NotesProtocol] = type("Protocol", (NotesProtocol,), {"notes": notes})
    factory.protocol = protocol
    factory.setProtocolOptions(maxMessagePayloadSize=64 * 1024, maxFramePayloadSize=64 * 1024)
    root = Resource()
    page = Page(notes)
    root.putChild(b"", page)
    root.putChild(b"ws", WebSocketResource(factory))
    return Site(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit4c.tools.notes", description=__doc__.split("\n\n")[0])
    addListenOptions(parser)
    parser.add_argument("--directory", type=Path, default=Path("."))
    options = parser.parse_args(argv)
    serve(reactor, options, site(options.directory), "notes")


if __name__ == "__main__":
    main()
