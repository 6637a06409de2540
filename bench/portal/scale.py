#!/usr/bin/env python3
"""Several portal processes on one PostgreSQL database, behind a load balancer.

Seeds PostgreSQL as bench/portal/run.py does (the same seed.py, the same
typical person), then runs 1, then 2, then 3 ``twistd -n dit4c-portal``
processes on it, each listening on port 0 (its port read back from its
log), with nginx in front of them (round robin, keep-alive to each
portal; its configuration written once the portals' ports are known), and
loads ``GET /`` and ``GET /api/v1/instances`` through nginx with wrk
(closed loop). One table: requests/s, p50 and p99 for each count of
processes, and where the CPU went (portals, PostgreSQL, nginx, wrk).

    python bench/portal/scale.py --quick
    python bench/portal/scale.py --processes 1,2,3 --json out.json

Needs nginx (``apt-get install -y nginx``), wrk and PostgreSQL (see
bench/portal/README.md). Prints figures, never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # bench/: plumbing, tables, wrk

from plumbing import (  # noqa: E402
    Run,
    Service,
    Skip,
    attempt,
    findExe,
    freePort,
    httpStatus,
    log,
    runTool,
    sourceEnv,
    waitFor,
)
from run import (  # noqa: E402  (the portal bench's database, seeding settings and CPU sampling)
    ENDPOINTS,
    LABELS,
    MIB,
    Postgres,
    cpu_delta,
    cpu_seconds,
    probe,
    wait_quiet,
)
from tables import heading, machine, markdown  # noqa: E402
from wrk import parse as parseWrk  # noqa: E402

REPO = HERE.parent.parent


def nginxConfig(base: Path, port: int, backends: list[int]) -> str:
    """Round robin over ``backends`` on loopback, keep-alive both sides, no access log."""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    upstream portals {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://portals;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
        }}
    }}
}}
"""


class Balancer:
    """nginx in front of the portals, its configuration written now that their ports are known."""

    def __init__(self, nginx: str, base: Path, logdir: Path, port: int, backends: list[int], name: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        conf = base / "nginx.conf"
        conf.write_text(nginxConfig(base, port, backends))
        self.port = port
        self.service = Service(name, [nginx, "-p", str(base), "-c", str(conf)], logdir)
        waitFor(lambda: httpStatus(port, "/health") == 200, "nginx to the portals' /health", 30, [self.service])

    def stop(self) -> None:
        self.service.stop()


def startPortals(
    twistd: str, count: int, url: str, publicPort: int, tmp: Path, logdir: Path, run: int
) -> list[Service]:
    portals = []
    for n in range(count):
        datadir = tmp / f"portal-{run}-{n}"
        datadir.mkdir()
        argv = [
            twistd, "-n", "--pidfile=", "dit4c-portal",
            "--listen", "tcp:0:interface=127.0.0.1",
            "--data-dir", str(datadir), "--database", url,
            "--public-url", f"http://127.0.0.1:{publicPort}",
        ]  # fmt: skip
        portals.append(Service(f"portal-{run}-{n}", argv, logdir, env=sourceEnv(REPO), cwd=datadir))
    return portals


def measure(
    wrk: str, seconds: int, connections: int, port: int, endpoint: str, headers: dict[str, str],
    portals: list[Service], lb: Balancer, pg: Postgres, quietWait: float,
) -> dict[str, Any]:  # fmt: skip
    hs = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    url = f"http://127.0.0.1:{port}{ENDPOINTS[endpoint]}"
    runTool([wrk, "-t1", f"-c{connections}", "-d1s", *hs, url], 60)  # warm-up, not counted
    busy, _ = wait_quiet(quietWait)
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *hs, url]
    groups = {
        "portals": lambda: [p for s in portals for p in s.procs()],
        "postgresql": pg.procs,
        "nginx": lambda: lb.service.procs(),
    }
    before = {k: cpu_seconds(f()) for k, f in groups.items()}
    xact0 = pg.xact_commits()
    t0 = time.monotonic()
    rc, out, err = runTool(argv, seconds + 60)
    elapsed = time.monotonic() - t0
    res: dict[str, Any] = {"command": argv[0:5] + ["…"] + argv[-1:], "background_busy_pct": busy}
    for k, f in groups.items():
        res[f"{k}_cpu_pct"] = 100 * cpu_delta(before[k], cpu_seconds(f())) / elapsed
    parsed = parseWrk(out)
    if rc != 0 or "rps" not in parsed:
        res["error"] = f"wrk exit {rc}: {(err or out).strip()[-300:]}"
        return res
    res.update(parsed)
    time.sleep(1.5)  # backends report their statistics at most once a second
    xact1 = pg.xact_commits()
    if xact0 is not None and xact1 is not None and parsed.get("requests"):
        res["db_xacts_per_req"] = (xact1 - xact0) / parsed["requests"]
    log(
        f"  {len(portals)} portal(s) {LABELS[endpoint]}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms,"
        f" p99 {res['p99_ms']} ms, portals {res['portals_cpu_pct']:.0f}%, PostgreSQL {res['postgresql_cpu_pct']:.0f}%,"
        f" nginx {res['nginx_cpu_pct']:.0f}%, errors {res['errors']}"
    )
    return res


def runAll(args: argparse.Namespace, tools: dict[str, str], run: Run, results: dict[str, Any]) -> None:
    pg = Postgres(str(run.tmp.parent), run.logs)
    try:
        pg.start()
        results["server_version"] = pg.version()
        url = pg.url()
        seedArgv = [
            sys.executable, str(HERE / "seed.py"), "--database", url, "--people", str(args.people),
            "--per-person", str(args.per_person), "--images", str(args.images), "--timings", "0",
        ]  # fmt: skip
        log(f"  seeding: {shlex.join(seedArgv)}")
        rc, out, err = runTool(seedArgv, 600)
        if rc != 0:
            raise Skip(f"seeding failed ({rc}): {(err or out).strip()[-800:]}")
        seeded = json.loads(out.strip().splitlines()[-1])
        headers = {
            "page": {"Cookie": f"dit4c_session={seeded['cookie']}"},
            "api": {"Authorization": f"Bearer {seeded['api_token']}"},
        }
        seconds = 3 if args.quick else 10
        for count in args.processes:
            log(f"== {count} portal process(es)")
            r: dict[str, Any] = {}
            results[str(count)] = r

            def one(count: int = count, r: dict[str, Any] = r) -> None:
                # nginx takes no socket handed over: its port is picked just before it starts.
                lbPort = freePort()
                portals = startPortals(tools["twistd"], count, url, lbPort, run.tmp, run.logs, count)
                lb: Balancer | None = None
                try:
                    ports = [p.waitForPort("portal", 60) for p in portals]
                    r["portal_ports"] = ports
                    lb = Balancer(tools["nginx"], run.tmp / f"nginx-{count}", run.logs, lbPort, ports, f"nginx-{count}")
                    for endpoint in ENDPOINTS:
                        seen = probe(lbPort, endpoint, headers[endpoint])
                        if seen["status"] != 200:
                            r[endpoint] = {"error": f"{ENDPOINTS[endpoint]} answered {seen['status']}"}
                            continue
                        r[endpoint] = measure(
                            tools["wrk"], seconds, args.connections, lbPort, endpoint, headers[endpoint],
                            portals, lb, pg, args.quiet_wait,
                        )  # fmt: skip
                        r[endpoint]["probe"] = seen
                    r["portal_rss_mib"] = [p.procs()[0].memory_info().rss / MIB for p in portals if p.procs()]
                finally:
                    if lb is not None:
                        lb.stop()
                    for p in portals:
                        p.stop()

            attempt(f"{count} portals", r, one, ["page", "api"])
    finally:
        pg.stop()


def fmt(v: Any, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def report(results: dict[str, Any], counts: list[int]) -> str:
    done = [c for c in counts if str(c) in results]
    head = [""] + [f"{c} portal{'s' if c > 1 else ''}" for c in done]
    rows = []
    for endpoint in ENDPOINTS:
        def cell(c: int, key: str, digits: int = 0, endpoint: str = endpoint) -> str:
            e = results[str(c)].get(endpoint, {})
            return e.get("error", "") and "error" or fmt(e.get(key), digits)

        label = f"`{LABELS[endpoint]}`"
        rows.append([f"{label}: requests/s"] + [cell(c, "rps") for c in done])
        base = results[str(done[0])].get(endpoint, {}).get("rps") if done else None
        rows.append(
            [f"{label}: × one process"]
            + [fmt(results[str(c)].get(endpoint, {}).get("rps", 0) / base, 2) if base else "—" for c in done]
        )
        rows.append(
            [f"{label}: p50 / p99 (ms)"]
            + [f"{cell(c, 'p50_ms', 1)} / {cell(c, 'p99_ms', 1)}" for c in done]
        )
        rows.append(
            [f"{label}: CPU, % of one core: portals / PostgreSQL / nginx"]
            + [
                f"{cell(c, 'portals_cpu_pct')} / {cell(c, 'postgresql_cpu_pct')} / {cell(c, 'nginx_cpu_pct')}"
                for c in done
            ]
        )
        rows.append([f"{label}: DB transactions per request"] + [cell(c, "db_xacts_per_req", 1) for c in done])
        rows.append([f"{label}: errors (socket + non-2xx)"] + [cell(c, "errors") for c in done])
    return "\n".join(markdown(head, rows, "l" + "r" * len(done))) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s runs instead of 10 s")
    p.add_argument("--processes", default="1,2,3", help="comma list of portal process counts (default 1,2,3)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--people", type=int, default=1000)
    p.add_argument("--per-person", type=int, default=10)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--quiet-wait", type=float, default=60.0, metavar="S")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON here")
    p.add_argument("--tmp-dir", help="parent of the temp dir (default /dev/shm when it has room)")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    args.processes = [int(x) for x in args.processes.split(",") if x.strip()]
    found = {"wrk": shutil.which("wrk"), "twistd": findExe("twistd"), "nginx": shutil.which("nginx") or findExe("nginx")}
    missing = [name for name, path in found.items() if not path]
    if missing:
        print(f"missing tools: {', '.join(missing)} (nginx: apt-get install -y nginx)", file=sys.stderr)
        return 2
    tools = {name: str(path) for name, path in found.items()}
    results: dict[str, Any] = {}
    run = Run("bench/portal/scale.py", argv, "dit4c-bench-scale-", 1024 * MIB, args.tmp_dir, args.keep_tmp)
    with run:
        attempt("postgresql", results, lambda: runAll(args, tools, run, results), [str(c) for c in args.processes])
    vers = machine(
        {"nginx": ([tools["nginx"], "-v"], -1), "wrk": ([tools["wrk"], "-v"], 2)},
        more={"PostgreSQL": str(results.get("server_version", "?"))},
    )
    about = [
        "PostgreSQL (defaults, Unix socket, in the temp dir) seeded as bench/portal/run.py seeds it;"
        " N portal processes on it, each with its own pool (up to 5 connections);"
        " nginx (one worker, round robin, keep-alive to the portals) in front; wrk (one thread,"
        f" {args.connections} connections) through nginx. Everything shares the machine's cores."
    ]
    return run.publish(heading("DIT4C portals side by side", run, vers, about), report(results, args.processes),
                       args.json, vars(args), vers, results)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
