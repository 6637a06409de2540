"""``twistd dit4c-helper-storage``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dit4c.common.errors import HelperEnvironmentError, KeyFileError
from dit4c.common.helperenv import fromEnvironment
from dit4c.common.keys import loadPrivateKey
from dit4c.storage.errors import StorageConfigError
from dit4c.storage.helper import SSHFSMount, parseFileServer, parseHostKey


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise ValueError(f"UID:GID (numbers), not {value!r}")
    return int(uid), int(gid)


class Options(usage.Options):
    synopsis = "[--file-server HOST:PORT] [--host-key KEY|FILE] [--mount DIR]"
    longdesc = (
        "Mount the storage of an instance's owner from a DIT4C file server with "
        "sshfs, keep it mounted (mounting again with back-off if sshfs ends) and "
        "unmount it when stopped. Reads the helper environment (DIT4C_INSTANCE, "
        "DIT4C_INSTANCE_KEY, DIT4C_PORTAL, DIT4C_FILE_SERVER, "
        "DIT4C_FILE_SERVER_HOST_KEY, DIT4C_STORAGE_MOUNT; docs/protocols.md "
        "sections 9 and 13); the options override it. Needs sshfs and /dev/fuse."
    )
    optParameters = [
        ["file-server", None, None, "The file server: host:port or tcp:host=H:port=P. Default: $DIT4C_FILE_SERVER."],
        ["host-key", None, None, "The file server's SSH host key (a public key or known_hosts line, or a file). Default: $DIT4C_FILE_SERVER_HOST_KEY."],
        ["mount", None, None, "Directory to mount the storage at. Default: $DIT4C_STORAGE_MOUNT."],
        ["work-dir", None, None, "Where to keep the converted key and known_hosts (a private temporary directory is made in it). Default: $DIT4C_STATE_DIR, else the system's temporary directory."],
        ["sshfs", None, "sshfs", "The sshfs program."],
        ["owner", None, None, "UID:GID of the tool that uses the mount, if not the helper's own user (the helper runs as root): files show as theirs, mode 0700, and only they and root may enter.", _owner],
    ]
    optFlags = [
        ["allow-other", None, "Let users other than the helper's use the mount (FUSE allow_other)."],
    ]

    def postOptions(self) -> None:
        try:
            helper = fromEnvironment(
                fileServer=self["file-server"], fileServerHostKey=self["host-key"], storageMount=self["mount"]
            )
        except HelperEnvironmentError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in (
            ("DIT4C_FILE_SERVER", helper.fileServer),
            ("DIT4C_FILE_SERVER_HOST_KEY", helper.fileServerHostKey),
            ("DIT4C_STORAGE_MOUNT", helper.storageMount),
        ):
            if not value:
                raise usage.UsageError(f"{name} is not set (or give the option)")
        assert helper.fileServer and helper.fileServerHostKey and helper.storageMount
        try:
            self["server"] = parseFileServer(helper.fileServer)
            self["host-key-line"] = parseHostKey(helper.fileServerHostKey)
        except StorageConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["key"] = loadPrivateKey(helper.keyFile)
        except (OSError, KeyFileError) as e:
            raise usage.UsageError(f"DIT4C_INSTANCE_KEY: {getattr(e, 'strerror', None) or e}") from None
        self["helper"] = helper
        if not self["work-dir"]:
            self["work-dir"] = helper.stateDir


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    helper = config["helper"]
    try:
        return SSHFSMount(
            reactor,
            instance=helper.instance,
            key=config["key"],
            server=config["server"],
            hostKey=config["host-key-line"],
            mountPoint=helper.storageMount,
            sshfs=config["sshfs"],
            allowOther=bool(config["allow-other"]),
            owner=config["owner"],
            workDir=config["work-dir"],
        )
    except StorageConfigError as e:
        raise usage.UsageError(str(e)) from None
