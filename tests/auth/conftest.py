"""
Fixtures for the auth helper's tests: a REAL portal (SQLite store, its own
keys, served on loopback with the real clock), alice, bob and carol, an
instance of alice's, the test backend as the tool, and the auth helper in
this process (see auth_client.World).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from auth_client import closeWorld, makeWorld


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = await makeWorld(tmp_path)
    yield w
    await closeWorld(w)
