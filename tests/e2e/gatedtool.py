"""
A web tool whose life a test holds: ``python gatedtool.py SOCKET DIRECTORY``.

It serves (``ok`` to any HTTP request, on the Unix socket ``SOCKET``) only
once the file ``DIRECTORY/serve`` exists, and on SIGTERM ends only once
``DIRECTORY/end`` exists: until then an instance of it stays ``starting``,
or ``stopping`` (for the node's stop grace). The directory is the tool's
working directory (``{dir}``), the one place outside its socket directory
that it sees and a test can write to.

Standard library only: it runs confined, as a uid of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

SERVE = "serve"
END = "end"


def waitFor(directory: str, name: str) -> None:
    while not os.path.exists(os.path.join(directory, name)):
        time.sleep(0.05)


def main() -> None:
    path, directory = sys.argv[1], sys.argv[2]

    def ended(number: int, frame: object) -> None:
        waitFor(directory, END)
        os._exit(0)

    signal.signal(signal.SIGTERM, ended)
    waitFor(directory, SERVE)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    while True:
        connection, _ = server.accept()
        with connection:
            connection.settimeout(5)
            try:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except OSError:
                pass


if __name__ == "__main__":
    main()
