"""
A compute node run by an ordinary user (not root), for real: the runtime
runs as ``nobody`` (``tests/node/ordinary_node.py`` under ``setpriv``).
Its tools keep its uid, in user, mount and PID namespaces of their own:
Notes answers on its socket, and a tool that snoops finds neither its key
nor the node's processes, and cannot write outside its own files.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from confined import NOBODY, ROOT, asUser, importPath, systemPython

HERE = Path(__file__).resolve().parent


@pytest.fixture
def nobodysDirectory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dit4c-ordinary-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_an_ordinary_users_node_confines_its_tools(nobodysDirectory: Path) -> None:
    python = systemPython()
    result = asUser(
        NOBODY, [python, str(HERE / "ordinary_node.py"), str(nobodysDirectory)],
        env={"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), str(ROOT), *importPath()])}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["uid"] == NOBODY and found["confined"] is None
    notes, snoop = found["nts1"], found["snp1"]
    assert notes["ready"] and notes["greets"], notes
    assert notes["socketDirectory"] == "0o700" and notes["tcp"] == 0
    assert "unconfined" not in notes["log"]
    seen = snoop["seen"]
    assert seen["uid"] == NOBODY  # the node's own uid: only the namespaces keep the key from it
    assert seen["key"][0] == "refused" and seen["pod"] == ["ok", ["sock", "work"]]
    assert seen["outside"] == ["refused", errno.EROFS] and not snoop["planted"]
    assert seen["pids"] == [1, 2]
