#!/usr/bin/env python3
"""100,000 idle WebSockets through one routing server.

One ``twistd dit4c-routing`` holds every connection. Behind it, as on a
site, the people are spread over several instances: each instance has its
own listener (``twistd dit4c-helper-listener``, one tunnel over TCP) and
its own WebSocket echo backend (``bench/wsecho.py``). One client process
per instance (``bench/wsidle.py``) opens its share of the connections from
a loopback address of its own (127.0.0.2, 127.0.0.3, ...), echoes one
message on each and holds them all.

Why several instances and several client addresses: the routing server
carries at most ``--max-streams`` (16,384 by default) streams on one
tunnel, and one client address reaches one server address and port from
about 28,000 ephemeral ports (``net.ipv4.ip_local_port_range``); each
listener likewise dials its backend from 127.0.0.1. Eight instances of
12,500 people each stay under both.

Meanwhile one more instance, with no idle connections of its own, serves
a person's requests: ``bench/loadgen.py`` sends ``GET /small`` to it (a
``twistd web``) at a fixed rate (open loop) through the same routing
server: before the idle connections open, while they open (at full speed,
as after a restart, or at ``--open-rate``), while they are held and after
they are closed, side by side.

Every process gets an open-file limit large enough for what it holds: the
harness raises its own hard limit, as a site's service manager does with
``LimitNOFILE=``, and every child inherits it. That needs
``CAP_SYS_RESOURCE``; without it, the connections are capped at what the
limit allows, and the report says so. Nothing system-wide is changed; the
sysctls that matter are read and printed.

    python bench/idle100k.py                         # 100,000 over 8 instances
    python bench/idle100k.py -n 10000 --instances 2  # a quick try
    python bench/idle100k.py --open-rate 200         # people arriving at 200/s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import select
import shlex
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from plumbing import (
    BENCH,
    Run,
    Service,
    Skip,
    findExe,
    httpStatus,
    kill,
    listeningSocket,
    log,
    runTool,
    spawn,
    waitFor,
)
from tables import heading, machine, markdown
from tunnel import Dit4cPath, Env, Settings, fmt_kib, rss
from tunnel import parse_args as tunnelArgs
from wsidle import raiseHardNofile

GIB = 1024**3
#: Descriptors beyond those of the connections: the process's own, logs, tunnels, a person's requests.
FD_SLACK = 512
#: Seconds the client processes take to start, left out of a person's latency while they open.
CLIENT_START = 3.0
SYSCTLS = [
    "fs.nr_open", "fs.file-max", "fs.file-nr", "net.ipv4.ip_local_port_range",
    "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_mem",
]  # fmt: skip


def sysctl(name: str) -> str:
    try:
        return " ".join(Path("/proc/sys", *name.split(".")).read_text().split())
    except OSError:
        return "?"


def sockstat() -> dict[str, int]:
    """/proc/net/sockstat's TCP line: sockets in use, orphans, TIME-WAIT, allocated, and ``mem`` (pages)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                words = line.split()[1:]
                out = {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    except OSError:
        pass
    return out


def listenDrops() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (SYNs dropped at a full accept queue, machine-wide)."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
        table = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    except (OSError, IndexError, ValueError):
        return {}
    return {k: table[k] for k in ("ListenOverflows", "ListenDrops") if k in table}


def slab() -> dict[str, int]:
    """Kernel memory of TCP sockets by slab cache (bytes), where /proc/slabinfo can be read."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            w = line.split()
            if w[0] in ("TCP", "request_sock_TCP", "tw_sock_TCP", "sock_inode_cache", "dentry", "filp", "eventpoll_epi"):
                out[w[0]] = int(w[2]) * int(w[3])  # num_objs * objsize
    except (OSError, IndexError, ValueError):
        pass
    return out


def nofile(procs: list[psutil.Process]) -> str:
    """The open-file limits (soft/hard) of ``procs``, distinct ones only."""
    seen = []
    for p in procs:
        try:
            soft, hard = p.rlimit(psutil.RLIMIT_NOFILE)
        except psutil.Error:
            continue
        if f"{soft}/{hard}" not in seen:
            seen.append(f"{soft}/{hard}")
    return ", ".join(seen) or "?"


class Instances(Dit4cPath):
    """One routing server, and a listener for each of several instances (each its own host name and backend)."""

    def __init__(self, env: Env) -> None:
        super().__init__(env, tls=False)
        self.name = "dit4c-tcp"
        self.listeners: list[Service] = []

    def startAll(self, targets: dict[str, int]) -> None:
        """The routing server, then a listener for each instance in ``targets`` (its name → its backend's port)."""
        creds = self._credentials()
        routing = self._routing(["--jwks-file", str(creds["jwks"])])
        for name, port in targets.items():
            listener = Service(
                f"listener-{name}",
                [
                    str(self.env.tools["twistd"]), "-n", "--pidfile=", "dit4c-helper-listener",
                    "--routing", routing, "--key-file", str(creds["key"]), "--instance", name,
                    "--target", f"tcp:host=127.0.0.1:port={port}",
                ],
                self.env.logs,
            )  # fmt: skip
            self.services.append(listener)
            self.listeners.append(listener)
        for name in targets:
            host = f"{name}.localhost"
            waitFor(partial(self.answers, host), f"GET / with Host: {host}", 60, self.services)

    def answers(self, host: str) -> bool:
        """Whether ``GET /`` with ``Host: host`` is answered 200 through the routing server."""
        return httpStatus(self.port, "/", host) == 200

    def listener_procs(self) -> list[psutil.Process]:
        return [p for s in self.listeners for p in s.procs()]


def startEcho(name: str, logs: Path) -> tuple[Service, int]:
    """A WebSocket echo backend (``bench/wsecho.py``) and its port."""
    svc = Service(name, [sys.executable, str(BENCH / "wsecho.py")], logs, stdout=subprocess.PIPE)
    assert svc.popen.stdout is not None
    line = svc.popen.stdout.readline().decode().strip()
    if not line.startswith("PORT "):
        raise Skip(f"{name} did not start: {line!r}\n{svc.tail()}")
    port = int(line.split()[1])
    waitFor(lambda: httpStatus(port, "/", "x") == 200, name, 10, [svc])
    return svc, port


def startWeb(tmp: Path, logs: Path, twistd: str) -> tuple[Service, int]:
    """
    The person's backend: ``twistd web`` serving ``/small`` (100 bytes) with
    keep-alive, on a socket bound here on port 0 and handed over as systemd does.
    """
    www = tmp / "www"
    www.mkdir()
    (www / "small").write_bytes(b"x" * 99 + b"\n")
    sock, port = listeningSocket()
    svc = Service(
        "web-person",
        [twistd, "-n", "--pidfile=", "web", "--listen", "systemd:domain=INET:index=0", "--path", str(www)],
        logs,
        systemd=sock,
    )
    waitFor(lambda: httpStatus(port, "/small", "x") == 200, "web-person", 30, [svc])
    return svc, port


def startLatency(
    args: argparse.Namespace, port: int, host: str, later: float = 0.0
) -> tuple[subprocess.Popen[str], list[str]]:
    """
    Start ``bench/loadgen.py``: open loop, ``GET /small`` with ``Host: host``
    through the routing server, counted from ``later`` seconds after its warm-up.
    """
    argv = [
        sys.executable, str(BENCH / "loadgen.py"), "--port", str(port), "--host-header", host, "--path", "/small",
        "--rate", f"{args.rate:g}", "--duration", f"{args.duration:g}", "--warmup", f"{args.warmup + later:g}",
        "--connections", str(args.connections),
    ]  # fmt: skip
    return spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), argv


def latencyResult(args: argparse.Namespace, started: tuple[subprocess.Popen[str], list[str]]) -> dict[str, Any]:
    """What the loadgen run ``started`` measured, once it is done."""
    p, argv = started
    try:
        out, err = p.communicate(timeout=args.duration + args.warmup + 60)
    except subprocess.TimeoutExpired:
        kill(p)
        out, err = p.communicate()
    kill(p)  # gone already; forgotten
    try:
        r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r = {"error": f"loadgen exit {p.returncode}: {(err or out).strip()[-300:]}"}
    r["command"] = shlex.join(argv)
    if "error" not in r:
        lat = r["latency_ms"]
        log(f"  latency: p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms "
            f"({r['completed']}/{r['scheduled']} ok; errors {r['errors']})")  # fmt: skip
    return r


def latency(args: argparse.Namespace, port: int, host: str) -> dict[str, Any]:
    """A person's requests (``bench/loadgen.py``) through the routing server, start to end."""
    return latencyResult(args, startLatency(args, port, host))


def openIdle(
    args: argparse.Namespace, port: int, names: list[str], res: dict[str, Any]
) -> list[subprocess.Popen[bytes]]:
    """
    Start one ``wsidle.py`` per instance, each from its own loopback address,
    all at once; wait until each has reported. Every client is ended if the
    machine's available memory falls under ``--min-available-gib``.
    """
    share = [args.n // len(names) + (1 if i < args.n % len(names) else 0) for i in range(len(names))]
    clients: list[subprocess.Popen[bytes]] = []
    commands = []
    t0 = time.monotonic()
    for i, (name, k) in enumerate(zip(names, share, strict=True)):
        argv = [
            sys.executable, str(BENCH / "wsidle.py"), "--port", str(port), "--source", f"127.0.0.{2 + i}",
            "--host-header", f"{name}.localhost", "--path", "/", "--concurrency", str(args.concurrency),
            "--timeout", "60", "-n", str(k),
        ]  # fmt: skip
        if args.open_rate:
            argv += ["--rate", f"{args.open_rate * k / args.n:g}"]
        commands.append(shlex.join(argv))
        clients.append(spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    res["commands"] = commands
    reports: dict[int, dict[str, Any]] = {}
    lowest = psutil.virtual_memory().available
    while len(reports) < len(clients):
        outs = {c.stdout.fileno(): i for i, c in enumerate(clients) if i not in reports and c.stdout}
        ready, _, _ = select.select(list(outs), [], [], 1.0)
        for fd in ready:
            i = outs[fd]
            line = clients[i].stdout.readline().decode()  # type: ignore[union-attr]
            try:
                reports[i] = json.loads(line)
            except ValueError:
                reports[i] = {"opened": 0, "failed": share[i], "failures": {"no report": share[i]}, "seconds": None,
                              "error": (line + clients[i].stderr.read().decode()[-300:]).strip()}  # type: ignore[union-attr]  # fmt: skip
            reports[i]["wall"] = round(time.monotonic() - t0, 3)
            log(f"  client {i}: {reports[i].get('opened')}/{share[i]} open at {reports[i]['wall']} s")
        available = psutil.virtual_memory().available
        lowest = min(lowest, available)
        if available < args.min_available_gib * GIB:
            res["error"] = f"stopped: available memory {available / GIB:.1f} GiB < {args.min_available_gib} GiB"
            log("  " + res["error"])
            for c in clients:
                c.kill()
            break
    res["clients"] = [reports.get(i) for i in range(len(clients))]
    res["opened"] = sum(r.get("opened", 0) for r in reports.values())
    res["failed"] = sum(r.get("failed", 0) for r in reports.values())
    failures: dict[str, int] = {}
    for r in reports.values():
        for kind, count in (r.get("failures") or {}).items():
            failures[kind] = failures.get(kind, 0) + count
    res["failures"] = failures
    res["open_seconds"] = max((r["wall"] for r in reports.values()), default=None)
    res["lowest_available_gib"] = round(lowest / GIB, 2)
    return clients


def closeIdle(clients: list[subprocess.Popen[bytes]]) -> None:
    for c in clients:
        try:
            assert c.stdin is not None
            c.stdin.write(b"close\n")
            c.stdin.close()
        except (OSError, ValueError):
            pass
    for c in clients:
        try:
            c.wait(60)
        except subprocess.TimeoutExpired:
            c.kill()


def measure(args: argparse.Namespace, run: Run, res: dict[str, Any]) -> None:
    tools = {"dit4c": findExe("dit4c"), "twistd": findExe("twistd")}
    if not tools["dit4c"] or not tools["twistd"]:
        raise Skip("the `dit4c` and `twistd` commands are needed (pip install -e . in the repo)")
    env = Env(settings=Settings.make(tunnelArgs([])), tmp=run.tmp, tools=tools)
    names = [f"bench{i + 1}" for i in range(args.instances)]
    person = "person"
    backends: dict[str, Service] = {}
    targets: dict[str, int] = {}
    for name in names:
        backends[name], targets[name] = startEcho(f"wsecho-{name}", run.logs)
    backends[person], targets[person] = startWeb(run.tmp, run.logs, str(tools["twistd"]))
    path = Instances(env)
    if args.backlog:
        path.httpEndpoint += f":backlog={args.backlog}"
    # The bench keeps its own count under the open-file limit (or, with
    # --no-cap, goes to it): the routing server's cap, which would turn
    # the last tenth away with a 503, is set to the limit itself.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        path.routingOptions = ("--max-connections", str(hard))
    path.startAll(targets)
    res["processes"] = path.describe()
    res["http_endpoint"] = path.httpEndpoint
    server = path.services[0]
    res["nofile"] = {
        "routing server": nofile(server.procs()),
        "listeners": nofile(path.listener_procs()),
        "backends": nofile([p for b in backends.values() for p in b.procs()]),
    }

    log("latency with no idle connections held")
    res["latency_before"] = latency(args, path.port, f"{person}.localhost")

    # warm up every instance's code paths (lazy imports, buffers) before the baseline
    for name in names:
        runTool([sys.executable, str(BENCH / "wsidle.py"), "--port", str(path.port), "--host-header",
                 f"{name}.localhost", "-n", "20", "--hold", "0"], 60)  # fmt: skip
    time.sleep(1.0)
    idleBackends = [p for n in names for p in backends[n].procs()]
    before = {
        "routing": rss(server.procs()),
        "listeners": rss(path.listener_procs()),
        "backends": rss(idleBackends),
        "routing_fds": server.procs()[0].num_fds(),
        "sockstat": sockstat(),
        "slab": slab(),
        "available": psutil.virtual_memory().available,
    }
    res["before"] = before
    log(f"opening {args.n} idle WebSockets over {args.instances} instances")
    drops = listenDrops()
    res["load_before"] = os.getloadavg()
    # not counted: the first seconds, while the client processes start (Python's imports, on the same CPUs)
    opening = startLatency(args, path.port, f"{person}.localhost", later=CLIENT_START)
    clients = openIdle(args, path.port, names, res)
    log("latency while they opened")
    res["latency_opening"] = latencyResult(args, opening)
    res["load_after"] = os.getloadavg()
    res["listen_drops"] = {k: v - drops.get(k, 0) for k, v in listenDrops().items()}
    try:
        if res.get("error"):
            return
        time.sleep(args.settle)  # let lazily-freed buffers settle
        res["after"] = {
            "routing": rss(server.procs()),
            "listeners": rss(path.listener_procs()),
            "backends": rss(idleBackends),
            "clients": rss([psutil.Process(c.pid) for c in clients if c.poll() is None]),
            "routing_fds": server.procs()[0].num_fds(),
            "sockstat": sockstat(),
            "slab": slab(),
            "available": psutil.virtual_memory().available,
        }
        log(f"latency with {res['opened']} idle connections held")
        res["latency_during"] = latency(args, path.port, f"{person}.localhost")
        alive = [c.poll() is None for c in clients]
        res["clients_alive_after_latency"] = sum(alive)
        # Are they all still open? The routing server's descriptors say so.
        res["routing_fds_end"] = server.procs()[0].num_fds()
    finally:
        closeIdle(clients)
    if not res.get("error"):
        # until the routing server has closed its side of them all (up to a minute), then settle
        t0 = time.monotonic()
        while server.procs()[0].num_fds() > before["routing_fds"] + 50 and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        res["close_seconds"] = round(time.monotonic() - t0, 1)
        time.sleep(args.settle)
        log(f"latency after they are closed ({res['close_seconds']} s to close)")
        res["latency_after"] = latency(args, path.port, f"{person}.localhost")


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    lines: list[str] = []
    k = res.get("opened") or 0
    b, a = res.get("before") or {}, res.get("after") or {}

    def per(key: str) -> str:
        if not k or a.get(key) is None or b.get(key) is None:
            return "—"
        return fmt_kib((a[key] - b[key]) / 1024 / k)

    def mib(v: int | None) -> str:
        return "—" if v is None else f"{v / 2**20:,.0f}"

    opened = f"{k:,}/{args.n:,}" + (f" (of {res['requested']:,} asked for)" if res.get("capped") else "")
    secs = res.get("open_seconds")
    rows = [
        ["connections open", opened],
        ["opened at", f"{args.open_rate:g}/s, paced" if args.open_rate else f"full speed, {args.concurrency} handshakes in flight per client"],
        ["time to open them all (s)", f"{secs:.1f}" if secs else "—"],
        ["opened per second", f"{k / secs:,.0f}" if secs and k else "—"],
        ["SYNs dropped at a full accept queue (machine-wide)",
         ", ".join(f"{v:,} {k}" for k, v in (res.get("listen_drops") or {}).items()) or "—"],
        ["load average (1 min) before / after", " / ".join(f"{x[0]:.1f}" for x in (res.get("load_before"), res.get("load_after")) if x) or "—"],
        ["time until the routing server had closed them all (s)", f"{res['close_seconds']:.1f}" if res.get("close_seconds") is not None else "—"],
        ["failures", ", ".join(f"{n} {kind}" for kind, n in res.get("failures", {}).items()) or "none"],
    ]
    lines += ["### Opening", "", *markdown(["", "figure"], rows, "lr"), ""]
    rows = [
        ["routing server (1 process)", mib(b.get("routing")), mib(a.get("routing")), per("routing")],
        [f"listeners ({args.instances} processes)", mib(b.get("listeners")), mib(a.get("listeners")), per("listeners")],
        [f"echo backends ({args.instances} processes)", mib(b.get("backends")), mib(a.get("backends")), per("backends")],
        [f"clients ({args.instances} wsidle.py)", "—", mib(a.get("clients")), "—"],
    ]
    lines += ["### Memory (RSS)", "", *markdown(["", "before (MiB)", "after (MiB)", "KiB per connection"], rows, "lrrr"), ""]
    sb, sa = b.get("sockstat") or {}, a.get("sockstat") or {}
    kb, ka = b.get("slab") or {}, a.get("slab") or {}
    rows = [
        ["TCP sockets in use (sockstat inuse)", f"{sb.get('inuse', 0):,}", f"{sa.get('inuse', 0):,}",
         f"{(sa.get('inuse', 0) - sb.get('inuse', 0)) / k:.2f} per connection" if k else "—"],
        ["TCP buffer memory (sockstat mem, pages)", f"{sb.get('mem', 0):,}", f"{sa.get('mem', 0):,}",
         fmt_kib((sa.get("mem", 0) - sb.get("mem", 0)) * 4 / k) + " KiB per connection" if k else "—"],
    ]  # fmt: skip
    for cache in ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi"):
        if cache in kb and cache in ka:
            rows.append([f"slab {cache} (MiB)", mib(kb[cache]), mib(ka[cache]), fmt_kib((ka[cache] - kb[cache]) / 1024 / k) + " KiB per connection" if k else "—"])  # fmt: skip
    rows.append(["routing server descriptors", f"{b.get('routing_fds', 0):,}", f"{a.get('routing_fds', 0):,}",
                 f"{res.get('routing_fds_end', 0):,} after the latency run"])  # fmt: skip
    lines += ["### Kernel and machine", "", *markdown(["", "before", "after", ""], rows, "lrrl"), ""]

    lb, lo, ld, la = (res.get(f"latency_{w}") or {} for w in ("before", "opening", "during", "after"))

    def lat(r: dict[str, Any], key: str, which: str = "latency_ms") -> str:
        if "error" in r or not r:
            return "error" if r else "—"
        v = r[which].get(key)
        return "—" if v is None else f"{v:.2f}"

    def ok(r: dict[str, Any]) -> str:
        if "error" in r or not r:
            return "—"
        bad = r["scheduled"] - sum(v for s, v in r["statuses"].items() if s.startswith("2"))
        return f"{r['completed']:,}/{r['scheduled']:,} ({bad} failed)"

    rows = [[f"{q} (ms)", lat(lb, q), lat(lo, q), lat(ld, q), lat(la, q)] for q in ("p50", "p90", "p99", "max")]
    rows += [[f"from its send: {q} (ms)", *(lat(r, q, "service_ms") for r in (lb, lo, ld, la))] for q in ("p50", "p99")]
    rows.append(["answered 2xx / scheduled", ok(lb), ok(lo), ok(ld), ok(la)])
    held = f"{k:,} idle held"
    lines += [
        f"### A person's requests meanwhile ({args.rate:g} req/s, open loop, {args.duration:g} s)",
        "",
        *markdown(["", "before they open", "while they open", held, "after they are closed"], rows, "lrrrr"),
        "",
    ]
    notes = [
        f"- {args.instances} instances of {args.n // args.instances:,} connections each, one routing server; "
        f"instance *i*'s client connects from 127.0.0.*{{i+1}}* (bound before connect, "
        "`IP_BIND_ADDRESS_NO_PORT`) to the routing server's one address and port; each listener dials its "
        "own backend from 127.0.0.1. Each connection echoed one message, then was held.",
        "- A person's requests go to one more instance, `person`, whose backend (`twistd web`) holds no idle "
        "connection: `GET /small` (100 bytes), so the figure shows what the routing server's load adds.",
        f"- Latency runs from when a request was scheduled; a request that finds all {args.connections} "
        "of a person's connections busy waits, and that wait counts. *From its send* leaves that wait out: "
        "what one request took once it was sent.",
        f"- A person's requests while they open: from {CLIENT_START + args.warmup:g} s after the clients start "
        f"(their start, Python's imports on the same CPUs, is left out) for {args.duration:g} s.",
        f"- The routing server's public endpoint: `{res.get('http_endpoint')}`"
        + ("" if args.backlog else " (Twisted's accept queue of 50, as a plain `--http tcp:PORT` gets)") + ".",
        "- Four TCP sockets per connection on loopback (client, routing server's accepted one, listener's "
        "to its backend, backend's accepted one) plus one tunnel per instance.",
        f"- Open-file limits (soft/hard): {'; '.join(f'{w} {v}' for w, v in (res.get('nofile') or {}).items())}; "
        f"the harness: {res.get('nofile_how', '?')}. A site sets these with systemd's `LimitNOFILE=` "
        "(or limits.conf's `nofile`), under `fs.nr_open`; the whole machine's open files are bounded by `fs.file-max`.",
        "- sysctls as read (not changed): " + "; ".join(f"`{n}` {v}" for n, v in (res.get("sysctls") or {}).items()),
        f"- Lowest available memory while opening: {res.get('lowest_available_gib')} GiB.",
    ]
    if res.get("capped"):
        notes.append(f"- {res['capped'][0].upper()}{res['capped'][1:]}.")
    if res.get("error"):
        notes.append(f"- Stopped early: {res['error']}")
    for c in res.get("clients") or []:
        if c and c.get("error"):
            notes.append(f"- A client failed: {c['error']}")
    for label, r in (("before they open", lb), ("while they open", lo), ("with them held", ld), ("after they are closed", la)):
        if r.get("errors") or r.get("unanswered"):
            notes.append(f"- A person's requests {label}: {r.get('unanswered')} unanswered, errors {r.get('errors')}.")
        elif r.get("error"):
            notes.append(f"- A person's requests {label}: {r['error']}")
    cmds = res.get("commands") or []
    if cmds:
        notes.append(f"- First client: `{cmds[0]}`")
    if ld.get("command"):
        notes.append(f"- Latency: `{ld['command']}`")
    return "\n".join([*lines, *notes, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=100_000, help="idle connections in all (default 100000)")
    p.add_argument("--instances", type=int, default=8, help="instances they are spread over (default 8)")
    p.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per client (default 50)")
    p.add_argument("--rate", type=float, default=200.0, help="a person's requests per second (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of them measured (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    p.add_argument("--connections", type=int, default=8, help="a person's keep-alive connections (default 8)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after opening before reading RSS")
    p.add_argument("--min-available-gib", type=float, default=6.0, help="end the clients below this much free memory")
    p.add_argument(
        "--open-rate", type=float,
        help="connections opened per second in all (default: as fast as they open, as after a restart)",
    )  # fmt: skip
    p.add_argument("--backlog", type=int, help="the routing server's accept queue (default: Twisted's, 50)")
    p.add_argument(
        "--no-cap", action="store_true",
        help="open -n connections even past what the open-file limit lets the routing server hold (to see what a person gets then)",
    )  # fmt: skip
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    if args.instances < 1 or args.instances > 250:
        p.error("--instances: 1 to 250 (one loopback address each)")
    per = math.ceil(args.n / args.instances)
    if per > 16384:
        p.error(f"{per} connections per instance: more than one tunnel carries (16,384); use more --instances")

    res: dict[str, Any] = {"sysctls": {n: sysctl(n) for n in SYSCTLS}, "requested": args.n}
    # The routing server holds one descriptor per connection; a listener two.
    soft, hard, how = raiseHardNofile(max(args.n, 2 * per) + FD_SLACK)
    res["nofile_how"] = f"{soft}/{hard} ({how})"
    log(f"RLIMIT_NOFILE {soft}/{hard}: {how}")
    # What the limit lets every process hold, with room left for a person's connections: a
    # process at its limit accepts nothing more, not even them.
    room = min(hard - FD_SLACK, args.instances * ((hard - FD_SLACK) // 2))
    if args.n > room and not args.no_cap:
        res["capped"] = (
            f"capped at {room:,} of the {args.n:,} asked for: the open-file limit is {hard:,} "
            f"and could not be raised ({how}); the routing server holds one descriptor per "
            "connection, a listener two"
        )
        log(res["capped"])
        args.n = room

    run = Run("bench/idle100k.py", argv, "dit4c-idle-", 64 * 2**20, keep=args.keep_tmp)
    with run:
        try:
            measure(args, run, res)
        except Skip as e:
            res["error"] = str(e)
            log(f"SKIP: {e}")
    vers = machine({}, packages=["twisted", "autobahn"])
    about = [
        f"{args.n:,} idle WebSockets through one routing server, spread over {args.instances} instances "
        "(a listener and a WebSocket echo backend each), everything on 127.0.0.1."
    ]
    head = heading("Idle WebSockets through one routing server", run, vers, about)
    return run.publish(head, report(args, res), args.json, vars(args), vers, res)


if __name__ == "__main__":
    sys.exit(main())
