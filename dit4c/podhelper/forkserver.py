"""
A fork server for pod helpers: one process per compute node that has
imported everything a pod helper runs (Twisted, cryptography, the auth,
listener and storage code) and forks one pod helper per pod, and the
upload helper of each save.

Why: a pod helper started afresh is ~36 MB of private memory, nearly all of
it the interpreter's copy of the modules it imported. Forked from a parent
that imported them once (and froze them out of the garbage collector's
reach with ``gc.freeze()``, so collections do not write to their pages),
each pod's helper shares those pages with the parent and with every other
pod's, copy-on-write, and owns only what it changes.

How it stays simple across node restarts: the server is a plain child of
the node (no reactor of its own: a blocking loop on its socket) and exits
when its standard input, a pipe from the node, reaches end of file, which
it does when the node stops or dies. Each pod helper it forks calls
``setsid`` at once, so it is in a session of its own, outlives the server
and the node, and is found again as every pod process is, by the pid file
and start time the node writes (:class:`~dit4c.node.processes.PodProcess`).
The server ignores ``SIGCHLD``, so a pod helper that ends is reaped at once
and never lingers as a zombie. A restarted node starts a new server at its
first pod; the old server's children run on.

The upload helper is forked too: started afresh it spent about 0.45 s of
CPU importing what the server has imported already, at every save.

Who may ask: the socket is the node's (mode 0600, in the node's private
data directory; the peer's uid is checked too), and a request can only
choose which of the helpers (:data:`PROGRAMS`) runs, with what options,
environment, working directory and log: the program run is always
``python -m twisted`` with one of them.

The request is one JSON line, ``{"program": NAME, "arguments": [...],
"environment": {...}, "cwd": PATH, "log": PATH}`` (``program`` defaults to
``dit4c-helper-pod``); the answer one JSON line, ``{"pid": N}`` or
``{"error": "why"}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from dit4c.common.helperenv import inherited

__all__ = ["PLUGIN", "PROGRAMS", "PRELOAD", "UPLOAD", "ForkServer", "serve"]

#: What the helpers import, imported once in the server.
PRELOAD = (
    "twisted.internet.epollreactor",
    "twisted.application.twist._twist",
    "twisted.application.internet",
    "twisted.internet.endpoints",
    "twisted.web.client",
    "dit4c.podhelper.tap",
    "dit4c.podhelper.service",
    "dit4c.auth.tap",
    "dit4c.auth.service",
    "dit4c.listener.activity",
    "dit4c.listener.nearest",
    "dit4c.listener.report",
    "dit4c.storage.tap",
    "dit4c.node.processes",
    "dit4c.upload.tap",
    "dit4c.upload.helper",
)
#: The pod's helper process, what a request runs unless it names another.
PLUGIN = "dit4c-helper-pod"
#: The upload helper, which a node forks for each save.
UPLOAD = "dit4c-helper-upload"
#: The programs a child may run (after ``python -m twisted``).
PROGRAMS = (PLUGIN, UPLOAD)
#: The longest request, in bytes (an environment of a few kilobytes).
MAX_REQUEST = 256 * 1024


def _preload() -> None:
    import importlib

    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    for name in PRELOAD:
        importlib.import_module(name)
    # The plugin cache, read once here rather than in every child.
    list(getPlugins(IServiceMaker))


def serve(socketPath: str) -> None:
    """Preload, listen on ``socketPath``, and fork a pod helper per request until standard input closes."""
    import gc
    import selectors
    import signal

    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Bound and listening under another name first: the socket appears
    # (renamed into place) only once it takes connections.
    partial = f"{socketPath}.{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(partial)
    finally:
        os.umask(umask)
    listener.listen(64)
    os.replace(partial, socketPath)
    gc.collect()
    gc.freeze()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(0, selectors.EVENT_READ)
    print(f"pod helper fork server ready on {socketPath} (pid {os.getpid()})", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj == 0:
                if not os.read(0, 4096):
                    print("the node is gone: the fork server stops", flush=True)
                    os.unlink(socketPath)
                    return
                continue
            connection, _ = listener.accept()
            with connection:
                _answer(connection, listener)


def _answer(connection: socket.socket, listener: socket.socket) -> None:
    connection.settimeout(5)
    try:
        uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise ValueError(f"uid {uid} may not ask")
        request = _request(_readLine(connection))
        pid = os.fork()
        if pid == 0:
            _child(request, (connection, listener))
        reply: dict[str, Any] = {"pid": pid}
    except (OSError, ValueError) as e:
        reply = {"error": str(e)}
    try:
        connection.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def _readLine(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            raise ValueError("the request ended early")
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("the request is too long")
    return data


def _request(line: bytes) -> dict[str, Any]:
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError("the request is not an object")
    arguments, environment = request.get("arguments"), request.get("environment")
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ValueError("arguments must be a list of strings")
    if not isinstance(environment, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
    ):
        raise ValueError("environment must map strings to strings")
    if request.setdefault("program", PLUGIN) not in PROGRAMS:
        raise ValueError(f"program must be one of {', '.join(PROGRAMS)}")
    for name in ("cwd", "log"):
        if not isinstance(request.get(name), str) or not os.path.isabs(request[name]):
            raise ValueError(f"{name} must be an absolute path")
    return request


def _child(request: Mapping[str, Any], sockets: Sequence[socket.socket]) -> None:
    """In the forked child: become the helper asked for; never returns."""
    import signal
    import traceback

    status = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for s in sockets:
            s.detach()  # closed below by number: the objects must not close a reused fd later
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["environment"])
        argv = ["twist", "--log-format", "text", request["program"], *request["arguments"]]
        sys.argv = argv
        from twisted.application.twist._twist import Twist

        Twist.main(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


# -- the node's side -------------------------------------------------------------------------------


class _Reply(Protocol):
    """Sends the request; what the server answers, once it closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


class ForkServer:
    """
    The node's handle on its fork server: started at the first request,
    asked for one pod helper per pod, stopped with the node (or when the
    node dies: its standard input closes).
    """

    log = Logger()

    def __init__(self, reactor: Any, socketPath: Path, logPath: Path, *, startTimeout: float = 60.0) -> None:
        self.reactor = reactor
        self.socketPath = socketPath
        self.logPath = logPath
        self.startTimeout = startTimeout
        self._process: Any = None
        self._starting: Deferred[None] | None = None

    def spawn(
        self, arguments: Sequence[str], environment: Mapping[str, str], cwd: Path, log: Path, program: str = PLUGIN
    ) -> Deferred[int]:
        """``program`` (one of :data:`PROGRAMS`) forked with these options, environment, working directory and log: its pid."""
        return Deferred.fromCoroutine(self._spawn(program, list(arguments), dict(environment), cwd, log))

    async def _spawn(self, program: str, arguments: list[str], environment: dict[str, str], cwd: Path, log: Path) -> int:
        await self._running()
        request = {
            "program": program, "arguments": arguments, "environment": environment, "cwd": str(cwd), "log": str(log),
        }  # fmt: skip
        reply = json.loads(await self._ask(json.dumps(request).encode() + b"\n"))
        if "pid" not in reply:
            raise OSError(f"the pod helper fork server refused: {reply.get('error')}")
        return int(reply["pid"])

    def _ask(self, request: bytes) -> Deferred[bytes]:
        client = _Reply(request)
        d = connectProtocol(UNIXClientEndpoint(self.reactor, str(self.socketPath), timeout=5), client)
        return d.addCallback(lambda _: client.done).addTimeout(30, self.reactor)

    async def _running(self) -> None:
        """The server, started if it is not running (one start for every request that waits on it)."""
        if self._process is not None and self._process.pid is not None and self.socketPath.exists():
            return
        if self._starting is None:
            self._starting = Deferred.fromCoroutine(self._start())

            def started(result: object) -> object:
                self._starting = None
                return result

            self._starting.addBoth(started)
        waiter: Deferred[None] = Deferred()

        def relay(result: Any) -> Any:
            waiter.callback(result)
            return result

        self._starting.addBoth(relay)
        await waiter

    async def _start(self) -> None:
        self.socketPath.unlink(missing_ok=True)
        log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._process = self.reactor.spawnProcess(
                ProcessProtocol(),
                sys.executable,
                [sys.executable, "-m", "dit4c.podhelper.forkserver", "--socket", str(self.socketPath)],
                env=inherited(),
                path=str(self.socketPath.parent),
                childFDs={0: "w", 1: log, 2: log},
            )
        finally:
            os.close(log)
        waited = 0.0
        while not self.socketPath.exists():
            if self._process.pid is None or waited > self.startTimeout:
                raise OSError(f"the pod helper fork server did not start (see {self.logPath})")
            await deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05
        self.log.info("pod helper fork server started (pid {pid})", pid=self._process.pid)

    def stop(self) -> None:
        """Let the server go (it exits once its standard input closes); pod helpers run on."""
        process, self._process = self._process, None
        if process is not None and process.pid is not None:
            process.closeStdin()


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dit4c.podhelper.forkserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on (in a directory only this user may enter)")
    options = parser.parse_args(argv)
    serve(options.socket)


if __name__ == "__main__":
    main()
