#!/usr/bin/env python3
"""WebSocket echo backend for the idle-connection benchmark (autobahn on Twisted).

Listens on 127.0.0.1 (port 0 picks a free one), prints ``PORT <n>`` on a line
of its own once listening, then echoes every message. A plain HTTP GET without
``Upgrade`` gets autobahn's 200 status page, which is what readiness probes use.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from plumbing import raiseNofile  # bench/plumbing.py


def echoFactory() -> Any:
    """The echo server's factory (autobahn's, on any path), for this process's reactor."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.setProtocolOptions(openHandshakeTimeout=120, closeHandshakeTimeout=5)
    return factory


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--interface", default="127.0.0.1")
    args = p.parse_args()
    raiseNofile()

    from twisted.internet import reactor

    port = reactor.listenTCP(args.port, echoFactory(), backlog=4096, interface=args.interface)
    print(f"PORT {port.getHost().port}", flush=True)  # type: ignore[attr-defined]
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
