"""
Real processes: a ``twistd -n`` child (or any command), its log and the
ports it announced, and listening sockets handed to it as systemd does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import zygote
from .waiting import deferLater

#: Puts the listening sockets it is given (``argv[1]``: how many, then
#: their descriptors) at descriptors 3, 4, ... as systemd's socket
#: activation does, and becomes the command that follows (the same process:
#: ``LISTEN_PID`` stays true).
_HANDOVER = zygote.HANDOVER + """
import sys
count = int(sys.argv[1])
handOver([int(fd) for fd in sys.argv[2:2 + count]])
os.execvp(sys.argv[2 + count], sys.argv[2 + count:])
"""


def _announced(what: str, host: str | None) -> str:
    """The log line of a server listening on a TCP port (:class:`dit4c.common.service.ListeningService`'s)."""
    address = re.escape(host) if host is not None else "[^']*"
    return rf"{what} listening on IPv4Address\(type='TCP', host='{address}', port=(\d+)\)"


def announcedPort(log: str, what: str, start: int = 0, host: str | None = None) -> int | None:
    """
    The port a server announced in ``log`` (``<what> listening on
    IPv4Address(type='TCP', host=..., port=N)``, as every server here logs
    it), from ``start`` on; the first, or the first on ``host``; None if
    none. ``what`` is a regular expression.
    """
    match = re.compile(_announced(what, host)).search(log, start)
    return int(match.group(1)) if match else None


class Process:
    """A ``twistd -n`` child (or any command), its log, and the addresses it announced."""

    def __init__(
        self,
        args: list[str],
        logPath: Path,
        env: dict[str, str] | None = None,
        sockets: Sequence[socket.socket] = (),
        socketNames: Sequence[str] = (),
    ) -> None:
        """
        :param sockets: listening sockets handed to the child as systemd
            would (socket activation: it serves the first on the endpoint
            ``systemd:domain=INET:index=0``, the next on ``index=1``...),
            for a server whose own arguments name its port. They are closed
            here once the child holds them: the port closes when it ends,
            unless the caller holds a duplicate (``sock.dup()``) to hand to
            the server started again.
        :param socketNames: their names (``LISTEN_FDNAMES``), for a server
            that looks its sockets up by name; ``socket0``, ``socket1``... if
            not given.
        """
        self.args = args
        self.logPath = logPath
        self._log = open(logPath, "ab")
        command = args
        if socketNames:
            env = dict(env or {}, LISTEN_FDNAMES=":".join(socketNames))
        descriptors = [sock.fileno() for sock in sockets]
        if args[: len(TWISTD)] == TWISTD and zygote.enabled():
            # Forked from a warm interpreter (see support.zygote): the same twistd, without its imports' CPU.
            try:
                self.proc: subprocess.Popen[bytes] | zygote.ForkedProcess = zygote.forkTwistd(
                    args[len(TWISTD) :], dict(os.environ, **(env or {})), logPath, descriptors
                )
            finally:
                for sock in sockets:
                    sock.close()
            return
        if descriptors:
            command = [sys.executable, "-c", _HANDOVER, str(len(descriptors)), *map(str, descriptors), *args]
        try:
            self.proc = subprocess.Popen(
                command,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **(env or {})),
                start_new_session=True,
                pass_fds=descriptors,
            )
        finally:
            for sock in sockets:
                sock.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    async def waitForLog(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """Wait (without blocking the reactor) until the log matches ``pattern``."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while True:
            match = compiled.search(self.log(), start)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[:4]} exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} in:\n{self.log()}")
            await deferLater(0.05)

    def port(self, what: str, start: int = 0, host: str | None = None) -> int:
        """The port the server announced (:func:`announcedPort`) in its log."""
        port = announcedPort(self.log(), what, start, host)
        assert port is not None, f"no {what} port{f' on {host}' if host else ''} in log:\n{self.log()}"
        return port

    async def waitForPort(self, what: str, timeout: float = 20.0, host: str | None = None) -> int:
        """:meth:`port`, once the server has announced it (waiting, as :meth:`waitForLog` does)."""
        return int((await self.waitForLog(_announced(what, host), timeout)).group(1))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def peakRSS(self) -> int:
        """The process's peak resident set (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


#: ``twistd`` as a user runs it, with this interpreter.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
