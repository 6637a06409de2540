#!/usr/bin/env python3
"""
Saving and restoring a big instance: save (capture, hash, upload to the
image server, report) and restore (fetch, check the digest, unpack, start)
of an instance holding ``--size`` MiB (default 1024) of incompressible
data, through ``twistd dit4c-dev`` as a user runs it (process runtime).

Then the file server: ``dd`` writing and reading ``--size`` MiB through an
instance's mount of the person's storage (sshfs to the file server's SFTP),
and the same ``dd`` on the local disk.

Side by side, in the same run, the same bytes moved by plain tools on the
same disk: ``tar`` of the working directory piped to ``sha256sum`` (what
a save must at least do), ``curl`` of the file from a plain local HTTP
server (``python -m http.server``) into a file (what a restore must at
least move), and ``tar`` extracting the archive. It prints seconds and
MB/s (10^6 bytes); it never passes or fails.

    python bench/images.py                # 1 GiB
    python bench/images.py --size 256 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plumbing import Service  # noqa: E402
from start import Browser, Dev, api, logIn  # noqa: E402
from tables import markdown  # noqa: E402


def waitForState(browser: Browser, dev: Dev, csrf: str, instance: str, states: set[str], limit: float = 1800) -> str:
    began = time.monotonic()
    while True:
        state = api(browser, dev, csrf, "GET", f"/instances/{instance}")
        if state["state"] in states:
            return str(state["state"])
        if state["state"] == "errored":
            raise RuntimeError(f"{instance} errored: {state.get('reason')}")
        if time.monotonic() - began > limit:
            raise RuntimeError(f"{instance} still {state['state']} after {limit} s")
        time.sleep(0.05)


def makeData(path: Path, mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1024 * 1024))


def ours(dev: Dev, browser: Browser, csrf: str, mib: int) -> tuple[float, float]:
    images = api(browser, dev, csrf, "GET", "/images")
    notes = next(i["id"] for i in images if i["name"].startswith("Notes"))
    instance = api(browser, dev, csrf, "POST", "/instances", {"image": notes})["id"]
    waitForState(browser, dev, csrf, instance, {"running"})
    makeData(dev.directory / "node" / instance / "work" / "data.bin", mib)
    subprocess.run(["sync"], check=True)

    began = time.monotonic()
    api(browser, dev, csrf, "POST", f"/instances/{instance}/save")
    waitForState(browser, dev, csrf, instance, {"saved"})
    saved = time.monotonic() - began

    mine = [i for i in api(browser, dev, csrf, "GET", "/images") if i["mine"]]
    image = mine[-1]["id"]
    began = time.monotonic()
    restored = api(browser, dev, csrf, "POST", "/instances", {"image": image})["id"]
    waitForState(browser, dev, csrf, restored, {"running"})
    restoredIn = time.monotonic() - began
    assert (dev.directory / "node" / restored / "work" / "data.bin").stat().st_size == mib * 1024 * 1024

    api(browser, dev, csrf, "POST", f"/instances/{restored}/stop")
    waitForState(browser, dev, csrf, restored, {"stopped"})
    for each in (restored, instance):
        api(browser, dev, csrf, "POST", f"/instances/{each}/discard")
    api(browser, dev, csrf, "DELETE", f"/images/{image}")
    return saved, restoredIn


def plain(directory: Path, mib: int) -> tuple[float, float, float]:
    work = directory / "plain-work"
    work.mkdir()
    makeData(work / "data.bin", mib)
    archive = directory / "plain.tar"
    subprocess.run(["sync"], check=True)
    began = time.monotonic()
    subprocess.run(f"tar -C {work} -cf - . | tee {archive} | sha256sum > /dev/null", shell=True, check=True)
    packed = time.monotonic() - began

    # Port 0; it says which it got ("Serving HTTP on 127.0.0.1 port N ...") once it listens.
    server = Service(
        "http.server",
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)],
        directory,
    )
    try:
        port = int(server.waitForLog(r"Serving HTTP on \S+ port (\d+)").group(1))
        began = time.monotonic()
        subprocess.run(
            ["curl", "-sf", "-o", str(directory / "fetched.tar"), f"http://127.0.0.1:{port}/plain.tar"], check=True
        )
        fetched = time.monotonic() - began
    finally:
        server.stop()
    out = directory / "plain-out"
    out.mkdir()
    began = time.monotonic()
    subprocess.run(["tar", "-C", str(out), "-xf", str(directory / "fetched.tar")], check=True)
    unpacked = time.monotonic() - began
    for path in (work, out):
        shutil.rmtree(path)
    for path in (archive, directory / "fetched.tar"):
        path.unlink()
    return packed, fetched, unpacked


def dd(source: str, target: str, mib: int, *extra: str) -> float:
    began = time.monotonic()
    subprocess.run(["dd", f"if={source}", f"of={target}", "bs=1M", f"count={mib}", *extra],
                   check=True, capture_output=True)  # fmt: skip
    return time.monotonic() - began


def storage(dev: Dev, browser: Browser, csrf: str, mib: int, directory: Path) -> tuple[float, float, float, float]:
    """dd through an instance's storage mount, and on the local disk: write s, read s, each."""
    images = api(browser, dev, csrf, "GET", "/images")
    notes = next(i["id"] for i in images if i["name"].startswith("Notes"))
    instance = api(browser, dev, csrf, "POST", "/instances", {"image": notes})["id"]
    waitForState(browser, dev, csrf, instance, {"running"})
    mount = dev.directory / "node" / instance / "mnt"
    for _ in range(300):
        if os.path.ismount(mount):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("the storage was not mounted")
    local = directory / "local.bin"
    random = directory / "random.bin"
    dd("/dev/urandom", str(random), mib)
    written = dd(str(random), str(mount / "big.bin"), mib, "conv=fsync")
    localWritten = dd(str(random), str(local), mib, "conv=fsync")
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    read = dd(str(mount / "big.bin"), "/dev/null", mib)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    localRead = dd(str(local), "/dev/null", mib)
    (mount / "big.bin").unlink()
    local.unlink()
    random.unlink()
    api(browser, dev, csrf, "POST", f"/instances/{instance}/stop")
    waitForState(browser, dev, csrf, instance, {"stopped"})
    api(browser, dev, csrf, "POST", f"/instances/{instance}/discard")
    return written, read, localWritten, localRead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of data in the instance")
    parser.add_argument("--runs", type=int, default=2)
    options = parser.parse_args()
    mib = options.size
    megabytes = mib * 1024 * 1024 / 1e6
    directory = Path(tempfile.mkdtemp(prefix="dit4c-bench-images-"))
    saves, restores, packs, fetches, unpacks = [], [], [], [], []
    mountWrites, mountReads, diskWrites, diskReads = [], [], [], []
    try:
        dev = Dev("process", directory)
        try:
            browser = Browser()
            csrf = logIn(browser, dev)
            for run in range(options.runs):
                saved, restored = ours(dev, browser, csrf, mib)
                saves.append(saved)
                restores.append(restored)
                packed, fetched, unpacked = plain(directory, mib)
                packs.append(packed)
                fetches.append(fetched)
                unpacks.append(unpacked)
                if shutil.which("sshfs"):
                    w, r, lw, lr = storage(dev, browser, csrf, mib, directory)
                    mountWrites.append(w)
                    mountReads.append(r)
                    diskWrites.append(lw)
                    diskReads.append(lr)
                print(f"run {run + 1}: save {saved:.1f} s, restore {restored:.1f} s; "
                      f"tar+sha256 {packed:.1f} s, curl {fetched:.1f} s, untar {unpacked:.1f} s", file=sys.stderr)  # fmt: skip
        finally:
            dev.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    def row(name: str, values: list[float]) -> list[str]:
        median = statistics.median(values)
        return [name, f"{median:.1f}", f"{megabytes / median:.0f}", f"{min(values):.1f}", f"{max(values):.1f}"]

    def table(what: str, rows: list[list[str]]) -> None:
        print("\n".join(markdown([f"{mib} MiB{what}, {options.runs} runs", "median s", "MB/s", "min s", "max s"], rows, "lrrrr")))

    table("", [
        row("dit4c save: click to `saved` (capture, hash, upload, report)", saves),
        row("dit4c restore: start to `running` (fetch, check, unpack, start)", restores),
        row("plain: tar piped to tee and sha256sum, same directory", packs),
        row("plain: curl from python -m http.server", fetches),
        row("plain: tar -x of the archive", unpacks),
        row("plain: curl + tar -x (a restore's floor)", [f + u for f, u in zip(fetches, unpacks, strict=True)]),
    ])  # fmt: skip
    if mountWrites:
        print()
        table(" with dd", [
            row("write through the storage mount (sshfs to the file server), fsync", mountWrites),
            row("write to the local disk, fsync", diskWrites),
            row("read through the storage mount (caches dropped)", mountReads),
            row("read from the local disk (caches dropped)", diskReads),
        ])  # fmt: skip


if __name__ == "__main__":
    main()
