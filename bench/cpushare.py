#!/usr/bin/env python3
"""Where a command's CPU goes, by kind of process, machine-wide.

Runs a command (by default CI's, ``bash .ci/run``) and reads every
process's CPU time from ``/proc`` once a second while it runs, so that
processes which are nobody's child of the command also count: the
containers podman starts (under ``conmon``), the pods a node under test
starts in sessions of their own, the kernel's own threads. Each process is
put in a kind by its command line (Chromium, the test workers, the servers
the tests start, the pods' processes, JupyterLab, podman, Tor, ...).
Processes that ran before the command count only for what they use while
it runs; one that starts and ends between two looks is missed (a short
one: a second of CPU at most). Also prints how busy the machine was.
Prints a markdown table; never passes or fails.

    python bench/cpushare.py                     # bash .ci/run
    python bench/cpushare.py -- bash scripts/test -k portal
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/: tables
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' support: the process table

from support.cpu import processTable  # noqa: E402
from tables import markdown  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

#: (kind, words any of which in the command line puts a process in it), first match wins.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("Chromium and chromedriver", ("chromium", "chromedriver", "chrome")),
    ("test workers (pytest-xdist)", ("exec(eval(sys.stdin.readline()))",)),
    ("pytest's main process", ("-m pytest",)),
    ("servers the tests start (twistd, forked from each worker's zygote)", ("twisted.scripts.twistd", "twistd")),
    ("the pods' processes (built-in tools, launcher, pod helpers, uploads)", ("-m dit4c.",)),
    ("JupyterLab and its kernels", ("jupyter", "ipykernel", "irkernel")),
    ("code-server", ("code-server",)),
    ("podman and the container runtime", ("podman", "conmon", "crun", "runc", "catatonit", "buildah", "netavark",
                                          "aardvark", "slirp4netns", "pasta", "fuse-overlayfs", "rootlessport")),
    ("PostgreSQL", ("postgres",)),
    ("Slurm and munge", ("slurm", "munge")),
    ("load balancers (HAProxy, nginx)", ("haproxy", "nginx")),
    ("installing (pip, apt, npm, compileall)", ("pip", "apt-get", "dpkg", "npm", "compileall", "rewrite-tests")),
]  # fmt: skip


def kindOf(pid: int) -> str:
    """The kind of process ``pid`` is (see :data:`KINDS`)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("latin-1")
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone before it was seen"
    if not command:
        return "the kernel's own threads"
    if name in ("tor", "tor-gencert"):
        return "Tor"
    line = f"{name} {command} "
    for kind, words in KINDS:
        if any(word in line for word in words):
            return kind
    return f"other: {name}"


def cpuTimes() -> dict[tuple[int, str], int]:
    """Every process's own CPU time (clock ticks; its children are looked at themselves), by (pid, start time)."""
    return {(pid, started): ticks for pid, (_, started, ticks, _) in processTable().items()}


def busy() -> tuple[int, int]:
    """The machine's (busy, total) clock ticks so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    p.add_argument("command", nargs="*", default=["bash", ".ci/run"], help="the command (after --)")
    args = p.parse_args(argv)
    seen = cpuTimes()  # what ran before counts from here
    kinds: dict[tuple[int, str], str] = {}
    used: Counter[str] = Counter()
    busyBefore, totalBefore = busy()
    began = time.monotonic()
    child = subprocess.Popen(args.command)
    while child.poll() is None:
        time.sleep(args.interval)
        for key, ticks in cpuTimes().items():
            if key not in kinds:
                kinds[key] = kindOf(key[0])
            used[kinds[key]] += ticks - seen.get(key, 0)
            seen[key] = ticks
    seconds = time.monotonic() - began
    busyAfter, totalAfter = busy()
    total = sum(used.values()) / TICKS
    rows = [[kind, f"{ticks / TICKS:.0f}", f"{100 * ticks / TICKS / total:.1f}"] for kind, ticks in used.most_common() if ticks]
    print(f"\n`{' '.join(args.command)}`: exit status {child.returncode}, {seconds:.0f} s, {total:.0f} s of CPU;"
          f" the machine {100 * (busyAfter - busyBefore) / max(1, totalAfter - totalBefore):.0f} % busy"
          f" on {os.cpu_count()} cores\n")  # fmt: skip
    print("\n".join(markdown(["kind of process", "CPU (s)", "%"], rows, "lrr")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
