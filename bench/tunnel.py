#!/usr/bin/env python3
"""Side-by-side benchmark of ways to reach one loopback web server.

Paths (client -> ... -> backend, everything on 127.0.0.1):

  direct     client -> backend
  ssh        client -> sshd (ssh -R reverse forward) -> ssh client -> backend
  chp        client -> configurable-http-proxy (node) -> backend
  floor      client -> bare Twisted forwarder -> bare Twisted forwarder -> backend
             (bench/forward.py: no parsing, no tunnel; the least any path
             through two Twisted processes, as the path people use is, costs)
  dit4c-tcp  client -> dit4c routing server -> tunnel over TCP -> listener -> backend
  dit4c-tls  the same with the tunnel over TLS
  dit4c-full the path people use: client -> routing server -> tunnel over TCP ->
             the pod's helper process (twistd dit4c-helper-pod, as a node runs
             it: the listener hands each stream to the auth helper in the same
             process) -> backend, with a session of a real portal's (every
             request carries its cookie, and is checked)

With --before REV, every dit4c path also runs from a git worktree of REV (as
dit4c-tcp-before, dit4c-full-before...), in the same run, to compare.

Measurements (see bench/README.md for what each figure means):

  bulk     one and eight parallel curl downloads of a big file, one upload
  rps      wrk -t1 -c32 on a ~100-byte file
  latency  bench/loadgen.py, open loop at fixed rates, latency from schedule
  idle     RSS per idle WebSocket connection held through the path

The harness never passes or fails: it prints markdown tables (and optionally
JSON). A path whose tools are missing, or whose processes do not come up, is
skipped with the reason.

    python bench/tunnel.py --quick
    python bench/tunnel.py --paths direct,ssh --only bulk,rps --json out.json
    python bench/tunnel.py --paths ssh,chp,dit4c-tcp,dit4c-full --only bulk,rps --before HEAD~5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import wrk
from plumbing import (
    BENCH,
    REPO,
    Run,
    Service,
    Skip,
    attempt,
    findExe,
    freePort,
    httpGet,
    httpStatus,
    kill,
    listeningSocket,
    log,
    raiseNofile,
    runTool,
    sourceEnv,
    spawn,
    waitFor,
    worktree,
)
from tables import Row, dig, heading, machine, sideBySide

HOST = "bench1.localhost"
ALL_PATHS = ["direct", "ssh", "chp", "floor", "dit4c-tcp", "dit4c-tls", "dit4c-full"]
ALL_TESTS = ["bulk", "rps", "latency", "idle"]
MB = 1e6
MIB = 1024 * 1024


def _total(procs: list[psutil.Process], read: Callable[[psutil.Process], int]) -> int | None:
    """The sum of ``read`` over ``procs``, or None if none of them can be read."""
    total, seen = 0, False
    for p in procs:
        try:
            total += read(p)
            seen = True
        except psutil.Error:
            pass
    return total if seen else None


def rss(procs: list[psutil.Process]) -> int | None:
    """Sum of VmRSS in bytes, or None if none of them can be read."""
    return _total(procs, lambda p: int(p.memory_info().rss))


def nfds(procs: list[psutil.Process]) -> int | None:
    """Sum of open descriptors, or None if none of them can be read."""
    return _total(procs, lambda p: int(p.num_fds()))


# --------------------------------------------------------------------------
# settings and shared environment


@dataclass
class Settings:
    quick: bool
    big_size: int
    bulk_cap: float  # curl --max-time per transfer
    parallel: int
    rps_seconds: int
    rps_connections: int
    lat_rates: list[int]
    lat_seconds: float
    lat_warmup: float
    lat_connections: int
    idle_n: int
    idle_concurrency: int

    @classmethod
    def make(cls, args: argparse.Namespace) -> Settings:
        q = args.quick
        s = cls(
            quick=q,
            big_size=(64 if q else 1024) * MIB,
            bulk_cap=10.0 if q else 15.0,
            parallel=8,
            rps_seconds=3 if q else 10,
            rps_connections=32,
            lat_rates=[500, 1000],
            lat_seconds=3.0 if q else 10.0,
            lat_warmup=0.5 if q else 1.0,
            lat_connections=32,
            idle_n=1000 if q else 10000,
            idle_concurrency=100,
        )
        if args.big_mib:
            s.big_size = args.big_mib * MIB
        if args.idle_n:
            s.idle_n = args.idle_n
        if args.rates:
            s.lat_rates = [int(r) for r in args.rates.split(",")]
        return s


@dataclass
class Env:
    settings: Settings
    tmp: Path
    tools: dict[str, str | None]
    nginx_port: int = 0
    ws_port: int = 0
    big: Path = field(default_factory=Path)
    cache: dict[str, Any] = field(default_factory=dict)
    #: A worktree of the revision to compare with (--before), if any.
    before: Path | None = None

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"


def make_files(env: Env) -> None:
    www = env.tmp / "www"
    www.mkdir()
    small = (
        b"dit4c bench: a small response body of about one hundred bytes, for requests/s tests.\n"
    )
    small = small.ljust(99, b".") + b"\n"
    (www / "small").write_bytes(small)
    env.big = www / "big"
    size = env.settings.big_size
    chunk = os.urandom(min(size, 16 * MIB))  # incompressible; repeats every 16 MiB
    with open(env.big, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


#: nginx takes no port 0: it is handed a socket bound here on port 0
#: (``NGINX=<fd>;``, as for its binary upgrade), which its ``listen`` names;
#: it takes one only with its master process, which serves nothing. Its
#: worker runs as the bench's user (a root master would make it nobody's).
NGINX_CONF = """\
daemon off;
master_process on;
user {user};
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        server_name _;
        root {www};
        # Upload sink: nginx reads the whole body (buffered to a temp file in
        # the bench dir) before it proxies a body-less GET /small to itself,
        # so the response means the last byte arrived.
        location = /upload {{
            client_max_body_size 0;
            client_body_buffer_size 1m;
            proxy_pass http://127.0.0.1:{port}/small;
            proxy_method GET;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def start_backends(env: Env) -> list[Service]:
    d = env.tmp / "nginx"
    d.mkdir()
    sock, env.nginx_port = listeningSocket()
    conf = d / "nginx.conf"
    user = pwd.getpwuid(os.geteuid()).pw_name
    conf.write_text(NGINX_CONF.format(d=d, port=env.nginx_port, www=env.tmp / "www", user=user))
    nginx = env.tools["nginx"]
    if not nginx:
        raise SystemExit("nginx not found (Debian: apt-get install nginx)")
    fd = sock.fileno()
    try:
        svc = [
            Service(
                "nginx", [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], env.logs,
                env=dict(os.environ, NGINX=f"{fd};"), passFds=[fd],
            )
        ]  # fmt: skip
    finally:
        sock.close()
    waitFor(lambda: httpStatus(env.nginx_port, "/small", HOST) == 200, "nginx", 10, svc)
    # the first upload after start is several times slower (temp-file pages
    # being allocated for the first time): take that hit before any path
    if env.tools["curl"]:
        runTool(curl_argv(env, f"http://127.0.0.1:{env.nginx_port}/upload", upload=env.big), 120)
        runTool(curl_argv(env, f"http://127.0.0.1:{env.nginx_port}/big"), 120)

    ws = Service(
        "wsecho",
        [sys.executable, str(BENCH / "wsecho.py")],
        env.logs,
        stdout=subprocess.PIPE,
    )
    svc.append(ws)
    assert ws.popen.stdout is not None
    line = ws.popen.stdout.readline().decode().strip()
    if not line.startswith("PORT "):
        raise SystemExit(f"WebSocket echo backend did not start: {line!r}\n{ws.tail()}")
    env.ws_port = int(line.split()[1])
    waitFor(lambda: httpStatus(env.ws_port, "/", HOST) == 200, "wsecho", 10, [ws])
    return svc


# --------------------------------------------------------------------------
# paths


class BasePath:
    name = "?"
    fds_per_conn = 1  # file descriptors per proxied connection in its busiest process
    server_label = ""  # whose RSS is "server side" in the idle test
    client_label = ""
    #: The measurements this path can take.
    tests = tuple(ALL_TESTS)

    def __init__(self, env: Env) -> None:
        self.env = env
        self.services: list[Service] = []
        self.port = 0
        #: The Host header, and further headers, of every request sent through it.
        self.host = HOST
        self.headers: dict[str, str] = {}

    def check(self) -> None:
        """Raise Skip if this path's tools are missing."""

    def start(self, target: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for s in reversed(self.services):
            s.stop()
        self.services = []

    def server_procs(self) -> list[psutil.Process]:
        return []

    def client_procs(self) -> list[psutil.Process]:
        return []

    def describe(self) -> str:
        return "\n".join(f"{s.name}: {shlex.join(s.argv)}" for s in self.services)


class DirectPath(BasePath):
    name = "direct"

    def start(self, target: int) -> None:
        self.port = target


#: sshd takes no port 0 and no socket handed to it, but serves one connection
#: as inetd starts it (``sshd -i``): this accepts on the socket it is handed
#: (its descriptor in argv[1], bound on port 0) and starts argv[2:] on each
#: connection, as inetd would. The sshd processes are its children, as they
#: are a listening sshd's.
INETD = """
import socket, subprocess, sys
listener = socket.socket(fileno=int(sys.argv[1]))
while True:
    connection, _ = listener.accept()
    subprocess.Popen(sys.argv[2:], stdin=connection, stdout=connection)
    connection.close()
"""


class SshPath(BasePath):
    name = "ssh"
    server_label = "sshd children"
    client_label = "ssh client"

    def check(self) -> None:
        for t in ("sshd", "ssh", "ssh-keygen"):
            if not self.env.tools[t]:
                raise Skip(f"{t} not found (Debian: apt-get install openssh-server openssh-client)")

    def _keys(self) -> Path:
        d = self.env.tmp / "ssh"
        if not d.exists():
            d.mkdir(mode=0o700)
            kg = self.env.tools["ssh-keygen"]
            assert kg
            for name in ("host_ed25519", "client_ed25519"):
                rc, _, err = runTool([kg, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], 30)
                if rc != 0:
                    raise Skip(f"ssh-keygen failed: {err.strip()}")
            (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
            # sshd insists on its privilege-separation directory
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        return d

    def start(self, target: int) -> None:
        d = self._keys()
        conf = d / "sshd_config"
        conf.write_text(
            "\n".join(
                [
                    f"HostKey {d / 'host_ed25519'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "PermitRootLogin yes",
                    "StrictModes no",
                    "UsePAM no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowTcpForwarding yes",
                    "GatewayPorts no",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "UseDNS no",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        sock, sshd_port = listeningSocket()
        fd = sock.fileno()
        try:
            sshd = Service(
                "sshd", [sys.executable, "-c", INETD, str(fd), str(self.env.tools["sshd"]), "-i", "-e", "-f", str(conf)],
                self.env.logs, passFds=[fd],
            )  # fmt: skip
        finally:
            sock.close()
        self.services.append(sshd)
        ssh = Service(
            "ssh",
            [
                str(self.env.tools["ssh"]),
                "-N",
                "-F", "/dev/null",
                "-i", str(d / "client_ed25519"),
                "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "LogLevel=INFO",
                "-R", f"127.0.0.1:0:127.0.0.1:{target}",
                "-p", str(sshd_port),
                "root@127.0.0.1",
            ],
            self.env.logs,
        )  # fmt: skip
        self.services.append(ssh)
        # the forward's port, on 0, is the one sshd got: ssh says which (at LogLevel INFO)
        self.port = int(ssh.waitForLog(r"Allocated port (\d+) for remote forward", 10).group(1))

    def server_procs(self) -> list[psutil.Process]:
        return self.services[0].procs(includeSelf=False) if self.services else []

    def client_procs(self) -> list[psutil.Process]:
        return self.services[1].procs() if len(self.services) > 1 else []


class ChpPath(BasePath):
    name = "chp"
    fds_per_conn = 2
    server_label = "configurable-http-proxy"

    def check(self) -> None:
        if not self.env.tools["configurable-http-proxy"]:
            raise Skip(
                "configurable-http-proxy not found on PATH; install it with "
                "`npm install -g configurable-http-proxy` (needs node and npm)"
            )

    def start(self, target: int) -> None:
        # It takes no port 0 (0 counts as not given: 8000) and no socket handed to it.
        self.port, api = freePort(), freePort()
        env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=secrets.token_hex(16))
        chp = Service(
            "chp",
            [
                str(self.env.tools["configurable-http-proxy"]),
                "--ip", "127.0.0.1",
                "--port", str(self.port),
                "--api-ip", "127.0.0.1",
                "--api-port", str(api),
                "--default-target", f"http://127.0.0.1:{target}",
                "--log-level", "warn",
            ],
            self.env.logs,
            env=env,
        )  # fmt: skip
        self.services.append(chp)

    def server_procs(self) -> list[psutil.Process]:
        return self.services[0].procs() if self.services else []


class FloorPath(BasePath):
    """
    Two bare Twisted forwarders in a chain (``bench/forward.py``): what any
    path through two Twisted processes costs at the least, before a byte is
    parsed or checked.
    """

    name = "floor"
    fds_per_conn = 2
    server_label = "first forwarder"
    client_label = "second forwarder"
    tests = ("bulk", "rps")

    def start(self, target: int) -> None:
        for n in (2, 1):
            forwarder = Service(f"forward{n}", [sys.executable, str(REPO / "bench" / "forward.py"), str(target)], self.env.logs)
            self.services.insert(0, forwarder)
            target = forwarder.waitForPort("forwarder")
        self.port = target

    def server_procs(self) -> list[psutil.Process]:
        return self.services[0].procs() if self.services else []

    def client_procs(self) -> list[psutil.Process]:
        return self.services[1].procs() if len(self.services) > 1 else []


class Dit4cPath(BasePath):
    server_label = "routing server"
    client_label = "listener"
    #: The routing server's public endpoint (``bench/idle100k.py`` sets its accept queue).
    httpEndpoint = "tcp:0:interface=127.0.0.1"
    #: More of the routing server's options (``bench/idle100k.py``: its connection cap).
    routingOptions: tuple[str, ...] = ()

    def __init__(self, env: Env, tls: bool, source: Path = REPO, suffix: str = "") -> None:
        super().__init__(env)
        self.tls = tls
        self.name = ("dit4c-tls" if tls else "dit4c-tcp") + suffix
        #: The checkout whose code runs (this one, or another revision's worktree).
        self.source = source

    def check(self) -> None:
        if not self.env.tools["dit4c"]:
            raise Skip("the `dit4c` command is not installed (pip install -e . in the repo)")
        if not self.env.tools["twistd"]:
            raise Skip("twistd not found (pip install twisted)")

    def _credentials(self) -> dict[str, Path]:
        """Key and JWKS, made once per run with the `dit4c` command (the listener signs its own tokens)."""
        cached = self.env.cache.get("dit4c-creds")
        if isinstance(cached, Skip):
            raise Skip(str(cached))
        if cached:
            return cached
        d = self.env.tmp / "dit4c"
        d.mkdir(exist_ok=True)
        key, jwks = d / "signing.key", d / "jwks.json"
        exe = str(self.env.tools["dit4c"])
        steps: list[tuple[list[str], Path | None]] = [
            ([exe, "keygen", str(key)], None),
            ([exe, "jwks", str(key)], jwks),
        ]  # fmt: skip
        for argv, out in steps:
            rc, stdout, stderr = runTool(argv, 60)
            if rc != 0 or (out is not None and not stdout.strip()):
                tail = "\n".join((stderr or stdout).strip().splitlines()[-6:])
                err = Skip(f"`{shlex.join(argv)}` failed (exit {rc}):\n{tail}".rstrip())
                self.env.cache["dit4c-creds"] = err
                raise err
            if out is not None:
                out.write_text(stdout)
        creds = {"key": key, "jwks": jwks}
        self.env.cache["dit4c-creds"] = creds
        return creds

    def _token(self, key: Path) -> Path:
        """A routing token for bench1 signed with ``key`` (5 minutes: read once, at the connect), in a file."""
        argv = [
            str(self.env.tools["dit4c"]), "token", "--key", str(key), "--audience", "dit4c-routing",
            "--subject", "bench1", "--lifetime", "300",
        ]  # fmt: skip
        rc, stdout, stderr = runTool(argv, 60)
        if rc != 0 or not stdout.strip():
            raise Skip(f"`{shlex.join(argv)}` failed (exit {rc}): {(stderr or stdout).strip()[-300:]}")
        token = key.with_name("token.jwt")
        token.write_text(stdout)
        return token

    def _tls_files(self) -> dict[str, Path]:
        cached = self.env.cache.get("tls")
        if cached:
            return cached
        d = self.env.tmp / "tls"
        (d / "roots").mkdir(parents=True)
        key_pem, cert_pem = make_self_signed("localhost")
        (d / "key.pem").write_bytes(key_pem)
        (d / "cert.pem").write_bytes(cert_pem)
        (d / "roots" / "cert.pem").write_bytes(cert_pem)
        files = {"key": d / "key.pem", "cert": d / "cert.pem", "roots": d / "roots"}
        self.env.cache["tls"] = files
        return files

    def start(self, target: int) -> None:
        creds = self._credentials()
        routing = self._routing(["--jwks-file", str(creds["jwks"])])
        if '"key-file"' in (self.source / "dit4c" / "listener" / "tap.py").read_text():
            signing = ["--key-file", str(creds["key"]), "--instance", "bench1"]
        else:  # a revision whose listener signed no token of its own when run by hand
            signing = ["--token-file", str(self._token(creds["key"]))]
        listener = Service(
            "listener" + self.name[len("dit4c-tcp"):],
            [
                str(self.env.tools["twistd"]), "-n", "--pidfile=", "dit4c-helper-listener",
                "--routing", routing, *signing,
                "--target", f"tcp:host=127.0.0.1:port={target}",
            ],
            self.env.logs,
            env=sourceEnv(self.source),
            cwd=self.source,
        )  # fmt: skip
        self.services.append(listener)

    def _routing(self, keys: list[str]) -> str:
        """Start ``twistd dit4c-routing`` (tunnel tokens checked with ``keys``): the tunnel's client endpoint."""
        if self.tls:
            t = self._tls_files()
            tunnel = f"ssl:0:interface=127.0.0.1:privateKey={t['key']}:certKey={t['cert']}"
        else:
            tunnel = "tcp:0:interface=127.0.0.1"
        server = Service(
            "routing-" + self.name,
            [
                str(self.env.tools["twistd"]), "-n", "--pidfile=", "dit4c-routing",
                "--tunnel", tunnel,
                "--http", self.httpEndpoint,
                "--domain", "localhost",
                *keys,
                "--admin", "tcp:0:interface=127.0.0.1",
                *self.routingOptions,
            ],
            self.env.logs,
            env=sourceEnv(self.source),
            cwd=self.source,
        )  # fmt: skip
        self.services.append(server)
        self.adminPort = server.waitForPort("admin")
        self.port = server.waitForPort("public http")
        tport = server.waitForPort("tunnel")
        waitFor(lambda: httpStatus(self.adminPort, "/health") == 200, "routing server /health", 30, [server])
        if self.tls:
            return f"tls:localhost:{tport}:trustRoots={t['roots']}"
        return f"tcp:host=127.0.0.1:port={tport}"

    def server_procs(self) -> list[psutil.Process]:
        return self.services[0].procs() if self.services else []

    def client_procs(self) -> list[psutil.Process]:
        return self.services[1].procs() if len(self.services) > 1 else []


#: Run with the source's code (``python -c SEED db keyfile password``): alice,
#: an image and a running instance of hers on a scheduler (with the instance
#: key's public half, as its node sends it up, so the portal publishes it for
#: the routing server) in a portal's store; prints the instance id.
SEED = """
import json, sys
from twisted.internet import defer, task
try:
    from dit4c.common.keys import loadPrivateKey, publicJWK
except ImportError:  # a revision from before they were named in camelCase
    from dit4c.common.keys import load_private_key as loadPrivateKey, public_jwk as publicJWK
from dit4c.portal import security
from dit4c.portal.store import openStore
try:
    from dit4c.testing.scheduler import registerScheduler
except ImportError:  # a revision from before the test doubles were a package
    from dit4c.testing_scheduler import registerScheduler

async def seed(reactor):
    database, keyFile, password = sys.argv[1:4]
    store = await openStore(f"sqlite:///{database}", reactor)
    try:
        alice = await store.createUser("alice", password_hash=await security.hashPassword(password))
        image = await store.createImage("nginx", "nginx:bench", owner_id=None, port=80)
        instance = await store.createInstance(alice.id, image.id)
        scheduler, _ = await registerScheduler(store, "bench")
        key = json.dumps(publicJWK(loadPrivateKey(keyFile)))
        await store.updateInstance(instance.id, state="running", public_jwk=key, scheduler_id=scheduler.id)
    finally:
        await store.close()
    print(instance.id)

task.react(lambda reactor: defer.Deferred.fromCoroutine(seed(reactor)))
"""


class Dit4cFullPath(Dit4cPath):
    """
    The path people use: the routing server, the tunnel, and the pod's one
    helper process (``twistd dit4c-helper-pod`` with the helper environment,
    as a node's process runtime runs it: the listener hands each stream to
    the auth helper in the same process), in front of the backend as the
    tool; a real portal (``twistd dit4c-portal``) issues the session, and
    every request carries its cookie and is checked.
    """

    server_label = "routing server"
    client_label = "pod helper"
    tests = ("bulk", "rps")

    def __init__(self, env: Env, source: Path = REPO, suffix: str = "") -> None:
        super().__init__(env, tls=False, source=source, suffix=suffix)
        self.name = "dit4c-full" + suffix

    def start(self, target: int) -> None:
        from start import Browser, field  # bench/start.py: a browser by hand

        d = self.env.tmp / self.name
        d.mkdir(exist_ok=True)
        key = d / "instance.pem"
        rc, _, err = runTool([str(self.env.tools["dit4c"]), "keygen", str(key)], 60)
        if rc != 0:
            raise Skip(f"dit4c keygen failed: {err.strip()}")
        twistd = str(self.env.tools["twistd"])
        # Its public URL names its port: a socket bound here on port 0, handed over.
        sock, pport = listeningSocket()
        portal = f"http://127.0.0.1:{pport}"
        server = Service(
            "portal-" + self.name,
            [
                twistd, "-n", "--pidfile=", "dit4c-portal",
                "--listen", "systemd:domain=INET:index=0",
                "--data-dir", str(d / "portal"), "--public-url", portal,
            ],
            self.env.logs,
            env=sourceEnv(self.source),
            cwd=self.source,
            systemd=sock,
        )  # fmt: skip
        self.services.append(server)
        waitFor(lambda: httpStatus(pport, "/login") == 200, "portal /login", 60, [server])
        password = secrets.token_urlsafe(12)
        argv = [sys.executable, "-c", SEED, str(d / "portal" / "portal.db"), str(key), password]
        rc, out, err = runTool(argv, 60, env=sourceEnv(self.source), cwd=self.source)
        if rc != 0 or not out.strip():
            raise Skip(f"could not seed the portal: {(err or out).strip()[-500:]}")
        instance = out.strip().splitlines()[-1]
        # The routing server checks tunnel tokens with the keys the portal publishes.
        routing = self._routing(["--jwks-url", portal + "/.well-known/jwks.json"])
        self.services.reverse()  # the routing server first: its RSS is the "server" side
        helper = {
            "DIT4C_INSTANCE": instance,
            "DIT4C_INSTANCE_KEY": str(key),
            "DIT4C_PORTAL": portal,
            "DIT4C_TOOL": f"tcp:host=127.0.0.1:port={target}",
            "DIT4C_AUTH_LISTEN": "tcp:0:interface=127.0.0.1",
            "DIT4C_ROUTING": routing,
        }
        # A revision from before the one pod helper ran the listener and the
        # auth helper as two processes, the listener dialling the auth helper.
        separate = not (self.source / "dit4c" / "podhelper").is_dir()
        plugins = ["dit4c-helper-auth", "dit4c-helper-listener"] if separate else ["dit4c-helper-pod"]
        for at, plugin in enumerate(plugins, start=1):
            service = Service(
                f"{plugin[len('dit4c-'):]}-{self.name}",
                [twistd, "-n", "--pidfile=", plugin],
                self.env.logs,
                env={**sourceEnv(self.source), **helper},
                cwd=self.source,
            )
            self.services.insert(at, service)
            if plugin == "dit4c-helper-auth":
                helper["DIT4C_AUTH"] = f"tcp:host=127.0.0.1:port={service.waitForPort('auth helper')}"

        def registered() -> bool:
            status, body = httpGet(self.adminPort, "/health", {"Host": f"127.0.0.1:{self.adminPort}"}, 2)
            try:
                return status == 200 and bool(json.loads(body).get("tunnels", 0))
            except ValueError:
                return False

        waitFor(registered, "the pod helper's tunnel", 60, self.services)
        # Log in as a browser would, through the whole path: the instance sends
        # the browser to the portal, which sends it back with a code.
        self.host = f"{instance}.localhost:{self.port}"
        browser = Browser()
        # (the portal lets the instance's helper in once the listener's URL report arrived)
        deadline = time.monotonic() + 30
        while True:
            status, url, page = browser.request("GET", f"http://{self.host}/")
            if "/login" in url or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if "/login" not in url:
            raise Skip(f"the instance did not send the browser to log in: {status} {url}")
        form = {"username": "alice", "password": password, "csrf": field(page, "csrf"), "next": field(page, "next")}
        status, url, _ = browser.request(
            "POST", portal + "/login", urlencode(form).encode(),
            {"Content-Type": "application/x-www-form-urlencoded", "Origin": portal},
        )  # fmt: skip
        cookie = browser.cookies.get(f"{instance}.localhost", {}).get("dit4c_auth")
        if not cookie:
            raise Skip(f"no session after logging in: {status} {url}")
        self.headers = {"Cookie": f"dit4c_auth={cookie}"}


def make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """(key PEM, cert PEM): a self-signed CA certificate for ``hostname`` that
    also serves as the server certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def make_path(name: str, env: Env) -> BasePath:
    if name.endswith("-before"):
        assert env.before is not None
        base = name[: -len("-before")]
        if base == "dit4c-full":
            return Dit4cFullPath(env, env.before, "-before")
        return Dit4cPath(env, base == "dit4c-tls", env.before, "-before")
    if name == "dit4c-full":
        return Dit4cFullPath(env)
    if name == "direct":
        return DirectPath(env)
    if name == "ssh":
        return SshPath(env)
    if name == "chp":
        return ChpPath(env)
    if name == "floor":
        return FloorPath(env)
    if name == "dit4c-tcp":
        return Dit4cPath(env, tls=False)
    if name == "dit4c-tls":
        return Dit4cPath(env, tls=True)
    raise ValueError(name)


def bring_up(path: BasePath, target: int, probe: str) -> None:
    path.start(target)
    waitFor(
        lambda: httpStatus(path.port, probe, path.host, headers=path.headers) == 200,
        f"{path.name}: GET {probe} with Host: {path.host}",
        30,
        path.services,
    )


# --------------------------------------------------------------------------
# measurements

CURL_FMT = "%{http_code} %{size_download} %{size_upload} %{time_total}\\n"


def header_args(host: str, headers: dict[str, str]) -> list[str]:
    """``-H`` options (curl, wrk) for the Host header and ``headers``."""
    return [a for name, value in (("Host", host), *headers.items()) for a in ("-H", f"{name}: {value}")]


def curl_argv(
    env: Env, url: str, upload: Path | None = None, host: str = HOST, headers: dict[str, str] | None = None
) -> list[str]:
    argv = [
        str(env.tools["curl"]), "-s", "-o", "/dev/null", *header_args(host, headers or {}),
        "--max-time", f"{env.settings.bulk_cap:g}", "-w", CURL_FMT,
    ]  # fmt: skip
    if upload is not None:
        argv += ["-H", "Expect:", "-H", "Content-Type: application/octet-stream", "-X", "POST"]
        argv += ["-T", str(upload)]
    return argv + [url]


def _parse_curl(out: str, rc: int) -> dict[str, Any]:
    parts = out.split()
    if len(parts) < 4:
        return {"error": f"curl exit {rc}, output {out!r}"}
    code, down, up, secs = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
    return {"http": code, "down": down, "up": up, "seconds": secs, "rc": rc}


def _transfer(env: Env, argv: list[str], timeout: float, moved: str) -> dict[str, Any]:
    """One curl transfer (``moved``: ``down`` or ``up``), its rate and whether it moved the whole file."""
    rc, out, err = runTool(argv, timeout)
    r = _parse_curl(out, rc)
    if "error" in r:
        r["error"] += " " + err.strip()[-200:]
        return r
    return {
        "MBps": r[moved] / r["seconds"] / MB if r["seconds"] else None,
        "bytes": r[moved],
        "seconds": r["seconds"],
        "complete": rc == 0 and r["http"] == 200 and r[moved] == env.settings.big_size,
        "http": r["http"],
    }


def measure_bulk(env: Env, path: BasePath) -> dict[str, Any]:
    s = env.settings
    res: dict[str, Any] = {}
    url = f"http://127.0.0.1:{path.port}/big"
    timeout = s.bulk_cap + 30

    argv = curl_argv(env, url, host=path.host, headers=path.headers)
    res["commands"] = {"download": shlex.join(argv)}
    one = _transfer(env, argv, timeout, "down")
    res["download_1"] = one
    log(f"  {path.name} download 1 stream: {fmt_mb(one)}")

    procs = [spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(s.parallel)]  # fmt: skip
    t0 = time.monotonic()
    outs = []
    for p in procs:
        try:
            o, _e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(p)
            o = ""
        outs.append(_parse_curl(o, p.returncode))
        kill(p)
    wall = time.monotonic() - t0
    good = [o for o in outs if "error" not in o]
    if good:
        total = sum(o["down"] for o in good)
        span = max(o["seconds"] for o in good)
        par = {
            "MBps": total / span / MB if span else None,
            "bytes": total,
            "seconds": span,
            "wall_seconds": wall,
            "streams": s.parallel,
            "complete": all(o["rc"] == 0 and o["down"] == s.big_size for o in outs),
            "per_stream_MBps": [
                o["down"] / o["seconds"] / MB if o["seconds"] else None for o in good
            ],
        }
    else:
        par = {"error": outs[0].get("error", "all curls failed")}
    res[f"download_{s.parallel}"] = par
    log(f"  {path.name} download {s.parallel} streams: {fmt_mb(par)}")

    argv = curl_argv(env, f"http://127.0.0.1:{path.port}/upload", upload=env.big, host=path.host, headers=path.headers)
    res["commands"]["upload"] = shlex.join(argv)
    up = _transfer(env, argv, timeout, "up")
    res["upload_1"] = up
    log(f"  {path.name} upload 1 stream: {fmt_mb(up)}")
    return res


def measure_rps(env: Env, path: BasePath) -> dict[str, Any]:
    s = env.settings
    argv = [
        str(env.tools["wrk"]), "-t1", f"-c{s.rps_connections}", f"-d{s.rps_seconds}s",
        "--latency", *header_args(path.host, path.headers), f"http://127.0.0.1:{path.port}/small",
    ]  # fmt: skip
    rc, out, err = runTool(argv, s.rps_seconds + 60)
    res: dict[str, Any] = {"command": shlex.join(argv)}
    parsed = wrk.parse(out)
    if rc != 0 or "rps" not in parsed:
        res["error"] = f"wrk exit {rc}: {(err or out).strip()[-300:]}"
        return res
    res.update(parsed)
    res["raw"] = out
    log(
        f"  {path.name} rps: {res['rps']:.0f} req/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms"
    )
    return res


def measure_latency(env: Env, path: BasePath) -> dict[str, Any]:
    s = env.settings
    res: dict[str, Any] = {}
    for rate in s.lat_rates:
        argv = [
            sys.executable, str(BENCH / "loadgen.py"), "--port", str(path.port),
            "--host-header", HOST, "--path", "/small", "--rate", str(rate),
            "--duration", f"{s.lat_seconds:g}", "--warmup", f"{s.lat_warmup:g}",
            "--connections", str(s.lat_connections),
        ]  # fmt: skip
        rc, out, err = runTool(argv, s.lat_seconds + s.lat_warmup + 60)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"error": f"loadgen exit {rc}: {(err or out).strip()[-300:]}"}
        r["command"] = shlex.join(argv)
        res[str(rate)] = r
        if "error" in r:
            log(f"  {path.name} latency @{rate}/s: {r['error']}")
        else:
            lat = r["latency_ms"]
            log(
                f"  {path.name} latency @{rate}/s: p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} "
                f"max {lat['max']:.3f} ms ({r['completed']}/{r['scheduled']} ok)"
            )
    return res


def measure_idle(env: Env, path: BasePath, hard_nofile: int) -> dict[str, Any]:
    s = env.settings
    n = min(s.idle_n, (hard_nofile - 300) // path.fds_per_conn, hard_nofile - 300)
    res: dict[str, Any] = {"requested": s.idle_n, "n": n}
    if n < s.idle_n:
        res["note"] = (
            f"capped at {n}: RLIMIT_NOFILE hard limit {hard_nofile}, "
            f"{path.fds_per_conn} fds per connection in one process"
        )
        log(f"  {path.name} idle: {res['note']}")
    base = [
        sys.executable, str(BENCH / "wsidle.py"), "--port", str(path.port),
        "--host-header", HOST, "--path", "/", "--concurrency", str(s.idle_concurrency),
    ]  # fmt: skip
    # warm up the code paths (lazy imports, buffers) before the baseline
    rc, out, err = runTool(base + ["-n", "20", "--hold", "0"], 60)
    try:
        warm = json.loads(out.strip().splitlines()[0])
    except (ValueError, IndexError):
        res["error"] = f"wsidle warm-up failed (exit {rc}): {(err or out).strip()[-300:]}"
        return res
    if warm.get("opened", 0) == 0:
        res["error"] = f"no WebSocket through {path.name}: {warm.get('failures')}"
        return res
    time.sleep(1.0)
    sp, cp = path.server_procs(), path.client_procs()
    res["server_rss_before"] = rss(sp)
    res["client_rss_before"] = rss(cp)
    res["server_fds_before"] = nfds(sp)

    argv = base + ["-n", str(n)]
    res["command"] = shlex.join(argv)
    client = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline().decode()
        try:
            opened = json.loads(line)
        except ValueError:
            res["error"] = f"wsidle gave no result: {line!r}"
            return res
        res.update(opened=opened["opened"], failed=opened["failed"],
                   failures=opened["failures"], open_seconds=opened["seconds"])  # fmt: skip
        time.sleep(2.0)  # let lazily-freed buffers settle
        sp, cp = path.server_procs(), path.client_procs()
        res["server_rss_after"] = rss(sp)
        res["client_rss_after"] = rss(cp)
        res["server_fds_after"] = nfds(sp)
        k = opened["opened"]
        for side in ("server", "client"):
            b, a = res[f"{side}_rss_before"], res[f"{side}_rss_after"]
            res[f"{side}_kib_per_conn"] = (
                (a - b) / 1024 / k if (a is not None and b is not None and k) else None
            )
        client.stdin.write(b"close\n")
        client.stdin.flush()
        client.stdin.close()
        try:
            client.wait(60)
        except subprocess.TimeoutExpired:
            pass
    finally:
        kill(client)
    log(
        f"  {path.name} idle: {res.get('opened')}/{n} open in {res.get('open_seconds')} s; "
        f"server {fmt_kib(res.get('server_kib_per_conn'))} KiB/conn, "
        f"client {fmt_kib(res.get('client_kib_per_conn'))} KiB/conn"
    )
    return res


# --------------------------------------------------------------------------
# report


def fmt_mb(r: dict[str, Any]) -> str:
    if not r or "error" in r or r.get("MBps") is None:
        return "error" if r and "error" in r else "—"
    v = r["MBps"]
    txt = f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return txt if r.get("complete", True) else txt + "*"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def fmt_kib(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def fmt_mib(v: int | None) -> str:
    return "—" if v is None else f"{v / MIB:.1f}"


def table(
    title: str, paths: list[str], rows: list[Row], peers: list[tuple[str, str]], notes: list[str]
) -> str:
    """A table of figures, a column a path (and the ratios of ``peers``), under ``title``, with ``notes`` under it."""
    out = [f"### {title}", "", *sideBySide(paths, rows, peers), ""]
    out += [n for n in notes if n]
    return "\n".join(out) + "\n"


def report(results: dict[str, Any], paths: list[str], tests: list[str], s: Settings) -> str:
    ok = [p for p in paths if results[p].get("status") != "skipped"]
    parts: list[str] = []

    def get(p: str, *keys: str) -> Any:
        return dig(results[p], *keys)

    def first_cmd(*keys: str) -> str:
        for p in ok:
            c = get(p, *keys)
            if c:
                return f"`{c}`"
        return "—"

    if "bulk" in tests and ok:
        rows: list[Row] = []
        for key, label in (
            ("download_1", "download, 1 stream (MB/s)"),
            (f"download_{s.parallel}", f"download, {s.parallel} streams, aggregate (MB/s)"),
            ("upload_1", "upload, 1 stream (MB/s)"),
        ):
            cells = {p: fmt_mb(get(p, "bulk", key) or {}) for p in ok}
            raw = {p: get(p, "bulk", key, "MBps") for p in ok}
            rows.append((label, cells, raw))
        parts.append(
            table(
                f"Bulk transfer ({s.big_size // MIB} MiB file; MB = 10^6 bytes)",
                ok,
                rows,
                [("dit4c-tcp", "ssh"), ("dit4c-tls", "ssh"), ("dit4c-tcp", "chp")],
                [
                    "`*`: stopped by the per-transfer cap of "
                    f"{s.bulk_cap:g} s (or incomplete); the rate is over the bytes moved.",
                    f"Download: {first_cmd('bulk', 'commands', 'download')} "
                    f"({s.parallel} of them at once for the aggregate)",
                    f"Upload: {first_cmd('bulk', 'commands', 'upload')}",
                    "",
                ],
            )
        )
    if "rps" in tests and ok:
        rows = []
        for key, label, f in (
            ("rps", "requests/s", lambda v: f"{v:.0f}"),
            ("p50_ms", "latency p50 (ms)", fmt_ms),
            ("p90_ms", "latency p90 (ms)", fmt_ms),
            ("p99_ms", "latency p99 (ms)", fmt_ms),
            ("errors", "errors (socket + non-2xx)", lambda v: f"{v:d}"),
        ):
            cells, raw = {}, {}
            for p in ok:
                v = get(p, "rps", key)
                cells[p] = "error" if get(p, "rps", "error") else ("—" if v is None else f(v))
                raw[p] = v
            rows.append((label, cells, raw))
        parts.append(
            table(
                f"Requests/s, closed loop ({s.rps_connections} keep-alive connections, "
                f"{s.rps_seconds} s, ~100-byte body)",
                ok,
                rows,
                [
                    ("dit4c-tcp", "chp"), ("dit4c-tls", "chp"), ("dit4c-tcp", "ssh"),
                    ("dit4c-full", "chp"), ("floor", "chp"), ("dit4c-full", "floor"),
                ],  # fmt: skip
                [f"Command: {first_cmd('rps', 'command')}", ""],
            )
        )
    if "latency" in tests and ok:
        rows = []
        for rate in s.lat_rates:
            r = str(rate)
            for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("max", "max")):
                cells, raw = {}, {}
                for p in ok:
                    v = get(p, "latency", r, "latency_ms", key)
                    cells[p] = "error" if get(p, "latency", r, "error") else fmt_ms(v)
                    raw[p] = v
                rows.append((f"{rate}/s {label} (ms)", cells, raw))
            if "direct" in ok:
                for key in ("p50", "p99"):
                    cells, raw = {}, {}
                    base = get("direct", "latency", r, "latency_ms", key)
                    for p in ok:
                        v = get(p, "latency", r, "latency_ms", key)
                        d = v - base if v is not None and base is not None else None
                        cells[p] = "—" if d is None else ("+" if d >= 0 else "") + fmt_ms(d)
                        raw[p] = d
                    rows.append((f"{rate}/s added {key} vs direct (ms)", cells, raw))
            cells = {}
            for p in ok:
                g = get(p, "latency", r)
                if not g or "error" in g:
                    cells[p] = "—"
                    continue
                bad = g["unanswered"] + sum(g["errors"].values())
                bad += sum(v for k, v in g["statuses"].items() if not k.startswith("2"))
                cells[p] = f"{g['achieved_rate']:.0f} / {bad}"
            rows.append((f"{rate}/s achieved req/s / failures", cells, {}))
        parts.append(
            table(
                f"Latency at fixed offered load (open loop, {s.lat_connections} keep-alive "
                f"connections, {s.lat_seconds:g} s after {s.lat_warmup:g} s warm-up, "
                "measured from each request's scheduled send time)",
                ok,
                rows,
                [("dit4c-tcp", "chp"), ("dit4c-tls", "chp")],
                [
                    f"Command: {first_cmd('latency', str(s.lat_rates[0]), 'command')} "
                    f"(once per rate: {', '.join(map(str, s.lat_rates))})",
                    "",
                ],
            )
        )
    if "idle" in tests and ok:
        rows = []

        def idle_row(label: str, key: str, f: Callable[[Any], str], ratios: bool = True) -> Row:
            cells, raw = {}, {}
            for p in ok:
                v = get(p, "idle", key)
                cells[p] = "error" if get(p, "idle", "error") else f(v)
                raw[p] = v
            return (label, cells, raw if ratios else {})

        rows.append(
            (
                "connections held",
                {p: f"{get(p, 'idle', 'opened')}/{get(p, 'idle', 'n')}"
                 if get(p, "idle", "opened") is not None else "—" for p in ok},
                {},
            )
        )  # fmt: skip
        rows.append(
            idle_row(
                "time to open them (s)", "open_seconds", lambda v: "—" if v is None else f"{v:.1f}"
            )
        )
        rows.append(("server side is", {p: results[p].get("server_label") or "—" for p in ok}, {}))
        rows.append(idle_row("server RSS before (MiB)", "server_rss_before", fmt_mib, False))
        rows.append(idle_row("server RSS after (MiB)", "server_rss_after", fmt_mib, False))
        rows.append(idle_row("server KiB per connection", "server_kib_per_conn", fmt_kib))
        rows.append(("client side is", {p: results[p].get("client_label") or "—" for p in ok}, {}))
        rows.append(idle_row("client RSS before (MiB)", "client_rss_before", fmt_mib, False))
        rows.append(idle_row("client RSS after (MiB)", "client_rss_after", fmt_mib, False))
        rows.append(idle_row("client KiB per connection", "client_kib_per_conn", fmt_kib))
        notes = [f"{p}: {get(p, 'idle', 'note')}" for p in ok if get(p, "idle", "note")]
        notes += [f"{p}: {get(p, 'idle', 'error')}" for p in ok if get(p, "idle", "error")]
        parts.append(
            table(
                "Idle WebSocket connections (each echoed one message, then held; "
                "backend: autobahn echo server)",
                ok,
                rows,
                [("dit4c-tcp", "chp"), ("dit4c-tcp", "ssh"), ("dit4c-tls", "chp")],
                [*notes, f"Command: {first_cmd('idle', 'command')}", ""],
            )
        )
    skipped = [p for p in paths if results[p].get("status") == "skipped"]
    if skipped:
        parts.append("### Skipped paths\n")
        for p in skipped:
            reason = results[p]["skip_reason"].replace("\n", "\n    ")
            parts.append(f"- **{p}**: {reason}")
        parts.append("")
    errs = [(p, results[p]["error"]) for p in ok if results[p].get("error")]
    for p, e in errs:
        parts.append(f"- **{p}** stopped early: {e}")
    return "\n".join(parts)


def versions(tools: dict[str, str | None]) -> dict[str, str]:
    return machine(
        {
            "nginx": ([tools["nginx"], "-v"], -1),
            "openssh": ([tools["ssh"], "-V"], None),
            "curl": ([tools["curl"], "--version"], 2),
            "wrk": ([tools["wrk"], "-v"], 2),
            "configurable-http-proxy": ([tools["configurable-http-proxy"], "--version"], None),
            "node": ([shutil.which("node"), "--version"], None),
        },
        packages=["twisted"],
    )


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="short run (~2 min): small file, short tests"
    )
    p.add_argument(
        "--paths", default=",".join(ALL_PATHS), help="comma list of " + ",".join(ALL_PATHS)
    )
    p.add_argument(
        "--only", default=",".join(ALL_TESTS), help="comma list of " + ",".join(ALL_TESTS)
    )
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON here")
    p.add_argument("--big-mib", type=int, help="bulk file size in MiB (default 1024, quick 64)")
    p.add_argument("--idle-n", type=int, help="idle connections (default 10000, quick 1000)")
    p.add_argument("--rates", help="latency test rates, comma list (default 500,1000)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--dit4c", help="dit4c command (default: beside python, or on PATH)")
    p.add_argument("--twistd", help="twistd command (default: beside python, or on PATH)")
    p.add_argument(
        "--before", metavar="REV",
        help="also run every dit4c path from a git worktree of REV (named dit4c-...-before), to compare",
    )  # fmt: skip
    args = p.parse_args(argv)
    for name, allowed in (("paths", ALL_PATHS), ("only", ALL_TESTS)):
        items = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            p.error(f"--{name}: unknown {bad}; choose from {','.join(allowed)}")
        setattr(args, name, items)
    if args.before:
        # each dit4c path right after its own, from the other revision
        args.paths = [q for x in args.paths for q in ((x, x + "-before") if x.startswith("dit4c-") else (x,))]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings.make(args)
    raiseNofile()
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_nofile == resource.RLIM_INFINITY:
        hard_nofile = 1 << 20

    tools = {
        t: findExe(t) if t in ("dit4c", "twistd") else shutil.which(t)
        for t in ("nginx", "sshd", "ssh", "ssh-keygen", "curl", "wrk",
                  "configurable-http-proxy", "dit4c", "twistd")
    }  # fmt: skip
    for t in ("nginx", "sshd"):
        if not tools[t] and os.path.exists(f"/usr/sbin/{t}"):
            tools[t] = f"/usr/sbin/{t}"
    if args.dit4c:
        tools["dit4c"] = args.dit4c
    if args.twistd:
        tools["twistd"] = args.twistd
    missing = [t for t in ("nginx", "curl", "wrk") if not tools[t]]
    if missing and (set(args.only) & {"bulk", "rps", "latency"}):
        print(f"missing tools: {', '.join(missing)} (Debian: apt-get install {' '.join(missing)})",
              file=sys.stderr)  # fmt: skip
        return 2

    results: dict[str, Any] = {}
    run = Run("bench/tunnel.py", argv, "dit4c-bench-", 3 * s.big_size + 512 * MIB, keep=args.keep_tmp)
    with run, contextlib.ExitStack() as stack:
        env = Env(settings=s, tmp=run.tmp, tools=tools)
        log(f"making a {s.big_size // MIB} MiB file")
        make_files(env)
        if args.before:
            env.before = stack.enter_context(worktree(args.before, run.tmp / "before-tree"))
        backends = start_backends(env)
        log(f"nginx on 127.0.0.1:{env.nginx_port}, WebSocket echo on 127.0.0.1:{env.ws_port}")
        http_tests = [t for t in args.only if t != "idle"]
        for name in args.paths:
            path = make_path(name, env)
            r: dict[str, Any] = {
                "server_label": path.server_label,
                "client_label": path.client_label,
            }
            results[name] = r
            log(f"== {name}")

            def measure(path: BasePath = path, r: dict[str, Any] = r) -> None:
                path.check()
                if http_tests:
                    bring_up(path, env.nginx_port, "/small")
                    r["processes"] = path.describe()
                    for t in http_tests:
                        if t not in path.tests:
                            r[t] = {"error": f"not measured on {path.name}"}
                            continue
                        fn = {"bulk": measure_bulk, "rps": measure_rps, "latency": measure_latency}[t]
                        r[t] = fn(env, path)
                    path.stop()
                if "idle" in args.only and "idle" in path.tests:
                    bring_up(path, env.ws_port, "/")
                    r["processes_idle"] = path.describe()
                    r["idle"] = measure_idle(env, path, hard_nofile)
                    path.stop()

            try:
                attempt(name, r, measure, ALL_TESTS)
            finally:
                path.stop()
        for b in backends:
            b.stop()
    if run.interrupted and not results:
        return 130

    paths = [p for p in args.paths if p in results]
    vers = versions(tools)
    about = [
        f"Every path reaches the same nginx (1 worker) on 127.0.0.1 with `Host: {HOST}`; "
        "clients, proxies and servers share the machine's CPUs."
    ]
    head = heading("DIT4C tunnel benchmark", run, vers, about)
    return run.publish(head, report(results, paths, args.only, s), args.json, s.__dict__, vers, results)


if __name__ == "__main__":
    sys.exit(main())
