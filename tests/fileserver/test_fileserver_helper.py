"""The storage helper without FUSE: its configuration, the sshfs command it runs, mounting again with back-off."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import backoffPolicy
from twisted.conch.ssh import keys
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure

from dit4c.common.keys import generatePrivateKey, savePrivateKey
from dit4c.storage.errors import StorageConfigError
from dit4c.storage.helper import (
    HOST_ALIAS,
    FileServerAddress,
    SSHFSMount,
    isMounted,
    parseFileServer,
    parseHostKey,
)
from dit4c.storage.tap import Options

HOST_KEY = keys.Key(generatePrivateKey()).public().toString("openssh").decode()


def test_file_server_addresses() -> None:
    assert parseFileServer("files.example.org:8700") == FileServerAddress("files.example.org", 8700)
    assert parseFileServer("[::1]:22").sshHost == "[::1]"
    assert parseFileServer("tcp:host=127.0.0.1:port=8700") == FileServerAddress("127.0.0.1", 8700)
    assert parseFileServer("tcp:127.0.0.1:8700") == FileServerAddress("127.0.0.1", 8700)
    for bad in ("", "host", "host:", "host:99999", "a b:22", "-oProxyCommand=x:22", "tcp:host=h", "user@h:22"):
        with pytest.raises(StorageConfigError):
            parseFileServer(bad)


def test_host_keys(tmp_path: Path) -> None:
    assert parseHostKey(HOST_KEY) == HOST_KEY
    assert parseHostKey(HOST_KEY + " comment") == HOST_KEY
    assert parseHostKey(f"[files.example.org]:8700 {HOST_KEY}") == HOST_KEY
    path = tmp_path / "host_key.pub"
    path.write_text(f"# the file server\n{HOST_KEY}\n")
    assert parseHostKey(str(path)) == HOST_KEY
    for bad in ("", "ssh-ed25519 notbase64", "nonsense", str(tmp_path / "missing")):
        with pytest.raises(StorageConfigError):
            parseHostKey(bad)


def test_mounts_are_read_from_proc(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    where = tmp_path / "my mount"
    mounts.write_text(f"sshfs {str(where).replace(' ', chr(92) + '040')} fuse.sshfs rw 0 0\n")
    assert isMounted(where, str(mounts))
    assert not isMounted(tmp_path / "other", str(mounts))


class FakeProcess:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)
        if name == "TERM":
            self.protocol.processEnded(Failure(ProcessTerminated(signal=15)))


class FakeReactor:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str]) -> FakeProcess:
        self.spawned.append((protocol, executable, args, env))
        process = FakeProcess(protocol)
        self.processes.append(process)
        return process

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()


def test_sshfs_runs_pinned_and_mounts_again_with_back_off(tmp_path: Path) -> None:
    clock = Clock()
    reactor = FakeReactor(clock)
    key = generatePrivateKey()
    mount = SSHFSMount(
        reactor, instance="abc123", key=key, server=FileServerAddress("127.0.0.1", 8700), hostKey=HOST_KEY,
        mountPoint=tmp_path / "mnt", workDir=tmp_path / "state", clock=clock,
        policy=backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0, jitter=lambda: 0),
    )  # fmt: skip
    mount.startService()
    assert len(reactor.spawned) == 1
    protocol, executable, args, env = reactor.spawned[0]
    assert args[1:3] == ["-f", "-F"] and args[-2:] == ["abc123@127.0.0.1:/", str(tmp_path / "mnt")]
    options = args[args.index("-o") + 1].split(",")
    assert "StrictHostKeyChecking=yes" in options and f"HostKeyAlias={HOST_ALIAS}" in options
    assert "reconnect" in options and "ServerAliveInterval=15" in options and "port=8700" in options
    assert not any(name.startswith("DIT4C_") for name in env)
    # The key, converted for OpenSSH, readable by its owner only; the host key pinned.
    identity = Path(next(o for o in options if o.startswith("IdentityFile="))[13:])
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.parent.stat().st_mode) == 0o700
    assert keys.Key.fromString(identity.read_bytes()).public() == keys.Key(key).public()
    assert identity.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    knownHosts = Path(next(o for o in options if o.startswith("UserKnownHostsFile="))[19:])
    assert knownHosts.read_text() == f"{HOST_ALIAS} {HOST_KEY}\n"
    assert (tmp_path / "mnt").is_dir()

    # sshfs ends: started again after 1 s, then 2 s, ...
    protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
    clock.advance(0.9)
    assert len(reactor.spawned) == 1
    clock.advance(0.2)
    assert len(reactor.spawned) == 2
    reactor.spawned[1][0].processEnded(Failure(ProcessDone(0)))
    clock.advance(1.5)
    assert len(reactor.spawned) == 2
    clock.advance(0.6)
    assert len(reactor.spawned) == 3
    # A mount that lasted resets the back-off.
    clock.advance(120)
    reactor.spawned[2][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    clock.advance(1.1)
    assert len(reactor.spawned) == 4

    # Stopped: sshfs is asked to end (and made to), nothing starts again, the key is gone.
    stopped = mount.stopService()
    clock.advance(5.1)
    assert stopped.called
    assert reactor.processes[3].signals == ["TERM"]
    clock.advance(300)
    assert len(reactor.spawned) == 4
    assert not identity.exists()


def test_options_from_the_helper_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyFile = tmp_path / "instance.key"
    savePrivateKey(generatePrivateKey(), keyFile)
    (tmp_path / "host.pub").write_text(HOST_KEY + "\n")
    for name, value in {
        "DIT4C_INSTANCE": "abc123", "DIT4C_INSTANCE_KEY": str(keyFile), "DIT4C_PORTAL": "http://127.0.0.1:8000",
        "DIT4C_FILE_SERVER": "127.0.0.1:8700", "DIT4C_FILE_SERVER_HOST_KEY": str(tmp_path / "host.pub"),
        "DIT4C_STORAGE_MOUNT": str(tmp_path / "mnt"),
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions([])
    assert options["server"] == FileServerAddress("127.0.0.1", 8700)
    assert options["host-key-line"] == HOST_KEY
    assert options["helper"].storageMount == str(tmp_path / "mnt")
    options = Options()
    options.parseOptions(["--mount", str(tmp_path / "elsewhere"), "--file-server", "tcp6:host=\\:\\:1:port=22"])
    assert options["server"] == FileServerAddress("::1", 22)
    options = Options()
    options.parseOptions(["--mount", str(tmp_path / "elsewhere")])
    assert options["helper"].storageMount == str(tmp_path / "elsewhere")
    monkeypatch.delenv("DIT4C_FILE_SERVER")
    with pytest.raises(usage.UsageError, match="DIT4C_FILE_SERVER"):
        Options().parseOptions([])
    monkeypatch.setenv("DIT4C_FILE_SERVER", "127.0.0.1:8700")
    monkeypatch.setenv("DIT4C_FILE_SERVER_HOST_KEY", "not a key")
    with pytest.raises(usage.UsageError):
        Options().parseOptions([])
    os.environ.pop("DIT4C_FILE_SERVER_HOST_KEY", None)
