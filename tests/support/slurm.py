"""
A real one-machine Slurm cluster for the ``slurm`` runtime's tests: munged,
slurmctld and slurmd (Debian's slurm-wlm 22.05) with every file in a
temporary directory, started by a fixture and brought down at its end,
every process killed.

Ports. slurmctld refuses ``SlurmctldPort=0`` ("Invalid SlurmctldPort 0"),
takes no listening socket from its parent, and a port range
(``SlurmctldPort=A-B``) makes it bind every port of the range, so a busy one
is not skipped. ``SlurmdPort=0`` makes slurmd bind a port of the kernel's
choosing, but slurmctld and srun then reach it on port 0 and fail. Both ports
must be named in ``slurm.conf`` before either daemon starts, so this is the
one place where the tests choose ports for another program: chosen at
random from a range below the kernel's ephemeral ports (no port is bound
first and let go), and when either daemon cannot bind its port ("Address
already in use" in its log, or it ends at once) the whole cluster is started
again on fresh ports, a few times.

slurmctld listens on every interface (22.05 has no setting to bind loopback
only); slurmd is reached at 127.0.0.1 (``NodeAddr``). The cluster has one
node with this machine's host name, :data:`CPUS` CPUs and
:data:`MEMORY_MIB` MiB, one partition :data:`PARTITION`; ``MinJobAge`` keeps
an ended job (its ``TIMEOUT`` state) in ``squeue --states=all`` for
:data:`MIN_JOB_AGE` seconds, ``KillWait`` is short so stops are quick.
Accounting is off (``sacct`` has nothing).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["CPUS", "MEMORY_MIB", "MIN_JOB_AGE", "PARTITION", "SlurmCluster", "requireSlurm", "slurmUnavailable"]

#: The programs the cluster needs (apt-get install slurmctld slurmd slurm-client munge).
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
PARTITION = "dit4c"
#: The node's CPUs as the cluster counts them: a job asking for all of them fills it.
CPUS = 2
MEMORY_MIB = 2048
#: Seconds an ended job stays in slurmctld's memory (``squeue --states=all``).
MIN_JOB_AGE = 300
#: Seconds between SIGTERM and SIGKILL when the cluster ends a job.
KILL_WAIT = 3
#: Where the ports are drawn from: below Linux's ephemeral range (32768-60999), above most services.
PORTS = range(20000, 32000)
ATTEMPTS = 5


def slurmUnavailable() -> str | None:
    """Why a Slurm cluster cannot be started here, or None if it can."""
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user only as root"
    return None


def requireSlurm(what: str) -> None:
    """At a test module's top: skip where Slurm is missing, but fail under CI (``CI`` set), where it must run."""
    why = slurmUnavailable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run: {why}; CI is set, where they must", pytrace=False)
    pytest.skip(f"{what} cannot run: {why}", allow_module_level=True)


class PortTaken(Exception):
    """A daemon could not bind its port: start again on others."""


@dataclass
class SlurmCluster:
    """munged, slurmctld and slurmd in ``directory``; :meth:`start`, then :meth:`stop`."""

    directory: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ctldPort: int = 0
    slurmdPort: int = 0

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        """What a Slurm command needs to find this cluster (``SLURM_CONF``)."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._startMunge()
        for attempt in range(ATTEMPTS):
            self.ctldPort, self.slurmdPort = random.sample(PORTS, 2)
            try:
                self._startSlurm()
                return
            except PortTaken:
                self._stopSlurm()
                if attempt == ATTEMPTS - 1:
                    raise

    def _startMunge(self) -> None:
        keys = self.directory / "munge"
        keys.mkdir(mode=0o700, exist_ok=True)
        # munged wants everyone to be able to reach its socket's directory.
        run = self.directory / "munge-run"
        run.mkdir(mode=0o755, exist_ok=True)
        key = keys / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True, timeout=30)
        self.processes["munged"] = self._spawn(
            "munged",
            ["munged", "--foreground", "--force", "--socket", str(run / "munge.socket"), f"--key-file={key}",
             f"--log-file={keys / 'munged.log'}", f"--pid-file={keys / 'munged.pid'}",
             f"--seed-file={keys / 'munged.seed'}", "--num-threads=1"],
        )  # fmt: skip
        self._wait(lambda: (run / "munge.socket").exists(), "munged", 20)

    def _startSlurm(self) -> None:
        for name in ("state", "spool", "log"):
            (self.directory / name).mkdir(exist_ok=True)
        self.conf.write_text(self._confText())
        self.processes["slurmctld"] = self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self._portOpen(self.ctldPort), "slurmctld", 30)
        self.processes["slurmd"] = self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._idle, "slurmd (the node idle in sinfo)", 60)

    def _confText(self) -> str:
        d = self.directory
        return "\n".join([
            "ClusterName=dit4ctest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctldPort}",
            f"SlurmdPort={self.slurmdPort}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d / 'munge-run' / 'munge.socket'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # An ended job (TIMEOUT, say) stays visible to squeue --states=all this long.
            f"MinJobAge={MIN_JOB_AGE}",
            f"KillWait={KILL_WAIT}",
            # A batch job is scheduled at slurmctld's next look (its background loop, once a
            # second) rather than after 22.05's defaults (2 s between main scheduler runs, and
            # batch jobs held back up to 3 s): a job runs ~1 s after sbatch, not 2-3 s.
            "SchedulerParameters=sched_min_interval=100000,batch_sched_delay=0",
            # The node is what this file says, whatever the machine has (a runner with one core too).
            "SlurmdParameters=config_overrides",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MIB} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])  # fmt: skip

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.out").open("ab")
        with log:
            return subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                # The daemons, and so every job, carry it: what is left of them is found by it (stop).
                env=dict(os.environ, **self.environment),
            )  # fmt: skip

    def _output(self, name: str) -> str:
        texts = []
        for path in (self.directory / f"{name}.out", self.directory / "log" / f"{name}.log"):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(texts)

    def _wait(self, ready: object, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            if callable(ready) and ready():
                return
            process = self.processes.get(name.split()[0])
            output = self._output(name.split()[0])
            if "Address already in use" in output or "Unable to bind" in output:
                raise PortTaken(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} ended at once (status {process.returncode}):\n{output[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within {timeout} s:\n{output[-2000:]}")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _portOpen(self, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _idle(self) -> bool:
        try:
            result = subprocess.run(
                ["sinfo", "--noheader", "--format=%T", "--nodes", self.hostname],
                env=dict(os.environ, **self.environment), capture_output=True, timeout=10,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and result.stdout.decode().strip() == "idle"

    def run(self, *argv: str) -> str:
        """
        A Slurm command against this cluster (blocking: fixtures and checks
        only); its output. It runs in the cluster's directory: a job
        submitted without ``--output`` writes its ``slurm-N.out`` there.
        """
        result = subprocess.run(
            list(argv), env=dict(os.environ, **self.environment), capture_output=True, timeout=30, cwd=self.directory
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode()

    def cancelAll(self) -> None:
        """Every job of the cluster cancelled (between tests)."""
        try:
            self.run("scancel", "--full", "--partition", PARTITION)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass

    def _stopSlurm(self) -> None:
        for name in ("slurmd", "slurmctld"):
            self._kill(name)

    def _kill(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        """Every process of the cluster ended; the jobs' processes too (slurmd ends them as it goes)."""
        self.cancelAll()
        deadline = time.monotonic() + KILL_WAIT + 15
        while time.monotonic() < deadline and "slurmctld" in self.processes:
            try:
                if not self.run("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING", "--format=%i").strip():
                    break
            except (RuntimeError, subprocess.TimeoutExpired):
                break
            time.sleep(0.5)
        self._stopSlurm()
        # Whatever a job left behind (slurmstepd, a process it forked): none may be left.
        for pid in _jobProcesses(self.conf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill("munged")


def _jobProcesses(conf: Path) -> list[int]:
    """
    Processes of the cluster still alive: its daemons and each job's
    slurmstepd and processes, all started with ``SLURM_CONF`` naming its
    configuration (the daemons are given it; a job inherits it).
    """
    found = []
    marker = b"SLURM_CONF=" + str(conf).encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ + b"\0":
            found.append(int(entry.name))
    return found
