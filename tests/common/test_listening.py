"""
What every server does as it starts listening (dit4c.common.listening,
dit4c.common.service.ListeningService): it takes all the open files its
hard limit allows. Shown on a real ``twistd dit4c-routing`` started, as
systemd starts a service, with a soft limit far under its hard one.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.processes import Process

from dit4c.common.listening import raiseOpenFileLimit

#: The soft limit systemd gives a service unless told otherwise is 1,024; this is lower still.
LOW = 256

#: twistd, in a child whose soft limit on open files is first set to LOW (argv: twistd's arguments).
_LOWERED = f"""
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW}, hard))
from twisted.scripts.twistd import run
sys.argv = ["twistd", *sys.argv[1:]]
run()
"""


def openFiles(pid: int) -> tuple[int, int]:
    """The soft and hard limits on open files of process ``pid``, as the kernel holds them."""
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.M)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def test_already_at_the_hard_limit_nothing_changes() -> None:
    raiseOpenFileLimit()
    assert raiseOpenFileLimit() is None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY


@pytest_twisted.ensureDeferred
async def test_a_server_started_with_a_low_soft_limit_takes_its_hard_limit(tmp_path: Path, signing: Any) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= LOW:
        pytest.skip(f"the hard limit on open files here ({hard}) is no higher than {LOW}")
    local = "tcp:0:interface=127.0.0.1"
    routing = Process(
        [sys.executable, "-c", _LOWERED, "-n", "--pidfile=", "dit4c-routing", "--tunnel", local, "--http", local,
         "--jwks-file", str(signing.jwksPath), "--domain", "localhost"],
        tmp_path / "routing.log",
    )  # fmt: skip
    try:
        await routing.waitForLog(r"public http listening on IPv4Address")
        await routing.waitForLog(rf"open files: soft limit raised from {LOW} to {hard}")
        assert openFiles(routing.pid) == (hard, hard)
    finally:
        routing.stop()
