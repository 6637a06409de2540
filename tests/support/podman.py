"""
Building blocks of the ``podman`` runtime's tests: images and stand-in helpers.

No registry is reachable from the test machines, so images are made here:
:func:`buildBusyboxImage` imports a tar of a directory holding the host's
static ``/bin/busybox``, symlinks to its applets and the files given, with
``CMD`` and ``EXPOSE`` set by ``podman import --change``. Images are tagged
by a digest of what went into them, so building the same one again (in this
test session or a later one) costs one ``podman image exists``.

:func:`standInAuthCommand` and :func:`standInListenerCommand` are small
programs that stand in for the real helpers: each writes its environment to
``<name>-env.json`` in its working directory (the pod's directory); the
auth stand-in then forwards ``DIT4C_AUTH_LISTEN`` to ``DIT4C_TOOL`` as the
real auth helper would (without asking anyone who they are).

:func:`buildWebSocketToolImage` adds ``/bin/wstool`` (``tests/e2e/tool/wstool.c``,
compiled here with ``gcc -static``): a web tool serving a page and a
WebSocket echo endpoint on 8080, for end-to-end tests through a browser.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from dit4c.node.podman import CONTAINERS_CONF, LABEL_PREFIX, PodmanRuntime, summarise

__all__ = [
    "BUSYBOX",
    "buildBusyboxImage",
    "buildBusyboxImageSync",
    "buildWebSocketToolImage",
    "buildWebSocketToolImageSync",
    "compileWebSocketToolSync",
    "gccUnavailable",
    "podmanUnavailable",
    "podmanEnv",
    "removePods",
    "standInAuthCommand",
    "standInListenerCommand",
]

#: The static busybox the images are made of (Debian's busybox-static).
BUSYBOX = Path("/bin/busybox")
#: Applets linked into every image.
APPLETS = ("sh", "httpd", "sleep", "cat", "echo", "env", "ls", "wget", "true", "false", "nc")

_built: dict[str, str] = {}


def podmanEnv() -> dict[str, str]:
    """The environment podman needs on these machines (``CONTAINERS_CONF``)."""
    return dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))


def requirePodman(what: str, unavailable: str | None = None) -> None:
    """
    At a test module's top: skip the module where podman cannot run pods
    (or ``unavailable`` says why something else it needs is missing), but
    fail it under CI (``CI`` set), where it must run.
    """
    why = podmanUnavailable() if unavailable is None else unavailable
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run: {why}; CI is set, where they must", pytrace=False)
    pytest.skip(f"{what} cannot run: {why}", allow_module_level=True)


def podmanUnavailable() -> str | None:
    """Why podman cannot run pods here, or None if it can (blocking: call it before the reactor runs)."""
    missing = [tool for tool in ("podman", "nsenter", "iptables-restore") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc busybox-static)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} missing (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "the podman runtime needs root (rootful podman)"
    try:
        result = subprocess.run(
            ["podman", "info", "--format", "{{.Host.CgroupManager}}"],
            env=podmanEnv(),
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"podman info failed: {e}"
    if result.returncode != 0:
        return f"podman info failed: {summarise(result.stderr)}"
    return None


def _imageTar(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def directory(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)

        made = {"bin"}
        directory("bin")
        directory("tmp")
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for path, content in sorted(files.items()):
            name = path.lstrip("/")
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/".join(parts[:i])
                if parent not in made:
                    made.add(parent)
                    directory(parent)
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o755 if content.startswith(b"#!") else 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _plan(
    name: str, files: Mapping[str, bytes], expose: int | Sequence[int] | None, cmd: Sequence[str] | None
) -> tuple[str, list[str]]:
    """The image's reference and the ``--change`` arguments of ``podman import``."""
    ports = [expose] if isinstance(expose, int) else list(expose or [])
    if cmd is None:
        cmd = ["/bin/busybox", "httpd", "-f", "-p", str(min(ports)), "-h", "/www"] if ports else ["/bin/sh"]
    digest = hashlib.sha256()
    stat = BUSYBOX.stat()
    digest.update(json.dumps([stat.st_size, stat.st_mtime_ns, list(APPLETS), ports, list(cmd)]).encode())
    for path, content in sorted(files.items()):
        digest.update(path.encode() + b"\0" + hashlib.sha256(content).digest())
    reference = f"localhost/dit4c-test-{name}:{digest.hexdigest()[:16]}"
    changes = ["--change", f"CMD {json.dumps(list(cmd))}"]
    for port in ports:
        changes += ["--change", f"EXPOSE {port}"]
    return reference, changes


async def _imported(reference: str, changes: Sequence[str], content: Callable[[], Awaitable[bytes]]) -> str:
    """
    ``reference``, made once (in this process, and on this host) by ``podman
    import`` of the tar ``content()`` gives, only if no image of that name
    exists yet.
    """
    if reference in _built:
        return reference
    env = podmanEnv()
    _, _, code = await getProcessOutputAndValue("podman", ["image", "exists", reference], env=env)
    if code != 0:
        data = await content()
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar:
            tar.write(data)
            tar.flush()
            _, err, code = await getProcessOutputAndValue(
                "podman", ["import", "--quiet", *changes, tar.name, reference], env=env
            )
        if code != 0:
            raise RuntimeError(f"podman import of {reference} failed: {summarise(err)}")
    _built[reference] = reference
    return reference


def _importedSync(reference: str, changes: Sequence[str], content: Callable[[], bytes]) -> str:
    """:func:`_imported`, blocking: for use where no reactor runs."""
    if reference in _built:
        return reference
    env = podmanEnv()
    if subprocess.run(["podman", "image", "exists", reference], env=env).returncode != 0:
        result = subprocess.run(
            ["podman", "import", "--quiet", *changes, "-", reference],
            input=content(),
            env=env,
            capture_output=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"podman import of {reference} failed: {summarise(result.stderr)}")
    _built[reference] = reference
    return reference


async def _buildBusyboxImage(
    name: str, files: Mapping[str, bytes], expose: int | Sequence[int] | None, cmd: Sequence[str] | None
) -> str:
    reference, changes = _plan(name, files, expose, cmd)

    async def content() -> bytes:
        return _imageTar(files)

    return await _imported(reference, changes, content)


def buildBusyboxImage(
    name: str,
    files: Mapping[str, bytes] | None = None,
    expose: int | Sequence[int] | None = None,
    cmd: Sequence[str] | None = None,
) -> Deferred[str]:
    """
    Make (once) a busybox image and fire with its reference.

    :param name: part of the tag (``localhost/dit4c-test-<name>:<digest>``).
    :param files: absolute path in the image → content (``#!`` files are executable).
    :param expose: the port(s) the image exposes.
    :param cmd: the image's ``CMD``; by default ``busybox httpd`` on the
        lowest exposed port serving ``/www`` (a shell if none is exposed).
    """
    return Deferred.fromCoroutine(_buildBusyboxImage(name, dict(files or {}), expose, cmd))


def buildBusyboxImageSync(
    name: str,
    files: Mapping[str, bytes] | None = None,
    expose: int | Sequence[int] | None = None,
    cmd: Sequence[str] | None = None,
) -> str:
    """:func:`buildBusyboxImage`, blocking: for use where no reactor runs."""
    files = dict(files or {})
    reference, changes = _plan(name, files, expose, cmd)
    return _importedSync(reference, changes, lambda: _imageTar(files))


async def cleanUpDev(processes: Any, directory: Path, prefix: str) -> None:
    """
    After a ``dit4c-dev --runtime podman`` test: its servers stopped first
    (a node still running would be discarding beside this clean-up), then
    every pod of ``prefix`` removed and the pod processes it recorded under
    ``directory`` killed, whatever the test left.
    """
    from twisted.internet import reactor

    from dit4c.node.processes import killRecorded

    processes.stopAll()
    await removePods(reactor, prefix)
    killRecorded(directory)


async def removePods(reactor: Any, prefix: str) -> None:
    """
    Remove every pod of the runtime with this ``prefix``: its helpers (found
    from their pid files), its containers and directory. For fixtures'
    clean-up, even after a failed test.
    """
    runtime = PodmanRuntime(reactor, prefix=prefix, stopTimeout=1, helperStopGrace=2.0)
    try:
        for status in await runtime.pods():
            await runtime.discard(status.instance)
    finally:
        runtime.forget()
    env = podmanEnv()
    out, _, _ = await getProcessOutputAndValue(
        "podman", ["pod", "ps", "--quiet", "--filter", f"label={LABEL_PREFIX}={prefix}"], env=env
    )
    for podId in out.decode().split():
        await getProcessOutputAndValue("podman", ["pod", "rm", "--force", "--time", "0", podId], env=env)


_AUTH = """
import json, os, sys
from pathlib import Path
Path("auth-env.json.tmp").write_text(json.dumps(dict(os.environ)))
os.rename("auth-env.json.tmp", "auth-env.json")
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.protocols.portforward import ProxyFactory
tool = dict(part.split("=", 1) for part in os.environ["DIT4C_TOOL"].split(":")[1:])
serverFromString(reactor, os.environ["DIT4C_AUTH_LISTEN"]).listen(
    ProxyFactory(tool["host"], int(tool["port"]))
).addErrback(lambda f: (print(f.getErrorMessage(), flush=True), os._exit(1)))
print("auth stand-in forwarding", os.environ["DIT4C_AUTH_LISTEN"], "to", os.environ["DIT4C_TOOL"], flush=True)
reactor.run()
sys.exit(1)
"""

_LISTENER = """
import json, os, time
from pathlib import Path
Path("listener-env.json.tmp").write_text(json.dumps(dict(os.environ)))
os.rename("listener-env.json.tmp", "listener-env.json")
while True:
    time.sleep(3600)
"""


def standInAuthCommand() -> list[str]:
    """
    A stand-in auth helper: writes ``auth-env.json``, then forwards every
    connection on ``DIT4C_AUTH_LISTEN`` to ``DIT4C_TOOL``.
    """
    return [sys.executable, "-c", _AUTH]


def standInListenerCommand() -> list[str]:
    """A stand-in listener: writes ``listener-env.json``, then sleeps."""
    return [sys.executable, "-c", _LISTENER]


# -- a web tool with a WebSocket: wstool ------------------------------------------------

#: The WebSocket tool's source: one C file, libc only.
WSTOOL_SOURCE = Path(__file__).resolve().parents[1] / "e2e" / "tool" / "wstool.c"
#: The port the tool's image serves on (and exposes).
WSTOOL_PORT = 8080
_GCC_FLAGS = ("-O2", "-static", "-Wall")


def _cacheDirectory() -> Path:
    return Path(tempfile.gettempdir()) / "dit4c-test-cache"


def _lastLine(stderr: bytes, limit: int = 300) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    line = next((line for line in reversed(lines) if "error" in line), lines[-1] if lines else "no message")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def gccUnavailable() -> str | None:
    """Why gcc cannot build static programs here, or None if it can (blocking)."""
    if shutil.which("gcc") is None:
        return "gcc not installed (apt-get install gcc libc6-dev)"
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory, "empty.c")
        source.write_text("int main(void) { return 0; }\n")
        try:
            result = subprocess.run(
                ["gcc", "-static", "-o", str(Path(directory, "empty")), str(source)],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"gcc failed: {e}"
    if result.returncode != 0:
        return f"gcc cannot link a static program (apt-get install libc6-dev): {_lastLine(result.stderr)}"
    return None


def _wstoolPlan(source: Path) -> tuple[str, Path, list[str]]:
    """
    The image's reference, where the compiled tool is cached, and the
    ``--change`` arguments of ``podman import``; both named by a digest of
    the source (and of the rest of the image).
    """
    cmd = ["/bin/wstool", str(WSTOOL_PORT)]
    digest = hashlib.sha256()
    stat = BUSYBOX.stat()
    digest.update(json.dumps(["wstool", stat.st_size, stat.st_mtime_ns, list(APPLETS), _GCC_FLAGS, cmd]).encode())
    digest.update(hashlib.sha256(source.read_bytes()).digest())
    tag = digest.hexdigest()[:16]
    changes = ["--change", f"CMD {json.dumps(cmd)}", "--change", f"EXPOSE {WSTOOL_PORT}"]
    return f"localhost/dit4c-test-wstool:{tag}", _cacheDirectory() / f"wstool-{tag}", changes


def _gccArguments(source: Path, output: Path) -> list[str]:
    return [*_GCC_FLAGS, "-o", str(output), str(source)]


def _compiled(binary: Path, output: Path) -> Path:
    os.chmod(output, 0o755)
    os.replace(output, binary)  # atomic: another session may compile it at the same time
    return binary


def compileWebSocketToolSync(source: Path = WSTOOL_SOURCE) -> Path:
    """
    The tool compiled for this host (static, so it runs in any image too),
    cached by the digest of its source: for tests that run it as a host process.
    """
    _, binary, _ = _wstoolPlan(source)
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    output = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    result = subprocess.run(["gcc", *_gccArguments(source, output)], capture_output=True, timeout=120)
    if result.returncode != 0:
        output.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed to compile {source}: {_lastLine(result.stderr)}")
    return _compiled(binary, output)


async def _compileWebSocketTool(source: Path) -> Path:
    _, binary, _ = _wstoolPlan(source)
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    output = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    _, err, code = await getProcessOutputAndValue("gcc", _gccArguments(source, output), env=dict(os.environ))
    if code != 0:
        output.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed to compile {source}: {_lastLine(err)}")
    return _compiled(binary, output)


def _wstoolTar(binary: Path) -> bytes:
    """The busybox image's tar with the executable ``/bin/wstool`` added."""
    buffer = io.BytesIO(_imageTar({}))
    with tarfile.open(fileobj=buffer, mode="a") as tar:
        content = binary.read_bytes()
        info = tarfile.TarInfo("bin/wstool")
        info.size = len(content)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


async def _buildWebSocketToolImage(source: Path) -> str:
    reference, _, changes = _wstoolPlan(source)

    async def content() -> bytes:
        return _wstoolTar(await _compileWebSocketTool(source))

    return await _imported(reference, changes, content)


def buildWebSocketToolImage(source: Path = WSTOOL_SOURCE) -> Deferred[str]:
    """
    Make (once) the WebSocket tool's image and fire with its reference
    (``localhost/dit4c-test-wstool:<digest>``): busybox and ``/bin/wstool``,
    ``CMD ["/bin/wstool", "8080"]``, ``EXPOSE 8080``. It serves ``GET /`` a
    page greeting ``X-DIT4C-User`` ("Hello, alice.") with a WebSocket echo
    client, and ``/ws`` a WebSocket echoing every message.

    gcc runs only when no image of this source exists yet (see
    :func:`gccUnavailable`).
    """
    return Deferred.fromCoroutine(_buildWebSocketToolImage(source))


def buildWebSocketToolImageSync(source: Path = WSTOOL_SOURCE) -> str:
    """:func:`buildWebSocketToolImage`, blocking: for use where no reactor runs."""
    reference, _, changes = _wstoolPlan(source)
    return _importedSync(reference, changes, lambda: _wstoolTar(compileWebSocketToolSync(source)))
