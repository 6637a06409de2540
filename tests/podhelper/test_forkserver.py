"""
The helpers' fork server: which programs a request may run, and a real
server forking the upload helper (a node's saves) as well as the pod's
helper process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.helperenv import inherited
from dit4c.node.processes import startTime
from dit4c.podhelper.forkserver import PLUGIN, ForkServer, _request


def _line(**fields: object) -> bytes:
    request = {"arguments": [], "environment": {}, "cwd": "/", "log": "/tmp/x.log", **fields}
    return json.dumps(request).encode() + b"\n"


def test_a_request_runs_one_of_the_helpers() -> None:
    assert _request(_line())["program"] == PLUGIN
    assert _request(_line(program="dit4c-helper-upload"))["program"] == "dit4c-helper-upload"
    for other in ("dit4c-portal", "web", "", "../dit4c-helper-pod"):
        with pytest.raises(ValueError, match="program must be one of"):
            _request(_line(program=other))


@pytest_twisted.ensureDeferred
async def test_the_upload_helper_is_forked(tmp_path: Path) -> None:
    forks = ForkServer(reactor, tmp_path / "helpers.sock", tmp_path / "forkserver.log")
    try:
        log = tmp_path / "upload.log"
        # Without the helper environment it says what is missing and ends,
        # as it does when started afresh: the program asked for is what ran.
        environment = {**inherited(), "DIT4C_IMAGE_FILE": str(tmp_path / "saved-image.tar")}
        pid = await forks.spawn([], environment, tmp_path, log, program="dit4c-helper-upload")
        await eventually(lambda: startTime(pid) is None, 30, what="the forked upload helper ended")
        text = log.read_text()
        assert "DIT4C_INSTANCE is not set" in text
        assert "DIT4C_IMAGE_DIGEST" in text  # the upload helper's usage, not the pod helper's
    finally:
        forks.stop()
