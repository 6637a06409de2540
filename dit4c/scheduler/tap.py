"""``twistd dit4c-scheduler``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dit4c.common.errors import KeyFileError
from dit4c.common.keys import loadPrivateKey
from dit4c.common.options import endpointList
from dit4c.common.tokens import StaticKeySource


def parseNode(value: str) -> dict[str, str]:
    """``name=N,url=ws://host:port,key=FILE`` → its parts."""
    parts: dict[str, str] = {}
    for item in value.split(","):
        name, equals, setting = item.partition("=")
        if not equals or name.strip() not in ("name", "url", "key", "trust"):
            raise usage.UsageError(f"--node: expected name=...,url=...,key=..., not {value!r}")
        parts[name.strip()] = setting.strip()
    for required in ("url", "key"):
        if not parts.get(required):
            raise usage.UsageError(f"--node {value!r}: {required}= is required")
    if not parts["url"].startswith(("ws://", "wss://")):
        raise usage.UsageError(f"--node {value!r}: url must be ws:// or wss://")
    return parts


class Options(usage.Options):
    synopsis = "--portal URL --id ID --key FILE --node name=N,url=ws://H:P,key=FILE [...]"
    longdesc = (
        "Run a DIT4C scheduler: it dials the portal's scheduler channel "
        "(proving itself with its key, which an administrator registered at "
        "the portal), takes instance commands, places each new instance on "
        "the compute node with the most room, and reports states and keys "
        "back. It dials each node too (the node link), checking the node's "
        "public key. It accepts no connection itself, but for its figures "
        "(Prometheus /metrics and /health) if --metrics is given."
    )
    optParameters = [
        ["portal", None, None, "The portal's channel URL: wss://portal.example.org (or ws:// on loopback)."],
        ["id", None, None, "This scheduler's id, as the portal registered it."],
        ["key", None, None, "This scheduler's private key (PEM)."],
        ["issuer", None, None, "The portal's public URL, if its challenge must name it (default: trust the challenge)."],
        ["trust", None, None, "PEM file or directory of CA certificates for wss:// (default: the system's)."],
        ["node-grace", None, 60.0, "Seconds a node may be away before its instances are reported lost.", float],
        ["metrics", None, None, "Endpoint to serve Prometheus /metrics and /health on, e.g. tcp:9102:interface=127.0.0.1 (keep it off the public network)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["nodes"] = []

    def opt_node(self, value: str) -> None:
        """A compute node: name=N,url=ws://host:port,key=FILE (its public key, a JWKS or PEM file). Repeatable."""
        self["nodes"].append(parseNode(value))

    def postOptions(self) -> None:
        for option in ("portal", "id", "key"):
            if not self[option]:
                raise usage.UsageError(f"--{option} is required")
        if not self["nodes"]:
            raise usage.UsageError("at least one --node is required")
        try:
            self["private-key"] = loadPrivateKey(self["key"])
        except (OSError, KeyFileError) as e:
            raise usage.UsageError(f"--key: {e}") from None
        for node in self["nodes"]:
            try:
                node["keys"] = StaticKeySource.fromFile(node["key"])
            except (OSError, KeyFileError) as e:
                raise usage.UsageError(f"--node key={node['key']}: {e}") from None
        from dit4c.scheduler.channel import channelURL

        try:
            channelURL(self["portal"])
        except ValueError as e:
            raise usage.UsageError(f"--portal: {e}") from None
        if self["metrics"]:
            endpointList([self["metrics"]], server=True, option="metrics")


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from dit4c.node.remote import RemoteNode
    from dit4c.scheduler.channel import ChannelClient
    from dit4c.scheduler.scheduler import Scheduler

    scheduler = Scheduler(reactor=reactor)
    for spec in config["nodes"]:
        node = RemoteNode(
            reactor,
            spec["url"],
            config["id"],
            config["private-key"],
            spec["keys"],
            name=spec.get("name") or None,
            trustRoots=spec.get("trust") or config["trust"],
            grace=config["node-grace"],
        )
        node.setServiceParent(scheduler)
        scheduler.addNode(node)
    channel = ChannelClient(
        reactor,
        config["portal"],
        config["id"],
        config["private-key"],
        scheduler,
        issuer=config["issuer"],
        trustRoots=config["trust"],
    )
    scheduler.channel = channel
    channel.setServiceParent(scheduler)
    if config["metrics"]:
        from twisted.internet.endpoints import serverFromString

        from dit4c.common.adminsite import adminSite
        from dit4c.common.service import ListeningService

        metrics = scheduler.metrics
        ListeningService(
            serverFromString(reactor, config["metrics"]), adminSite(metrics, metrics.health), "scheduler metrics"
        ).setServiceParent(scheduler)
    return scheduler
