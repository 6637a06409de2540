"""``twistd dit4c-helper-listener``: options and service construction."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python import usage

from dit4c.common.errors import HelperEnvironmentError, KeyFileError
from dit4c.common.helperenv import fromEnvironment
from dit4c.common.keys import loadPrivateKey
from dit4c.common.options import endpointList
from dit4c.common.tokens import INSTANCE_ID_RE, ROUTING_AUDIENCE
from dit4c.listener.nearest import NearestEndpoint
from dit4c.listener.service import ListenerService


class Options(usage.Options):
    synopsis = "[--routing ENDPOINT | --onion CONTROL_ENDPOINT] [--target ENDPOINT] [--key-file PATH --instance ID | --token-file PATH]"
    longdesc = (
        "Keep a tunnel open to a DIT4C routing server and forward every "
        "connection that arrives through it to a target endpoint (the auth "
        "helper, or any local web server). Every dial sends a new routing "
        "token (a fresh jti, a short lifetime): a routing server refuses a "
        "token it has seen. Run beside an instance, it reads the helper "
        "environment (DIT4C_INSTANCE, DIT4C_INSTANCE_KEY, DIT4C_PORTAL, "
        "DIT4C_ROUTING, DIT4C_AUTH; docs/protocols.md section 9): it signs "
        "its tokens with the instance key, and tells the portal the "
        "instance's public URL, signed, after every (re)connect. Run by "
        "hand, give --routing, --target, and --key-file with --instance (a "
        "key the routing server trusts, as 'dit4c jwks' prints it). If "
        "another listener takes the instance's name, it dials again: at "
        "once, then with a growing back-off while that keeps happening. "
        "With --onion (or DIT4C_ONION) it dials no routing server: it "
        "publishes the target as a Tor onion service through that tor's "
        "control port, and reports http://<name>.onion/ to the portal."
    )
    optParameters = [
        ["routing", None, None, "Client endpoint of the routing server's tunnel port: tcp:host=H:port=P, tls:H:P, or dit4c-ws:url=wss\\://H/.dit4c/tunnel; several, separated by spaces: the nearest (fastest to connect, at every reconnect). Default: $DIT4C_ROUTING."],
        ["key-file", None, None, "PEM private key to sign a fresh routing token with for every dial (kid: the key's RFC 7638 thumbprint, as 'dit4c jwks' prints it). Default: $DIT4C_INSTANCE_KEY (kid instance:<id>, as the portal publishes it)."],
        ["instance", None, None, "Instance id (the host name label) the tokens name. Default: $DIT4C_INSTANCE."],
        ["token-file", None, None, "Instead of signing: a file holding a routing token made elsewhere ('dit4c token'), read again at every dial. A token serves one dial only, so whatever writes the file must put a new one there before each; prefer --key-file."],
        ["target", None, None, "Client endpoint to forward each stream to, e.g. tcp:host=127.0.0.1:port=8888. Default: $DIT4C_AUTH."],
        ["onion", None, None, "Instead of a routing server: client endpoint of a tor's control port (tcp:host=127.0.0.1:port=9051, unix:path=/run/tor/control), where the target is published as an onion service. Default: $DIT4C_ONION (unless --routing is given)."],
        ["onion-key", None, None, "With --onion: file keeping the onion service's key (made at the first start, mode 0600), so that a restart keeps the same .onion name. Default: $DIT4C_STATE_DIR/onion-service.key; neither: a new name at every start."],
    ]

    def postOptions(self) -> None:
        self["helper"] = None
        if self["routing"] and self["onion"]:
            raise usage.UsageError("give --routing or --onion, not both")
        if os.environ.get("DIT4C_INSTANCE"):
            try:
                self["helper"] = fromEnvironment()
            except HelperEnvironmentError as e:
                raise usage.UsageError(str(e)) from None
            # What is given on the command line wins; else an onion service
            # where the node says so, else its routing servers.
            if not self["routing"] and not self["onion"]:
                self["onion"] = self["helper"].onion
            if not self["routing"] and not self["onion"] and self["helper"].routing:
                self["routing"] = list(self["helper"].routing)
            if not self["target"]:
                self["target"] = self["helper"].auth
        if self["onion"]:
            self._onionOptions()
            return
        for key in ("routing", "target"):
            if not self[key]:
                raise usage.UsageError(f"--{key} is required (or the helper environment)")
        if isinstance(self["routing"], str):
            self["routing"] = self["routing"].split()
        endpointList(self["routing"], server=False, option="routing")
        endpointList([self["target"]], server=False, option="target")
        self._tokenSource()

    def _onionOptions(self) -> None:
        """Settle the onion service's options: its tor, target, key file, and the instance key its URL report is signed with."""
        from dit4c.listener.onion import ONION_KEY_FILE

        helper = self["helper"]
        if not self["target"]:
            raise usage.UsageError("--target is required (or the helper environment)")
        endpointList([self["onion"]], server=False, option="onion")
        endpointList([self["target"]], server=False, option="target")
        if self["onion-key"] is None and helper is not None and helper.stateDir:
            self["onion-key"] = str(Path(helper.stateDir) / ONION_KEY_FILE)
        self["key"] = None
        if helper is not None:
            # The portal is told the URL, signed with the instance key.
            try:
                self["key"] = loadPrivateKey(helper.keyFile)
            except KeyFileError as e:
                raise usage.UsageError(f"DIT4C_INSTANCE_KEY: {e}") from None
            except OSError as e:
                raise usage.UsageError(f"DIT4C_INSTANCE_KEY: cannot read {helper.keyFile}: {e.strerror}") from None

    def _tokenSource(self) -> None:
        """Settle where tokens come from: ``key`` and ``instance`` (and ``scoped``), or ``token-file``."""
        helper = self["helper"]
        if self["token-file"]:
            if self["key-file"] or self["instance"]:
                raise usage.UsageError("give --token-file, or --key-file with --instance, not both")
            if not Path(self["token-file"]).is_file():
                raise usage.UsageError(f"--token-file: {self['token-file']} is not a file")
        elif not self["key-file"] and helper is None:
            raise usage.UsageError(
                "--key-file with --instance (or --token-file) is required (or the helper environment)"
            )
        if self["instance"] is None and helper is not None:
            self["instance"] = helper.instance
        if self["instance"] is not None and INSTANCE_ID_RE.fullmatch(self["instance"]) is None:
            raise usage.UsageError(f"--instance: not an instance id (a DNS label): {self['instance']!r}")
        if self["key-file"] and self["instance"] is None:
            raise usage.UsageError("--key-file needs --instance (the instance id the tokens name)")
        # A key given by hand is named by its thumbprint; the instance key by
        # the kid the portal publishes it under.
        self["scoped"] = not self["key-file"]
        keyFile, option = (self["key-file"], "--key-file") if self["key-file"] else (None, "DIT4C_INSTANCE_KEY")
        if keyFile is None and helper is not None:
            keyFile = helper.keyFile
        self["key"] = None
        if keyFile is not None:
            try:
                self["key"] = loadPrivateKey(keyFile)
            except KeyFileError as e:
                raise usage.UsageError(f"{option}: {e}") from None
            except OSError as e:
                raise usage.UsageError(f"{option}: cannot read {keyFile}: {e.strerror}") from None


class TokenFile:
    """
    Routing tokens from a file written by something else, read at every
    dial. A token the file still holds after it was sent is sent again (the
    routing server then refuses it and the listener backs off), with a
    warning that says what to do.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._last: str | None = None

    def __call__(self) -> str:
        token = Path(self.path).read_text().strip()
        if token == self._last:
            self.log.warn(
                "the token in {path} was sent before, and a routing server takes a token once: "
                "write a new one there for every dial, or sign with --key-file",
                path=self.path,
            )
        self._last = token
        return token


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    helper = config["helper"]
    if config["onion"]:
        return _onionService(config, reactor)
    onRegistered = None
    token: Callable[[], str]
    if config["token-file"]:
        token = TokenFile(config["token-file"])
    else:
        from dit4c.listener.report import routingToken

        audience = helper.routingAudience if helper is not None else ROUTING_AUDIENCE
        token = routingToken(
            config["key"], config["instance"], audience=audience, scoped=config["scoped"], clock=reactor
        )
    if helper is not None:
        from dit4c.listener.report import URLReporter

        reporter = URLReporter(reactor, helper.portalBase, helper.instance, config["key"])

        def onRegistered(welcome: dict[str, Any]) -> None:
            if welcome.get("url"):
                reporter.report(welcome["url"])

    listener = ListenerService(
        reactor,
        NearestEndpoint(reactor, [(d, clientFromString(reactor, d)) for d in config["routing"]]),
        clientFromString(reactor, config["target"]),
        token,
        onRegistered=onRegistered,
    )
    if helper is not None:
        from dit4c.listener.activity import ActivityReporter

        # Whether anyone uses the instance, for the portal's idle limit.
        ActivityReporter(reactor, listener, helper.portalBase, helper.instance, config["key"]).setServiceParent(listener)
    return listener


def _onionService(config: Options, reactor: Any) -> IService:
    """The target published as an onion service, its URL reported to the portal where a node runs the listener."""
    from dit4c.listener.onion import OnionActivity, OnionService

    helper = config["helper"]
    onPublished = None
    if helper is not None:
        from dit4c.listener.report import URLReporter

        onPublished = URLReporter(reactor, helper.portalBase, helper.instance, config["key"]).report
    service = OnionService(
        reactor,
        clientFromString(reactor, config["onion"]),
        clientFromString(reactor, config["target"]),
        keyFile=Path(config["onion-key"]) if config["onion-key"] else None,
        onPublished=onPublished,
    )
    if helper is not None:
        # Whether anyone uses the instance, for the portal's idle limit.
        OnionActivity(reactor, service, helper.portalBase, helper.instance, config["key"]).setServiceParent(service)
    return service
