"""
The portal's store: users, sessions, API tokens, schedulers, images,
instances, shares and failed logins, in SQLite (one file, the embedded
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
    LoginFailures,
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
    "LoginFailures",
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
