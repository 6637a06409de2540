"""
How the podman runtime runs podman (and the few other programs it needs:
``nsenter``, ``iptables-restore``): each as a child process with a timeout,
``CONTAINERS_CONF`` pointing at the runtime's configuration, never blocking
the reactor; a failure said as what was being done and podman's own reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.node.errors import PodmanError, RuntimeError_

#: Where a saved image is named while it is committed and saved, and after it is loaded back.
SAVED_PREFIX = "localhost/dit4c-saved/"

__all__ = ["SAVED_PREFIX", "PodmanCommands", "summarise"]


class _Collect(ProcessProtocol):
    """Gathers a child's output; kills it after ``timeout`` seconds."""

    def __init__(self, reactor: Any, timeout: float, stdin: bytes | None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.timedOut = False
        self.done: Deferred[tuple[bytes, bytes, int | None]] = Deferred()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.reactor.callLater(self.timeout, self._kill)
        if self.stdin is not None:
            self.transport.write(self.stdin)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def _kill(self) -> None:
        self._timer = None
        self.timedOut = True
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:
            pass

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        code = getattr(reason.value, "exitCode", None)
        self.done.callback((b"".join(self.out), b"".join(self.err), code))


def summarise(stderr: bytes, limit: int = 300) -> str:
    """
    The gist of podman's standard error: its last ``Error:`` line (or last
    line), without the log decoration, shortened to ``limit`` characters.
    """
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "no message"
    errors = [line for line in lines if line.startswith("Error:")]
    line = errors[-1] if errors else lines[-1]
    match = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
    if match:
        line = match.group(1).replace('\\"', '"')
    line = re.sub(r"^Error:\s*", "", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."



class PodmanCommands:
    """
    Running podman, and the names it knows pods by (a part of
    :class:`dit4c.node.podman.PodmanRuntime`, which sets what is declared here).
    """

    log = Logger()

    reactor: Any
    #: The podman program, and its configuration.
    podman: str
    containersConf: Path
    #: Names the pods, and is kept in their ``dit4c.prefix`` label.
    prefix: str
    #: Seconds a podman command may take.
    commandTimeout: float
    #: Where podman runs (conmon leaves files in its working directory).
    workDirectory: Path

    def podName(self, instance: str) -> str:
        return f"{self.prefix}-{instance}"

    def toolName(self, instance: str) -> str:
        return f"{self.prefix}-{instance}-tool"

    def _env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.containersConf))

    async def _spawn(
        self, argv: Sequence[str], timeout: float | None = None, stdin: bytes | None = None
    ) -> tuple[bytes, bytes, int | None, bool]:
        executable = shutil.which(argv[0]) or argv[0]
        proto = _Collect(self.reactor, timeout or self.commandTimeout, stdin)
        try:
            self.reactor.spawnProcess(proto, executable, list(argv), env=self._env(), path=str(self.workDirectory))
        except OSError as e:
            raise RuntimeError_(f"cannot run {argv[0]}: {e.strerror}") from None
        out, err, code = await proto.done
        return out, err, code, proto.timedOut

    async def _run(
        self,
        *args: str,
        timeout: float | None = None,
        stdin: bytes | None = None,
        what: str | None = None,
        command: Sequence[str] | None = None,
    ) -> bytes:
        """
        Run ``podman <args>`` (or ``command``); its standard output.

        :raises PodmanError: it failed or timed out; the message says what
            was being done and podman's own reason.
        """
        argv = list(command) if command is not None else [self.podman, *args]
        label = what or " ".join(argv[:3])
        self.log.debug("running {argv}", argv=argv)
        out, err, code, timedOut = await self._spawn(argv, timeout, stdin)
        if timedOut:
            raise PodmanError(f"{label}: podman did not finish within {timeout or self.commandTimeout:g} s")
        if code != 0:
            # nsenter ... -- program: the program's status (or nsenter's own)
            program = argv[argv.index("--") + 1] if "--" in argv[:-1] else argv[0]
            reason = summarise(err) if err.strip() else f"{program} exited with status {code}"
            raise PodmanError(f"{label}: {reason}")
        return out

    async def _json(self, *args: str, what: str | None = None) -> Any:
        out = await self._run(*args, what=what)
        try:
            return json.loads(out or b"null")
        except ValueError:
            raise PodmanError(f"{what or args[0]}: podman's answer is not JSON") from None

    async def _exists(self, kind: str, name: str) -> bool:
        out, err, code, timedOut = await self._spawn([self.podman, kind, "exists", name])
        if timedOut or code not in (0, 1):
            raise PodmanError(f"checking {kind} {name}: {summarise(err)}")
        return code == 0
