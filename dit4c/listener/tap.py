"""``twistd dit4c-helper-listener``: options and service construction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString
from twisted.python import usage

from dit4c.common.helperenv import HelperEnvironmentError, fromEnvironment
from dit4c.common.keys import KeyFileError, load_private_key
from dit4c.common.options import endpointList
from dit4c.listener.nearest import NearestEndpoint
from dit4c.listener.service import ListenerService


class Options(usage.Options):
    synopsis = "[--routing ENDPOINT] [--target ENDPOINT] [--token-file PATH]"
    longdesc = (
        "Keep a tunnel open to a DIT4C routing server and forward every "
        "connection that arrives through it to a target endpoint (the auth "
        "helper, or any local web server). Run beside an instance, it reads "
        "the helper environment (DIT4C_INSTANCE, DIT4C_INSTANCE_KEY, "
        "DIT4C_PORTAL, DIT4C_ROUTING, DIT4C_AUTH; docs/protocols.md section 9): "
        "it signs its own routing token with the instance key at every "
        "connect, and tells the portal the instance's public URL, signed, "
        "after every (re)connect. Run by hand, give --routing, --target and "
        "--token-file (a routing token from the portal, read again at every "
        "reconnect, so it can be renewed while the listener runs)."
    )
    optParameters = [
        ["routing", None, None, "Client endpoint of the routing server's tunnel port: tcp:host=H:port=P, tls:H:P, or dit4c-ws:url=wss\\://H/.dit4c/tunnel; several, separated by spaces: the nearest (fastest to connect, at every reconnect). Default: $DIT4C_ROUTING."],
        ["token-file", None, None, "File holding a routing token (a JWT from the portal). Default: sign one with $DIT4C_INSTANCE_KEY."],
        ["target", None, None, "Client endpoint to forward each stream to, e.g. tcp:host=127.0.0.1:port=8888. Default: $DIT4C_AUTH."],
    ]

    def postOptions(self) -> None:
        self["helper"] = None
        if os.environ.get("DIT4C_INSTANCE"):
            try:
                self["helper"] = fromEnvironment()
            except HelperEnvironmentError as e:
                raise usage.UsageError(str(e)) from None
            if not self["routing"] and self["helper"].routing:
                self["routing"] = list(self["helper"].routing)
            if not self["target"]:
                self["target"] = self["helper"].auth
        for key in ("routing", "target"):
            if not self[key]:
                raise usage.UsageError(f"--{key} is required (or the helper environment)")
        if not self["token-file"] and self["helper"] is None:
            raise usage.UsageError("--token-file is required (or the helper environment)")
        if isinstance(self["routing"], str):
            self["routing"] = self["routing"].split()
        endpointList(self["routing"], server=False, option="routing")
        endpointList([self["target"]], server=False, option="target")
        if self["token-file"] and not Path(self["token-file"]).is_file():
            raise usage.UsageError(f"--token-file: {self['token-file']} is not a file")
        if self["helper"] is not None:
            try:
                self["key"] = load_private_key(self["helper"].keyFile)
            except KeyFileError as e:
                raise usage.UsageError(f"DIT4C_INSTANCE_KEY: {e}") from None


def tokenFromFile(path: str) -> Any:
    def read() -> str:
        return Path(path).read_text().strip()

    return read


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    helper = config["helper"]
    onRegistered = None
    if config["token-file"]:
        token = tokenFromFile(config["token-file"])
    else:
        from dit4c.listener.report import routingToken

        token = routingToken(config["key"], helper.instance, audience=helper.routingAudience, clock=reactor)
    if helper is not None:
        from dit4c.listener.report import URLReporter

        reporter = URLReporter(reactor, helper.portalBase, helper.instance, config["key"])

        def onRegistered(welcome: dict[str, Any]) -> None:
            if welcome.get("url"):
                reporter.report(welcome["url"])

    return ListenerService(
        reactor,
        NearestEndpoint(reactor, [(d, clientFromString(reactor, d)) for d in config["routing"]]),
        clientFromString(reactor, config["target"]),
        token,
        onRegistered=onRegistered,
    )
