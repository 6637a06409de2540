"""
2 GB request bodies thrown at a real ``twistd dit4c-portal``, with and
without ``Content-Length``, at the three places a stranger or a token holder
can post to: the login form (not logged in), the REST API (with a token) and
the OAuth token endpoint. Each is refused (413) without the portal growing:
its resident memory (psutil) and what it writes to disk (its
``write_bytes``, its open files in its TMPDIR, the free space there) stay
within a few MB, and it stops reading long before 2 GB.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from security_world import (
    GiB,
    MiB,
    RunningPortal,
    chunkedBody,
    exchange,
    lengthBody,
    push,
    startPortal,
    status,
)

from dit4c.portal.http import bodyLimit

#: A body "of any size": what was tried against the portal before it had limits.
HUGE = 2 * GiB
#: What the portal may grow by, in memory and on disk, while refusing it.
ALLOWANCE = 4 * MiB


@pytest_twisted.async_yield_fixture
async def portal(processes: Any, tmp_path: Path) -> Any:
    yield await startPortal(processes, tmp_path)


def warmUp(portal: RunningPortal) -> None:
    """A few ordinary requests, so that what the portal allocates once is allocated before measuring."""
    for _ in range(3):
        assert status(exchange(portal.port, b"GET /login HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")) == 200
        head = b"POST /login HTTP/1.1\r\nHost: p\r\nConnection: close\r\nContent-Length: 9\r\n\r\nusername="
        assert status(exchange(portal.port, head)) == 400  # no CSRF token: the form answers for itself
        refused = push(portal.port, b"POST /login HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n", chunkedBody(8 * MiB))
        assert status(refused.answer) == 413


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize(
    "path, credentials",
    [("/login", False), ("/api/v1/instances", True), ("/oauth/token", False)],
    ids=["login-not-logged-in", "api-with-a-token", "oauth-token"],
)
def test_a_2gb_body_is_refused_without_growth(portal: RunningPortal, path: str, credentials: bool, framing: str) -> None:
    warmUp(portal)
    ps = portal.ps
    rss = ps.memory_info().rss
    written = ps.io_counters().write_bytes
    free = shutil.disk_usage(portal.spool).free
    spooled: list[str] = []

    def watch() -> None:
        spooled.extend(portal.filesUnder(portal.spool))

    head = f"POST {path} HTTP/1.1\r\nHost: portal.localhost\r\n".encode()
    if credentials:
        head += f"Authorization: Bearer {portal.token}\r\nContent-Type: application/json\r\n".encode()
    else:
        head += b"Content-Type: application/x-www-form-urlencoded\r\n"
    if framing == "content-length":
        pushed = push(portal.port, head + b"Content-Length: %d\r\n\r\n" % HUGE, lengthBody(HUGE), watch)
    else:
        pushed = push(portal.port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunkedBody(HUGE), watch)

    assert status(pushed.answer) == 413
    assert b"limited to %d bytes" % bodyLimit(b"POST", path.encode()) in pushed.answer
    # It stopped reading: what got through is the linger allowance and the
    # sockets' buffers, not the body.
    assert pushed.cut and pushed.sent < 32 * MiB, pushed.sent
    assert spooled == [] and list(portal.spool.iterdir()) == []
    grew = ps.memory_info().rss - rss
    wrote = ps.io_counters().write_bytes - written
    assert grew < ALLOWANCE, f"the portal's RSS grew by {grew} bytes"
    assert wrote < ALLOWANCE, f"the portal wrote {wrote} bytes to disk"
    # Free space on a disk other programs share moves by itself: a spooled
    # 2 GB body would still show.
    assert free - shutil.disk_usage(portal.spool).free < HUGE // 4
    # And the portal goes on answering.
    assert status(exchange(portal.port, b"GET /health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")) == 200
