#!/usr/bin/env python3
"""The portal under load: its instances page and its instances API, on SQLite
and on PostgreSQL, with a realistic population.

For each database: seed 1,000 people with 10 instances each (bench/portal/seed.py),
start the real portal (``twistd -n dit4c-portal``) on it, and measure, for one
typical person (10 instances: 8 listed, plus 1 shared with them):

  GET /                  the instances page (HTML), with the session cookie
  GET /api/v1/instances  the same list as JSON, with an API token

closed loop with wrk (requests/s, latency p50/p99, CPU) and open loop at fixed
rates with bench/portal/fixedrate.py (latency from each request's scheduled
time). It also times each store call behind the two pages, and with
``--profile`` records the portal with py-spy under wrk.

The harness never passes or fails: it prints markdown tables (and optionally
JSON). See bench/portal/README.md.

    python bench/portal/run.py --quick
    python bench/portal/run.py --databases sqlite,postgresql --json out.json --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from plumbing import (  # noqa: E402  (bench/plumbing.py: the process plumbing every bench shares)
    Run,
    Service,
    Skip,
    attempt,
    findExe,
    httpGet,
    httpStatus,
    kill,
    listeningSocket,
    log,
    runTool,
    sourceEnv,
    spawn,
    waitFor,
)
from tables import dig, heading, machine, markdown, ratio  # noqa: E402
from wrk import parse as parseWrk  # noqa: E402

ALL_DATABASES = ["sqlite", "postgresql"]
ENDPOINTS = {"page": "/", "api": "/api/v1/instances"}
LABELS = {"page": "GET /", "api": "GET /api/v1/instances"}
DB_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
MIB = 1024 * 1024


@dataclass
class Settings:
    quick: bool
    people: int
    per_person: int
    images: int
    wrk_seconds: int
    wrk_connections: int
    rates: list[int]
    lat_seconds: float
    lat_warmup: float
    lat_connections: int
    timings: int
    profile_seconds: int
    quiet_wait: float

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        q = args.quick
        return cls(
            quick=q,
            people=args.people,
            per_person=args.per_person,
            images=args.images,
            wrk_seconds=3 if q else 10,
            wrk_connections=args.connections,
            rates=[int(r) for r in args.rates.split(",")],
            lat_seconds=3.0 if q else 10.0,
            lat_warmup=0.5 if q else 1.0,
            lat_connections=args.connections,
            timings=50 if q else 200,
            profile_seconds=args.profile_seconds,
            quiet_wait=args.quiet_wait,
        )


# --------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster on a Unix socket only


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None
    newest = max(
        candidates, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0
    )
    return Path(newest).parent


class Postgres:
    """initdb + pg_ctl in a temp dir, run as the postgres user when we are root.

    PostgreSQL's defaults otherwise (fsync and synchronous_commit on): where
    the temp dir is on tmpfs, a commit's fsync costs next to nothing."""

    DB = "dit4c_bench"

    def __init__(self, parent: str | None, logdir: Path) -> None:
        found = postgres_bin()
        if found is None:
            raise Skip(
                "no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin (apt-get install postgresql)"
            )
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Skip("psycopg is not installed (pip install 'psycopg[binary]')") from None
        self.bin: Path = found
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise Skip(
                    "running as root and there is no postgres user to run the server as"
                ) from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="dit4c-bench-pg-", dir=parent))
        if self.as_user:
            shutil.chown(self.base, "postgres", "postgres")
        self.data = self.base / "data"
        self.logfile = logdir / "postgresql.log"
        self.port = 5432  # only names the socket file, in a directory of its own
        self.started = False

    def _tool(self, argv: list[str], what: str, timeout: float = 120) -> None:
        rc, out, err = runTool([*self.as_user, *argv], timeout)
        if rc != 0:
            raise Skip(f"{what} failed ({rc}): {(err or out).strip()[-600:]}")

    def start(self) -> None:
        log(f"  initdb in {self.data}")
        self._tool(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb",
        )  # fmt: skip
        options = f"-k {self.base} -p {self.port} -c listen_addresses='' -c max_connections=50"
        serverlog = self.base / "server.log"
        try:
            self._tool(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(serverlog),
                 "-w", "-t", "60", "-o", options, "start"],
                "pg_ctl start",
            )  # fmt: skip
        finally:
            self.started = True  # stop() in any case: pg_ctl may have half-started it
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {self.DB}")

    def url(self, db: str | None = None) -> str:
        return f"postgresql:///{db or self.DB}?host={self.base}&port={self.port}&user=postgres"

    def _admin(self, db: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.url(db), autocommit=True)

    def version(self) -> str:
        try:
            with self._admin() as conn:
                return str(conn.execute("SHOW server_version").fetchone()[0])
        except Exception:  # noqa: BLE001
            return "?"

    def xact_commits(self) -> int | None:
        """Transactions committed in the bench database so far (pg_stat_database)."""
        try:
            with self._admin() as conn:
                row = conn.execute(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                    (self.DB,),
                ).fetchone()
                return int(row[0]) if row else None
        except Exception:  # noqa: BLE001
            return None

    def procs(self) -> list[psutil.Process]:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            me = psutil.Process(pid)
            return [me, *me.children(recursive=True)]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []

    def stop(self) -> None:
        if self.started:
            self.started = False
            rc = 1
            for mode in ("fast", "immediate"):
                pgctl = [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30"]
                rc, _, _ = runTool([*pgctl, "stop"], 60)
                if rc == 0:
                    break
            if rc != 0:
                # pg_ctl could not: kill the postmaster (its children follow it)
                for p in self.procs()[:1]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
        try:
            serverlog = self.base / "server.log"
            if serverlog.exists():
                shutil.copy(serverlog, self.logfile)
        except OSError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------
# helpers


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def portal_times(portal: Portal) -> tuple[float, float] | None:
    """The portal's user and system CPU seconds (all threads)."""
    try:
        t = psutil.Process(portal.pid).cpu_times()
        return t.user, t.system
    except psutil.Error:
        return None


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two samples (processes new since count from zero)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


#: Machine CPU busy (% of all cores) under which we call it quiet.
QUIET_PCT = 10.0


def wait_quiet(max_wait: float) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) until the machine is nearly idle for 1.5 s.

    The machine may be shared: what else runs skews every figure. Returns the
    last sample (busy %, which our own idle processes are part of) and the
    seconds waited. The pause also lets PostgreSQL's backends report earlier
    transactions (they do so at most once a second) before we count."""
    t0 = time.monotonic()
    while True:
        busy = psutil.cpu_percent(interval=1.5)
        waited = time.monotonic() - t0
        if busy < QUIET_PCT or waited >= max_wait:
            return busy, waited


def probe(port: int, endpoint: str, headers: dict[str, str]) -> dict[str, Any]:
    """What one request returns: status, size, and how many instances it lists."""
    status, body = httpGet(port, ENDPOINTS[endpoint], headers)
    res: dict[str, Any] = {"status": status, "bytes": len(body)}
    if status == 200:
        if endpoint == "page":
            res["instances_listed"] = body.count(b"data-instance=")
        else:
            try:
                res["instances_listed"] = len(json.loads(body))
            except ValueError:
                res["instances_listed"] = None
    return res


class Portal:
    """``twistd -n dit4c-portal`` on one database."""

    def __init__(self, twistd: str, database: str, tmp: Path, logdir: Path, name: str) -> None:
        # Its public URL names its port: a socket bound here on port 0, handed over.
        sock, self.port = listeningSocket()
        self.datadir = tmp / f"portal-{name}"
        self.datadir.mkdir(exist_ok=True)
        argv = [
            twistd, "-n", "--pidfile=", "dit4c-portal",
            "--listen", "systemd:domain=INET:index=0",
            "--data-dir", str(self.datadir), "--database", database,
            "--public-url", f"http://127.0.0.1:{self.port}",
        ]  # fmt: skip
        self.service = Service(f"portal-{name}", argv, logdir, env=sourceEnv(REPO), cwd=self.datadir, systemd=sock)
        self.argv = argv

    def wait(self, timeout: float = 60.0) -> None:
        waitFor(lambda: httpStatus(self.port, "/health") == 200, "the portal's /health", timeout, [self.service])

    @property
    def pid(self) -> int:
        return self.service.pid

    def proc(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.pid)]
        except psutil.Error:
            return []

    def stop(self) -> None:
        self.service.stop()


def redact(argv: list[str], secrets_: dict[str, str]) -> str:
    text = shlex.join(argv)
    for secret, name in secrets_.items():
        text = text.replace(secret, name)
    return text


# --------------------------------------------------------------------------
# measurements


@dataclass
class Target:
    db: str
    portal: Portal
    headers: dict[str, dict[str, str]]  # endpoint -> request headers
    secrets: dict[str, str]  # secret -> placeholder, for printed commands
    pg: Postgres | None


def wrk_argv(
    wrk: str, t: Target, endpoint: str, seconds: int, connections: int, latency: bool = True
) -> list[str]:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s"]
    if latency:
        argv.append("--latency")
    for name, value in t.headers[endpoint].items():
        argv += ["-H", f"{name}: {value}"]
    return argv + [f"http://127.0.0.1:{t.portal.port}{ENDPOINTS[endpoint]}"]


def measure_closed(s: Settings, wrk: str, t: Target, endpoint: str) -> dict[str, Any]:
    # a short warm-up (imports, templates, connection pool) that is not counted
    runTool(wrk_argv(wrk, t, endpoint, 1, s.wrk_connections, latency=False), 60)
    background, waited = wait_quiet(s.quiet_wait)
    argv = wrk_argv(wrk, t, endpoint, s.wrk_seconds, s.wrk_connections)
    portal_before = cpu_seconds(t.portal.proc())
    portal_times_before = portal_times(t.portal)
    db_before = cpu_seconds(t.pg.procs()) if t.pg else {}
    xact_before = t.pg.xact_commits() if t.pg else None
    machine_before = psutil.cpu_times()
    t0 = time.monotonic()
    rc, out, err = runTool(argv, s.wrk_seconds + 60)
    elapsed = time.monotonic() - t0
    machine_after = psutil.cpu_times()
    portal_cpu = cpu_delta(portal_before, cpu_seconds(t.portal.proc()))
    portal_times_after = portal_times(t.portal)
    db_cpu = cpu_delta(db_before, cpu_seconds(t.pg.procs())) if t.pg else None
    res: dict[str, Any] = {
        "command": redact(argv, t.secrets),
        "background_busy_pct": background,
        "waited_for_quiet_s": waited,
    }
    parsed = parseWrk(out)
    if rc != 0 or "rps" not in parsed:
        res["error"] = f"wrk exit {rc}: {(err or out).strip()[-300:]}"
        return res
    res.update(parsed)
    res["raw"] = out
    res["portal_cpu_pct"] = 100 * portal_cpu / elapsed
    if portal_times_before and portal_times_after:
        res["portal_cpu_user_s"] = portal_times_after[0] - portal_times_before[0]
        res["portal_cpu_system_s"] = portal_times_after[1] - portal_times_before[1]
    idle = (machine_after.idle - machine_before.idle) + (
        getattr(machine_after, "iowait", 0.0) - getattr(machine_before, "iowait", 0.0)
    )
    # guest time is already counted in user time
    total = (
        sum(machine_after)
        - sum(machine_before)
        - sum(
            getattr(machine_after, f, 0.0) - getattr(machine_before, f, 0.0)
            for f in ("guest", "guest_nice")
        )
    )
    res["machine_busy_pct"] = 100 * (1 - idle / total) if total > 0 else None
    res["portal_cpu_ms_per_req"] = (
        1e3 * portal_cpu / parsed["requests"] if parsed.get("requests") else None
    )
    if t.pg:
        res["db_cpu_pct"] = 100 * db_cpu / elapsed if db_cpu is not None else None
        res["db_cpu_ms_per_req"] = (
            1e3 * db_cpu / parsed["requests"] if db_cpu and parsed.get("requests") else None
        )
        time.sleep(1.5)  # backends report their statistics at most once a second
        xact_after = t.pg.xact_commits()
        if xact_before is not None and xact_after is not None and parsed.get("requests"):
            # the warm-up's and the probes' few transactions are outside the window;
            # our own two statistics queries are in another database
            res["db_xacts_per_req"] = (xact_after - xact_before) / parsed["requests"]
    res["rss_mib"] = (t.portal.proc()[0].memory_info().rss / MIB) if t.portal.proc() else None
    log(
        f"  {t.db} {LABELS[endpoint]}: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
        f"portal CPU {res['portal_cpu_pct']:.0f}%, errors {res['errors']}"
    )
    return res


def measure_open(s: Settings, t: Target, endpoint: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for rate in s.rates:
        background, waited = wait_quiet(s.quiet_wait)
        argv = [
            sys.executable, str(HERE / "fixedrate.py"), "--port", str(t.portal.port),
            "--path", ENDPOINTS[endpoint], "--rate", str(rate),
            "--duration", f"{s.lat_seconds:g}", "--warmup", f"{s.lat_warmup:g}",
            "--connections", str(s.lat_connections),
        ]  # fmt: skip
        for name, value in t.headers[endpoint].items():
            argv += ["--header", f"{name}: {value}"]
        rc, out, err = runTool(argv, s.lat_seconds + s.lat_warmup + 60)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"error": f"fixedrate exit {rc}: {(err or out).strip()[-300:]}"}
        r["command"] = redact(argv, t.secrets)
        r["background_busy_pct"] = background
        r["waited_for_quiet_s"] = waited
        res[str(rate)] = r
        if "error" in r:
            log(f"  {t.db} {LABELS[endpoint]} @{rate}/s: {r['error']}")
        else:
            lat = r["latency_ms"]
            ok = sum(v for k, v in r["statuses"].items() if k.startswith("2"))
            r["ok"] = ok
            r["failures"] = r["scheduled"] - ok
            log(
                f"  {t.db} {LABELS[endpoint]} @{rate}/s: p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} "
                f"max {lat['max']:.2f} ms ({ok}/{r['scheduled']} 2xx)"
            )
    return res


def measure_profile(
    s: Settings, wrk: str, pyspy: str, t: Target, endpoint: str, outdir: Path
) -> dict[str, Any]:
    out = outdir / f"pyspy-{t.db}-{endpoint}.txt"
    wait_quiet(s.quiet_wait)
    load = spawn(
        wrk_argv(wrk, t, endpoint, s.profile_seconds + 3, s.wrk_connections, latency=False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        argv = [pyspy, "record", "-p", str(t.portal.pid), "-d", str(s.profile_seconds), "-r", "200",
                "-f", "raw", "-o", str(out), "--nonblocking", "--gil"]  # fmt: skip
        rc, so, se = runTool(argv, s.profile_seconds + 60)
    finally:
        kill(load)
    res: dict[str, Any] = {"command": shlex.join(argv), "file": str(out)}
    if rc != 0 or not out.exists():
        res["error"] = f"py-spy exit {rc}: {(se or so).strip()[-300:]}"
        log(f"  {t.db} {LABELS[endpoint]} profile: {res['error']}")
        return res
    res.update(summarize_profile(out))
    log(f"  {t.db} {LABELS[endpoint]} profile: {res['samples']} samples -> {out}")
    return res


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``; lines are dropped so that
    a function's samples add up."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


#: Plumbing that sits under everything: left out of the inclusive list.
_PLUMBING = (
    "(threading.py)", "(twisted/python/context.py)", "(twisted/python/log.py)", "(twisted/_threads/",
    "(twisted/python/threadpool.py)", "(twisted/application/", "(twisted/scripts/", "(twistd)",
    "(twisted/internet/base.py)", "(twisted/internet/posixbase.py)", "(twisted/internet/defer.py)",
    "(twisted/enterprise/adbapi.py)", "(<frozen",
)  # fmt: skip


def thread_of(frames: list[str]) -> str:
    """Which of the portal's threads a (shortened) stack was sampled in."""
    if any("(threading.py)" in f or "(twisted/_threads/" in f or ".<locals>.work (dit4c/portal/store/" in f
           or "(twisted/enterprise/adbapi.py)" in f for f in frames):  # fmt: skip
        return "database pool threads"
    if frames and frames[0].startswith("<module> (twistd"):
        return "reactor thread"
    return "other (truncated stacks)"


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Top self and inclusive frames of a py-spy raw (collapsed stacks) file."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            frames = frames[1:]  # --threads / --subprocesses prefixes
        frames = [short_frame(f) for f in frames]
        threads[thread_of(frames)] += n
        if frames:
            self_c[frames[-1]] += n
        for f in set(frames):
            if not any(p in f for p in _PLUMBING):
                incl[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, int, float]]:
        return [(f, n, 100 * n / total) for f, n in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self": pct(self_c),
        "inclusive": pct(incl),
        "threads": {k: (n, 100 * n / total) for k, n in threads.most_common()},
    }


def run_database(
    db: str, s: Settings, tools: dict[str, str | None], tmp: Path, logdir: Path, args: argparse.Namespace,
    pg_holder: dict[str, Postgres],
) -> dict[str, Any]:  # fmt: skip
    r: dict[str, Any] = {}
    pg: Postgres | None = None
    if db == "sqlite":
        url = f"sqlite:///{tmp / 'portal.db'}"
    else:
        pg = Postgres(str(tmp.parent), logdir)
        pg_holder["pg"] = pg
        pg.start()
        r["server_version"] = pg.version()
        url = pg.url()

    def placeholders(text: str) -> str:
        if pg is not None:
            text = text.replace(str(pg.base), "$PGDIR")
        return text.replace(str(tmp), "$TMP")

    r["database_url"] = placeholders(url)
    seed_argv = [
        sys.executable, str(HERE / "seed.py"), "--database", url, "--people", str(s.people),
        "--per-person", str(s.per_person), "--images", str(s.images), "--timings", str(s.timings),
    ]  # fmt: skip
    log(f"  seeding: {shlex.join(seed_argv)}")
    t0 = time.monotonic()
    rc, out, err = runTool(seed_argv, 600)
    if rc != 0:
        raise Skip(f"seeding failed ({rc}): {(err or out).strip()[-800:]}")
    seeded = json.loads(out.strip().splitlines()[-1])
    seeded["wall_seconds"] = round(time.monotonic() - t0, 2)
    cookie, token = seeded.pop("cookie"), seeded.pop("api_token")
    r["seed"] = seeded
    r["seed"]["command"] = placeholders(shlex.join(seed_argv))
    log(
        f"  seeded {seeded['rows']['users']} people, {seeded['rows']['instances']} instances in "
        f"{seeded['seconds']['total']:.2f} s (insert {seeded['seconds']['insert_one_transaction']:.2f} s)"
    )

    portal = Portal(str(tools["twistd"]), url, tmp, logdir, db)
    try:
        portal.wait()
        r["portal_command"] = placeholders(shlex.join(portal.argv))
        t = Target(
            db=db,
            portal=portal,
            headers={
                "page": {"Cookie": f"dit4c_session={cookie}"},
                "api": {"Authorization": f"Bearer {token}"},
            },
            secrets={cookie: "$COOKIE", token: "$TOKEN"},
            pg=pg,
        )
        for endpoint in ENDPOINTS:
            e: dict[str, Any] = {}
            r[endpoint] = e
            e["probe"] = probe(portal.port, endpoint, t.headers[endpoint])
            if e["probe"]["status"] != 200:
                e["error"] = f"{ENDPOINTS[endpoint]} answered {e['probe']['status']}, not 200"
                log(f"  {db}: {e['error']}")
                continue
            if "closed" in args.only:
                e["closed"] = measure_closed(s, str(tools["wrk"]), t, endpoint)
            if "open" in args.only:
                e["open"] = measure_open(s, t, endpoint)
            if args.profile:
                if tools.get("py-spy"):
                    e["profile"] = measure_profile(
                        s, str(tools["wrk"]), str(tools["py-spy"]), t, endpoint, Path(args.profile)
                    )
                else:
                    e["profile"] = {"error": "py-spy not found (pip install py-spy)"}
            e["probe_after"] = probe(portal.port, endpoint, t.headers[endpoint])
        r["portal_rss_mib"] = portal.proc()[0].memory_info().rss / MIB if portal.proc() else None
    finally:
        portal.stop()
        if pg is not None:
            pg.stop()
            pg_holder.pop("pg", None)
    return r


# --------------------------------------------------------------------------
# report


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def report(results: dict[str, Any], dbs: list[str], s: Settings, args: argparse.Namespace) -> str:
    ok = [d for d in dbs if results[d].get("status") == "ok"]
    cols = [DB_LABELS[d] for d in ok]
    both = "sqlite" in ok and "postgresql" in ok
    head_r = ["", *cols] + (["PostgreSQL ÷ SQLite"] if both else [])
    parts: list[str] = []

    def row(label: str, keys: tuple[str, ...], f: Any, with_ratio: bool = True) -> list[str]:
        vals = [dig(results[d], *keys) for d in ok]
        cells = [label, *[f(v) for v in vals]]
        if both:
            cells.append(
                ratio(dig(results["postgresql"], *keys), dig(results["sqlite"], *keys))
                if with_ratio
                else "—"
            )
        return cells

    if ok:
        first = results[ok[0]]["seed"]
        rows = first["rows"]
        typ = first["typical"]
        parts += [
            f"Data: {rows['users']:,} people with {s.per_person} instances each ({rows['instances']:,} instances; "
            f"states per person: {', '.join(f'{n}× {st}' for st, n in Counter(first['state_mix']).items())}), "
            f"a catalogue of {rows['images']} images, {rows['schedulers']} schedulers, {rows['instance_shares']:,} "
            f"instance shares, {rows['sessions']:,} other sessions and {rows['api_tokens']:,} other API tokens. "
            f"The measured person ({first['user']}) owns {typ['own_instances']} instances; both pages list "
            f"{typ['own_listed']} of them (not the discarded ones) plus {typ['shared_listed']} shared with them.",
            "",
            "### Seeding (one transaction of `executemany` inserts after the store's own migrations)",
            "",
        ]
        table = [
            row("open + migrate (s)", ("seed", "seconds", "open_and_migrate"), lambda v: fmt_num(v, 3)),
            row("generate rows in Python (s)", ("seed", "seconds", "generate_rows"), lambda v: fmt_num(v, 3)),
            row("bulk insert, one transaction (s)", ("seed", "seconds", "insert_one_transaction"), lambda v: fmt_num(v, 3)),
            row("ANALYZE (s)", ("seed", "seconds", "analyze"), lambda v: fmt_num(v, 3), False),
            row("seed.py total incl. session, token, store timings (s)", ("seed", "wall_seconds"), lambda v: fmt_num(v, 2)),
        ]  # fmt: skip
        parts += markdown(head_r, table) + [""]

    if "closed" in args.only and ok:
        parts += [
            f"### Closed loop (wrk, {s.wrk_connections} keep-alive connections, {s.wrk_seconds} s, after a 1 s warm-up)",
            "",
        ]
        table = []
        for ep in ENDPOINTS:
            L = LABELS[ep]
            c = (ep, "closed")
            table += [
                row(f"{L}: requests/s", (*c, "rps"), lambda v: fmt_num(v, 0)),
                row(f"{L}: latency p50 (ms)", (*c, "p50_ms"), fmt_ms),
                row(f"{L}: latency p99 (ms)", (*c, "p99_ms"), fmt_ms),
                row(
                    f"{L}: errors (socket + non-2xx/3xx)",
                    (*c, "errors"),
                    lambda v: fmt_num(v),
                    False,
                ),
                row(
                    f"{L}: portal CPU (% of one core)",
                    (*c, "portal_cpu_pct"),
                    lambda v: fmt_num(v, 0),
                ),
                row(
                    f"{L}: portal CPU per request (ms)",
                    (*c, "portal_cpu_ms_per_req"),
                    lambda v: fmt_num(v, 2),
                ),
                row(
                    f"{L}: PostgreSQL CPU (% of one core)",
                    (*c, "db_cpu_pct"),
                    lambda v: fmt_num(v, 0),
                    False,
                ),
                row(
                    f"{L}: whole machine busy (% of all {os.cpu_count()} cores)",
                    (*c, "machine_busy_pct"),
                    lambda v: fmt_num(v, 0),
                    False,
                ),
                row(
                    f"{L}: machine busy just before, portal idle (%)",
                    (*c, "background_busy_pct"),
                    lambda v: fmt_num(v, 0),
                    False,
                ),
                row(
                    f"{L}: DB transactions per request",
                    (*c, "db_xacts_per_req"),
                    lambda v: fmt_num(v, 2),
                    False,
                ),
                row(
                    f"{L}: response body + headers (bytes)",
                    (*c, "bytes_per_response"),
                    lambda v: fmt_num(v, 0),
                    False,
                ),
            ]
        parts += markdown(head_r, table)
        parts += [
            "",
            "CPU is user + system time of the portal process (all its threads) and of every PostgreSQL "
            "server process, over the wrk run; the machine's wrk, portal and database share its cores. "
            "DB transactions come from `pg_stat_database` (PostgreSQL only).",
            "",
        ]

    if "open" in args.only and ok:
        parts += [
            f"### Latency at a fixed offered load (open loop, {s.lat_connections} keep-alive connections, "
            f"{s.lat_seconds:g} s after a {s.lat_warmup:g} s warm-up, from each request's scheduled send time)",
            "",
        ]
        table = []
        for ep in ENDPOINTS:
            for rate in s.rates:
                o = (ep, "open", str(rate))
                L = f"{LABELS[ep]} @ {rate}/s"
                table += [
                    row(f"{L}: p50 (ms)", (*o, "latency_ms", "p50"), fmt_ms),
                    row(f"{L}: p90 (ms)", (*o, "latency_ms", "p90"), fmt_ms),
                    row(f"{L}: p99 (ms)", (*o, "latency_ms", "p99"), fmt_ms),
                    row(f"{L}: max (ms)", (*o, "latency_ms", "max"), fmt_ms),
                ]
                cells = [f"{L}: achieved req/s / failures"]
                for d in ok:
                    r = dig(results[d], *o)
                    cells.append(
                        "—"
                        if not r or "error" in r
                        else f"{r['achieved_rate']:.0f} / {r['failures']}"
                    )
                if both:
                    cells.append("—")
                table.append(cells)
                table.append(
                    row(
                        f"{L}: machine busy just before, portal idle (%)",
                        (*o, "background_busy_pct"),
                        lambda v: fmt_num(v, 0),
                        False,
                    )
                )
        parts += markdown(head_r, table) + [""]

    if ok and any(dig(results[d], "seed", "timings") for d in ok):
        parts += [
            f"### Store calls behind the two pages (the typical person, one at a time, {s.timings} calls each, "
            "through the store's thread pool)",
            "",
        ]
        methods = [t["method"] for t in results[ok[0]]["seed"]["timings"]]
        head = ["store call", "used by", "rows", *[f"{DB_LABELS[d]} mean (ms)" for d in ok],
                *[f"{DB_LABELS[d]} p99 (ms)" for d in ok]]  # fmt: skip
        table = []
        for m in methods:
            per = {
                d: next((t for t in results[d]["seed"]["timings"] if t["method"] == m), None)
                for d in ok
            }
            any_t = next(t for t in per.values() if t)
            used = ", ".join(LABELS["page"] if p == "/" else LABELS["api"] for p in any_t["pages"])
            table.append(
                [f"`{m}`", used, str(any_t["rows"])]
                + [fmt_ms(dig(per[d], "mean_ms")) for d in ok]
                + [fmt_ms(dig(per[d], "p99_ms")) for d in ok]
            )
        parts += markdown(head, table) + [""]
        slow = []
        for d in ok:
            for t in results[d]["seed"]["timings"]:
                if t["mean_ms"] > 1.0 and t["plans"]:
                    slow.append((d, t))
        for d, t in slow:
            parts.append(f"Plan of `{t['method']}` on {DB_LABELS[d]} ({fmt_ms(t['mean_ms'])} ms):")
            parts.append("")
            parts.append("```")
            for p in t["plans"]:
                parts += [line for line in p if line]
            parts.append("```")
            parts.append("")

    if args.profile and ok:
        parts += [
            f"### Where the portal's CPU goes (py-spy, {s.profile_seconds} s at 200 samples/s under wrk "
            f"-c{s.wrk_connections}, non-idle threads)",
            "",
        ]
        for d in ok:
            for ep in ENDPOINTS:
                pr = dig(results[d], ep, "profile")
                if not pr:
                    continue
                if "error" in pr:
                    parts += [f"- {DB_LABELS[d]} {LABELS[ep]}: {pr['error']}", ""]
                    continue
                split = ", ".join(f"{k} {v[1]:.0f}%" for k, v in pr["threads"].items())
                parts.append(
                    f"**{DB_LABELS[d]}, {LABELS[ep]}** ({pr['samples']} samples: {split}; raw: `{pr['file']}`)"
                )
                parts.append("")
                head = [
                    "top self frames",
                    "% samples",
                    "top inclusive frames (plumbing left out)",
                    "% samples",
                ]
                rows_ = []
                self_ = pr["self"][:12]
                incl = pr["inclusive"][:12]
                for i in range(max(len(self_), len(incl))):
                    a = self_[i] if i < len(self_) else ("", 0, None)
                    b = incl[i] if i < len(incl) else ("", 0, None)
                    rows_.append([f"`{a[0]}`" if a[0] else "", fmt_num(a[2], 1) if a[2] is not None else "",
                                  f"`{b[0]}`" if b[0] else "", fmt_num(b[2], 1) if b[2] is not None else ""])  # fmt: skip
                parts += markdown(head, rows_) + [""]

    cmd_lines = []
    for d in ok:
        r = results[d]
        cmd_lines.append(f"- {DB_LABELS[d]} seed: `{r['seed']['command']}`")
        cmd_lines.append(f"- {DB_LABELS[d]} portal: `{r['portal_command']}`")
    for ep in ENDPOINTS:
        for d in ok[:1]:
            c = dig(results[d], ep, "closed", "command")
            if c:
                cmd_lines.append(f"- {LABELS[ep]} closed loop: `{c}`")
            o = dig(results[d], ep, "open")
            if o:
                first = next(iter(o.values()))
                cmd_lines.append(f"- {LABELS[ep]} open loop: `{first['command']}` (once per rate)")
    if cmd_lines:
        parts += [
            "Commands (`$TMP` is the run's temp dir, `$PGDIR` the cluster's socket dir; `$COOKIE` / `$TOKEN` the seeded secrets):",
            "",
            *cmd_lines,
            "",
        ]

    skipped = [d for d in dbs if results[d].get("status") != "ok"]
    for d in skipped:
        parts.append(f"- **{DB_LABELS[d]} skipped**: {results[d].get('skip_reason', '?')}")
    for d in ok:
        if results[d].get("error"):
            parts.append(f"- **{DB_LABELS[d]}** stopped early: {results[d]['error']}")
        for ep in ENDPOINTS:
            e = dig(results[d], ep, "error")
            if e:
                parts.append(f"- **{DB_LABELS[d]} {LABELS[ep]}**: {e}")
            after = dig(results[d], ep, "probe_after", "status")
            if after not in (None, 200):
                parts.append(f"- **{DB_LABELS[d]} {LABELS[ep]}** answered {after} after the runs")
    return "\n".join(parts) + "\n"


def versions(tools: dict[str, str | None], results: dict[str, Any]) -> dict[str, str]:
    import sqlite3

    more = {"sqlite": sqlite3.sqlite_version}
    pgv = dig(results, "postgresql", "server_version")
    if pgv:
        more["postgresql"] = pgv
    commands = {"wrk": ([tools["wrk"], "-v"], 2)} if tools.get("wrk") else {}
    return machine(commands, packages=["twisted", "klein", "jinja2", "psycopg"], more=more)


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s runs instead of 10 s")
    p.add_argument(
        "--databases",
        default=",".join(ALL_DATABASES),
        help="comma list of " + ",".join(ALL_DATABASES),
    )
    p.add_argument("--only", default="closed,open", help="comma list of closed,open")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON here")
    p.add_argument("--people", type=int, default=1000)
    p.add_argument("--per-person", type=int, default=10)
    p.add_argument("--images", type=int, default=10)
    p.add_argument(
        "--connections", type=int, default=16, help="wrk and open-loop connections (default 16)"
    )
    p.add_argument("--rates", default="50,100", help="open-loop rates, comma list (default 50,100)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="also record the portal with py-spy under wrk; raw files here",
    )
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        metavar="S",
        help=f"before each run, wait up to S s for the machine to be under {QUIET_PCT:g}%% busy (default 60)",
    )
    p.add_argument(
        "--tmp-dir",
        help="parent of the temp dirs (default /dev/shm when it has room, else the system's)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, SQLite file)")
    p.add_argument("--twistd", help="twistd command (default: beside python, or on PATH)")
    args = p.parse_args(argv)
    dbs = [x.strip() for x in args.databases.split(",") if x.strip()]
    bad = [x for x in dbs if x not in ALL_DATABASES]
    if bad or not dbs:
        p.error(f"--databases: unknown {bad}; choose from {','.join(ALL_DATABASES)}")
    args.databases = dbs
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if not only or any(x not in ("closed", "open") for x in only):
        p.error("--only: choose from closed,open")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings.make(args)
    tools: dict[str, str | None] = {
        "wrk": shutil.which("wrk"),
        "twistd": args.twistd or findExe("twistd"),
        "py-spy": findExe("py-spy"),
    }
    missing = [t for t in ("wrk", "twistd") if not tools[t]]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    pg_holder: dict[str, Postgres] = {}
    run = Run("bench/portal/run.py", argv, "dit4c-bench-portal-", 1024 * MIB, args.tmp_dir, args.keep_tmp)
    with run:
        try:
            for db in args.databases:
                log(f"== {db}")
                r: dict[str, Any] = {}
                results[db] = r

                def measure(db: str = db, r: dict[str, Any] = r) -> None:
                    r.update(run_database(db, s, tools, run.tmp, run.logs, args, pg_holder))

                attempt(db, r, measure, ["seed"])
        finally:
            pg = pg_holder.pop("pg", None)
            if pg is not None:
                pg.stop()
    if run.interrupted and not results:
        return 130
    dbs = [d for d in args.databases if d in results]
    vers = versions(tools, results)
    about = [
        f"Databases and the portal's data dir in {run.parent or tempfile.gettempdir()}"
        + (" (tmpfs: commits cost no disk flush)" if run.parent == "/dev/shm" else "")
        + "; SQLite as the portal opens it (WAL, synchronous=NORMAL, one connection), "
        "PostgreSQL with its defaults on a Unix socket (the portal's pool: up to 5 connections). "
        "The portal, the database, wrk and the load generator share the machine's cores."
    ]
    head = heading("DIT4C portal benchmark", run, vers, about)
    return run.publish(head, report(results, dbs, s, args), args.json, s.__dict__, vers, results)


if __name__ == "__main__":
    sys.exit(main())
