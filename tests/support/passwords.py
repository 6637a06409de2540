"""
Password hashes for the people a test makes.

The portal hashes with Argon2id at its real cost (about 0.2 s of CPU per
hash or check, by design). A hash carries its own parameters, so the
portal checks a hash made here at argon2-cffi's ``CHEAPEST`` profile, which
it documents for tests, as quickly as it was made: the portal's login path
is the same, only the work is not. Passwords set through the portal itself
(admin form, API, ``dit4c user-add``) still cost what they cost in use.

A login for a name nobody has is checked against the portal's stand-in
hash, which costs what a real one does so that it cannot be told apart:
:func:`cheapUnknownNames` makes it as cheap as the people a test makes, so
the two still cost the same in tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

_cheap = PasswordHasher.from_parameters(CHEAPEST)


def cheapHash(password: str) -> str:
    """An Argon2id hash of ``password`` that the portal checks as it checks any other."""
    return _cheap.hash(password)


@cache
def _cheapDummy() -> str:
    return cheapHash("no one's password")


@pytest.fixture(autouse=True)
def cheapUnknownNames(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The in-process portal's stand-in hash for unknown names, at the tests' cost."""
    from dit4c.portal import security

    monkeypatch.setattr(security, "_dummyHash", _cheapDummy)
    yield
