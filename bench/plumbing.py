"""
The process plumbing every bench shares: servers and tools started in
process groups of their own, one log file each, the port each server got,
and the run around them (its command line, a scratch directory, signals
that end it cleanly, a worktree of another revision to compare with).

Servers listen on port 0 and the bench reads back the port they got: a
DIT4C server from the line it logs (:func:`announcedPort`); one whose own
arguments name its port (a portal's public URL) is handed a socket bound
here on port 0, as systemd hands one (``Service(..., systemd=sock)``,
served on ``--listen systemd:domain=INET:index=0``). Other servers are
handed a socket their own way (nginx, sshd in ``tunnel.py``).
:func:`freePort` is for a server that takes neither (configurable-http-proxy,
another revision's ``dit4c-dev``).

Only the standard library and psutil, and nothing from ``tests/``: the
tests' harness reads the same announcement (``support.processes``); one
reader for both would sit beside the line it reads, in
``dit4c.common.service``.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """This part of a bench cannot run here; the message says why."""


# -- processes ---------------------------------------------------------------------------------


def raiseNofile() -> None:
    """Raise this process's open-file limit to the hard limit (thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _childSetup(systemd: int | None, environ: dict[str, str] | None) -> Callable[[], None]:
    def setup() -> None:
        # own process group, so that a group kill reaches everything it forks and a
        # Ctrl-C at the terminal reaches only the bench (which then cleans up)
        os.setpgid(0, 0)
        raiseNofile()
        if systemd is not None:
            # Socket activation: the socket at descriptor 3, and LISTEN_PID naming
            # this very process (known only now, after the fork; exec keeps it).
            os.dup2(systemd, 3)
            os.set_inheritable(3, True)
            os.environ.clear()
            os.environ.update(environ or {}, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="socket0")

    return setup


_LIVE: dict[int, subprocess.Popen[Any]] = {}


def spawn(argv: list[str], systemd: socket.socket | None = None, **kw: Any) -> subprocess.Popen[Any]:
    """
    Start ``argv`` in a process group of its own, remembered for
    :func:`killAll`; ``kw`` are Popen's. ``systemd``: a listening socket
    handed to it at descriptor 3 with ``LISTEN_FDS=1``, as systemd does.
    """
    kw.setdefault("stdin", subprocess.DEVNULL)
    if systemd is None:
        setup = _childSetup(None, None)
        kw.setdefault("close_fds", True)
    else:
        environ = kw.pop("env", None)
        setup = _childSetup(systemd.fileno(), dict(os.environ if environ is None else environ))
        # Python opens every descriptor not inheritable: the one made at 3 alone crosses exec.
        kw["close_fds"] = False
    p = subprocess.Popen(argv, preexec_fn=setup, **kw)
    _LIVE[p.pid] = p
    return p


def kill(p: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """End ``p``, its process group and every descendant (some, like sshd's
    per-connection children, leave the group with setsid)."""
    try:
        descendants = psutil.Process(p.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    else:
        try:  # the leader is gone; its group may not be
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for d in descendants:
        try:
            d.kill()
        except psutil.Error:
            pass
    _LIVE.pop(p.pid, None)


def killAll() -> None:
    """End every process :func:`spawn` started that is still running, the last started first."""
    for p in list(_LIVE.values())[::-1]:
        try:
            kill(p, grace=2.0)
        except Exception as e:  # noqa: BLE001 - clean up as much as possible
            log(f"cleanup of pid {p.pid} failed: {e}")


def runTool(argv: list[str], timeout: float, **options: Any) -> tuple[int, str, str]:
    """Run a short-lived tool in its own process group; (rc, stdout, stderr). ``options``: Popen's (env, cwd)."""
    p = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(p)
        out, err = p.communicate()
        return -999, out or "", (err or "") + f"\n(killed after {timeout:.0f} s)"
    finally:
        if p.poll() is not None:
            _LIVE.pop(p.pid, None)
    return p.returncode, out, err


def findExe(name: str) -> str | None:
    """The command ``name``: the script beside this interpreter first (skips pyenv shims), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


#: ``twistd`` with this interpreter, as a user runs it.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Service:
    """A long-running process of a bench, its output in ``<logdir>/<name>.log`` (appended to, if it runs again)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Any = None,
        stdin: Any = subprocess.DEVNULL,
        systemd: socket.socket | None = None,
        passFds: Sequence[int] = (),
    ) -> None:
        """
        :param systemd: a listening socket handed over as systemd would
            (see :func:`spawn`); closed here once the child holds it.
        :param passFds: descriptors the child inherits as they are.
        """
        self.name = name
        self.argv = argv
        self.logpath = logdir / f"{name}.log"
        self._logf = open(self.logpath, "ab")
        self._start = self._logf.tell()
        log(f"  start {name}: {shlex.join(argv)}")
        try:
            self.popen = spawn(
                argv,
                systemd=systemd,
                stdin=stdin,
                stdout=stdout if stdout is not None else self._logf,
                stderr=self._logf,
                env=env,
                cwd=cwd,
                pass_fds=passFds,
            )
        except OSError as e:
            self._logf.close()
            raise Skip(f"{name}: cannot run {argv[0]}: {e}") from e
        finally:
            if systemd is not None:
                systemd.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """What this run of it has logged so far."""
        try:
            with open(self.logpath, "rb") as f:
                f.seek(self._start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 12) -> str:
        return "\n".join(self.log().strip().splitlines()[-lines:])

    def deadReason(self) -> str:
        return f"{self.name} exited with status {self.popen.returncode}:\n{self.tail()}".rstrip()

    def waitForLog(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in its log, once there (:class:`Skip` if it exits or times out first)."""
        found: list[re.Match[str]] = []

        def logged() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
            return bool(match)

        waitFor(logged, f"{self.name}: {pattern!r} in its log", timeout, [self])
        return found[0]

    def waitForPort(self, what: str, timeout: float = 30.0) -> int:
        """The port its ``what`` (a regular expression) listens on, once announced (see :func:`announcedPort`)."""
        return int(self.waitForLog(_announced(what), timeout).group(1))

    def procs(self, includeSelf: bool = True) -> list[psutil.Process]:
        try:
            me = psutil.Process(self.pid)
            kids = me.children(recursive=True)
        except psutil.Error:
            return []
        return ([me] if includeSelf else []) + kids

    def stop(self, grace: float = 3.0) -> None:
        """End it, its process group and every descendant (see :func:`kill`)."""
        kill(self.popen, grace)
        self._logf.close()

    def end(self, how: int, timeout: float) -> None:
        """Send ``how`` to its process group and wait for it to exit; what it leaves running, it leaves."""
        os.killpg(self.pid, how)
        self.popen.wait(timeout)
        _LIVE.pop(self.pid, None)
        self._logf.close()


# -- ports ------------------------------------------------------------------------------------


def _announced(what: str) -> str:
    return rf"{what} listening on IPv4Address\(type='TCP', host='[^']*', port=(\d+)\)"


def announcedPort(text: str, what: str) -> int | None:
    """
    The port a DIT4C server says its ``what`` got, in its log ``text``
    (``<what> listening on IPv4Address(type='TCP', host=..., port=N)``, as
    ``dit4c.common.service.ListeningService`` logs it); None if not there.
    """
    match = re.search(_announced(what), text)
    return int(match.group(1)) if match else None


def listeningSocket(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """A socket listening on ``host``, port 0, to hand to a server; and the port it got."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(4096)
    return sock, int(sock.getsockname()[1])


def freePort() -> int:
    """
    A loopback port that was free a moment ago, for a server that takes
    neither port 0 nor a socket handed to it; another process may take it
    first, so only where there is no other way.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def httpStatus(
    port: int, path: str, host: str | None = None, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> int | None:
    """The status of ``GET path`` at 127.0.0.1:``port`` (with ``Host: host``); None if it got no answer."""
    status, _ = httpGet(port, path, {"Host": host or f"127.0.0.1:{port}", **(headers or {})}, timeout)
    return status


def httpGet(port: int, path: str, headers: dict[str, str], timeout: float = 10.0) -> tuple[int | None, bytes]:
    """``GET path`` at 127.0.0.1:``port``: the status and body; (None, b"") if it got no answer."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body
    except (OSError, http.client.HTTPException):
        return None, b""


def waitFor(cond: Callable[[], bool], what: str, timeout: float, services: Sequence[Service] = ()) -> None:
    """Poll ``cond`` until it holds; :class:`Skip` (with their logs) if one of ``services`` exits or it times out."""
    deadline = time.monotonic() + timeout
    while True:
        for s in services:
            if not s.alive():
                raise Skip(f"{what}: {s.deadReason()}")
        if cond():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.name} log:\n{s.tail()}" for s in services)
            raise Skip(f"{what}: not ready after {timeout:.0f} s\n{tails}".rstrip())
        time.sleep(0.1)


# -- the run ----------------------------------------------------------------------------------


def _onSignal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Run:
    """
    One run of a bench: its command line, when it started, a scratch
    directory with ``logs/`` (in ``/dev/shm`` when it has ``room`` bytes
    free: big files and databases then cost no disk I/O), and, as a
    context, SIGINT, SIGTERM and SIGHUP that end it cleanly: every process
    is ended and the scratch directory removed (unless ``keep``). An
    interruption is recorded in :attr:`interrupted`, not raised.
    """

    def __init__(
        self, script: str, argv: list[str] | None, prefix: str, room: int, parent: str | None = None, keep: bool = False
    ) -> None:
        name = os.path.relpath(sys.argv[0]) if sys.argv[0] else script
        self.command = shlex.join(["python", name, *(sys.argv[1:] if argv is None else argv)])
        if parent is None:
            try:
                if shutil.disk_usage("/dev/shm").free > room:
                    parent = "/dev/shm"
            except OSError:
                pass
        self.parent = parent
        self.prefix = prefix
        self.keep = keep
        self.interrupted = False

    def __enter__(self) -> Run:
        # explicit, so that Ctrl-C also works where SIGINT was inherited ignored
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _onSignal)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.started = datetime.datetime.now().astimezone()
        self._began = time.monotonic()
        log(f"temp dir {self.tmp}")
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        if kind is KeyboardInterrupt:
            self.interrupted = True
            log("interrupted; cleaning up")
        killAll()
        if self.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return kind is KeyboardInterrupt

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._began

    def publish(
        self, heading: list[str], body: str, jsonPath: str | None, settings: Any, versions: dict[str, str],
        results: dict[str, Any],
    ) -> int:
        """Print the report (``heading``, then ``body``) and, to ``jsonPath`` if given, every figure; the exit status."""
        print("\n".join(heading) + "\n" + body)
        if jsonPath:
            self.writeJSON(jsonPath, settings, versions, results)
        return 130 if self.interrupted else 0

    def writeJSON(self, path: str, settings: Any, versions: dict[str, str], results: dict[str, Any]) -> None:
        """Every figure, with the command, the settings and the machine, as JSON at ``path``."""
        doc = {
            "command": self.command,
            "started": self.started.isoformat(),
            "seconds": round(self.seconds, 1),
            "interrupted": self.interrupted,
            "settings": settings,
            "versions": versions,
            "results": results,
        }
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"wrote {path}")


def attempt(name: str, result: dict[str, Any], measure: Callable[[], None], figures: Iterable[str]) -> None:
    """
    Run ``measure`` (which fills ``result``) for the part ``name``: a
    :class:`Skip` marks it skipped with the reason, any other error is
    recorded and the bench goes on with the next part (one that has any of
    the keys ``figures`` in ``result`` counts as measured, stopped early).
    """
    try:
        measure()
        result["status"] = "ok"
    except Skip as e:
        result["status"] = "skipped"
        result["skip_reason"] = str(e)
        log(f"  SKIP {name}: {e}")
    except KeyboardInterrupt:
        result.setdefault("status", "skipped")
        result.setdefault("skip_reason", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - report it and go on with the next part
        result["status"] = "ok" if any(k in result for k in figures) else "skipped"
        result["error"] = f"{type(e).__name__}: {e}"
        result.setdefault("skip_reason", result["error"])
        log(f"  ERROR {name}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def worktree(rev: str, where: Path) -> Iterator[Path]:
    """A ``git worktree`` of this checkout at ``rev`` in ``where`` (removed after), to run another revision's code."""
    log(f"a worktree of {rev} at {where}")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], capture_output=True)


def sourceEnv(source: Path) -> dict[str, str]:
    """This environment, running the code (and twistd plugins) of the checkout ``source``."""
    pp = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{source}{os.pathsep}{pp}" if pp else str(source))
