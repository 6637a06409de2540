"""``twistd dit4c-helper-pod``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dit4c.common.errors import HelperEnvironmentError, KeyFileError
from dit4c.common.helperenv import fromEnvironment
from dit4c.common.keys import loadPrivateKey
from dit4c.common.options import endpointList, positiveFloat
from dit4c.podhelper.service import HOLD


class Options(usage.Options):
    synopsis = "[--owner UID:GID] [--tool-pid-file PATH] [--hold SECONDS]"
    longdesc = (
        "Run all of an instance's helpers in one process, as the process "
        "runtime of a compute node does: the auth helper in front of the "
        "tool (DIT4C_TOOL; it also listens on DIT4C_AUTH_LISTEN), the "
        "listener (a tunnel to the nearest of DIT4C_ROUTING, each stream "
        "handed to the auth helper in this process; or, with DIT4C_ONION, "
        "the instance published as a Tor onion service through that tor's "
        "control port instead, its http://<name>.onion/ URL reported to the "
        "portal and its key kept in DIT4C_STATE_DIR), and with "
        "DIT4C_FILE_SERVER the storage helper (sshfs at DIT4C_STORAGE_MOUNT). "
        "Reads the helper environment (docs/protocols.md section 9). Stopped, "
        "it closes the tunnel and the auth helper at once and keeps the "
        "storage mounted until the tool (--tool-pid-file) has ended."
    )
    optParameters = [
        ["owner", None, None, "Storage: UID:GID of the tool that uses the mount, if not this helper's user (as dit4c-helper-storage --owner)."],
        ["sshfs", None, "sshfs", "Storage: the sshfs program."],
        ["tool-pid-file", None, None, "Storage: the tool's pid file (JSON: pid, started) in the pod's directory; stopped, the helper unmounts only once that process has ended."],
        ["hold", None, HOLD, "Storage: the longest, in seconds, a stop waits for the tool before unmounting anyway.", positiveFloat],
        ["recheck", None, 30.0, "Auth: seconds between asking the portal again whether a session's person may still use the instance.", positiveFloat],
        ["timeout", None, 10.0, "Auth: seconds to wait for the portal.", positiveFloat],
    ]

    def postOptions(self) -> None:
        from dit4c.auth import tap as auth

        try:
            helper = fromEnvironment()
        except HelperEnvironmentError as e:
            raise usage.UsageError(str(e)) from None
        if not helper.authListen:
            raise usage.UsageError("DIT4C_AUTH_LISTEN is not set: where the auth helper answers on this machine")
        # The auth helper's own options read (and check) the same environment.
        self.auth = _parsed(auth.Options(), ["--recheck", str(self["recheck"]), "--timeout", str(self["timeout"])])
        if helper.onion:
            endpointList([helper.onion], server=False, option="DIT4C_ONION")
        elif helper.routing:
            endpointList(list(helper.routing), server=False, option="DIT4C_ROUTING")
        try:
            self.key = loadPrivateKey(helper.keyFile)
        except (OSError, KeyFileError) as e:
            raise usage.UsageError(f"DIT4C_INSTANCE_KEY: {getattr(e, 'strerror', None) or e}") from None
        self.storage = None
        if helper.fileServer:
            from dit4c.storage import tap as storage

            arguments = ["--sshfs", self["sshfs"], *(["--owner", self["owner"]] if self["owner"] else [])]
            self.storage = _parsed(storage.Options(), arguments)
        self.helper = helper


def _parsed(options: usage.Options, arguments: list[str]) -> Any:
    options.parseOptions(arguments)
    return options


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from dit4c.auth import tap as auth
    from dit4c.podhelper.service import (
        PodHelperService,
        StorageAfterTool,
        instanceListener,
        onionListener,
    )

    helper = config.helper
    authService: Any = auth.makeService(config.auth, reactor)
    listener: Any = None
    # Each stream, or each connection from tor, straight to the auth proxy:
    # the factory its port uses. A tor, where the node gives one, instead
    # of its routing servers (as dit4c-helper-listener chooses).
    if helper.onion:
        listener = onionListener(reactor, helper, config.key, authService.listening.factory)
    elif helper.routing:
        listener = instanceListener(reactor, helper, config.key, authService.listening.factory)
    storage = None
    if config.storage is not None:
        from dit4c.storage import tap as storageTap

        pidFile = Path(config["tool-pid-file"]) if config["tool-pid-file"] else None
        storage = StorageAfterTool(reactor, storageTap.makeService(config.storage, reactor), pidFile, config["hold"])
    return PodHelperService(authService, listener, storage)
