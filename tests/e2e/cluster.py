"""
A DIT4C installation of separate processes, as a site runs it: ``twistd
dit4c-portal``, ``dit4c-routing``, ``dit4c-scheduler`` and ``dit4c-node``
(with the ``process`` runtime), and optionally ``dit4c-imageserver`` and
``dit4c-fileserver`` (whose storage every pod then mounts), each a real
process that a test can kill and start again with the same configuration.
The scheduler and the node can be put in a network namespace (behind NAT:
they dial out, nothing dials in). The same installation can be had as one
``twistd dit4c-dev`` process instead (``allInOne``), for a test that treats
both alike.

Every server listens on port 0 and the harness reads back the port it got
(``Process.port``), starting them in order so that each is given the ports
of those before it. The portal, whose public URL names its own port, is
handed a socket the harness bound on port 0 (systemd's socket activation:
``--listen systemd:domain=INET:index=0``). A server started again (the
fault tests kill them) comes back on the ports it had: instance URLs and
OAuth redirect URIs name them.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows import DEV_ATTRIBUTES, devArguments, devPorts, devSockets, handOver
from support.hostnet import BRIDGE, BRIDGE_ADDRESS, BRIDGE_PREFIX, bridgeHeld
from support.passwords import cheapHash
from support.processes import TWISTD, Process
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.keys import generatePrivateKey, jwks, savePrivateKey
from dit4c.common.listening import listeningSocket
from dit4c.node.processes import killRecorded
from dit4c.portal.store import openStore

PASSWORD = "correct horse battery"


class Cluster:
    def __init__(
        self,
        directory: Path,
        *,
        netns: str | None = None,
        hostAddress: str = "127.0.0.1",
        nodes: tuple[str, ...] = ("n1",),
        images: bool = False,
        files: bool = False,
        nodeOptions: tuple[str, ...] = (),
        catalogue: Mapping[str, str] | None = None,
        allInOne: bool = False,
        portalOptions: tuple[str, ...] = (),
        routingDomains: tuple[str, ...] = ("localhost",),
    ) -> None:
        """
        :param netns: run the scheduler and the node (and so every pod) in
            this network namespace.
        :param hostAddress: where the namespace reaches the portal and the
            routing server's tunnel port (the host's end of its link).
        :param nodes: the compute nodes' names (the first one's process is
            ``node``, the others' ``node-<name>``).
        :param images: run an image server too, where the nodes save.
        :param files: run a file server too, whose storage every pod mounts.
        :param nodeOptions: more options for every node (``--tools FILE``,
            ``--stop-grace``, ``--upload-command``; ``dit4c-dev`` takes them too).
        :param catalogue: more catalogue entries (name → image reference),
            their ids in :attr:`imageIds`.
        :param allInOne: one ``twistd dit4c-dev`` process (``dev``) instead
            of separate servers: with an image server and a file server, and
            one node.
        :param portalOptions: more options for the portal (``--cull-interval``).
        :param routingDomains: one routing server for each, serving that
            domain: the first is ``routing``, the others ``routing2``,
            ``routing3``...; every node dials them all (the nearest
            first), and with more than one the portal is told them all
            (``--routing-domain``).
        """
        self.directory = directory
        self.portalOptions = portalOptions
        self.netns = netns
        self.hostAddress = hostAddress
        self.nodes = nodes
        self.allInOne = allInOne
        self.images = images or allInOne
        self.files = files or allInOne
        self.nodeOptions = nodeOptions
        self.catalogue = dict(catalogue or {})
        #: The ports each server got (0 until it first listens), which it keeps when started again.
        #: The portal's on loopback (its public URL's), and where the namespace reaches it.
        self.portalPort = self.portalHostPort = 0
        self.httpPort = self.tunnelPort = self.imagePort = self.filePort = 0
        self.nodePorts = {name: 0 for name in nodes}
        self.routingDomains = routingDomains
        #: Each routing server's (public HTTP, tunnel) ports; the first's are also ``httpPort``, ``tunnelPort``.
        self.routingPorts = {name: (0, 0) for name in self.routingNames}
        self.processes: dict[str, Process] = {}
        #: dit4c-dev's listening sockets by name, once it first starts (see :meth:`startDev`).
        self.devSockets: dict[str, Any] = {}
        self._runs = 0
        self.schedulerId = ""
        self.imageId = ""
        #: Image reference → catalogue id, of every catalogue entry made here.
        self.imageIds: dict[str, str] = {}

    # -- processes ---------------------------------------------------------------------------

    @property
    def portal(self) -> str:
        """The portal's public URL."""
        return f"http://localhost:{self.portalPort}"

    @property
    def nodePort(self) -> int:
        """The first node's port."""
        return self.nodePorts[self.nodes[0]]

    def _start(
        self, name: str, plugin: str, *args: str, netns: bool = False,
        sockets: list[Any] | None = None, socketNames: list[str] | None = None,
    ) -> Process:  # fmt: skip
        self._runs += 1
        command = [*TWISTD, "-n", "--pidfile=", plugin, *args]
        if netns and self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        process = Process(
            command, self.directory / f"{name}-{self._runs}.log", sockets=sockets or [], socketNames=socketNames or []
        )
        self.processes[name] = process
        return process

    def startPortal(self) -> Process:
        # Its public URL names its port: the port is had before it starts,
        # from a socket bound here (on port 0 the first time) and handed over.
        sockets = [listeningSocket("127.0.0.1", self.portalPort)]
        listen = ["--listen", "systemd:domain=INET:index=0"]
        if self.hostAddress != "127.0.0.1":
            sockets.append(listeningSocket(self.hostAddress, self.portalHostPort))
            listen += ["--listen", "systemd:domain=INET:index=1"]
        self.portalPort, self.portalHostPort = (sock.getsockname()[1] for sock in (sockets[0], sockets[-1]))
        if self.images:
            listen += ["--image-server-secret-file", str(self.directory / "image-server.secret")]
        if self.files:
            listen += ["--file-server-secret-file", str(self.directory / "file-server.secret")]
        return self._start(
            "portal", "dit4c-portal", *listen,
            "--data-dir", str(self.directory / "portal"),
            "--public-url", self.portal, *self.portalOptions,
            *(f"--routing-domain={domain}" for domain in self.routingDomains if len(self.routingDomains) > 1),
            sockets=sockets,
        )  # fmt: skip

    def startImages(self) -> Process:
        # Its public URL (where nodes fetch saved images): http://<host address>:<the port it got>.
        return self._start(
            "images", "dit4c-imageserver",
            "--listen", f"tcp:{self.imagePort}:interface={self.hostAddress}",
            "--data-dir", str(self.directory / "images"),
            "--portal", f"http://127.0.0.1:{self.portalPort}",
            "--secret-file", str(self.directory / "image-server.secret"),
        )  # fmt: skip

    def startFiles(self) -> Process:
        return self._start(
            "files", "dit4c-fileserver",
            "--listen", f"tcp:{self.filePort}:interface={self.hostAddress}",
            "--data-dir", str(self.directory / "files"),
            "--portal", f"http://127.0.0.1:{self.portalPort}",
            "--secret-file", str(self.directory / "file-server.secret"),
        )  # fmt: skip

    def startDev(self) -> Process:
        # Handed a listening socket for each part, held here while the
        # installation lives: started again, it is handed the same ones, so
        # its ports are never free for another process to take meanwhile.
        if not self.devSockets:
            self.devSockets = devSockets()
        ports = {option: getattr(self, attribute) for option, attribute in DEV_ATTRIBUTES.items()}
        return self._start("dev", *devArguments(self.directory / "dev", ports, *self.nodeOptions), **handOver(self.devSockets))

    def nodeDirectory(self, name: str | None = None) -> Path:
        name = name or self.nodes[0]
        return self.directory / ("node" if name == self.nodes[0] else f"node-{name}")

    @property
    def routingNames(self) -> tuple[str, ...]:
        """The routing servers' process names, one for each of ``routingDomains``."""
        return tuple("routing" if i == 0 else f"routing{i + 1}" for i in range(len(self.routingDomains)))

    def startRouting(self, name: str = "routing") -> Process:
        httpPort, tunnelPort = self.routingPorts[name]
        return self._start(
            name, "dit4c-routing",
            "--tunnel", f"tcp:{tunnelPort}:interface={self.hostAddress}",
            "--http", f"tcp:{httpPort}:interface=127.0.0.1",
            "--domain", self.routingDomains[self.routingNames.index(name)],
            "--jwks-url", f"http://127.0.0.1:{self.portalPort}/.well-known/jwks.json",
        )  # fmt: skip

    def startNode(self, name: str | None = None) -> Process:
        name = name or self.nodes[0]
        images = ["--image-server", f"http://{self.hostAddress}:{self.imagePort}"] if self.images else []
        if self.files:
            images += [
                "--file-server", f"{self.hostAddress}:{self.filePort}",
                "--file-server-host-key", str(self.directory / "files" / "host_key.pub"),
            ]  # fmt: skip
        return self._start(
            self.nodeDirectory(name).name, "dit4c-node",
            "--listen", f"tcp:{self.nodePorts[name]}",
            "--name", name,
            "--key", str(self.directory / f"{name}.pem"),
            "--scheduler-key", str(self.directory / "scheduler.jwks"),
            "--data-dir", str(self.nodeDirectory(name)),
            *images,
            "--portal", self.portal,
            "--portal-internal", f"http://{self.hostAddress}:{self.portalHostPort}",
            *(
                argument
                for _, tunnelPort in self.routingPorts.values()
                for argument in ("--routing", f"tcp:host={self.hostAddress}:port={tunnelPort}")
            ),
            *self.nodeOptions,
            netns=True,
        )  # fmt: skip

    def startScheduler(self) -> Process:
        return self._start(
            "scheduler", "dit4c-scheduler",
            "--portal", f"ws://{self.hostAddress}:{self.portalHostPort}",
            "--id", self.schedulerId,
            "--key", str(self.directory / "scheduler.pem"),
            *(
                argument
                for name in self.nodes
                for argument in (
                    "--node",
                    f"name={name},url=ws://127.0.0.1:{self.nodePorts[name]},key={self.directory / f'{name}.jwks'}",
                )
            ),
            netns=True,
        )  # fmt: skip

    @property
    def servers(self) -> tuple[str, ...]:
        """The names of the processes this installation runs, in the order they start."""
        if self.allInOne:
            return ("dev",)
        extra = (("images",) if self.images else ()) + (("files",) if self.files else ())
        nodes = tuple(self.nodeDirectory(name).name for name in self.nodes)
        return ("portal", *self.routingNames, *extra, *nodes, "scheduler")

    @property
    def dataDirectory(self) -> Path:
        """Where the portal, the image server and the file server keep their data (``portal/``, ``images/``, ``files/``)."""
        return self.directory / "dev" if self.allInOne else self.directory

    def podsDirectory(self, node: str | None = None) -> Path:
        """Where a node keeps its pods (``<pods>/<instance>/``)."""
        if self.allInOne:
            return self.directory / "dev" / "node"
        return self.nodeDirectory(node) / "pods"

    def openStore(self) -> Any:
        """The portal's store (SQLite, shared with the running portal); close it after use."""
        return openStore(f"sqlite:///{self.dataDirectory / 'portal' / 'portal.db'}", reactor)

    async def start(self) -> None:
        """Everything up, with alice and bob registered and the notes tool (and ``catalogue``) in the catalogue."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.allInOne:
            await self._up("dev", self.startDev(), 60)
        else:
            await self._startServers()
        store = await self.openStore()
        try:
            for name in ("alice", "bob"):
                await store.createUser(name, password_hash=cheapHash(PASSWORD))
            self.imageId = (await store.createImage("Notes", "dit4c/notes")).id
            for label, ref in self.catalogue.items():
                self.imageIds[ref] = (await store.createImage(label, ref)).id
        finally:
            await store.close()

    async def _startServers(self) -> None:
        for secret in (["image-server.secret"] if self.images else []) + (["file-server.secret"] if self.files else []):
            (self.directory / secret).write_text(secrets.token_urlsafe(32))
        for name in ("scheduler", *self.nodes):
            key = generatePrivateKey()
            savePrivateKey(key, self.directory / f"{name}.pem")
            (self.directory / f"{name}.jwks").write_text(json.dumps(jwks(key)))
        await self._up("portal", self.startPortal())
        store = await self.openStore()
        try:
            schedulerKey = json.loads((self.directory / "scheduler.jwks").read_text())["keys"][0]
            self.schedulerId = (await store.createScheduler("cluster", json.dumps(schedulerKey))).id
        finally:
            await store.close()
        # In order: each is given the ports of those before it.
        for name in self.routingNames:
            await self._up(name, self.startRouting(name))
        if self.images:
            await self._up("images", self.startImages())
        if self.files:
            # Before the nodes: they pin its host key, made as it first starts.
            await self._up("files", self.startFiles())
        for name in self.nodes:
            await self._up("node", self.startNode(name), node=name)
        await self._up("scheduler", self.startScheduler())

    async def _up(self, name: str, process: Process, timeout: float = 30, node: str | None = None) -> Process:
        """
        Until the server ``name`` is up; the ports it got, read back from its
        log: learnt the first time, the same ever after.
        """
        await process.waitForLog(self.READY["routing" if name in self.routingNames else name], timeout)
        if name == "scheduler":
            # Up for instances only once linked to its nodes: a start before that finds no room.
            for node in self.nodes:
                await process.waitForLog(f"linked to node {node} ", timeout)
        got: dict[str, int] = {}
        if name == "portal":
            got["portalPort"] = process.port("portal", host="127.0.0.1")
        elif name in self.routingNames:
            ports = (process.port("public http"), process.port("tunnel", host=self.hostAddress))
            assert self.routingPorts[name] in ((0, 0), ports), f"{name} came back on ports {ports}"
            self.routingPorts[name] = ports
            if name == "routing":
                got["httpPort"], got["tunnelPort"] = ports
        elif name == "images":
            got["imagePort"] = process.port("image server")
        elif name == "files":
            got["filePort"] = process.port(r"file server \(SFTP\)")
        elif name == "dev":
            ports = await devPorts(process)
            got = {DEV_ATTRIBUTES[option]: port for option, port in ports.items()}
        elif name == "node":
            node = node or self.nodes[0]
            port = process.port("node link")
            assert self.nodePorts[node] in (0, port), f"node {node} came back on port {port}"
            self.nodePorts[node] = port
        for attribute, port in got.items():
            assert getattr(self, attribute) in (0, port), f"{name} came back on port {port} ({attribute})"
            setattr(self, attribute, port)
        return process

    def kill(self, name: str) -> None:
        """Kill a server at once (SIGKILL), as a crash would."""
        process = self.processes[name]
        process.signal(signal.SIGKILL)
        process.proc.wait(10)

    #: What each server logs once it is up.
    READY = {
        "portal": "portal listening",
        "routing": "public http listening",
        "images": "image server listening",
        "files": r"file server \(SFTP\) listening",
        "node": "node link listening",
        "scheduler": "channel to the portal open",
        "dev": "DIT4C is up",
    }

    async def startAgain(self, name: str) -> Process:
        """
        Start a server (killed before) with the same configuration; fires
        once it is up (a node: once the scheduler is linked to it again, as
        until then it takes no instance).
        """
        scheduler = self.processes.get("scheduler") if name == "node" and self.running("scheduler") else None
        mark = len(scheduler.log()) if scheduler is not None else 0
        start = self.startRouting(name) if name in self.routingNames else getattr(self, f"start{name.capitalize()}")()
        process = await self._up(name, start, 60)
        if scheduler is not None:
            await scheduler.waitForLog(f"linked to node {self.nodes[0]} ", 60, start=mark)
        return process

    def running(self, name: str) -> bool:
        """Whether the server ``name`` runs (it was started and has not ended)."""
        process = self.processes.get(name)
        return process is not None and process.proc.poll() is None

    async def addAdministrator(self, name: str = "root") -> None:
        """An administrator, who logs in with :data:`PASSWORD`."""
        store = await self.openStore()
        try:
            await store.createUser(name, password_hash=cheapHash(PASSWORD), is_admin=True)
        finally:
            await store.close()

    async def apiToken(self, user: str, **fields: Any) -> str:
        """A personal API token of ``user``, a person made (with ``fields``: ``max_instances=1``) if new."""
        store = await self.openStore()
        try:
            record = await store.userByName(user)
            if record is None:
                record = await store.createUser(user, **fields)
            return str((await store.createApiToken(record.id, "tests"))[1])
        finally:
            await store.close()

    async def instanceState(self, instance: str) -> tuple[str, str | None]:
        """The portal's state and URL of an instance, from its store."""
        store = await self.openStore()
        try:
            record = await store.instanceById(instance)
            return record.state, record.url
        finally:
            await store.close()

    def nodeState(self, instance: str, node: str | None = None) -> str:
        """The node's state of an instance, from its record."""
        record = json.loads((self.podsDirectory(node) / instance / "instance.json").read_text())
        return str(record["state"])

    def nodeRecord(self, instance: str, node: str | None = None) -> dict[str, Any] | None:
        """The node's record of an instance, or None if it holds none."""
        try:
            record: dict[str, Any] = json.loads((self.podsDirectory(node) / instance / "instance.json").read_text())
        except FileNotFoundError:
            return None
        return record

    async def waitForStates(self, instance: str, state: str, timeout: float = 60) -> None:
        """Until the portal and the node agree that the instance is in ``state``."""

        async def agreed() -> bool:
            return (await self.instanceState(instance))[0] == state and self.nodeState(instance) == state

        try:
            await eventually(agreed, timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"portal says {await self.instanceState(instance)}, node says {self.nodeState(instance)}; wanted {state}"
            ) from None

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        for sock in self.devSockets.values():
            sock.close()
        for name in self.nodes:
            killRecorded(self.podsDirectory(name))


class Namespace:
    """
    A network namespace behind NAT: a veth link to the host, and a firewall
    in the namespace that drops every connection coming in (replies to its
    own outbound connections pass).

    Where the run holds podman's bridge up (``support.hostnet``), the link
    is a port of that bridge: the host is the bridge's address and the
    namespace ``10.88.254.<n>``, so the host gains no address (which would
    end every browser's requests in flight). Elsewhere the link has
    addresses of its own: ``10.231.<n>.1`` (host) and ``.2`` (namespace).
    """

    def __init__(self, name: str, number: int) -> None:
        self.name = name
        self.hostLink = f"{name[:8]}-h"
        self.link = f"{name[:8]}-n"
        self.bridge = BRIDGE if bridgeHeld() else None
        if self.bridge:
            self.hostAddress, self.address, self.prefix = BRIDGE_ADDRESS, f"10.88.254.{number}", BRIDGE_PREFIX
        else:
            self.hostAddress, self.address, self.prefix = f"10.231.{number}.1", f"10.231.{number}.2", 24

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        self.destroy()
        run = self._run
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.hostLink, "type", "veth", "peer", "name", self.link)
        run("ip", "link", "set", self.link, "netns", self.name)
        if self.bridge:
            run("ip", "link", "set", self.hostLink, "master", self.bridge)
        else:
            run("ip", "addr", "add", f"{self.hostAddress}/{self.prefix}", "dev", self.hostLink)
        run("ip", "link", "set", self.hostLink, "up")
        inside = ("ip", "netns", "exec", self.name)
        run(*inside, "ip", "addr", "add", f"{self.address}/{self.prefix}", "dev", self.link)
        run(*inside, "ip", "link", "set", self.link, "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "route", "add", "default", "via", self.hostAddress)
        # Behind NAT: nothing from outside may open a connection in here.
        rules = (
            "*filter\n"
            ":INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A INPUT -i lo -j ACCEPT\n"
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
            "-A INPUT -j DROP\n"
            "COMMIT\n"
        )
        subprocess.run([*inside, "iptables-restore"], input=rules.encode(), check=True, capture_output=True, timeout=30)

    def destroy(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.hostLink], capture_output=True, timeout=30)


def namespacesUnavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "network namespaces need root"
    for program in ("ip", "iptables-restore"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


__all__ = ["Cluster", "Namespace", "PASSWORD", "namespacesUnavailable"]

