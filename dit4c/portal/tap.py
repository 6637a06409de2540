"""``twistd dit4c-portal``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.options import endpointList, positiveFloat, positiveInt, secretFromFile
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the DIT4C portal: the pages people log in to and run their "
        "instances from, the REST API (/api/v1/, described at "
        "/api/v1/openapi.json), the OAuth 2 server that guards instances, the "
        "scheduler channel (wss://PORTAL/.dit4c/channel), and the key "
        "directory (JWKS) every other component checks signatures against. "
        "Add the first administrator with 'dit4c user-add NAME --admin --data-dir DIR'."
    )
    optParameters = [
        ["data-dir", None, "data/portal", "Directory for the portal's keys (and SQLite database)."],
        ["database", None, None, "sqlite:///PATH or postgresql://USER@HOST/DB. Default: SQLite in the data directory."],
        ["public-url", None, "http://localhost:8000", "The portal's public base URL (https:// makes cookies Secure)."],
        ["login-limit", None, 10, "Failed logins from one address before its attempts are spaced out (1 s, doubling with each failure).", positiveInt],
        ["login-name-limit", None, 3, "The same, for one user name from one address.", positiveInt],
        ["login-max-delay", None, 900.0, "The longest wait between login attempts from one address, in seconds.", positiveFloat],
        ["login-window", None, 3600.0, "Seconds after an address's latest login attempt that its failures are forgotten.", positiveFloat],
        ["session-lifetime", None, 43200.0, "Seconds a login lasts.", positiveFloat],
        ["default-quota", None, 4, "Instances a person may run at once unless set for them.", positiveInt],
        ["login-providers", None, None, "JSON file of GitHub / OpenID Connect login providers (docs/protocols.md)."],
        ["image-server-secret-file", None, None, "File holding the secret the image server sends when it asks whether a request may go on."],
        ["file-server-secret-file", None, None, "File holding the secret the file server sends when it asks whose storage an instance may reach."],
        ["metrics", None, None, "Endpoint to serve Prometheus /metrics and /health on, e.g. tcp:9101:interface=127.0.0.1 (keep it off the public network)."],
        ["image-server", None, None, "The image server's base URL as the portal reaches it, where saved images uploaded as files go (none: no uploads)."],
        ["file-server", None, None, "The file server as the portal reaches it (host:port or tcp:host=H:port=P), for the Files page (none: no Files page)."],
        ["file-server-host-key", None, None, "The file server's SSH host key: its host_key.pub line, or that file."],
        ["upload-limit", None, 20 * 1024**3, "The largest saved image uploaded as a file, in bytes (default 20 GiB).", positiveInt],
        ["cull-interval", None, 30.0, "Seconds between looks for instances unused past their catalogue entry's idle limit.", positiveFloat],
    ]

    optFlags = [
        ["onion-urls", None, "Take an instance's URL at a Tor v3 onion service (http://<56 characters>.onion/) from its listener (dit4c-helper-listener --onion), besides <id>.<routing domain>."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["channel"] = []
        self["trusted-proxy"] = []
        self["routing-domain"] = []

    def opt_routing_domain(self, value: str) -> None:
        """A routing server's --domain: instances may then report only URLs at <id>.<one of these>. Repeatable; without it any domain is taken."""
        domain = value.strip().strip(".").lower()
        if not domain:
            raise usage.UsageError("--routing-domain: give a domain, e.g. r1.example.org")
        self["routing-domain"].append(domain)

    def opt_channel(self, value: str) -> None:
        """Extra endpoint where schedulers dial in (they can also use wss://PORTAL/.dit4c/channel). Repeatable."""
        self["channel"].append(value)

    def opt_trusted_proxy(self, value: str) -> None:
        """A reverse proxy whose X-Forwarded-For names the client: an address, a network (10.0.0.0/8) or 'unix'. Repeatable; without it X-Forwarded-For is ignored."""
        from dit4c.portal.security import TrustedProxies

        try:
            TrustedProxies([value])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy: {e}") from None
        self["trusted-proxy"].append(value)

    def opt_listen(self, value: str) -> None:
        """Endpoint to serve the portal on, e.g. tcp:8000:interface=127.0.0.1. Repeatable."""
        self["listen"].append(value)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:8000:interface=127.0.0.1"]
        endpointList(self["listen"], server=True, option="listen")
        self["public-url"] = self["public-url"].rstrip("/")
        if not self["public-url"].startswith(("http://", "https://")):
            raise usage.UsageError("--public-url must start with http:// or https://")
        if self["image-server"] and not self["image-server"].startswith(("http://", "https://")):
            raise usage.UsageError("--image-server must start with http:// or https://")
        endpointList(self["channel"], server=True, option="channel")
        if self["metrics"]:
            endpointList([self["metrics"]], server=True, option="metrics")
        self["image-server-secret"] = (
            secretFromFile(self["image-server-secret-file"], "image-server-secret-file")
            if self["image-server-secret-file"]
            else None
        )
        self["file-server-secret"] = (
            secretFromFile(self["file-server-secret-file"], "file-server-secret-file")
            if self["file-server-secret-file"]
            else None
        )
        if bool(self["file-server"]) != bool(self["file-server-host-key"]):
            raise usage.UsageError("--file-server and --file-server-host-key go together")
        if self["file-server"]:
            from dit4c.portal.fileclient import fileServerEndpoint, hostKeyFrom

            try:
                fileServerEndpoint(self["file-server"])
                hostKeyFrom(self["file-server-host-key"])
            except (ValueError, OSError) as e:
                raise usage.UsageError(f"--file-server: {e}") from None
        if self["login-providers"]:
            from dit4c.portal.upstream import ConfigError, providersFromFile

            try:
                self["login-providers"] = providersFromFile(self["login-providers"])
            except ConfigError as e:
                raise usage.UsageError(f"--login-providers: {e}") from None
        else:
            self["login-providers"] = []
        if not self["database"]:
            self["database"] = "sqlite:///" + str(Path(self["data-dir"]).resolve() / "portal.db")


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return PortalService(
        reactor,
        database=config["database"],
        dataDir=Path(config["data-dir"]),
        config=PortalConfig(
            publicURL=config["public-url"],
            loginLimit=config["login-limit"],
            loginNameLimit=config["login-name-limit"],
            loginMaxDelay=config["login-max-delay"],
            loginWindow=config["login-window"],
            trustedProxies=tuple(config["trusted-proxy"]),
            sessionLifetime=config["session-lifetime"],
            defaultQuota=config["default-quota"],
        ),
        endpoints=[serverFromString(reactor, e) for e in config["listen"]],
        channelEndpoints=[serverFromString(reactor, e) for e in config["channel"]],
        loginProviders=config["login-providers"],
        imageServerSecret=config["image-server-secret"],
        fileServerSecret=config["file-server-secret"],
        metricsEndpoint=serverFromString(reactor, config["metrics"]) if config["metrics"] else None,
        imageServer=config["image-server"],
        uploadLimit=config["upload-limit"],
        cullInterval=config["cull-interval"],
        fileServer=config["file-server"],
        fileServerHostKey=config["file-server-host-key"],
        onionURLs=bool(config["onion-urls"]),
        routingDomains=tuple(config["routing-domain"]),
    )
