"""Every DIT4C server as a twistd plugin, and the DIT4C endpoint parsers."""

from twisted.application.service import ServiceMaker

routing = ServiceMaker(
    "DIT4C routing server", "dit4c.routing.tap", "Route public HTTP(S) to instances through tunnels.", "dit4c-routing"
)
portal = ServiceMaker(
    "DIT4C portal", "dit4c.portal.tap", "Log people in, show their instances, guard them (OAuth 2), publish keys.", "dit4c-portal"
)
listener = ServiceMaker(
    "DIT4C listener helper", "dit4c.listener.tap", "Keep an instance's tunnel open to a routing server.", "dit4c-helper-listener"
)


def _endpointParsers() -> object:
    from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    @implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
    class WebSocketTunnelParser:
        """``dit4c-ws:url=wss\\://host/.dit4c/tunnel``: a tunnel carried over WebSocket."""

        prefix = "dit4c-ws"

        def parseStreamClient(self, reactor, *args, **kwargs):  # type: ignore[no-untyped-def]
            from dit4c.tunnel.websocket import WebSocketTunnelParser as _Parser

            return _Parser().parseStreamClient(reactor, *args, **kwargs)

    return WebSocketTunnelParser()


webSocketTunnelParser = _endpointParsers()
