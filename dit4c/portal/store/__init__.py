"""
The portal's store: users, sessions, API tokens, schedulers, images,
instances, shares and login attempts, in SQLite (one file, the embedded
default) or PostgreSQL (several portal processes), behind ``IStore``.

    store = await openStore("sqlite:///var/lib/dit4c/portal.db", reactor)
"""

from ._open import openStore
from ._sql import SQLStore
from .errors import Conflict, NotFound, StoreError
from .ids import hashToken, newInstanceId
from .interfaces import IStore
from .migrations import MIGRATIONS
from .model import (
    UNSET,
    ApiToken,
    Identity,
    Image,
    Instance,
    LoginAttempt,
    Scheduler,
    Session,
    Share,
    ShareLink,
    User,
)

__all__ = [
    "MIGRATIONS",
    "UNSET",
    "ApiToken",
    "Conflict",
    "IStore",
    "Identity",
    "Image",
    "Instance",
    "LoginAttempt",
    "NotFound",
    "SQLStore",
    "Scheduler",
    "Session",
    "Share",
    "ShareLink",
    "StoreError",
    "User",
    "hashToken",
    "newInstanceId",
    "openStore",
]
