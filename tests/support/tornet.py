"""
A private Tor network on loopback, for the tests of DIT4C over Tor
(``onion:`` and ``tor:`` endpoint strings, the listener's onion service):
three directory authorities (also relays), two exit relays, a tor that
hosts onion services (its control port is what DIT4C is given) and a
client tor (its SOCKS port is how a test or a listener dials through
Tor). No internet: every address is 127.0.0.1, every tor has
``TestingTorNetwork`` (short voting intervals, flags for everyone).

Ports. Every port is chosen by tor itself (``auto``) and read back, none
picked here and bound later:

- each tor's control port is ``auto``, written to ``ControlPortWriteToFile``;
- the SOCKS port of the client is ``auto``, read back with ``GETINFO``;
- the authorities' ORPort and DirPort must be in every tor's
  ``DirAuthority`` lines, the authorities' own included. Each authority is
  started with ``ORPort auto`` and ``DirPort auto`` and a placeholder
  ``DirAuthority`` line of its own keys (``TestingTorNetwork`` will not
  start without one); once all three listen, their ports are read back
  (``GETINFO net/listeners/or``, ``net/listeners/dir``) and the three real
  lines are set on each with ``SETCONF`` while it runs: tor keeps an
  ``auto`` listener open across a change of configuration, so nothing is
  rebound. The relays and the other tors start afterwards with the real
  lines in their torrc.

Every tor has ``__OwningControllerProcess`` set to this process, so none
outlives the test run even if it is killed; :meth:`TorNetwork.stop` ends
them at once.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .processes import Process
from .waiting import eventually

__all__ = ["TorNetwork", "TorNode", "requireTor", "startTorNetwork", "torUnavailable"]

#: What every tor of the network has (``{data}``: its data directory).
COMMON = """\
TestingTorNetwork 1
AssumeReachable 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
GeoIPFile /dev/null
GeoIPv6File /dev/null
SafeLogging 0
ShutdownWaitLength 0
RunAsDaemon 0
DataDirectory {data}
ControlPort 127.0.0.1:auto
ControlPortWriteToFile {data}/control-port
CookieAuthentication 1
Log notice file {data}/notice.log
__OwningControllerProcess {owner}
"""

#: A directory authority's own options (voting every 10 s: 5 s was unstable).
AUTHORITY = """\
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 10
V3AuthVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVoteDelay 2
V3AuthDistDelay 2
Address 127.0.0.1
ORPort 127.0.0.1:auto
DirPort 127.0.0.1:auto
ExitRelay 0
ContactInfo dit4c-test
SocksPort 0
"""

#: An exit relay that lets streams out to loopback only.
RELAY = """\
Address 127.0.0.1
ORPort 127.0.0.1:auto
ExitRelay 1
ExitPolicyRejectPrivate 0
ExitPolicy accept 127.0.0.0/8:*
ExitPolicy reject *:*
ContactInfo dit4c-test
SocksPort 0
"""


def torUnavailable() -> str | None:
    """Why no private Tor network can run here, or None."""
    missing = [tool for tool in ("tor", "tor-gencert") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install tor; scripts/install --test does)"
    try:
        import txtorcon  # noqa: F401
    except ImportError:
        return "txtorcon is not installed (pip install -e '.[tor]'; scripts/install --test does)"
    return None


def requireTor(what: str) -> None:
    """At a test module's top: skip it where tor is missing, but fail it under CI (``CI`` set)."""
    why = torUnavailable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run: {why}; CI is set, where they must", pytrace=False)
    pytest.skip(f"{what} cannot run: {why}", allow_module_level=True)


class ControlError(Exception):
    """Tor answered a control command with an error."""


@dataclass
class TorNode:
    """One tor of the network: its data directory, process and control port."""

    name: str
    data: Path
    process: Process | None = None
    #: The fingerprints a directory authority is known by.
    v3ident: str = ""
    fingerprint: str = ""

    @property
    def controlPort(self) -> int:
        """The control port tor chose (``ControlPortWriteToFile``: ``PORT=127.0.0.1:N``)."""
        return int((self.data / "control-port").read_text().strip().rsplit(":", 1)[1])

    @property
    def controlEndpoint(self) -> str:
        """The control port as a Twisted client endpoint string."""
        return f"tcp:host=127.0.0.1:port={self.controlPort}"

    def ready(self) -> bool:
        """The control port is written and its cookie too (tor writes the port file first)."""
        if self.process is not None and self.process.proc.poll() is not None:
            raise AssertionError(f"tor {self.name} exited ({self.process.proc.returncode}):\n{self.log()}")
        return (self.data / "control-port").exists() and (self.data / "control_auth_cookie").exists()

    def control(self, *commands: str) -> list[str]:
        """
        Send ``commands`` on a new control connection (cookie
        authentication) and return the lines of the last answer. A few
        milliseconds on loopback: the fixture's waits use it between
        looks.
        """
        cookie = (self.data / "control_auth_cookie").read_bytes().hex()
        with socket.create_connection(("127.0.0.1", self.controlPort), timeout=10) as sock:
            reader = sock.makefile("rb")
            lines: list[str] = []
            for command in (f"AUTHENTICATE {cookie}", *commands):
                sock.sendall(command.encode() + b"\r\n")
                lines = []
                while True:
                    line = reader.readline().decode("utf-8", "replace").rstrip("\r\n")
                    if not line:
                        raise ControlError(f"tor {self.name} closed the control connection after {command.split()[0]}")
                    lines.append(line)
                    if re.match(r"\d{3} ", line):
                        break
                if not lines[-1].startswith("250"):
                    raise ControlError(f"tor {self.name}: {command.split()[0]}: {lines}")
            return lines

    def getinfo(self, key: str) -> str:
        """One ``GETINFO`` value (single-line answers)."""
        for line in self.control(f"GETINFO {key}"):
            if line[4:].startswith(f"{key}="):
                return line[4 + len(key) + 1 :].strip('"')
        raise ControlError(f"tor {self.name}: no {key}")

    def listener(self, kind: str) -> int:
        """The port of this tor's ``kind`` listener (``or``, ``dir``, ``socks``)."""
        return int(self.getinfo(f"net/listeners/{kind}").split()[0].strip('"').rsplit(":", 1)[1])

    def bootstrapped(self) -> bool:
        return "PROGRESS=100" in self.getinfo("status/bootstrap-phase")

    def knowsAll(self, relays: int) -> bool:
        """
        Whether this tor's consensus lists all ``relays`` of the network and
        it has every one's microdescriptor. Bootstrapping ends sooner: the
        first consensus the authorities vote may list only themselves (the
        exit relays' descriptors came after the vote), and a tor with that
        one cannot build a path of four distinct relays. An onion service
        then gives up on the rendezvous a client asked for, and the
        client's stream waits out its SOCKS timeout (120 s).
        """
        listed = sum(line.startswith("r ") for line in self.control("GETINFO ns/all"))
        described = sum(line.startswith("onion-key") for line in self.control("GETINFO md/all"))
        return listed >= relays and described >= relays

    def log(self) -> str:
        path = self.data / "notice.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def onionLog(self, lines: int = 60) -> str:
        """
        The last of what this tor's info log says of its onion services
        (their introduction points, circuits and descriptors' uploads):
        the service tor keeps one, for a test's failure to show.
        """
        path = self.data / "info.log"
        if not path.exists():
            return "(no info log)"
        words = ("hs_", "intro", "upload", "descriptor", "Failing", "No available", "consensus")
        kept = [line for line in path.read_text(errors="replace").splitlines() if any(w in line for w in words)]
        return "\n".join(kept[-lines:])

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class TorNetwork:
    """The running network: its tors, and where DIT4C's endpoint strings point."""

    base: Path
    authorities: list[TorNode] = field(default_factory=list)
    relays: list[TorNode] = field(default_factory=list)
    #: The tor whose control port is given to the servers that publish onion services.
    service: TorNode | None = None
    #: The tor whose SOCKS port clients dial through.
    client: TorNode | None = None
    dirAuthorities: list[str] = field(default_factory=list)
    #: Seconds to make the authorities' keys, and from then to the service and client being bootstrapped.
    keySeconds: float = 0.0
    bootstrapSeconds: float = 0.0

    @property
    def socksPort(self) -> int:
        assert self.client is not None
        return self.client.listener("socks")

    @property
    def controlPort(self) -> int:
        assert self.service is not None
        return self.service.controlPort

    def dial(self, host: str, port: int) -> str:
        """A ``tor:`` client endpoint string to ``host:port`` through the client tor."""
        return f"tor:host={host}:port={port}:socksHostname=127.0.0.1:socksPort={self.socksPort}"

    def nodes(self) -> list[TorNode]:
        return [*self.authorities, *self.relays, *[n for n in (self.service, self.client) if n is not None]]

    def logs(self) -> str:
        return "\n".join(f"--- tor {n.name}\n{n.log()}" for n in self.nodes())

    def start(self, node: TorNode, options: str) -> None:
        node.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        torrc = node.data / "torrc"
        torrc.write_text(COMMON.format(data=node.data, owner=os.getpid()) + options)
        node.process = Process(["tor", "-f", str(torrc), "--quiet"], node.data / "stdout.log")

    def stop(self) -> None:
        for node in reversed(self.nodes()):
            node.stop()


async def _run(commands: list[list[str]], timeout: float = 120.0) -> None:
    """Run ``commands`` side by side, waiting without blocking the reactor."""
    running = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in commands]
    try:
        await eventually(lambda: all(p.poll() is not None for p in running), timeout, 0.1, "tor key generation")
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
            p.wait()
    for command, p in zip(commands, running, strict=True):
        output = p.stdout.read().decode(errors="replace") if p.stdout else ""
        if p.returncode != 0:
            raise AssertionError(f"{command[0]} failed ({p.returncode}): {output}")


async def _authorityKeys(nodes: list[TorNode]) -> None:
    """Each authority's v3 identity (``tor-gencert``) and relay identity (``tor --list-fingerprint``)."""
    for node in nodes:
        (node.data / "keys").mkdir(mode=0o700, parents=True)
        node.data.chmod(0o700)
    await _run([
        # No address (-a) in the certificates: clients would take it over
        # the DirAuthority line's.
        ["tor-gencert", "--create-identity-key", "-m", "12",
         "-i", str(n.data / "keys/authority_identity_key"), "-s", str(n.data / "keys/authority_signing_key"),
         "-c", str(n.data / "keys/authority_certificate"), "--passphrase-fd", "0"]
        for n in nodes
    ])  # fmt: skip
    await _run([
        ["tor", "--list-fingerprint", "--quiet", "--DataDirectory", str(n.data), "--ORPort", "1",
         "--Nickname", n.name, "--DisableNetwork", "1", "--SocksPort", "0"]
        for n in nodes
    ])  # fmt: skip
    for node in nodes:
        certificate = (node.data / "keys/authority_certificate").read_text()
        node.v3ident = re.search(r"fingerprint ([0-9A-F]{40})", certificate).group(1)  # type: ignore[union-attr]
        node.fingerprint = (node.data / "fingerprint").read_text().split()[1]


async def startTorNetwork(base: Path, timeout: float = 180.0) -> TorNetwork:
    """
    Start the network under ``base`` and wait until the service tor and
    the client tor have bootstrapped and know every relay
    (:meth:`TorNode.knowsAll`). The caller stops it (:meth:`TorNetwork.stop`).
    """
    net = TorNetwork(base)
    began = time.monotonic()
    try:
        net.authorities = [TorNode(f"auth{i}", base / f"auth{i}") for i in range(3)]
        await _authorityKeys(net.authorities)
        net.keySeconds = time.monotonic() - began
        began = time.monotonic()
        for node in net.authorities:
            placeholder = f"DirAuthority {node.name} orport=1 no-v2 v3ident={node.v3ident} 127.0.0.1:1 {node.fingerprint}\n"
            net.start(node, AUTHORITY + f"Nickname {node.name}\n" + placeholder)
        for node in net.authorities:
            await eventually(node.ready, 30, 0.05, f"tor {node.name}'s control port")
        net.dirAuthorities = [
            f"{n.name} orport={n.listener('or')} no-v2 v3ident={n.v3ident} 127.0.0.1:{n.listener('dir')} {n.fingerprint}"
            for n in net.authorities
        ]
        setconf = "SETCONF " + " ".join(f'DirAuthority="{line}"' for line in net.dirAuthorities)
        for node in net.authorities:
            node.control(setconf)
        lines = "".join(f"DirAuthority {line}\n" for line in net.dirAuthorities)
        net.relays = [TorNode(f"exit{i}", base / f"exit{i}") for i in range(2)]
        for node in net.relays:
            net.start(node, RELAY + f"Nickname {node.name}\n" + lines)
        net.service = TorNode("service", base / "service")
        net.start(net.service, f"SocksPort 0\nLog info file {net.service.data}/info.log\n" + lines)
        net.client = TorNode("client", base / "client")
        net.start(net.client, "SocksPort 127.0.0.1:auto\n" + lines)
        for node in (net.service, net.client):
            await eventually(node.ready, 30, 0.05, f"tor {node.name}'s control port")
        remaining = timeout - (time.monotonic() - began)
        for node in (net.service, net.client):
            await eventually(node.bootstrapped, remaining, 0.5, lambda n=node: f"tor {n.name} bootstrapped:\n{net.logs()}")
        relays = len(net.authorities) + len(net.relays)
        remaining = timeout - (time.monotonic() - began)
        for node in (net.service, net.client):
            await eventually(
                lambda n=node: n.knowsAll(relays), remaining, 0.5,
                lambda n=node: f"tor {n.name} knows all {relays} relays:\n{net.logs()}",
            )  # fmt: skip
        net.bootstrapSeconds = time.monotonic() - began
        return net
    except BaseException:
        net.stop()
        raise
