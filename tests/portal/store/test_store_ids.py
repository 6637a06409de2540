"""Instance ids: DNS labels, sorted by time; tokens are hashed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dit4c.portal.store import hashToken, newInstanceId
from dit4c.portal.store.ids import INSTANCE_ID_LENGTH, instanceIdTime

#: RFC 1035's label: a letter, then letters, digits and hyphens, at most 63.
DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

# From 1970 to the year 2500, to the millisecond.
times = st.integers(min_value=0, max_value=16_725_225_600_000).map(lambda ms: ms / 1000)
randomBits = st.integers(min_value=0, max_value=(1 << 40) - 1)


@given(times, randomBits)
def test_dnsLabel(now: float, bits: int) -> None:
    instanceId = newInstanceId(now, lambda n: bits)
    assert DNS_LABEL.match(instanceId), instanceId
    assert len(instanceId) == INSTANCE_ID_LENGTH


@given(times, times, randomBits, randomBits)
def test_sortedByTime(t1: float, t2: float, r1: int, r2: int) -> None:
    """A later millisecond always sorts after, whatever the random bits."""
    a = newInstanceId(t1, lambda n: r1)
    b = newInstanceId(t2, lambda n: r2)
    if int(t1 * 1000) < int(t2 * 1000):
        assert a < b
    elif int(t1 * 1000) > int(t2 * 1000):
        assert a > b


@given(times, randomBits)
def test_timeRoundTrip(now: float, bits: int) -> None:
    assert instanceIdTime(newInstanceId(now, lambda n: bits)) == int(now * 1000) / 1000


def test_random() -> None:
    ids = {newInstanceId(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize("now", [-1.0, float(1 << 44) / 1000])
def test_outOfRange(now: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        newInstanceId(now)


def test_hashToken() -> None:
    assert hashToken("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_record_ids_never_look_like_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record id is an argument on a command line (``dit4c start ID``): never one that begins with ``-``."""
    from dit4c.portal.store import ids

    made = iter(["-gnppOz8rzpYq_2m", "--vOz8rzpYq_2mAb", "Kq3x0c9-2vLm1bTe"])
    monkeypatch.setattr(ids.secrets, "token_urlsafe", lambda n: next(made))
    assert ids.newId() == "Kq3x0c9-2vLm1bTe"
