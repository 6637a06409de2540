#!/usr/bin/env python3
"""
How long ``dit4c-dev`` takes to come back from a restart with 20 running
instances: to the portal answering, and to every instance taken back
(``running`` at the portal, and its tool answering at its URL through the
routing server, the listener and the auth helper).

Each instance uses the person's storage (``dit4c-dev`` embeds a file
server, and each pod mounts it with sshfs), so a restart meets mounts whose
server is the very process restarting: after SIGKILL they are dead until it
is back. Side by side in the same run: this checkout, and another revision
(``--before``, by default the last one before a node restart stopped
stat'ing mounts), run from a ``git worktree`` of it. It never passes or
fails; what did not come back within ``--timeout`` is printed as such.

    python bench/restart.py                       # 20 instances, SIGINT then SIGKILL
    python bench/restart.py --instances 5 --before HEAD~3 --how SIGKILL
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plumbing import worktree  # noqa: E402
from start import ROOT, Browser, Dev, api, imageFor, logIn  # noqa: E402
from tables import markdown  # noqa: E402

#: The revision before a restarted node stopped stat'ing mount points and took every pod back.
BEFORE = "b690800"


def waitUntil(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` holds, or None if it did not within ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if predicate():
                return time.monotonic() - began
        except OSError:
            pass
        time.sleep(interval)
    return None


def startMany(browser: Browser, dev: Dev, csrf: str, count: int) -> dict[str, str]:
    """``count`` instances of the notes tool, each answering at its URL: id → URL."""
    me = api(browser, dev, csrf, "GET", "/me")
    api(browser, dev, csrf, "PATCH", f"/admin/users/{me['id']}", {"max_instances": count})
    image = imageFor(browser, dev, csrf)
    ids = [api(browser, dev, csrf, "POST", "/instances", {"image": image})["id"] for _ in range(count)]
    urls: dict[str, str] = {}

    def allRunning() -> bool:
        for instance in ids:
            if instance in urls:
                continue
            state = api(browser, dev, csrf, "GET", f"/instances/{instance}")
            if state["state"] == "errored":
                raise RuntimeError(f"{instance} errored: {state.get('reason')}")
            if state["state"] == "running" and state.get("url") and answers(browser, state["url"]):
                urls[instance] = state["url"]
        return len(urls) == count

    if waitUntil(allRunning, 300, 0.2) is None:
        print(f"{dev.source}: only {len(urls)} of {count} instances came up within 300 s", file=sys.stderr)
    return urls


def answers(browser: Browser, url: str) -> bool:
    status, _, body = browser.request("GET", url)
    return status == 200 and b"Hello, admin." in body


def portalAnswers(dev: Dev) -> bool:
    status, _, _ = Browser().request("GET", dev.portal + "/health", follow=False)
    return status == 200


def takenBack(browser: Browser, dev: Dev, urls: dict[str, str]) -> bool:
    # The session cookie survives the restart (sessions are in the store); a GET needs no CSRF token.
    states = api(browser, dev, "", "GET", "/instances")
    items = states["instances"] if isinstance(states, dict) and "instances" in states else states
    running = {i["id"] for i in items if i["state"] == "running"}
    return set(urls) <= running and all(answers(browser, url) for url in urls.values())


def measure(
    label: str, source: Path, directory: Path, count: int, hows: list[int], timeout: float, extra: tuple[str, ...]
) -> list[list[str]]:
    rows: list[list[str]] = []
    dev = Dev("process", directory, source=source, name=label, extra=extra)
    try:
        browser = Browser()
        csrf = logIn(browser, dev)
        urls = startMany(browser, dev, csrf, count)
        for how in hows:
            dev.restart(how)  # the old process has ended, the new one just began
            began = time.monotonic()
            portal = waitUntil(lambda: portalAnswers(dev), timeout)
            left = timeout - (time.monotonic() - began)
            back = waitUntil(lambda: takenBack(browser, dev, urls), max(left, 0), 0.2)
            total = None if back is None else time.monotonic() - began
            never = f"not within {timeout:g} s"
            rows.append([
                label, signal.Signals(how).name, str(len(urls)),
                f"{portal:.2f}" if portal is not None else never,
                f"{total:.2f}" if total is not None else never,
            ])  # fmt: skip
            if total is None:
                break  # what did not come back cannot be restarted meaningfully
    finally:
        dev.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--before", default=BEFORE, help="the revision to compare with (default %(default)s)")
    parser.add_argument("--how", default="SIGINT,SIGKILL", help="signals to restart with, in order")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each restart")
    options = parser.parse_args()
    hows = [int(getattr(signal, name.strip())) for name in options.how.split(",")]
    directory = Path(tempfile.mkdtemp(prefix="dit4c-bench-restart-"))
    rows: list[list[str]] = []
    try:
        with worktree(options.before, directory / "before-tree") as before:
            # The earlier revision's node takes 8 instances and dit4c-dev cannot say
            # otherwise: its default capacity alone is raised to the count asked for.
            node = before / "dit4c" / "node" / "node.py"
            node.write_text(node.read_text().replace("capacity: int = 8,", f"capacity: int = {options.instances},"))
            rows += measure("before", before, directory, options.instances, hows, options.timeout, ())
            capacity = ("--capacity", str(options.instances))
            rows += measure("after", ROOT, directory, options.instances, hows, options.timeout, capacity)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"dit4c-dev restarted with {options.instances} running instances using storage (before = {options.before}):")
    print()
    head = ["code", "restarted with", "instances", "portal answers (s)", "every instance taken back and answering (s)"]
    print("\n".join(markdown(head, rows, "llrrr")))


if __name__ == "__main__":
    main()
