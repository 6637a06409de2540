"""
The all-in-one service: portal, routing server, scheduler, one compute
node (``process`` runtime) and an image server (saved instances) in one
process, with the embedded defaults:
SQLite in a data directory, instance URLs under ``*.localhost`` (which
browsers send to loopback), and a catalogue of the tools this machine can
run.

Each part is the same code the separate servers run, joined as they would
be across machines: the scheduler dials the portal's channel over a real
WebSocket, the routing server checks tokens against the portal's JWKS over
HTTP, and each instance's helpers are real processes dialling the routing
server. Only the addresses are fixed to loopback.

Every port may be 0 (any free one): the service listens on each port
first, then makes its URLs (the portal's public URL, the instances' URLs,
the image server's, the routing server's tunnel address the node dials)
from the ports it got, and each part logs ``<what> listening on
IPv4Address(..., port=N)`` as the separate servers do. A part may also be
handed its listening socket by systemd's socket activation, named
``portal``, ``http``, ``tunnel``, ``image`` or ``file``
(``FileDescriptorName=``): it serves on that socket, whatever its port
option says.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from dit4c.common.keys import loadOrCreatePrivateKey, publicJWK
from dit4c.common.life import HOLDS_POD
from dit4c.common.listening import adopted, listeningSocket
from dit4c.common.tokens import JWKSKeySource, TokenVerifier
from dit4c.fileserver.service import FileServerService
from dit4c.imageserver.service import ImageServerService
from dit4c.node.interfaces import IRuntime
from dit4c.node.node import Node
from dit4c.node.process import ProcessRuntime, Tool, builtinTools
from dit4c.node.processes import STOP_GRACE
from dit4c.podhelper.forkserver import ForkServer
from dit4c.portal import security
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService
from dit4c.routing.server import RoutingServer
from dit4c.scheduler.channel import ChannelClient
from dit4c.scheduler.scheduler import Scheduler

__all__ = ["DevConfig", "DevService", "CATALOGUE"]

#: Catalogue entries for the built-in tools: tool name → what people see.
CATALOGUE = {
    "dit4c/notes": "Notes (a shared notepad)",
    "dit4c/static": "Static web site (the instance's files)",
    "jupyter/lab": "JupyterLab",
}

#: The tool images ``scripts/build-images`` makes (``images/``): image →
#: what people see. Under the podman runtime, each one built joins the catalogue.
PODMAN_CATALOGUE = {
    "localhost/dit4c/jupyterlab:latest": "JupyterLab",
    "localhost/dit4c/r-jupyterlab:latest": "R in JupyterLab (IRkernel)",
    "localhost/dit4c/code-server:latest": "code-server (VS Code in the browser)",
    "localhost/dit4c/desktop:latest": "Desktop in the browser (noVNC)",
}

SCHEDULER_NAME = "local"


@dataclass(frozen=True)
class DevConfig:
    """What ``dit4c-dev`` runs; every port on loopback, 0 for any free one."""

    dataDir: Path
    portalPort: int = 8000
    httpPort: int = 8080
    tunnelPort: int = 8001
    #: Loopback port of the image server (saved instances).
    imagePort: int = 8002
    #: Loopback port of the file server (each person's storage, mounted in their instances); None: none.
    filePort: int | None = 8003
    #: The host name browsers use; instances are ``<id>.<host>``.
    host: str = "localhost"
    #: The first administrator's name (made, with a password printed once, on a fresh data directory).
    adminName: str = "admin"
    tools: dict[str, Tool] | None = None
    #: ``process`` (local processes) or ``podman`` (containers; the catalogue is then the administrator's to fill).
    runtime: str = "process"
    #: Names the podman pods (``<prefix>-<instance>``): this service sees only its own.
    podmanPrefix: str = "dit4c-dev"
    #: Seconds a tool has to end after SIGTERM before it is killed (None: the runtime's default).
    stopGrace: float | None = None
    #: Instances the compute node runs at once.
    capacity: int = 8

    @property
    def publicURL(self) -> str:
        return f"http://{self.host}:{self.portalPort}"

    @property
    def internalURL(self) -> str:
        return f"http://127.0.0.1:{self.portalPort}"


class DevService(MultiService):
    log = Logger()

    def __init__(self, reactor: Any, config: DevConfig, *, out: Any = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.out: Any = out if out is not None else sys.__stdout__
        dataDir = config.dataDir
        # Shared storage needs sshfs (FUSE) to mount it in each instance.
        files = config.filePort is not None and shutil.which("sshfs") is not None
        if config.filePort is not None and not files:
            self.log.warn("shared storage is off: install sshfs to mount each person's storage in their instances")
        # Listen first, then make the URLs from the ports got (port 0: any free one).
        ports = {"portalPort": config.portalPort, "httpPort": config.httpPort, "tunnelPort": config.tunnelPort}
        ports["imagePort"] = config.imagePort
        if files and config.filePort is not None:
            ports["filePort"] = config.filePort
        sockets = _listenAll(reactor, ports)
        self.config = config = replace(config, **{name: sock.getsockname()[1] for name, sock in sockets.items()})
        endpoints: list[Any] = [adopted(reactor, sockets["portalPort"])]
        portalInternal = config.internalURL
        if config.runtime == "podman":
            # A pod's auth helper lives in the pod's network namespace, where
            # the host's loopback is out of reach; a UNIX socket is not.
            socketPath = (dataDir / "portal.sock").resolve()
            dataDir.mkdir(parents=True, exist_ok=True)
            endpoints.append(serverFromString(reactor, f"unix:{socketPath}:mode=600:lockfile=1"))
            portalInternal = f"unix:{socketPath}"
        # The image server proves itself to the portal with a secret they
        # share; in one process, a fresh one at every start will do.
        imageSecret = secrets.token_urlsafe(32)
        fileSecret = secrets.token_urlsafe(32) if files else None
        self.portal = PortalService(
            reactor,
            database="sqlite:///" + str((dataDir / "portal" / "portal.db").resolve()),
            dataDir=dataDir / "portal",
            config=PortalConfig(publicURL=config.publicURL),
            endpoints=endpoints,
            imageServerSecret=imageSecret,
            fileServerSecret=fileSecret,
            imageServer=f"http://127.0.0.1:{config.imagePort}",  # where saved images uploaded as files go
        )
        self.portal.setServiceParent(self)
        imageServer = f"http://127.0.0.1:{config.imagePort}"
        self.images = ImageServerService(
            reactor,
            endpoints=[adopted(reactor, sockets["imagePort"])],
            portal=config.internalURL,
            secret=imageSecret,
            dataDir=dataDir / "images",
            publicURL=imageServer,
        )
        self.images.setServiceParent(self)
        self.files: FileServerService | None = None
        if fileSecret is not None:
            self.files = FileServerService(
                reactor,
                endpoints=[adopted(reactor, sockets["filePort"])],
                dataDir=dataDir / "files",
                portal=config.internalURL,
                secret=fileSecret,
            )
            self.files.setServiceParent(self)
            # The portal's Files page reaches the same storage, the host key pinned.
            self.portal.fileServer, self.portal.fileServerHostKey = f"127.0.0.1:{config.filePort}", self.files.hostKeyLine
        keys = JWKSKeySource(
            f"{config.internalURL}/.well-known/jwks.json", reactor=reactor, min_refetch=0.5, refresh=60
        )
        self.routing = RoutingServer(
            reactor,
            TokenVerifier(keys, audience="dit4c-routing", clock=reactor),
            config.host,
        )
        self.routing.addTunnelEndpoint(adopted(reactor, sockets["tunnelPort"]))
        self.routing.addPublicEndpoint(adopted(reactor, sockets["httpPort"]), "http")
        self.routing.publicURL = f"http://{{host}}:{config.httpPort}/"
        self.routing.setServiceParent(self)
        runtime: IRuntime
        forks: ForkServer | None = None
        if config.runtime == "podman":
            from dit4c.node.interfaces import helperCommand
            from dit4c.node.podman import STOP_TIMEOUT, PodmanRuntime

            self.tools: dict[str, Tool] = {}
            stopTimeout = math.ceil(config.stopGrace) if config.stopGrace else STOP_TIMEOUT
            # The catalogue's images run their tools as a user of their own,
            # not root: the person's storage is mounted for every user.
            storage = helperCommand("dit4c-helper-storage", "--allow-other")
            runtime = PodmanRuntime(
                reactor, prefix=config.podmanPrefix, stopTimeout=stopTimeout, storageCommand=storage,
                workDirectory=dataDir / "podman",
            )  # fmt: skip
        else:
            self.tools = config.tools if config.tools is not None else builtinTools()
            runtime = ProcessRuntime(reactor, dataDir / "node", self.tools, stopGrace=config.stopGrace or STOP_GRACE)
            forks = runtime.forkServer
        self.node = Node(
            reactor,
            runtime,
            dataDir / "node",
            portal=config.publicURL,
            portalInternal=portalInternal,
            routing=(f"tcp:host=127.0.0.1:port={config.tunnelPort}",),
            imageServer=imageServer,
            helperForks=forks,
            fileServer=f"127.0.0.1:{config.filePort}" if self.files is not None else None,
            fileServerHostKey=self.files.hostKeyLine if self.files is not None else None,
            capacity=config.capacity,
        )
        self.node.setServiceParent(self)
        self.scheduler = Scheduler([self.node], reactor=reactor)
        self.scheduler.setServiceParent(self)
        self.channel: ChannelClient | None = None
        #: Fires once every part is up and the scheduler's channel is open.
        self.ready: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        """Stop every part; say which instances keep running (their pods outlive dit4c-dev)."""
        running = sorted(s.instance for s in self.node.instances() if s.state in HOLDS_POD)

        async def stop() -> None:
            await MultiService.stopService(self)
            if running:
                self.out.write(
                    f"\ndit4c-dev stopped; {len(running)} instance{'s' if len(running) != 1 else ''} keep"
                    f"{'s' if len(running) == 1 else ''} running ({', '.join(running)}): they are found again "
                    "when it starts. To stop them too, stop them in the portal first.\n"
                )
            else:
                self.out.write("\ndit4c-dev stopped; no instance is running.\n")
            self.out.flush()

        return Deferred.fromCoroutine(stop())

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())

        def failed(f: Any) -> None:
            self.log.failure("dit4c-dev could not start", f)
            if not self.ready.called:
                self.ready.errback(f)

        d.addErrback(failed)

    async def _start(self) -> None:
        await self.portal.ready
        store = self.portal.store
        await self._firstAdministrator(store)
        await self._catalogue(store)
        key = loadOrCreatePrivateKey(self.config.dataDir / "scheduler.key")
        scheduler = await self._registerScheduler(store, key)
        self.channel = ChannelClient(
            self.reactor,
            f"ws://127.0.0.1:{self.config.portalPort}",
            scheduler.id,
            key,
            self.scheduler,
            issuer=self.config.publicURL,
        )
        self.scheduler.channel = self.channel
        self.channel.setServiceParent(self)
        await self.channel.whenConnected()
        self.log.info(
            "DIT4C is up: open {url} (instances at http://<id>.{host}:{port}/)",
            url=self.config.publicURL,
            host=self.config.host,
            port=self.config.httpPort,
        )
        self.ready.callback(None)

    async def _firstAdministrator(self, store: Any) -> None:
        if await store.countUsers():
            return
        password = secrets.token_urlsafe(12)
        name = self.config.adminName
        await store.createUser(name, password_hash=await security.hashPassword(password), is_admin=True)
        # Straight to the terminal, once: never through the log.
        self.out.write(
            "\n"
            "  DIT4C's first administrator (shown only this once):\n"
            f"    user name: {name}\n"
            f"    password:  {password}\n"
            f"  Log in at {self.config.publicURL}/login\n"
            f"  (lost it? dit4c user-add NAME --admin --data-dir {self.config.dataDir / 'portal'})\n\n"
        )
        self.out.flush()

    async def _catalogue(self, store: Any) -> None:
        known = {image.ref for image in await store.listCatalogue()}
        for ref, label in CATALOGUE.items():
            if ref in self.tools and ref not in known:
                await store.createImage(label, ref)
                self.log.info("catalogue: added {label}", label=label)
        if self.config.runtime == "podman":
            for ref, label in PODMAN_CATALOGUE.items():
                if ref not in known and await _imageExists(ref):
                    await store.createImage(label, ref)
                    self.log.info("catalogue: added {label} ({ref})", label=label, ref=ref)

    async def _registerScheduler(self, store: Any, key: Any) -> Any:
        jwk = json.dumps(publicJWK(key))
        for scheduler in await store.listSchedulers():
            if scheduler.name == SCHEDULER_NAME:
                if scheduler.public_jwk != jwk or scheduler.disabled:
                    scheduler = await store.updateScheduler(scheduler.id, public_jwk=jwk, disabled=False)
                return scheduler
        return await store.createScheduler(SCHEDULER_NAME, jwk)


#: The option that moves each port, for the message when one is taken.
_PORT_OPTIONS = {
    "portalPort": ("--portal-port", "portal"),
    "httpPort": ("--http-port", "public HTTP"),
    "tunnelPort": ("--tunnel-port", "tunnel"),
    "imagePort": ("--image-port", "image server"),
    "filePort": ("--file-port", "file server"),
}


#: The name of each part's socket when sockets are handed over (``FileDescriptorName=`` of systemd's socket units).
SOCKET_NAMES = {"portalPort": "portal", "httpPort": "http", "tunnelPort": "tunnel", "imagePort": "image", "filePort": "file"}


def _handedOver(reactor: Any) -> dict[str, socket.socket]:
    """
    The listening sockets handed to this process by systemd's socket
    activation, by name (``LISTEN_FDNAMES``), through Twisted's ``systemd:``
    endpoint (which has taken them from the environment already). A part
    served on one stays on its port across restarts: the port is never free
    for another program to take while the service starts again.
    """
    found: dict[str, socket.socket] = {}
    for name in os.environ.get("LISTEN_FDNAMES", "").split(":"):
        if name not in SOCKET_NAMES.values() or name in found:
            continue
        try:
            endpoint = serverFromString(reactor, f"systemd:domain=INET:name={name}")
        except KeyError:
            continue  # named, but not handed to this process
        found[name] = socket.socket(fileno=endpoint.fileno)
    return found


def _listenAll(reactor: Any, ports: dict[str, int]) -> dict[str, Any]:
    """
    A listening loopback socket for each port: the one handed over for it
    (see :func:`_handedOver`), else one bound here (0: any free port); none
    left open if one fails, and then a one-line message that names the
    option to give instead (what a person reads when another program has
    the port).
    """
    handed = _handedOver(reactor)
    sockets: dict[str, Any] = {}
    try:
        for name, port in ports.items():
            given = handed.pop(SOCKET_NAMES[name], None)
            if given is not None:
                sockets[name] = given
                continue
            try:
                sockets[name] = listeningSocket(port=port)
            except CannotListenError as e:
                option, what = _PORT_OPTIONS[name]
                why = e.socketError.strerror if isinstance(e.socketError, OSError) else str(e.socketError)
                raise SystemExit(
                    f"dit4c-dev: cannot listen on 127.0.0.1:{port} for the {what} ({why}): "
                    f"another program has it, or dit4c-dev runs already. Give another port with "
                    f"{option} N (0 takes any free one)."
                ) from None
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    finally:
        for unused in handed.values():
            unused.close()
    return sockets


async def _imageExists(ref: str) -> bool:
    """Whether podman has the image ``ref`` (built by ``scripts/build-images``)."""
    from twisted.internet.utils import getProcessOutputAndValue

    from dit4c.node.podman import CONTAINERS_CONF

    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    try:
        _, _, code = await getProcessOutputAndValue("podman", ["image", "exists", ref], env=env)
    except OSError:
        return False
    return bool(code == 0)


def defaultDataDir() -> Path:
    return Path("data") / "dev"
