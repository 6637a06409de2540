"""Fixtures for the file server's tests (the world itself is in fileserver_world.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from fileserver_world import makeWorld


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    async for w in makeWorld(tmp_path):
        yield w
