"""
Password hashes for the people a test makes.

The portal hashes with Argon2id at its real cost (about 0.2 s of CPU per
hash or check, by design). A hash carries its own parameters, so the
portal checks a hash made here at argon2-cffi's ``CHEAPEST`` profile, which
it documents for tests, as quickly as it was made: the portal's login path
is the same, only the work is not. Passwords set through the portal itself
(admin form, API, ``dit4c user-add``) still cost what they cost in use.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

_cheap = PasswordHasher.from_parameters(CHEAPEST)


def cheapHash(password: str) -> str:
    """An Argon2id hash of ``password`` that the portal checks as it checks any other."""
    return _cheap.hash(password)
