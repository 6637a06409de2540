"""
Figures side by side: the markdown tables every bench prints, the ratio
columns that compare two of their columns, the machine a run was on and
the heading of a report. Benches print figures and never pass or fail.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: A row of figures side by side: its label, each column's text, and each
#: column's raw value (for the ratio columns; left out where a ratio means nothing).
Row = tuple[str, dict[str, str], dict[str, float | None]]


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A markdown table; ``align`` has an ``r`` for each column set to the right (``l`` or nothing: left)."""
    rule = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(head))]
    lines = [head, rule, *rows]
    return ["| " + " | ".join(line) + " |" for line in lines]


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def sideBySide(
    columns: Sequence[str],
    rows: Iterable[Row],
    peers: Iterable[tuple[str, str]] = (),
    names: Callable[[str], str] = str,
) -> list[str]:
    """
    ``rows`` with a column each of ``columns`` (headed ``names(column)``),
    then a ratio column ``a ÷ b`` for each pair of ``peers`` that are both
    among them.
    """
    pairs = [(a, b) for a, b in peers if a in columns and b in columns]
    head = ["", *map(names, columns), *[f"{names(a)} ÷ {names(b)}" for a, b in pairs]]
    body = [
        [label, *[cells.get(c, "—") for c in columns], *[ratio(raw.get(a), raw.get(b)) for a, b in pairs]]
        for label, cells, raw in rows
    ]
    return markdown(head, body)


def dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``; None where a key is missing or a value is not a dict."""
    for k in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(k)
    return value


def machine(
    commands: Mapping[str, tuple[list[str | None], int | None]], packages: Sequence[str] = (), more: dict[str, str] | None = None
) -> dict[str, str]:
    """
    What a run was on: Python, the kernel, the version of each of
    ``packages`` (Python distributions), the first line that each of
    ``commands`` prints (name → (argv, how many of its words to keep:
    the first N, the last -N, or all if None);
    those whose command is missing are left out), ``more``, and the CPUs.
    """
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version(), "kernel": platform.release()}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    for name, (argv, words) in commands.items():
        if not argv[0]:
            continue
        try:
            p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (p.stdout + p.stderr).strip().splitlines()
        line = text[0].strip() if text else "?"
        out[name] = " ".join(line.split()[:words] if words > 0 else line.split()[words:]) if words else line
    out.update(more or {})
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        out["cpu"] = f"{os.cpu_count()} x {m.group(1).strip() if m else '?'}"
    except OSError:
        pass
    return out


def heading(title: str, run: Any, versions: dict[str, str], about: Iterable[str]) -> list[str]:
    """A report's heading: its title, the command it ran (a :class:`plumbing.Run`), the machine, and ``about``."""
    return [
        f"## {title}",
        "",
        f"Run: `{run.command}` at {run.started:%Y-%m-%d %H:%M %Z}, {run.seconds:.0f} s"
        + (" (interrupted)" if run.interrupted else ""),
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        *[line for paragraph in about for line in (paragraph, "")],
    ]
