#!/usr/bin/env python3
"""
How long from "start" to the tool answering through the routing server.

For each runtime (``process``, ``podman``) this runs the all-in-one
``twistd dit4c-dev`` as a user would, logs in as its administrator, and 20
times (``--runs``): starts an instance through the portal's API, then asks
the instance's URL, as a browser would (through the routing server, the
listener and the auth helper, with the portal's OAuth flow), until the
tool itself answers; then stops and discards it. It prints, per runtime,
the time to the portal showing ``running`` and the time to the tool's
first answer: p50, p90, min, max. It never passes or fails.

    python bench/start.py                 # both runtimes, 20 starts each
    python bench/start.py --runtime process --runs 5
    python bench/start.py --memory-only   # only the helpers' memory (below)
    python bench/start.py --runtime slurm # the slurm runtime beside the process runtime (below)

The process runtime starts the built-in notes tool (a Python program); the
podman runtime a container from a tiny image built here (a static C
WebSocket tool on busybox, tests/support/podman.py), so the figures are the
system's own cost, not a big tool's start-up.

Then it measures what a pod's helpers cost in memory under the process
runtime: PSS (``/proc/<pid>/smaps_rollup``) of all of a pod's helper
processes together, per instance, at 1 and at 20 instances, with the
helpers as three processes (``podHelpers="separate"``, as before) and as
one process per pod forked from the node's fork server (the default), side
by side. Each pod runs the notes tool under a real ``ProcessRuntime``; its
helpers dial a routing server in this process (which trusts the instances'
keys) and hold their tunnels; the portal they would report to is absent (no
shared storage, so no storage helper in either mode). The fork server's own
PSS is printed too: the node pays it once, shared by every pod.

``--runtime slurm`` measures the slurm runtime on a one-machine Slurm
cluster started for it, beside the process runtime, from the runtime's
start of a pod to its tool answering and its tunnel held by a routing
server (``bench/slurmstart.py``: ``dit4c-dev`` has no slurm runtime, so
these rows leave out the portal and the browser).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from plumbing import REPO as ROOT
from plumbing import TWISTD, Service, announcedPort, freePort, sourceEnv
from tables import markdown

sys.path.insert(0, str(ROOT))

from dit4c.dev.tap import PORTS  # noqa: E402


def podmanHarness() -> Any:
    """
    ``tests/support/podman.py``, for the podman runtime alone: the one part
    of the tests' harness a bench still uses (podman's environment here, and
    the tiny WebSocket tool image, compiled from C): it is not copied here.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    import support.podman

    return support.podman


class Browser:
    """Just enough of a browser: cookies per host, redirects, every host on loopback."""

    def __init__(self) -> None:
        self.cookies: dict[str, dict[str, str]] = {}

    def request(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, follow: bool = True
    ) -> tuple[int, str, bytes]:
        for _ in range(10):
            parts = urlsplit(url)
            host = parts.hostname or "localhost"
            connection = http.client.HTTPConnection("127.0.0.1", parts.port or 80, timeout=30)
            sent = {"Host": parts.netloc, "Accept": "text/html", **(headers or {})}
            jar = self.cookies.get(host, {})
            if jar:
                sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            for header in response.headers.get_all("Set-Cookie") or []:
                name, _, rest = header.partition("=")
                value = rest.split(";", 1)[0]
                if "Max-Age=0" in header or "expires=Thu, 01 Jan 1970" in header:
                    self.cookies.setdefault(host, {}).pop(name, None)
                else:
                    self.cookies.setdefault(host, {})[name] = value
            location = response.headers.get("Location")
            if follow and response.status in (301, 302, 303, 307) and location:
                url = urljoin(url, location)
                method, body = "GET", None
                headers = {}
                continue
            return response.status, url, data
        raise RuntimeError("too many redirects")


def field(html: bytes, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"'.encode(), html)
    if not match:
        raise RuntimeError(f"no {name} in the page")
    return match.group(1).decode()


class Dev:
    """
    ``twistd dit4c-dev`` as a user runs it, from ``source`` (a checkout of
    DIT4C: this one, or another revision's, to compare with).
    """

    def __init__(
        self, runtime: str, directory: Path, source: Path = ROOT, name: str | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.runtime = runtime
        self.source = source
        self.prefix = f"dit4c-bench{os.getpid()}"
        self.name = f"dev-{name or runtime}"
        self.logs = directory
        self.directory = directory / (name or runtime)
        self.extra = extra
        # Every port 0, read back once it is up; another revision's dit4c-dev
        # may take no port 0, and is given ports free a moment before.
        self.ports = {option: 0 if source == ROOT else freePort() for option in PORTS}
        self._launch()
        self.service.waitForLog("DIT4C is up", 60)
        log = self.service.log()
        for option, what in PORTS.items():
            self.ports[option] = announcedPort(log, what) or self.ports[option]
        self.portal = f"http://localhost:{self.ports['--portal-port']}"
        self.password = re.search(r"password:\s+(\S+)", log).group(1)  # type: ignore[union-attr]

    @property
    def command(self) -> list[str]:
        """``twistd dit4c-dev`` on its ports (started again: on the ones it got)."""
        return [
            *TWISTD, "-n", "--pidfile=", "dit4c-dev",
            "--data-dir", str(self.directory),
            *(argument for option, port in self.ports.items() for argument in (option, str(port))),
            "--runtime", self.runtime, "--podman-prefix", self.prefix, *self.extra,
        ]  # fmt: skip

    def _launch(self) -> None:
        # The source's own code, for dit4c-dev and (inherited) every process it starts.
        self.service = Service(self.name, self.command, self.logs, env=sourceEnv(self.source), cwd=self.source)

    def restart(self, how: int) -> None:
        """Stop it with signal ``how`` (its pods run on) and start it again as it was, at once."""
        self.service.end(how, 60)
        self._launch()

    def stop(self) -> None:
        self.service.stop(grace=20)
        from dit4c.node.processes import killRecorded

        killRecorded(self.directory)
        if self.runtime == "podman":
            env = podmanHarness().podmanEnv()
            out = subprocess.run(
                ["podman", "pod", "ps", "-q", "--filter", f"label=dit4c.prefix={self.prefix}"],
                env=env, capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            for pod in out:
                subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", pod], env=env, capture_output=True)


def logIn(browser: Browser, dev: Dev) -> str:
    _, _, page = browser.request("GET", dev.portal + "/login")
    form = urlencode({"username": "admin", "password": dev.password, "csrf": field(page, "csrf"), "next": "/"})
    status, _, home = browser.request(
        "POST", dev.portal + "/login", form.encode(), {"Content-Type": "application/x-www-form-urlencoded"}
    )
    if status != 200:
        raise RuntimeError(f"login failed: {status}")
    return field(home, "csrf")


def api(browser: Browser, dev: Dev, csrf: str, method: str, path: str, body: object = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/json", "X-CSRF-Token": csrf, "Content-Type": "application/json"}
    status, _, answer = browser.request(method, dev.portal + "/api/v1" + path, data, headers, follow=False)
    if status >= 400:
        raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
    return json.loads(answer) if answer else {}


def imageFor(browser: Browser, dev: Dev, csrf: str) -> str:
    if dev.runtime == "podman":
        reference = podmanHarness().buildWebSocketToolImageSync()
        created = api(browser, dev, csrf, "POST", "/admin/images", {"name": "WS tool", "ref": reference})
        return str(created["id"])
    images = api(browser, dev, csrf, "GET", "/images")
    items = images["images"] if isinstance(images, dict) and "images" in images else images
    return str(next(i["id"] for i in items if i["name"].startswith("Notes")))


def oneStart(browser: Browser, dev: Dev, csrf: str, image: str) -> tuple[float, float]:
    began = time.monotonic()
    instance = api(browser, dev, csrf, "POST", "/instances", {"image": image})
    instanceId = instance["id"]
    running = None
    answered = None
    last = "nothing yet"
    while answered is None:
        if time.monotonic() - began > 180:
            raise RuntimeError(f"{instanceId} did not answer within 180 s; last answer: {last}")
        state = api(browser, dev, csrf, "GET", f"/instances/{instanceId}")
        if state["state"] == "errored":
            raise RuntimeError(f"{instanceId} errored: {state.get('reason')}")
        if state["state"] == "running" and running is None:
            running = time.monotonic() - began
        if state.get("url") and state["state"] == "running":
            try:
                status, where, body = browser.request("GET", state["url"])
                last = f"{status} at {where}: {body[:200]!r}"
            except OSError as e:
                status, body = 0, b""
                last = repr(e)
            if status == 200 and b"Hello, admin." in body:
                answered = time.monotonic() - began
                break
        time.sleep(0.02)
    api(browser, dev, csrf, "POST", f"/instances/{instanceId}/stop")
    while api(browser, dev, csrf, "GET", f"/instances/{instanceId}")["state"] not in ("stopped", "errored"):
        time.sleep(0.05)
    api(browser, dev, csrf, "POST", f"/instances/{instanceId}/discard")
    return running or answered, answered


def summary(name: str, values: list[float]) -> list[str]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return [name, str(len(values)), *(f"{v:.2f}" for v in (statistics.median(values), p90, ordered[0], ordered[-1]))]


# -- the helpers' memory ---------------------------------------------------------------------------


def pss(pid: int) -> int:
    """The process's proportional set size, in KiB (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]


HELPER_ROLES = ("helpers", "auth", "listener", "storage")


def helperMemory(podHelpers: str, counts: list[int], directory: Path) -> dict[int, tuple[float, float | None]]:
    """count → (MiB of a pod's helper processes, per instance; MiB of the fork server), in a reactor of its own."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from dit4c.common.keys import generatePrivateKey, publicJWK, savePrivateKey
from dit4c.common.tokens import StaticKeySource, TokenVerifier
from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, builtinTools
from dit4c.routing.server import RoutingServer
sys.path.insert(0, {str(ROOT / "bench")!r})
from start import HELPER_ROLES, pss

async def main(reactor):
    instances = [f"mem{{n}}" for n in range(max({counts!r}))]
    privates = {{instance: generatePrivateKey() for instance in instances}}
    keys = [{{**publicJWK(key), "kid": f"instance:{{instance}}"}} for instance, key in privates.items()]
    routing = RoutingServer(reactor, TokenVerifier(StaticKeySource({{"keys": keys}}), audience="dit4c-routing"), "localhost")
    tunnel = routing.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    routing.startService()
    port = tunnel.port.getHost().port
    directory = Path({str(directory)!r})
    runtime = ProcessRuntime(reactor, directory, builtinTools(), podHelpers={podHelpers!r})
    started, results = [], {{}}
    try:
        for count in {counts!r}:
            while len(started) < count:
                instance = instances[len(started)]
                pod = directory / instance
                pod.mkdir(parents=True, mode=0o700)
                savePrivateKey(privates[instance], pod / "instance.key")
                environment = {{
                    "DIT4C_INSTANCE": instance, "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
                    "DIT4C_PORTAL": "http://127.0.0.1:9", "DIT4C_ROUTING": f"tcp:host=127.0.0.1:port={{port}}",
                }}
                await runtime.start(PodSpec(instance, "dit4c/notes", None, pod, environment))
                started.append(instance)
            for _ in range(600):
                ready = [await runtime.ready(i) for i in started]
                if all(ready) and len(routing.registry) >= count:
                    break
                await task.deferLater(reactor, 0.1, lambda: None)
            else:
                raise RuntimeError(f"{{count}} pods never all answered and registered")
            await task.deferLater(reactor, 3, lambda: None)
            total = 0
            for instance in started:
                for role in HELPER_ROLES:
                    record = directory / instance / f"{{role}}.pid"
                    if record.exists():
                        total += pss(json.loads(record.read_text())["pid"])
            server = runtime.forkServer._process.pid if runtime.forkServer and runtime.forkServer._process else None
            results[count] = [total / count / 1024, pss(server) / 1024 if server else None]
    finally:
        for instance in started:
            await runtime.discard(instance)
        runtime.forget()
        await routing.stopService()
    print(json.dumps(results))

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the memory run ({podHelpers}) failed:\n{out.stderr[-3000:]}")
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return {int(count): (value[0], value[1]) for count, value in results.items()}


def memoryTable(directory: Path, counts: list[int]) -> list[str]:
    before = helperMemory("separate", counts, directory / "separate")
    after = helperMemory("forked", counts, directory / "forked")
    head = ["MiB of PSS per instance", *(f"{n} instance{'s' if n > 1 else ''}" for n in counts)]
    rows = [
        ["separate helpers: auth and listener, two processes per pod", *(f"{before[n][0]:.1f}" for n in counts)],
        ["one helper process per pod, forked: the pod's own", *(f"{after[n][0]:.1f}" for n in counts)],
        ["the fork server (one per node), its share", *(f"{(after[n][1] or 0) / n:.1f}" for n in counts)],
        ["one helper process per pod, forked: with the server's share",
         *(f"{after[n][0] + (after[n][1] or 0) / n:.1f}" for n in counts)],
    ]  # fmt: skip
    return markdown(head, rows, "l" + "r" * len(counts))


def slurmRows(runs: int) -> list[list[str]]:
    """The slurm runtime's starts beside the process runtime's, runtime only (bench/slurmstart.py, a process of its own)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "slurmstart.py"), "--runs", str(runs)],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the slurm runs failed:\n{out.stderr[-3000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return [summary(f"{kind} runtime alone: pod answers, tunnel held", times[kind]) for kind in ("process", "slurm")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", action="append", choices=["process", "podman", "slurm"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--memory-only", action="store_true", help="only the helpers' memory")
    parser.add_argument("--memory-counts", default="1,20", help="instances to measure the helpers' memory at")
    options = parser.parse_args()
    if options.memory_only:
        directory = Path(tempfile.mkdtemp(prefix="dit4c-bench-memory-"))
        try:
            memory = memoryTable(directory, [int(n) for n in options.memory_counts.split(",")])
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print("\n".join(memory))
        return
    runtimes = options.runtime or ["process", "podman"]
    directory = Path(tempfile.mkdtemp(prefix="dit4c-bench-start-"))
    rows: list[list[str]] = []
    failed = False
    try:
        for runtime in runtimes:
            if runtime == "slurm":
                rows.extend(slurmRows(options.runs))
                continue
            if runtime == "podman" and shutil.which("podman") is None:
                print("podman is not installed: skipping the podman runtime", file=sys.stderr)
                continue
            dev = Dev(runtime, directory)
            try:
                browser = Browser()
                csrf = logIn(browser, dev)
                image = imageFor(browser, dev, csrf)
                oneStart(browser, dev, csrf, image)  # warm-up: caches, first image use
                runningTimes, answerTimes = [], []
                for n in range(options.runs):
                    running, answered = oneStart(browser, dev, csrf, image)
                    runningTimes.append(running)
                    answerTimes.append(answered)
                    print(f"{runtime} start {n + 1}: running after {running:.2f} s, tool answered after {answered:.2f} s",
                          file=sys.stderr)  # fmt: skip
                rows.append(summary(f"{runtime}: portal shows running", runningTimes))
                rows.append(summary(f"{runtime}: tool answers through the routing server", answerTimes))
            except Exception:
                failed = True
                raise
            finally:
                dev.stop()
    finally:
        if failed:
            print(f"logs kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print("\n".join(markdown(["seconds from start", "runs", "p50", "p90", "min", "max"], rows, "lrrrrr")))
    directory = Path(tempfile.mkdtemp(prefix="dit4c-bench-memory-"))
    try:
        memory = memoryTable(directory, [int(n) for n in options.memory_counts.split(",")])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print()
    print("\n".join(memory))


if __name__ == "__main__":
    main()
