"""``twistd dit4c-routing``: options and service construction."""

from __future__ import annotations

import resource
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.options import endpointList, positiveFloat, positiveInt, verifierFromOptions
from dit4c.common.tokens import ROUTING_MAX_LIFETIME
from dit4c.routing.admin import adminSite
from dit4c.routing.front import FrontLimits
from dit4c.routing.replay import SeenTokens
from dit4c.routing.server import RoutingServer
from dit4c.tunnel.session import Settings


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a DIT4C routing server: listeners beside instances dial in over "
        "tunnels (TCP, TLS or WebSocket), and public HTTP(S) traffic for "
        "<instance>.<domain> is sent down the tunnel that owns that name. "
        "A tunnel token opens one tunnel only: it must carry a jti, live "
        "no longer than --max-token-lifetime, and not have been seen "
        "before. Every address is a Twisted endpoint string; options marked "
        "'repeatable' may be given several times."
    )
    optParameters = [
        ["domain", None, "localhost", "Instances get host names <instance>.<domain>."],
        ["public-url", None, None, "Template of the URL given to a tunnel, e.g. 'https://{host}/'. Default: from the first public endpoint."],
        ["jwks-url", None, None, "URL of the JWKS that verifies tunnel tokens (the portal's /.well-known/jwks.json)."],
        ["jwks-file", None, None, "File with the JWKS (or a PEM public key) that verifies tunnel tokens."],
        ["audience", None, "dit4c-routing", "Audience that tunnel tokens must name."],
        ["issuer", None, None, "Issuer that tunnel tokens must name (not checked if unset)."],
        ["max-token-lifetime", None, ROUTING_MAX_LIFETIME, "Seconds a tunnel token may live at most (exp - iat); longer ones are refused.", positiveFloat],
        ["max-seen-tokens", None, 100_000, "Most token ids (jti) remembered at once to refuse a second use (about 200 bytes each); past it new tunnels are refused until old ids expire.", positiveInt],
        ["admin", None, None, "Endpoint for /health and /metrics, e.g. tcp:9090:interface=127.0.0.1."],
        ["heartbeat", None, 10.0, "Seconds between tunnel heartbeats.", positiveFloat],
        ["timeout", None, 30.0, "Seconds of silence after which a tunnel is taken for dead.", positiveFloat],
        ["max-streams", None, 16384, "Most streams open at once on one tunnel.", positiveInt],
        ["max-connections", None, None, "Public connections held at once; more are answered 503 (default: the open-file limit, less a tenth kept for tunnels).", positiveInt],
        ["head-timeout", None, 10.0, "Seconds a client has to send a request head.", positiveFloat],
        ["idle-timeout", None, 60.0, "Seconds a keep-alive connection may sit idle.", positiveFloat],
        ["drain-timeout", None, 10.0, "Seconds running streams get to finish when stopping.", positiveFloat],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tunnel"] = []
        self["tunnel-websocket"] = []
        self["http"] = []
        self["https"] = []

    def opt_tunnel(self, value: str) -> None:
        """Endpoint for raw tunnels (TCP or TLS), e.g. tcp:8443. Repeatable."""
        self["tunnel"].append(value)

    def opt_tunnel_websocket(self, value: str) -> None:
        """Endpoint for tunnels over WebSocket (path /.dit4c/tunnel). Repeatable."""
        self["tunnel-websocket"].append(value)

    def opt_http(self, value: str) -> None:
        """Endpoint for public HTTP, e.g. tcp:80. Repeatable."""
        self["http"].append(value)

    def opt_https(self, value: str) -> None:
        """Endpoint for public HTTPS, e.g. ssl:443:privateKey=key.pem:certKey=cert.pem. Repeatable."""
        self["https"].append(value)

    def postOptions(self) -> None:
        if not (self["tunnel"] or self["tunnel-websocket"]):
            raise usage.UsageError("give at least one --tunnel or --tunnel-websocket endpoint")
        if not (self["http"] or self["https"]):
            raise usage.UsageError("give at least one --http or --https endpoint")
        if bool(self["jwks-url"]) == bool(self["jwks-file"]):
            raise usage.UsageError("give exactly one of --jwks-url and --jwks-file")
        if self["jwks-file"]:
            from dit4c.common.tokens import StaticKeySource

            try:
                StaticKeySource.fromFile(self["jwks-file"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--jwks-file: {e}") from None
        if self["timeout"] <= self["heartbeat"]:
            raise usage.UsageError("--timeout must be longer than --heartbeat")
        for key in ("tunnel", "tunnel-websocket", "http", "https"):
            endpointList(self[key], server=True, option=key)
        if self["admin"]:
            endpointList([self["admin"]], server=True, option="admin")


def connectionCap() -> int | None:
    """
    The public connections a routing server holds at most by default: its
    open-file limit (raised to the hard one, as it will be once it listens),
    less a tenth, at least 1,024, kept for tunnels, fetching keys and the
    admin endpoint; None where there is no limit.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return None
    return max(hard - max(1024, hard // 10), hard // 2)


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    settings = Settings(
        heartbeat=config["heartbeat"], timeout=config["timeout"], maxStreams=config["max-streams"]
    )
    limits = FrontLimits(
        headTimeout=config["head-timeout"], idleTimeout=config["idle-timeout"],
        maxConnections=config["max-connections"] or connectionCap(),
    )  # fmt: skip
    server = RoutingServer(
        reactor,
        verifierFromOptions(config, reactor),
        config["domain"],
        settings=settings,
        limits=limits,
        publicURL=config["public-url"],
        drainTimeout=config["drain-timeout"],
        maxTokenLifetime=config["max-token-lifetime"],
        seen=SeenTokens(reactor, maxEntries=config["max-seen-tokens"]),
    )
    for description in config["tunnel"]:
        server.addTunnelEndpoint(serverFromString(reactor, description))
    for description in config["tunnel-websocket"]:
        server.addTunnelWebSocketEndpoint(serverFromString(reactor, description))
    for description in config["http"]:
        server.addPublicEndpoint(serverFromString(reactor, description), "http")
    for description in config["https"]:
        server.addPublicEndpoint(serverFromString(reactor, description), "https")
    if config["admin"]:
        from dit4c.common.service import ListeningService

        ListeningService(serverFromString(reactor, config["admin"]), adminSite(server), "admin").setServiceParent(server)
    return server
