"""
A DIT4C installation of separate processes, as a site runs it: ``twistd
dit4c-portal``, ``dit4c-routing``, ``dit4c-scheduler`` and ``dit4c-node``
(with the ``process`` runtime), each a real process that a test can kill
and start again with the same configuration. The scheduler and the node can
be put in a network namespace (behind NAT: they dial out, nothing dials in).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from pathlib import Path

from twisted.internet import reactor

from dit4c.common.keys import generate_private_key, jwks, save_private_key
from dit4c.node.process import freePort
from dit4c.node.processes import killRecorded
from dit4c.portal import security
from dit4c.portal.store import openStore
from dit4c.testing import TWISTD, Process, deferLater

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
    ) -> None:
        """
        :param netns: run the scheduler and the node (and so every pod) in
            this network namespace.
        :param hostAddress: where the namespace reaches the portal and the
            routing server's tunnel port (the host's end of its link).
        :param nodes: the compute nodes' names (the first one's process is
            ``node``, the others' ``node-<name>``).
        :param images: run an image server too, where the nodes save.
        """
        self.directory = directory
        self.netns = netns
        self.hostAddress = hostAddress
        self.nodes = nodes
        self.images = images
        self.portalPort, self.httpPort, self.tunnelPort, self.imagePort = (freePort() for _ in range(4))
        self.nodePorts = {name: freePort() for name in nodes}
        self.nodePort = self.nodePorts[nodes[0]]
        self.portal = f"http://localhost:{self.portalPort}"
        self.processes: dict[str, Process] = {}
        self._runs = 0
        self.schedulerId = ""
        self.imageId = ""

    # -- processes ---------------------------------------------------------------------------

    def _start(self, name: str, plugin: str, *args: str, netns: bool = False) -> Process:
        self._runs += 1
        command = [*TWISTD, "-n", "--pidfile=", plugin, *args]
        if netns and self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        process = Process(command, self.directory / f"{name}-{self._runs}.log")
        self.processes[name] = process
        return process

    def startPortal(self) -> Process:
        listen = ["--listen", f"tcp:{self.portalPort}:interface=127.0.0.1"]
        if self.hostAddress != "127.0.0.1":
            listen += ["--listen", f"tcp:{self.portalPort}:interface={self.hostAddress}"]
        if self.images:
            listen += ["--image-server-secret-file", str(self.directory / "image-server.secret")]
        return self._start(
            "portal", "dit4c-portal", *listen,
            "--data-dir", str(self.directory / "portal"),
            "--public-url", self.portal,
        )  # fmt: skip

    def startImages(self) -> Process:
        return self._start(
            "images", "dit4c-imageserver",
            "--listen", f"tcp:{self.imagePort}:interface={self.hostAddress}",
            "--data-dir", str(self.directory / "images"),
            "--portal", f"http://127.0.0.1:{self.portalPort}",
            "--secret-file", str(self.directory / "image-server.secret"),
            "--public-url", f"http://{self.hostAddress}:{self.imagePort}",
        )  # fmt: skip

    def nodeDirectory(self, name: str | None = None) -> Path:
        name = name or self.nodes[0]
        return self.directory / ("node" if name == self.nodes[0] else f"node-{name}")

    def startRouting(self) -> Process:
        return self._start(
            "routing", "dit4c-routing",
            "--tunnel", f"tcp:{self.tunnelPort}:interface={self.hostAddress}",
            "--http", f"tcp:{self.httpPort}:interface=127.0.0.1",
            "--domain", "localhost",
            "--jwks-url", f"http://127.0.0.1:{self.portalPort}/.well-known/jwks.json",
        )  # fmt: skip

    def startNode(self, name: str | None = None) -> Process:
        name = name or self.nodes[0]
        images = ["--image-server", f"http://{self.hostAddress}:{self.imagePort}"] if self.images else []
        return self._start(
            self.nodeDirectory(name).name, "dit4c-node",
            "--listen", f"tcp:{self.nodePorts[name]}",
            "--name", name,
            "--key", str(self.directory / f"{name}.pem"),
            "--scheduler-key", str(self.directory / "scheduler.jwks"),
            "--data-dir", str(self.nodeDirectory(name)),
            *images,
            "--portal", self.portal,
            "--portal-internal", f"http://{self.hostAddress}:{self.portalPort}",
            "--routing", f"tcp:host={self.hostAddress}:port={self.tunnelPort}",
            netns=True,
        )  # fmt: skip

    def startScheduler(self) -> Process:
        return self._start(
            "scheduler", "dit4c-scheduler",
            "--portal", f"ws://{self.hostAddress}:{self.portalPort}",
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

    async def start(self) -> None:
        """Everything up, with alice and bob registered and the notes tool in the catalogue."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.images:
            (self.directory / "image-server.secret").write_text(secrets.token_urlsafe(32))
        for name in ("scheduler", *self.nodes):
            key = generate_private_key()
            save_private_key(key, self.directory / f"{name}.pem")
            (self.directory / f"{name}.jwks").write_text(json.dumps(jwks(key)))
        await self.startPortal().waitForLog("portal listening", 30)
        store = await openStore(f"sqlite:///{self.directory / 'portal' / 'portal.db'}", reactor)
        try:
            for name in ("alice", "bob"):
                await store.createUser(name, password_hash=await security.hashPassword(PASSWORD))
            self.imageId = (await store.createImage("Notes", "dit4c/notes")).id
            schedulerKey = json.loads((self.directory / "scheduler.jwks").read_text())["keys"][0]
            self.schedulerId = (await store.createScheduler("cluster", json.dumps(schedulerKey))).id
        finally:
            await store.close()
        await self.startRouting().waitForLog("public http listening", 30)
        if self.images:
            await self.startImages().waitForLog("listening", 30)
        for name in self.nodes:
            await self.startNode(name).waitForLog("node link listening", 30)
        await self.startScheduler().waitForLog("channel to the portal open", 30)

    def kill(self, name: str) -> None:
        """Kill a server at once (SIGKILL), as a crash would."""
        process = self.processes[name]
        process.signal(signal.SIGKILL)
        process.proc.wait(10)

    #: What each server logs once it is up.
    READY = {
        "portal": "portal listening",
        "routing": "public http listening",
        "node": "node link listening",
        "scheduler": "channel to the portal open",
    }

    async def startAgain(self, name: str) -> Process:
        """Start a server (killed before) with the same configuration; fires once it is up."""
        process: Process = getattr(self, f"start{name.capitalize()}")()
        await process.waitForLog(self.READY[name], 60)
        return process

    async def instanceState(self, instance: str) -> tuple[str, str | None]:
        """The portal's state and URL of an instance, from its store."""
        store = await openStore(f"sqlite:///{self.directory / 'portal' / 'portal.db'}", reactor)
        try:
            record = await store.instanceById(instance)
            return record.state, record.url
        finally:
            await store.close()

    def nodeState(self, instance: str, node: str | None = None) -> str:
        """The node's state of an instance, from its record."""
        record = json.loads((self.nodeDirectory(node) / "pods" / instance / "instance.json").read_text())
        return str(record["state"])

    async def waitForStates(self, instance: str, state: str, timeout: float = 60) -> None:
        """Until the portal and the node agree that the instance is in ``state``."""
        for _ in range(int(timeout / 0.2)):
            if (await self.instanceState(instance))[0] == state and self.nodeState(instance) == state:
                return
            await deferLater(0.2)
        raise AssertionError(
            f"portal says {await self.instanceState(instance)}, node says {self.nodeState(instance)}; wanted {state}"
        )

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        for name in self.nodes:
            killRecorded(self.nodeDirectory(name))


class Namespace:
    """
    A network namespace behind NAT: a veth link to the host, addresses
    ``10.<n>.<m>.1`` (host) and ``.2`` (namespace), and a firewall in the
    namespace that drops every connection coming in (replies to its own
    outbound connections pass).
    """

    def __init__(self, name: str, subnet: str) -> None:
        self.name = name
        self.hostAddress = f"{subnet}.1"
        self.address = f"{subnet}.2"
        self.hostLink = f"{name[:8]}-h"
        self.link = f"{name[:8]}-n"

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        self.destroy()
        run = self._run
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.hostLink, "type", "veth", "peer", "name", self.link)
        run("ip", "link", "set", self.link, "netns", self.name)
        run("ip", "addr", "add", f"{self.hostAddress}/24", "dev", self.hostLink)
        run("ip", "link", "set", self.hostLink, "up")
        inside = ("ip", "netns", "exec", self.name)
        run(*inside, "ip", "addr", "add", f"{self.address}/24", "dev", self.link)
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

