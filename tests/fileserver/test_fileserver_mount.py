"""
The storage helper for real: ``python -m twisted dit4c-helper-storage`` as
a child process with the helper environment, mounting alice's storage with
sshfs (FUSE) from the file server. Skipped where sshfs or /dev/fuse is
missing, except under CI (CI=...), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from fileserver_world import World
from support.waiting import eventually
from twisted.internet.threads import deferToThread

from dit4c.common.keys import savePrivateKey
from dit4c.storage.helper import isMounted

ROOT = Path(__file__).resolve().parents[2]


def _fuseMissing() -> str | None:
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (Debian: apt-get install sshfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed (Debian: fuse3)"
    return None


@pytest.fixture
def fuse() -> None:
    missing = _fuseMissing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE mounts cannot be tested: {missing}")
        pytest.skip(f"FUSE mounts cannot be tested: {missing}")


class Helper:
    def __init__(self, w: World, instance: Any, key: Any, name: str) -> None:
        self.mount = w.tmp / f"mnt-{name}"
        keyFile = w.tmp / f"{name}.key"
        savePrivateKey(key, keyFile)
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "DIT4C_INSTANCE": instance.id,
            "DIT4C_INSTANCE_KEY": str(keyFile),
            "DIT4C_PORTAL": w.portalURL,
            "DIT4C_FILE_SERVER": f"127.0.0.1:{w.port}",
            "DIT4C_FILE_SERVER_HOST_KEY": str(w.tmp / "files" / "host_key.pub"),
            "DIT4C_STORAGE_MOUNT": str(self.mount),
            "DIT4C_STATE_DIR": str(w.tmp / f"state-{name}"),
        }
        self.log = open(w.tmp / f"helper-{name}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "dit4c-helper-storage"],
            cwd=ROOT, env=environment, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    async def mounted(self) -> None:
        await eventually(lambda: isMounted(self.mount) or self.process.poll() is not None, 20, 0.1, "the mount")
        assert self.process.poll() is None, self.output()
        assert isMounted(self.mount)

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            await eventually(lambda: self.process.poll() is not None, 20, 0.1, "the helper to end")
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if isMounted(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_file_written_under_one_mount_is_read_under_another(world: World, fuse: None) -> None:
    w = world
    helpers = [Helper(w, w.a, w.keyA, "a"), Helper(w, w.b, w.keyB, "b"), Helper(w, w.c, w.keyC, "c")]
    a, b, c = helpers
    try:
        for helper in helpers:
            await helper.mounted()

        def writeAndRead() -> tuple[bytes, list[str], list[str]]:
            (a.mount / "results").mkdir()
            (a.mount / "results" / "data.csv").write_bytes(b"x,y\n1,2\n")
            os.rename(a.mount / "results" / "data.csv", a.mount / "results" / "final.csv")
            return (
                (b.mount / "results" / "final.csv").read_bytes(),
                sorted(os.listdir(b.mount)),
                sorted(os.listdir(c.mount)),
            )

        # The mounts are served by this process's reactor: touch them from a thread.
        seenByB, listedByB, listedByC = await deferToThread(writeAndRead)
        assert seenByB == b"x,y\n1,2\n"
        assert listedByB == ["results"]
        assert listedByC == []
        assert (w.home(w.alice) / "results" / "final.csv").read_bytes() == b"x,y\n1,2\n"
        # Files appear as the mounting user's (sshfs idmap=user).
        owner = await deferToThread(lambda: os.stat(b.mount / "results" / "final.csv").st_uid)
        assert owner == os.getuid()

        for helper in helpers:
            await helper.stop()
            # twist ends by the signal it was stopped with, after a clean stop.
            assert helper.process.returncode in (0, -signal.SIGTERM), helper.output()
            assert "unmounted the storage" in helper.output()
            assert not isMounted(helper.mount), helper.output()
        # The converted key and known_hosts are gone with it.
        assert not list((w.tmp / "state-a").glob("dit4c-storage-*"))
    finally:
        for helper in helpers:
            helper.cleanup()


@pytest_twisted.ensureDeferred
async def test_a_helper_with_a_wrong_host_key_mounts_nothing(world: World, fuse: None, tmp_path: Path) -> None:
    w = world
    other = tmp_path / "other.pub"
    from twisted.conch.ssh import keys

    from dit4c.common.keys import generatePrivateKey

    other.write_text(keys.Key(generatePrivateKey()).public().toString("openssh").decode() + "\n")
    (w.tmp / "files" / "host_key.pub").rename(w.tmp / "files" / "host_key.real")
    (w.tmp / "files" / "host_key.pub").write_text(other.read_text())
    helper = Helper(w, w.a, w.keyA, "wrong")
    try:
        # Until it has been refused and is about to try again.
        await eventually(
            lambda: "Host key verification failed" in helper.output() and "mounting again" in helper.output(),
            20,
            0.1,
            helper.output,
        )
        assert not isMounted(helper.mount)
        assert helper.process.poll() is None  # it keeps trying, with back-off
        await helper.stop()
        assert "mounting again" in helper.output()
        assert "Host key verification failed" in helper.output()
    finally:
        helper.cleanup()
