"""
The tool launcher (``python -m dit4c.node.confine``) as a real process: as
root it hands the tool a uid of its own; as an ordinary user it confines
the tool in a user namespace; where the kernel refuses that, it says so and
runs the tool unconfined. Exit statuses are passed on, and the tool's
processes all end with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from confined import NOBODY, ROOT, asUser, importPath, systemPython
from support.waiting import eventually

from dit4c.node.confine import Plan, command

#: Reports what the tool is and can do, as JSON on standard output.
REPORT = r"""
import json, os, sys
key = sys.argv[1]
seen = {"uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
try:
    seen["key"] = open(key).read()
except OSError as e:
    seen["key"] = e.errno
print(json.dumps(seen))
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can reach (a test's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dit4c-confine-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def pod(base: Path, owner: int) -> tuple[Path, Path, Path]:
    """``<base>/data/pods/p`` with a key (mode 0600) and a working directory, all ``owner``'s."""
    data = base / "data"
    directory = data / "pods" / "p"
    (directory / "work").mkdir(parents=True)
    key = directory / "instance.key"
    key.write_text("the instance key")
    key.chmod(0o600)
    directory.chmod(0o700)
    for path in (data, data / "pods", directory, directory / "work", key):
        os.chown(path, owner, owner)
    return data, directory, key


def launch(python: str, data: Path, directory: Path, argv: list[str], uid: int | None = None) -> list[str]:
    plan = Plan(argv, str(directory / "work"), uid, uid, hide=[str(data)], bind=[str(directory / "work")])
    return command(python, plan)


def rootLaunch(shared: Path, uid: int, code: str) -> list[str]:
    """The launcher's command, as a root node runs it, for a tool (Python ``code``, given the key's path) as ``uid``."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    data, directory, key = pod(shared, 0)
    os.chown(directory / "work", uid, uid)
    return launch(sys.executable, data, directory, [sys.executable, "-c", code, str(key)], uid=uid)


def test_a_root_node_runs_the_tool_as_its_uid(shared: Path) -> None:
    result = subprocess.run(rootLaunch(shared, 1_000_123, REPORT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 1_000_123
    assert seen["key"] == 2  # ENOENT: the data directory is an empty tmpfs in there
    assert seen["pids"] == [1, 2]


def test_an_ordinary_user_confines_the_tool_in_a_user_namespace(shared: Path) -> None:
    python = systemPython()
    data, directory, key = pod(shared, NOBODY)
    result = asUser(NOBODY, launch(python, data, directory, [python, "-c", REPORT, str(key)]), timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # Its own uid (not root in its namespace), yet the key, which that uid owns, is out of sight.
    assert seen["uid"] == NOBODY
    assert seen["key"] == 2
    assert seen["pids"] == [1, 2]
    assert "unconfined" not in result.stderr


#: Runs ``argv[1:]`` as ``nobody`` in a user namespace of root's making
#: that allows no further user namespace: as on a kernel that refuses
#: unprivileged ones (``user.max_user_namespaces`` is per namespace).
REFUSING = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ready, mapped = os.pipe(), os.pipe()
parent = os.getpid()
helper = os.fork()
if helper == 0:
    os.read(ready[0], 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{parent}/{name}", "w") as f:
            f.write("0 0 1\n65534 65534 1\n")
    os.write(mapped[1], b"x")
    os._exit(0)
assert libc.unshare(0x10000000) == 0, os.strerror(ctypes.get_errno())
os.write(ready[1], b"x")
os.read(mapped[0], 1)
os.waitpid(helper, 0)
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_where_the_kernel_refuses_user_namespaces_the_tool_runs_unconfined_and_says_so(shared: Path) -> None:
    python = systemPython()
    data, directory, key = pod(shared, NOBODY)
    refusing = [sys.executable, "-c", REFUSING]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *importPath()]))
    probe = subprocess.run(
        [*refusing, python, "-c", "from dit4c.node.confine import probe; print(probe())"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith("the kernel refuses user, mount and PID namespaces"), probe.stdout
    result = subprocess.run(
        [*refusing, *launch(python, data, directory, [python, "-c", REPORT, str(key)])],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "the kernel refuses an unprivileged user namespace" in result.stderr
    assert "the tool runs unconfined" in result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == NOBODY and seen["key"] == "the instance key"


@pytest_twisted.ensureDeferred
async def test_the_exit_status_is_passed_on_and_the_tools_processes_end_with_it(shared: Path) -> None:
    """A tool that leaves a process behind in a session of its own (as Jupyter's kernels are): it goes too."""
    leaves = (
        "import subprocess, sys\n"
        "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "open('child', 'w').write(str(child.pid))\n"
        "sys.exit(7)\n"
    )
    before = _sleepers()
    result = subprocess.run(rootLaunch(shared, 1_000_124, leaves), capture_output=True, text=True, timeout=60)
    assert result.returncode == 7, result.stderr
    await eventually(lambda: not _sleepers() - before, what=lambda: f"left running: {_sleepers() - before}")


def _sleepers() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == b"sleep\x00300\x00":
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def test_a_signal_to_the_group_reaches_the_tool_once(shared: Path) -> None:
    """The node stops a tool with SIGTERM to its process group; the tool sees it once, and its status comes back."""
    counts = (
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
        "print('ready', flush=True)\n"
        "while not got: time.sleep(0.05)\n"
        # A doubled signal (the group's, and a copy the launcher passed on) comes at once; no event can
        # show that none is coming, so the tool gives it half a second before it counts.
        "time.sleep(0.5)\n"
        "print(len(got), flush=True)\n"
        "sys.exit(0)\n"
    )
    process = subprocess.Popen(
        rootLaunch(shared, 1_000_125, counts),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out.strip() == "1"
