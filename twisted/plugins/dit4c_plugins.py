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
auth = ServiceMaker(
    "DIT4C auth helper", "dit4c.auth.tap", "Let only the people the portal allows reach an instance's tool.", "dit4c-helper-auth"
)
scheduler = ServiceMaker(
    "DIT4C scheduler", "dit4c.scheduler.tap", "Take instance commands from the portal and place them on compute nodes.", "dit4c-scheduler"
)
node = ServiceMaker(
    "DIT4C compute node", "dit4c.node.tap", "Run instances as pods (the tool and its helpers) for a scheduler.", "dit4c-node"
)
imageserver = ServiceMaker("DIT4C image server", "dit4c.imageserver.tap", "Store saved instance images, asking the portal about every request.", "dit4c-imageserver")
fileserver = ServiceMaker("DIT4C file server", "dit4c.fileserver.tap", "Serve each person's persistent storage (SFTP) to their instances.", "dit4c-fileserver")
storage = ServiceMaker("DIT4C storage helper", "dit4c.storage.tap", "Mount the instance owner's storage from the file server (sshfs).", "dit4c-helper-storage")
upload = ServiceMaker(
    "DIT4C upload helper", "dit4c.upload.tap", "Store a saved instance's image at the image server and report it, then exit.", "dit4c-helper-upload"
)
pod = ServiceMaker("DIT4C pod helper", "dit4c.podhelper.tap", "All of an instance's helpers (listener, auth, storage) in one process.", "dit4c-helper-pod")
dev = ServiceMaker(
    "DIT4C all in one", "dit4c.dev.tap", "Portal, routing, scheduler, a compute node, image and file servers in one process on loopback.", "dit4c-dev"
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
