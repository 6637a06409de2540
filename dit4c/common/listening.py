"""
Listening before anything is built on the port: a socket bound (port 0:
whichever port the kernel gives) and listening at once, for a server whose
own URLs name its port, or for a process that hands the socket to another.

A port read back from such a socket was never free for another program to
take: it is the one alternative to choosing a free port and binding it
later, which races with every other process on the machine.
"""

from __future__ import annotations

import resource
import socket
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import CannotListenError

__all__ = ["BACKLOG", "adopted", "listeningSocket", "raiseOpenFileLimit"]

#: Connections waiting to be accepted (Twisted's own default for ``listenTCP``).
BACKLOG = 50


def raiseOpenFileLimit() -> tuple[int, int] | None:
    """
    Raise this process's soft limit on open files to its hard limit, as
    HAProxy and nginx do: every connection a server holds is a descriptor,
    and systemd starts services with a soft limit of 1,024 under a hard one
    of 524,288, so a routing server left at the soft limit would stop
    taking connections at about a thousand. A site sets the hard limit
    (``LimitNOFILE=``); the server uses all of it. The ``(old, new)`` soft
    limits if raised, None if it was already at the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def listeningSocket(host: str = "127.0.0.1", port: int = 0, backlog: int = BACKLOG) -> socket.socket:
    """
    A TCP socket bound to ``host:port`` and listening; ``getsockname()``
    says the port it got. ``SO_REUSEADDR`` is set, as Twisted sets it, so a
    server started again comes back on its port while old connections to
    it linger in ``TIME_WAIT``.

    :raises CannotListenError: the address cannot be bound (in use, not
        this machine's), as a Twisted endpoint would say.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(host, port, e) from None
    return sock


def adopted(reactor: Any, sock: socket.socket) -> AdoptedStreamServerEndpoint:
    """
    A server endpoint that serves on ``sock`` (listening already). The
    endpoint owns the socket from now on: it closes its descriptor once it
    listens, and ``sock`` is detached here.
    """
    family = sock.family
    return AdoptedStreamServerEndpoint(reactor, sock.detach(), family)
