"""
A bare Twisted byte forwarder (``twisted.protocols.portforward``, with
TCP_NODELAY as dit4c's fronts set it) on a loopback port 0, which it
announces as dit4c's servers do, to ``127.0.0.1:PORT``: no HTTP parsing, no
tunnel, no checks. Two of these in a chain are the fewest Python steps any
path through two Twisted processes can take, which the path people use
(the routing server, then the pod's helper) is; ``bench/tunnel.py --paths
floor`` measures them.

    python bench/forward.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.protocols import portforward


class _Client(portforward.ProxyClient):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class _ClientFactory(portforward.ProxyClientFactory):
    protocol = _Client


class _Server(portforward.ProxyServer):
    clientProtocolFactory = _ClientFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class _Factory(portforward.ProxyFactory):
    protocol = _Server


if __name__ == "__main__":
    port = reactor.listenTCP(0, _Factory("127.0.0.1", int(sys.argv[1])), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"forwarder listening on {port.getHost()}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
