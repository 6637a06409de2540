"""
``twistd`` children forked from a warm interpreter, for the tests.

Why: a test worker starts a few hundred servers (``twistd -n dit4c-portal``,
``-routing``, ``-node``, ``dit4c-dev``...) in a full run, and each one
started afresh spends 0.4 to 1 s of CPU importing Twisted, cryptography,
Klein and the server's own modules before it does anything: on this
project's two cores that was a good part of the run. A zygote (one per
worker, started at its first server) imports them once; each server is then
a ``fork`` of it that runs ``twistd`` with its own arguments, environment,
working directory and log, in a session of its own, as
:class:`~support.processes.Process` starts any command. What the server
does is the same code as ``twistd`` run afresh; what is not covered so is
starting from nothing, which the tests that run ``--help``, bad options and
the console scripts keep doing (they do not come here).

Two things make a fork of an interpreter that imported Twisted safe:

- no reactor exists before the fork: ``twistd`` installs one in the child.
  Klein and Twisted's SSH server import ``twisted.internet.reactor`` at the
  top of a module (which installs the default one); while they are
  imported here, that name is a stand-in that forwards every attribute to
  the reactor the child installs later (:class:`_LaterReactor`), and the
  stand-in is gone from ``sys.modules`` before any fork;
- the zygote reaps its children and reports each one's exit status, so
  :class:`ForkedProcess` answers ``poll`` and ``wait`` as ``Popen`` does.

``DIT4C_TEST_FORK=0`` starts every server afresh instead.

The protocol is one JSON line each way on a socket pair: ``{"argv": [...],
"env": {...}, "cwd": PATH, "log": PATH}`` asks for a child and is answered
``{"pid": N}`` (or ``{"error": "why"}``); ``{"exited": N, "code": C}``
comes whenever a child ends (``C`` as ``Popen.returncode`` has it: negative
for a signal).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ForkedProcess", "forkTwistd", "enabled"]

#: What the zygote imports before it forks: twistd itself, every server's
#: tap, and the plugins twistd looks for.
PRELOAD = (
    "twisted.scripts.twistd",
    "dit4c.portal.tap",
    "dit4c.routing.tap",
    "dit4c.scheduler.tap",
    "dit4c.node.tap",
    "dit4c.imageserver.tap",
    "dit4c.fileserver.tap",
    "dit4c.dev.tap",
)

#: Puts the listening sockets ``given`` (descriptors) at 3, 4, ... with
#: ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` set, as systemd's socket activation
#: does: Python source, for the zygote's children and for
#: :data:`support.processes._HANDOVER`.
HANDOVER = """
import fcntl, os


def handOver(given):
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(given)) for fd in given]
    for fd in given:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    # Named by the caller (LISTEN_FDNAMES in the environment it gave), or socket0, socket1...
    names = os.environ.get("LISTEN_FDNAMES") or ":".join(f"socket{index}" for index in range(len(given)))
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(given)), LISTEN_FDNAMES=names)
"""

_ZYGOTE = HANDOVER + r"""
import gc, json, select, signal, socket, sys, traceback

control = socket.socket(fileno=int(sys.argv[1]))
preload = sys.argv[2].split(",")

import twisted.internet


class _LaterReactor:
    '''What a module that imports twisted.internet.reactor gets here: the reactor twistd installs in the child.'''

    def __getattr__(self, name):
        real = sys.modules.get("twisted.internet.reactor")
        if real is None or real is self:
            raise AttributeError(f"the reactor was used before twistd installed one (reactor.{name})")
        return getattr(real, name)


# Twisted's SSH server keeps IReactorTime(reactor) in a class attribute.
from twisted.internet.epollreactor import EPollReactor
from zope.interface import classImplements, implementedBy

classImplements(_LaterReactor, implementedBy(EPollReactor))
stand_in = _LaterReactor()
sys.modules["twisted.internet.reactor"] = stand_in
twisted.internet.reactor = stand_in
for name in preload:
    __import__(name)
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

list(getPlugins(IServiceMaker))
del sys.modules["twisted.internet.reactor"]
del twisted.internet.reactor
sys.stdout.flush()
sys.stderr.flush()
gc.collect()
gc.freeze()

wakeRead, wakeWrite = os.pipe()
os.set_blocking(wakeRead, False)
os.set_blocking(wakeWrite, False)
signal.set_wakeup_fd(wakeWrite)
signal.signal(signal.SIGCHLD, lambda *_: None)


def send(message):
    control.sendall(json.dumps(message).encode() + b"\n")


def child(request, given):
    code = 1
    try:
        control.close()
        signal.set_wakeup_fd(-1)
        os.close(wakeRead)
        os.close(wakeWrite)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        if given:
            handOver(given)
        # Twisted reads the handed-over sockets from the environment when
        # its endpoints module is imported: here, that was in the zygote.
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        endpoints._SystemdParser._sddaemon = ListenFDs.fromEnvironment()
        import tempfile

        tempfile.tempdir = None  # found again from this child's TMPDIR
        sys.argv = request["argv"]
        from twisted.scripts.twistd import run

        run()
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


buffer = b""
received = []
while True:
    try:
        ready, _, _ = select.select([control, wakeRead], [], [])
    except InterruptedError:
        continue
    if wakeRead in ready:
        try:
            while os.read(wakeRead, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    if control in ready:
        data, fds, _, _ = socket.recv_fds(control, 65536, 16)
        if not data:
            break
        received += fds
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            given, received = received[: request["fds"]], received[request["fds"] :]
            try:
                pid = os.fork()
            except OSError as e:
                pid = None
                send({"error": str(e)})
            if pid == 0:
                child(request, given)
            for fd in given:
                os.close(fd)
            if pid is not None:
                send({"pid": pid})
"""


def enabled() -> bool:
    """Whether servers are forked from the zygote (``DIT4C_TEST_FORK`` is not ``0``)."""
    return os.environ.get("DIT4C_TEST_FORK", "1") != "0"


class _Zygote:
    """The worker's end of its zygote: requests, and the exit statuses it reports."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, str(theirs.fileno()), ",".join(PRELOAD)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self._socket = ours
        self._buffer = b""
        self._exited: dict[int, int] = {}
        self._lock = threading.Lock()

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        """What arrives within ``timeout`` seconds (all that is there already, if any), exits recorded."""
        ready, _, _ = select.select([self._socket], [], [], timeout)
        if not ready:
            return []
        data = self._socket.recv(1 << 20)
        if not data:
            raise RuntimeError(f"the test zygote ended ({self._process.poll()})")
        self._buffer += data
        messages = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self._exited[message["exited"]] = message["code"]
            else:
                messages.append(message)
        return messages

    def fork(self, argv: list[str], env: dict[str, str], log: Path, descriptors: list[int]) -> int:
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "log": str(log), "fds": len(descriptors)}
        line = json.dumps(request).encode() + b"\n"
        with self._lock:
            # The descriptors ride on the line's first byte; one request is in flight at a time.
            sent = socket.send_fds(self._socket, [line[:1]], descriptors) if descriptors else 0
            self._socket.sendall(line[sent:])
            while True:
                for message in self._read(60):
                    if "error" in message:
                        raise OSError(f"the test zygote could not fork: {message['error']}")
                    return int(message["pid"])

    def exitCode(self, pid: int, timeout: float) -> int | None:
        """``pid``'s exit code once it has ended, waiting at most ``timeout`` seconds; None if it runs on."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._read(0)
            while pid not in self._exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._read(left)
            return self._exited[pid]


_zygote: list[_Zygote] = []
_starting = threading.Lock()


def _theZygote() -> _Zygote:
    with _starting:
        if not _zygote or _zygote[0]._process.poll() is not None:
            _zygote[:] = [_Zygote()]
        return _zygote[0]


class ForkedProcess:
    """A server forked by the zygote, with the part of ``subprocess.Popen`` the harness uses."""

    def __init__(self, zygote: _Zygote, pid: int, args: list[str]) -> None:
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exitCode(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._zygote.exitCode(self.pid, 1e9 if timeout is None else timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode


def forkTwistd(arguments: list[str], env: dict[str, str], log: Path, descriptors: Sequence[int] = ()) -> ForkedProcess:
    """
    ``twistd <arguments>`` forked from this worker's zygote, its output
    appended to ``log``, the listening sockets ``descriptors`` handed to it
    as systemd hands them (``systemd:domain=INET:index=0``, ...).
    """
    zygote = _theZygote()
    pid = zygote.fork(["twistd", *arguments], env, log, list(descriptors))
    return ForkedProcess(zygote, pid, ["twistd", *arguments])
