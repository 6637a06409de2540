"""
The portal's store: users, sessions, API tokens, schedulers, images,
instances, shares and failed logins, in SQLite (one file, the embedded
default) or PostgreSQL (several portal processes), behind ``IStore``: one
interface per area (``IPeople``, ``ISessions``, ``IInstances``, ...), so a
part of the portal can ask for only the area it uses.

    store = await openStore("sqlite:///var/lib/dit4c/portal.db", reactor)
"""

from ._open import openStore
from ._sql import SQLStore
from .errors import Conflict, NotFound, StoreError
from .ids import hashToken, newInstanceId
from .interfaces import (
    IApiTokens,
    ICommands,
    IImages,
    IInstances,
    ILoginFailures,
    IOAuthCodes,
    IPageViews,
    IPeople,
    IPortals,
    IReports,
    ISchedulers,
    ISessions,
    IStore,
)
from .migrations import MIGRATIONS
from .model import (
    UNSET,
    ApiToken,
    Grant,
    Identity,
    Image,
    Instance,
    LoginFailures,
    PageView,
    Removed,
    Scheduler,
    Session,
    ShareLink,
    User,
)

__all__ = [
    "MIGRATIONS",
    "UNSET",
    "ApiToken",
    "Grant",
    "Conflict",
    "IApiTokens",
    "ICommands",
    "IImages",
    "IInstances",
    "ILoginFailures",
    "IOAuthCodes",
    "IPageViews",
    "IPeople",
    "IPortals",
    "IReports",
    "ISchedulers",
    "ISessions",
    "IStore",
    "Identity",
    "Image",
    "Instance",
    "LoginFailures",
    "NotFound",
    "PageView",
    "Removed",
    "SQLStore",
    "Scheduler",
    "Session",
    "ShareLink",
    "StoreError",
    "User",
    "hashToken",
    "newInstanceId",
    "openStore",
]
