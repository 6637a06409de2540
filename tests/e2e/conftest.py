"""Fixtures the end-to-end tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dit4c.node.processes import killRecorded


@pytest.fixture
def devDir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose pods are killed afterwards, whatever happened (they outlive dit4c-dev)."""
    yield tmp_path / "dev"
    killRecorded(tmp_path / "dev")
