"""
The process runtime's tool catalogue: what a tool is (a command serving a
web tool on the Unix socket or loopback port it is given), the tools that
work on a fresh machine, and a tool table read from JSON (``twistd
dit4c-node --tools``).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Tool", "builtinTools", "freePort", "toolsFromFile"]


_PLACEHOLDER = re.compile(r"\{(port|dir|socket|python)\}")


@dataclass(frozen=True)
class Tool:
    """
    A command that serves a web tool, in ``{dir}`` (its working directory):
    on the Unix socket ``{socket}`` if the command or its environment names
    it, else on the loopback TCP port ``{port}`` (also in ``$PORT``).
    ``{python}`` is the node's own Python.
    """

    name: str
    command: tuple[str, ...]
    #: Extra environment for the tool (``{port}``, ``{socket}``, ``{dir}`` and ``{python}`` are substituted).
    environment: Mapping[str, str] | None = None

    @property
    def socket(self) -> bool:
        """Whether the tool listens on the Unix socket it is given (rather than on TCP)."""
        return any("{socket}" in part for part in (*self.command, *(self.environment or {}).values()))

    def _fill(self, text: str, port: int | None, directory: Path, socket: Path | None) -> str:
        values = {"port": port, "dir": directory, "socket": socket, "python": sys.executable}
        # Only the placeholders: any other brace (a script, JSON) stays as it is.
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

    def argv(self, port: int | None, directory: Path, socket: Path | None = None) -> list[str]:
        return [self._fill(part, port, directory, socket) for part in self.command]

    def env(self, port: int | None, directory: Path, socket: Path | None = None) -> dict[str, str]:
        return {k: self._fill(v, port, directory, socket) for k, v in (self.environment or {}).items()}


def builtinTools() -> dict[str, Tool]:
    """
    Tools that work on a fresh machine: ``dit4c/notes`` (part of DIT4C),
    ``dit4c/static`` (the working directory as a static web site, also
    DIT4C's own), and ``jupyter/lab`` when JupyterLab is installed. All
    listen on the Unix socket they are given.
    """
    tools = {
        "dit4c/notes": Tool("dit4c/notes", ("{python}", "-m", "dit4c.tools.notes", "--socket", "{socket}")),
        "dit4c/static": Tool(
            "dit4c/static", ("{python}", "-m", "dit4c.tools.static", "--socket", "{socket}", "--directory", "{dir}")
        ),
    }
    lab = shutil.which("jupyter-lab") or _besidePython("jupyter-lab")
    if lab:
        tools["jupyter/lab"] = Tool(
            "jupyter/lab",
            (
                lab, "--no-browser", "--ServerApp.sock={socket}", "--ServerApp.root_dir={dir}",
                # The auth helper in front decides who gets in; JupyterLab's own token would ask again.
                "--IdentityProvider.token=", "--ServerApp.password=",
                "--ServerApp.allow_remote_access=True", "--ServerApp.disable_check_xsrf=True",
                # Kernels on Unix sockets too (in the runtime directory, mode 0700), not on loopback ports.
                "--KernelManager.transport=ipc",
            ),
            # A short path (a Unix socket's is at most 107 bytes): /tmp is the tool's own.
            {"JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime"},
        )  # fmt: skip
    return tools


def _besidePython(program: str) -> str | None:
    candidate = Path(sys.executable).parent / program
    return str(candidate) if candidate.exists() else None


def toolsFromFile(path: str | Path) -> dict[str, Tool]:
    """
    A tool table from JSON: ``{"tools": {"name": {"command": [...], "environment": {...}}}}``.
    The command and environment may use ``{socket}`` (a Unix socket to
    listen on: the tool is then reachable only through its auth helper),
    ``{port}`` (a loopback TCP port, for a tool that speaks only TCP),
    ``{dir}`` and ``{python}``.

    :raises ValueError: the file is not such a table.
    """
    data = json.loads(Path(path).read_text())
    tools: dict[str, Tool] = {}
    for name, entry in dict(data["tools"]).items():
        command = entry["command"]
        if not isinstance(command, list) or not command or not all(isinstance(p, str) for p in command):
            raise ValueError(f"tool {name!r}: command must be a non-empty list of strings")
        environment = entry.get("environment")
        if environment is not None and (
            not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values())
        ):
            raise ValueError(f"tool {name!r}: environment must map names to strings")
        tools[name] = Tool(name, tuple(command), environment)
    return tools


def freePort() -> int:
    """
    A TCP port free on loopback now, for a tool that only speaks TCP (the
    tool binds it soon after; another process may take it meanwhile, and
    the tool then fails to start, saying so in its log). The one port the
    node picks for another program: every server of DIT4C's own listens on
    port 0 or on a Unix socket instead.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
