"""
How DIT4C's own tools listen: on the Unix socket the node gives them
(``--socket PATH``, mode 0600: only the tool's user, and root, may connect;
the auth helper is the way in), or on a TCP port (``--port``), for running
one by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

__all__ = ["addListenOptions", "serve"]

log = Logger()


def addListenOptions(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Listen on this Unix socket (what the compute node gives the tool).")
    where.add_argument("--port", type=int, help="Listen on this TCP port instead.")
    parser.add_argument("--interface", default="127.0.0.1", help="With --port: the address to listen on.")


def endpointString(options: argparse.Namespace) -> str:
    if options.socket:
        return f"unix:{quoteStringArgument(str(options.socket))}:mode=600"
    return f"tcp:{options.port}:interface={options.interface}"


def serve(reactor: Any, options: argparse.Namespace, site: Site, what: str) -> None:
    """Log to standard output, listen where ``options`` say, and run until stopped."""
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    description = endpointString(options)

    def failed(failure: Any) -> None:
        log.failure("{what}: cannot listen on {where}", failure, what=what, where=description)
        reactor.stop()

    serverFromString(reactor, description).listen(site).addErrback(failed)
    log.info("{what} on {where}", what=what, where=description)
    reactor.run()
