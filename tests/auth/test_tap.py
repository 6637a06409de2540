"""
``dit4c-helper-auth`` as the node runs it: ``python -m twisted
dit4c-helper-auth`` with the helper environment and no options, as a real
process, through a whole login; ``--help``; and usage errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from auth_client import Browser, logIn
from support.processes import announcedPort
from support.waiting import eventually

from dit4c.common.helperenv import HelperEnvironment, toEnvironment

TWIST = [sys.executable, "-m", "twisted", "--log-format=text", "dit4c-helper-auth"]


def _environ(**variables: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIT4C_")}
    return {**base, **variables}


def test_help_documents_every_option() -> None:
    result = subprocess.run([*TWIST, "--help"], capture_output=True, text=True, env=_environ(), timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--tool", "--portal", "--portal-internal", "--instance", "--key-file", "--recheck", "--timeout"):
        assert option in result.stdout
    assert "DIT4C_INSTANCE_KEY" in result.stdout


@pytest.mark.parametrize(
    "variables, message",
    [
        ({}, "DIT4C_INSTANCE is not set"),
        ({"DIT4C_INSTANCE": "abc", "DIT4C_INSTANCE_KEY": "/nonexistent.pem", "DIT4C_PORTAL": "http://p"}, "--tool"),
        (
            {"DIT4C_INSTANCE": "abc", "DIT4C_INSTANCE_KEY": "/nonexistent.pem", "DIT4C_PORTAL": "http://p",
             "DIT4C_TOOL": "tcp:host=127.0.0.1:port=1", "DIT4C_AUTH_LISTEN": "tcp:0"},
            "--key-file",
        ),
        ({"DIT4C_INSTANCE": "Not_An_Id", "DIT4C_INSTANCE_KEY": "k", "DIT4C_PORTAL": "http://p"}, "not an instance id"),
    ],
    ids=["nothing", "no-tool", "no-key", "bad-instance"],
)
def test_missing_configuration_is_a_usage_error(variables: dict[str, str], message: str) -> None:
    result = subprocess.run([*TWIST], capture_output=True, text=True, env=_environ(**variables), timeout=60)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


class _Child:
    def __init__(self, args: list[str], env: dict[str, str], logPath: Path) -> None:
        self.logPath = logPath
        self._log = open(logPath, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    async def port(self, timeout: float = 30.0) -> int:
        """The port the helper announced, once it has."""

        def announced() -> int | None:
            assert self.proc.poll() is None, self.log()
            return announcedPort(self.log(), "auth helper")

        return int(await eventually(announced, timeout, 0.05, self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_real_process_lets_alice_in(world: Any, tmp_path: Path) -> None:
    env = toEnvironment(
        HelperEnvironment(
            instance=world.instance.id,
            keyFile=str(world.keyFile),
            portal=world.portalURL,
            tool=world.tool.endpoint,
            authListen="tcp:0:interface=127.0.0.1",
        )
    )
    child = _Child(TWIST, _environ(**env), tmp_path / "auth.log")
    try:
        world.authPort = await child.port()
        world.instance = await world.store.updateInstance(world.instance.id, url=world.instanceURL)
        alice = Browser(world)
        response = await logIn(alice, "alice", "/headers")
        assert response.code == 303
        response = await alice.get(world.instanceURL + "headers", accept="application/json")
        assert response.code == 200
        seen = {k.lower(): v for k, v in (await response.json())["headers"].items()}
        assert seen["x-dit4c-user"] == ["alice"]
        log = child.log()
        assert alice.instanceCookies()["dit4c_auth"] not in log  # no token in the log
        assert "alice logged in" in log
    finally:
        child.stop()
