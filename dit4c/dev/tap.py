"""``twistd dit4c-dev``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dit4c.common.options import positiveFloat, positiveInt
from dit4c.dev.service import DevConfig, DevService
from dit4c.node.tap import toolTable


def _port(value: str) -> int:
    """A TCP port number; 0 for any free one."""
    try:
        port = int(value)
    except ValueError:
        raise usage.UsageError(f"{value!r} is not a port") from None
    if not 0 <= port <= 65535:
        raise usage.UsageError(f"{value} is not a port")
    return port


#: Each port option, and what the part on that port logs as it listens
#: (``<what> listening on IPv4Address(type='TCP', host=..., port=N)``, a
#: regular expression): with port 0, where to read the port it got.
PORTS = {
    "--portal-port": "portal",
    "--http-port": "public http",
    "--tunnel-port": "tunnel",
    "--image-port": "image server",
    "--file-port": r"file server \(SFTP\)",
}


class Options(usage.Options):
    synopsis = "[--data-dir DIR] [--portal-port N] [--http-port N] [--tunnel-port N] [--image-port N]"
    longdesc = (
        "Run all of DIT4C in one process on loopback: the portal "
        "(http://localhost:PORTAL-PORT), the routing server (instances at "
        "http://<id>.localhost:HTTP-PORT/; browsers send *.localhost to "
        "loopback), a scheduler, one compute node that runs each tool as "
        "local processes (or podman containers, --runtime podman), an image "
        "server for saved instances and a file server for each person's "
        "storage (when sshfs is installed). State is kept in the data "
        "directory (SQLite, keys, instances, images, files). On a fresh data directory it makes an administrator and "
        "prints the password once. Any port may be 0 (any free one): each part logs the port it got "
        "('portal listening on IPv4Address(..., port=N)', and 'public http', 'tunnel', 'image server', "
        "'file server (SFTP)'), and every URL names the ports got."
    )
    optParameters = [
        ["data-dir", None, "data/dev", "Directory for everything DIT4C keeps."],
        ["portal-port", None, 8000, "Loopback port of the portal (0: any free one).", _port],
        ["http-port", None, 8080, "Loopback port where instances are served (0: any free one).", _port],
        ["tunnel-port", None, 8001, "Loopback port listeners dial (0: any free one).", _port],
        ["image-port", None, 8002, "Loopback port of the image server, for saved instances (0: any free one).", _port],
        ["file-port", None, 8003, "Loopback port of the file server, each person's storage in their instances; needs sshfs (0: any free one).", _port],
        ["admin", None, "admin", "Name of the first administrator."],
        ["runtime", None, "process", "process (each tool as local processes) or podman (containers; add images to the catalogue at /admin/)."],
        ["podman-prefix", None, "dit4c-dev", "podman runtime: pods are named <prefix>-<instance>."],
        ["tools", None, None, "process runtime: JSON file of tools in place of the built-in ones (as twistd dit4c-node --tools); those named as built-in ones join the catalogue, add the others at /admin/."],
        ["capacity", None, 8, "Instances the compute node runs at once (each person may run their quota, 4 unless an administrator sets it).", positiveInt],
        ["stop-grace", None, None, "Seconds an instance's tool has to end after SIGTERM before it is killed (as twistd dit4c-node --stop-grace).", positiveFloat],
    ]

    def postOptions(self) -> None:
        ports = [self["portal-port"], self["http-port"], self["tunnel-port"], self["image-port"], self["file-port"]]
        chosen = [port for port in ports if port != 0]
        if len(set(chosen)) != len(chosen):
            raise usage.UsageError(
                "--portal-port, --http-port, --tunnel-port, --image-port and --file-port must differ (or be 0)"
            )
        if self["runtime"] not in ("process", "podman"):
            raise usage.UsageError("--runtime is process or podman")
        if self["tools"]:
            self["tools"] = toolTable(self["tools"])


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return DevService(
        reactor,
        DevConfig(
            dataDir=Path(config["data-dir"]).resolve(),
            portalPort=config["portal-port"],
            httpPort=config["http-port"],
            tunnelPort=config["tunnel-port"],
            imagePort=config["image-port"],
            filePort=config["file-port"],
            adminName=config["admin"],
            runtime=config["runtime"],
            podmanPrefix=config["podman-prefix"],
            tools=config["tools"] or None,
            stopGrace=config["stop-grace"],
            capacity=config["capacity"],
        ),
    )
