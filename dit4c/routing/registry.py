"""
Which tunnel owns which host name.

A token names exactly one instance and the host name is derived from it, so
no tunnel can take another's name. A newer tunnel for the same instance
replaces the older one at once (new connections go to the new tunnel) while
the old one's streams finish: reconnecting leaves no gap of errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from dit4c.tunnel.errors import ErrorCode

if TYPE_CHECKING:
    from dit4c.tunnel.protocol import TunnelProtocol, TunnelServerProtocol
    from dit4c.tunnel.session import Session


class TunnelRegistry:
    log = Logger()

    def __init__(self, domain: str) -> None:
        self.domain = domain.lower().strip(".")
        self._suffix = "." + self.domain
        self._tunnels: dict[str, TunnelServerProtocol] = {}

    def __len__(self) -> int:
        return len(self._tunnels)

    def hostFor(self, instance: str) -> str:
        return instance + self._suffix

    def add(self, instance: str, tunnel: TunnelServerProtocol) -> None:
        old = self._tunnels.get(instance)
        self._tunnels[instance] = tunnel
        tunnel.closed.addCallback(self._closed, instance)
        self.log.info(
            "tunnel for {instance} from {peer} registered{replacing}",
            instance=instance,
            peer=tunnel.transport.getPeer(),
            replacing=" (replacing an older one)" if old is not None else "",
        )
        if old is not None and old.session is not None:
            old.session.goAway(ErrorCode.REPLACED, "a newer tunnel took this instance")

    def _closed(self, tunnel: TunnelProtocol, instance: str) -> None:
        if self._tunnels.get(instance) is tunnel:
            del self._tunnels[instance]
            self.log.info("tunnel for {instance} closed", instance=instance)

    def resolve(self, host: str) -> Session | None:
        """The session owning ``host`` (lower case, no port), if any."""
        if not host.endswith(self._suffix):
            return None
        label = host[: -len(self._suffix)]
        tunnel = self._tunnels.get(label)
        if tunnel is None:
            return None
        return tunnel.session

    def tunnels(self) -> list[TunnelServerProtocol]:
        return list(self._tunnels.values())
