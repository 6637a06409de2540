"""
Options of ``twistd dit4c-node`` (and of ``twistd dit4c-dev``, which runs a
node) that reach the node's runtime: the tool table and the stop grace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.python import usage

from dit4c.common.keys import generatePrivateKey, jwks
from dit4c.dev import tap as devTap
from dit4c.node import tap as nodeTap
from dit4c.node.processes import STOP_GRACE


def toolTable(directory: Path) -> Path:
    path = directory / "tools.json"
    path.write_text(json.dumps({"tools": {"site/lab": {"command": ["{python}", "-m", "lab", "--socket", "{socket}"]}}}))
    return path


def nodeService(directory: Path, *extra: str) -> Any:
    schedulerKey = directory / "scheduler.jwks"
    schedulerKey.write_text(json.dumps(jwks(generatePrivateKey())))
    config = nodeTap.Options()
    config.parseOptions([
        "--scheduler-key", str(schedulerKey), "--portal", "http://portal.test", "--routing", "tcp:host=127.0.0.1:port=1",
        "--data-dir", str(directory / "node"), "--listen", "tcp:0:interface=127.0.0.1", *extra,
    ])  # fmt: skip
    return nodeTap.makeService(config, reactor)


def runtimeOf(service: Any) -> Any:
    from dit4c.node.node import Node

    node = next(s for s in service if isinstance(s, Node))
    return node.runtime


def test_the_stop_grace_and_the_tool_table_reach_the_runtime(tmp_path: Path) -> None:
    runtime = runtimeOf(nodeService(tmp_path, "--stop-grace", "60", "--tools", str(toolTable(tmp_path))))
    assert runtime.stopGrace == 60.0
    assert list(runtime.tools) == ["site/lab"]
    assert runtime.tools["site/lab"].command == ("{python}", "-m", "lab", "--socket", "{socket}")


def test_without_a_stop_grace_the_runtime_keeps_its_own(tmp_path: Path) -> None:
    assert runtimeOf(nodeService(tmp_path)).stopGrace == STOP_GRACE


@pytest.mark.parametrize("grace", ["0", "-1", "soon"])
def test_a_stop_grace_must_be_a_positive_number(tmp_path: Path, grace: str) -> None:
    with pytest.raises(usage.UsageError):
        nodeService(tmp_path, "--stop-grace", grace)


def test_a_bad_tool_table_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps({"tools": {"site/lab": {"command": "lab --socket {socket}"}}}))
    with pytest.raises(usage.UsageError, match="--tools: tool 'site/lab': command must be a non-empty list"):
        nodeService(tmp_path, "--tools", str(bad))
    with pytest.raises(usage.UsageError, match="--tools: "):
        nodeService(tmp_path, "--tools", str(tmp_path / "missing.json"))


PORTS = ("--portal-port", "--http-port", "--tunnel-port", "--image-port", "--file-port")


def test_dit4c_dev_passes_them_to_its_node(tmp_path: Path) -> None:
    config = devTap.Options()
    config.parseOptions([
        "--data-dir", str(tmp_path / "dev"), "--stop-grace", "30", "--tools", str(toolTable(tmp_path)),
        # It listens as it is made: on ports of its own, not the defaults another may hold.
        *(argument for option in PORTS for argument in (option, "0")),
    ])  # fmt: skip
    service = devTap.makeService(config, reactor)
    assert service.node.runtime.stopGrace == 30.0
    assert list(service.tools) == ["site/lab"]
