"""``twistd dit4c-fileserver``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.options import endpointList, positiveFloat, positiveInt, secretFromFile
from dit4c.common.portalhttp import isPortalAddress
from dit4c.fileserver.service import FileServerService
from dit4c.fileserver.sftp import MAX_HANDLES

#: The shortest secret accepted (the portal's rule).
DEFAULT_LISTEN = "tcp:8700:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "--portal URL --secret-file PATH [options]"
    longdesc = (
        "Run a DIT4C file server: each person's persistent storage, served "
        "over SFTP (SSH) to the storage helpers of their instances, which "
        "mount it with sshfs. An instance logs in with its id as the user "
        "name and its own key, which must be the key the portal publishes "
        "for it; the portal (POST <portal>/reports/file-access, with the "
        "secret shared with the portal's --file-server-secret-file) says "
        "whose storage it reaches. The SSH host key is made on first start "
        "in the data directory (host_key.pem; host_key.pub is what storage "
        "helpers pin)."
    )
    optParameters = [
        ["data-dir", None, "data/files", "Directory for the host key and each person's storage (users/<user id>/)."],
        ["portal", None, None, "The portal's URL as this server reaches it: http(s)://... (or unix:/path). Required."],
        ["secret-file", None, None, "File holding the secret shared with the portal (at least 16 characters). Required."],
        ["max-connections", None, 100, "Connections served at once; more are closed at once.", positiveInt],
        ["idle-timeout", None, 300.0, "Seconds a connection may send nothing before it is closed.", positiveFloat],
        ["login-timeout", None, 30.0, "Seconds a connection has to log in.", positiveFloat],
        ["max-open-files", None, MAX_HANDLES, "Files and directories one SFTP session may hold open.", positiveInt],
        ["portal-timeout", None, 10.0, "Seconds to wait for the portal's answer.", positiveFloat],
        ["access-cache", None, 30.0, "Seconds a connection may go on on the portal's last yes before it asks again.", positiveFloat],
        ["metrics", None, None, "Endpoint to serve Prometheus /metrics and /health on, e.g. tcp:9105:interface=127.0.0.1 (keep it off the public network)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """Endpoint to serve SSH on, e.g. tcp:8700:interface=127.0.0.1 (the default). Repeatable."""
        self["listen"].append(value)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        endpointList(self["listen"], server=True, option="listen")
        if self["metrics"]:
            endpointList([self["metrics"]], server=True, option="metrics")
        if not self["portal"]:
            raise usage.UsageError("--portal is required")
        if not isPortalAddress(self["portal"]):
            raise usage.UsageError("--portal must be an http:// or https:// URL (or unix:/path)")
        if not self["secret-file"]:
            raise usage.UsageError("--secret-file is required")
        self["secret"] = secretFromFile(self["secret-file"], "secret-file")


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return FileServerService(
        reactor,
        endpoints=[serverFromString(reactor, e) for e in config["listen"]],
        dataDir=config["data-dir"],
        portal=config["portal"],
        secret=config["secret"],
        maxConnections=config["max-connections"],
        idleTimeout=config["idle-timeout"],
        loginTimeout=config["login-timeout"],
        maxHandles=config["max-open-files"],
        portalTimeout=config["portal-timeout"],
        accessCache=config["access-cache"],
        metricsEndpoint=serverFromString(reactor, config["metrics"]) if config["metrics"] else None,
    )
