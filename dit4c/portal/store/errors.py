"""
What can go wrong in the portal's store.

Each exception's docstring is the message a person sees when no more
particular one was given.
"""

from __future__ import annotations


class StoreError(Exception):
    """The portal's database could not do that."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class StoreClosed(StoreError):
    """The portal's store is closed: the portal is stopping; try again in a moment."""


class InvalidName(StoreError, ValueError):
    """That is not a login name: 1 to 32 of a-z, 0-9, '.', '_' and '-', beginning and ending with a letter or digit."""


class NotFound(StoreError):
    """There is no such record."""


class Conflict(StoreError):
    """That conflicts with what the portal already holds: it exists already, or it changed meanwhile."""


class QuotaReached(StoreError):
    """That person already runs as many instances as they may."""

    def __init__(self, quota: int, active: int) -> None:
        super().__init__(f"{active} active instance{'s' if active != 1 else ''}, and the quota is {quota}")
        #: How many instances the person may run at once.
        self.quota = quota
        #: How many they had when the claim was refused (``dit4c.common.life.ACTIVE``).
        self.active = active
