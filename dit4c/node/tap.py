"""``twistd dit4c-node``: options and service construction."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.errors import KeyFileError
from dit4c.common.keys import loadOrCreatePrivateKey
from dit4c.common.options import endpointList, positiveFloat, positiveInt
from dit4c.common.tokens import StaticKeySource

if TYPE_CHECKING:
    from dit4c.node.process import Tool


def toolTable(path: str) -> dict[str, Tool]:
    """The tool table in ``path`` (``--tools``), or a usage error saying what is wrong with it."""
    from dit4c.node.process import toolsFromFile

    try:
        return toolsFromFile(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--tools: {e}") from None


class Options(usage.Options):
    synopsis = "--scheduler-key FILE --portal URL (--routing ENDPOINT | --onion CONTROL_ENDPOINT) [options]"
    longdesc = (
        "Run a DIT4C compute node: it runs each instance as a pod (the tool "
        "and its helpers) through a runtime, for the scheduler that dials it "
        "(the node link, docs/protocols.md). The scheduler must prove itself "
        "with the key in --scheduler-key; the node proves itself with its "
        "own key (--key, made on first start; give the scheduler its public "
        "half: dit4c jwks KEY). Pods keep running while the node restarts, "
        "and it finds them again. Each instance is reached through a routing "
        "server (--routing) or, with --onion, as a Tor onion service of its "
        "own (the portal needs --onion-urls)."
    )
    optParameters = [
        ["listen", None, "tcp:8500:interface=127.0.0.1", "Endpoint the scheduler dials (ssl:... for wss://)."],
        ["name", None, "node", "The node's name, as the scheduler knows it."],
        ["key", None, None, "The node's private key (PEM); made if missing. Default: DATA-DIR/node.key."],
        ["scheduler-key", None, None, "The scheduler's public key: a JWKS/JWK file or a PEM key."],
        ["data-dir", None, "data/node", "Where pods keep their files."],
        ["runtime", None, "process", "process (local processes), podman (containers) or slurm (a batch job per instance on a Slurm cluster; --start-timeout counts from when the job runs)."],
        ["tools", None, None, "process and slurm runtimes: JSON file of tools (default: the built-in ones)."],
        ["tool-uids", None, None, "process runtime, a node run as root: FIRST-LAST, the uids (and gids) tools run as, one per instance; no account may use them (default: 1000000-1065535)."],
        ["containers-conf", None, None, "podman runtime: the containers.conf to use (default: the one DIT4C ships)."],
        ["slurm-partition", None, None, "slurm runtime: the partition jobs go to (default: the cluster's default partition)."],
        ["slurm-directory", None, None, "slurm runtime: the pods' directory, on storage the cluster's compute nodes share (default: DATA-DIR/pods)."],
        ["slurm-time-limit", None, 24 * 60, "slurm runtime: minutes each instance's job may run (sbatch --time).", positiveInt],
        ["portal", None, None, "The portal's public URL (where browsers log in)."],
        ["portal-internal", None, None, "The portal's URL as pods reach it (default: --portal)."],
        ["onion", None, None, "Instead of --routing: client endpoint of a tor's control port (tcp:host=127.0.0.1:port=9051, unix:path=/run/tor/control), where each pod publishes its instance as a Tor onion service (http://<name>.onion/, the same name after a resume; the portal needs --onion-urls). Each pod's listener dials it from where it runs: the node's network namespace for the process and podman runtimes (podman's listener runs on the host, not in the pod's namespace), the compute node Slurm picked for slurm (run a tor on each, at the same address)."],
        ["image-server", None, None, "The image server's base URL, where saved instances go (none: this node cannot save)."],
        ["file-server", None, None, "The file server (host:port) whose storage each pod mounts (needs sshfs)."],
        ["file-server-host-key", None, None, "The file server's SSH host key: a key line, or a file holding one."],
        ["capacity", None, 8, "Instances this node runs at once.", positiveInt],
        ["start-timeout", None, 300.0, "Seconds a tool has to answer after it starts.", positiveFloat],
        ["metrics", None, None, "Endpoint to serve Prometheus /metrics and /health on, e.g. tcp:9102:interface=127.0.0.1 (keep it off the public network)."],
        ["stop-grace", None, None, "Seconds a pod's tool has to end after SIGTERM (saving its work, say) before it is killed; default 5 (process runtime) or 10 (podman)", positiveFloat],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["routing"] = []

    def opt_routing(self, value: str) -> None:
        """Client endpoint of a routing server's tunnel port (tcp:host=H:port=P, tls:...). Repeatable."""
        self["routing"].append(value)

    def postOptions(self) -> None:
        for option in ("scheduler-key", "portal"):
            if not self[option]:
                raise usage.UsageError(f"--{option} is required")
        if not self["routing"] and not self["onion"]:
            raise usage.UsageError("--routing (or --onion) is required")
        if self["routing"] and self["onion"]:
            raise usage.UsageError("give --routing or --onion, not both: with --onion the pods dial no routing server")
        if self["runtime"] not in ("process", "podman", "slurm"):
            raise usage.UsageError("--runtime is process, podman or slurm")
        if not self["portal"].startswith(("http://", "https://")):
            raise usage.UsageError("--portal must be an http(s) URL")
        endpointList([self["listen"]], server=True, option="listen")
        if self["metrics"]:
            endpointList([self["metrics"]], server=True, option="metrics")
        endpointList(self["routing"], server=False, option="routing")
        if self["onion"]:
            endpointList([self["onion"]], server=False, option="onion")
        try:
            self["scheduler-keys"] = StaticKeySource.fromFile(self["scheduler-key"])
        except (OSError, KeyFileError) as e:
            raise usage.UsageError(f"--scheduler-key: {e}") from None
        if self["file-server"] and not self["file-server-host-key"]:
            raise usage.UsageError("--file-server needs --file-server-host-key (the host key is pinned)")
        if self["tool-uids"]:
            first, sep, last = self["tool-uids"].partition("-")
            if not sep or not first.isdigit() or not last.isdigit() or not 0 < int(first) <= int(last) < 2**32 - 1:
                raise usage.UsageError("--tool-uids is FIRST-LAST, e.g. 1000000-1065535")
            self["tool-uids"] = range(int(first), int(last) + 1)
        if self["tools"]:
            self["tools"] = toolTable(self["tools"])


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from dit4c.node.link import NodeLinkServer
    from dit4c.node.node import Node

    dataDir = Path(config["data-dir"]).resolve()
    dataDir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = loadOrCreatePrivateKey(config["key"] or dataDir / "node.key")
    pods = dataDir / "pods"
    runtime: Any
    forks = None
    if config["runtime"] == "slurm":
        from dit4c.node.slurm import SlurmRuntime

        if config["slurm-directory"]:
            pods = Path(config["slurm-directory"]).resolve()
        runtime = SlurmRuntime(
            reactor, pods, config["tools"] or None, partition=config["slurm-partition"],
            timeLimit=config["slurm-time-limit"], stopGrace=config["stop-grace"] or 5.0,
        )  # fmt: skip
    elif config["runtime"] == "podman":
        from dit4c.node.podman import STOP_TIMEOUT, PodmanRuntime

        stopTimeout = math.ceil(config["stop-grace"]) if config["stop-grace"] else STOP_TIMEOUT
        from dit4c.node.interfaces import helperCommand

        # Tools in images run as a user of their own, not root: the person's
        # storage is mounted for every user (the pods' directory is the node's alone).
        runtime = PodmanRuntime(
            reactor, containersConf=config["containers-conf"], stopTimeout=stopTimeout, workDirectory=dataDir / "podman",
            storageCommand=helperCommand("dit4c-helper-storage", "--allow-other"),
        )  # fmt: skip
    else:
        from dit4c.node.process import TOOL_UIDS, ProcessRuntime
        from dit4c.node.processes import STOP_GRACE

        runtime = ProcessRuntime(
            reactor, pods, config["tools"] or None,
            toolUids=config["tool-uids"] or TOOL_UIDS, stopGrace=config["stop-grace"] or STOP_GRACE,
        )  # fmt: skip
        forks = runtime.forkServer
    top = MultiService()
    node = Node(
        reactor,
        runtime,
        pods,
        name=config["name"],
        portal=config["portal"].rstrip("/"),
        portalInternal=(config["portal-internal"] or "").rstrip("/") or None,
        routing=tuple(config["routing"]),
        capacity=config["capacity"],
        startTimeout=config["start-timeout"],
        imageServer=(config["image-server"] or "").rstrip("/") or None,
        helperForks=forks,
        fileServer=config["file-server"],
        fileServerHostKey=config["file-server-host-key"],
    )
    node.onion = config["onion"]
    node.setServiceParent(top)
    if config["runtime"] == "slurm":
        from dit4c.node.slurm import showQueueWaits

        showQueueWaits(runtime, node)
    link = NodeLinkServer(reactor, node, key, config["scheduler-keys"])
    link.listen(serverFromString(reactor, config["listen"]))
    link.setServiceParent(top)
    if config["metrics"]:
        from dit4c.common.adminsite import adminSite
        from dit4c.common.service import ListeningService
        from dit4c.node.metrics import NodeMetrics

        metrics = NodeMetrics(node)
        site = adminSite(metrics, metrics.health)
        ListeningService(serverFromString(reactor, config["metrics"]), site, "node metrics").setServiceParent(top)
    return top
