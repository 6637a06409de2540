"""
The records the portal's store holds, as frozen dataclasses.

Times are seconds since the epoch (floats) read from the store's clock;
flags are ``bool``; ids are URL-safe strings.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dit4c.common.life import ACTIONS, State
from dit4c.common.limits import ToolLimits

#: The longest login name.
MAX_LOGIN_NAME = 32

#: A login name: short, lower case, safe in a URL path, a page and a log line
#: as it is. Names are matched lower-cased (``Alice`` logs in as ``alice``).
LOGIN_NAME_RE: re.Pattern[str] = re.compile(rf"[a-z0-9](?:[a-z0-9._-]{{0,{MAX_LOGIN_NAME - 2}}}[a-z0-9])?")


@dataclass(frozen=True)
class User:
    id: str
    #: Unique, lower-case login name.
    name: str
    email: str | None
    #: A password hash (the portal's own format), or None for external login only.
    password_hash: str | None
    display_name: str
    is_admin: bool
    #: The most instances this user may run at once; None for the portal's default.
    max_instances: int | None
    created: float
    disabled: bool
    #: Their password was set by an administrator (a reset): they choose
    #: their own at their next login, before anything else.
    password_reset: bool = False


@dataclass(frozen=True)
class Identity:
    """An external login (OIDC, GitHub) linked to a user."""

    provider: str
    subject: str
    user_id: str


@dataclass(frozen=True)
class Session:
    """
    A browser session. ``id`` is the secret the browser presents: the store
    keeps only its SHA-256, so ``id`` is only ever what the caller gave.
    """

    id: str
    user_id: str
    csrf: str
    created: float
    expires: float
    last_seen: float


@dataclass(frozen=True)
class ApiToken:
    """A bearer token for the REST API; the token itself is shown only once."""

    id: str
    user_id: str
    name: str
    token_hash: str
    created: float
    last_used: float | None
    revoked: bool


@dataclass(frozen=True)
class Scheduler:
    id: str
    name: str
    #: The scheduler's public key, a JWK as JSON text.
    public_jwk: str
    created: float
    disabled: bool


@dataclass(frozen=True)
class Image:
    id: str
    name: str
    #: An image reference (``docker.io/jupyter/base-notebook:latest``) or a saved image's URL.
    ref: str
    digest: str | None
    #: None for a catalogue entry.
    owner_id: str | None
    #: The tool's HTTP port, or None to take the image's lowest exposed port.
    port: int | None
    created: float
    deleted: bool
    #: What each instance of it may use (a saved image keeps its tool's).
    limits: ToolLimits = field(default_factory=ToolLimits)


@dataclass(frozen=True)
class Instance:
    #: DNS-label-safe and time-sortable (see ``newInstanceId``).
    id: str
    owner_id: str
    image_id: str
    scheduler_id: str | None
    state: State
    #: Why it is in this state (shown to the user), chiefly for ``errored``.
    reason: str | None
    url: str | None
    #: The instance's public key, a JWK as JSON text.
    public_jwk: str | None
    created: float
    updated: float
    #: When traffic last reached it, as its helpers reported (None: none yet).
    active_at: float | None = None

    def __post_init__(self) -> None:
        # The store hands states over by name; they are checked (and made States) here.
        object.__setattr__(self, "state", State(self.state))


@dataclass(frozen=True)
class ShareLink:
    """A link that gives whoever redeems it (logged in) use of an instance, until revoked."""

    id: str
    instance_id: str
    token_hash: str
    created: float
    revoked: bool


@dataclass(frozen=True)
class Grant:
    """Someone who may use an instance that is not theirs, and how they came to."""

    user_id: str
    #: Their login name: what the owner sees and types.
    name: str
    #: Since when (the share, or their first use of the link).
    since: float
    #: The share link they followed; None if the owner named them.
    link_id: str | None


@dataclass(frozen=True)
class Removed:
    """What went with a removed person."""

    #: Their instances' records (every one discarded).
    instances: int
    #: Their saved images as they were, no longer listed, shared or served.
    images: tuple[Image, ...]


@dataclass(frozen=True)
class LoginFailures:
    """Failed logins counted for one key (an address, a name at an address)."""

    key: str
    failures: int
    #: When the key's latest attempt was let through.
    latest: float


class Unset(enum.Enum):
    """The type of ``UNSET``."""

    UNSET = "UNSET"


#: "Leave this field as it is" in ``update*`` calls, where None means "clear it".
UNSET = Unset.UNSET


@dataclass(frozen=True)
class OAuthCode:
    """
    A one-time OAuth 2 authorization code (RFC 6749 section 4.1), bound to
    the client, redirect URI, user and PKCE challenge it was issued for. The
    code itself is never stored, only its hash.
    """

    code_hash: str
    #: The instance the code is for.
    client_id: str
    redirect_uri: str
    user_id: str
    #: ``BASE64URL(SHA256(code_verifier))`` (RFC 7636, method ``S256``).
    code_challenge: str
    created: float
    expires: float
    used: bool
    #: The hash of the portal session the code was issued in (None: none).
    session_hash: str | None = None


#: What a scheduler can be told to do with an instance.
COMMAND_OPS: tuple[str, ...] = ("start", *(action.op for action in ACTIONS.values()))

#: The most a command's parameters may take, as JSON text.
MAX_COMMAND_PARAMS = 64 * 1024


@dataclass(frozen=True)
class Command:
    """
    An instruction for a scheduler about one instance, kept (and re-sent
    after every reconnect) until the scheduler acknowledges it.
    """

    id: str
    scheduler_id: str
    instance_id: str
    #: Orders one scheduler's commands: later commands have larger numbers.
    seq: int
    #: One of ``COMMAND_OPS``.
    op: str
    #: A JSON object: the image reference and port for ``start``, say.
    params: Mapping[str, Any]
    created: float
    #: When the scheduler acknowledged it; None while it is pending.
    acked: float | None


@dataclass(frozen=True)
class PageView:
    """
    What one page of a person's (``GET /``, ``GET /api/v1/instances``)
    shows, read in one transaction (``IPageViews.pageView``): every part
    from the same moment of the database.
    """

    user: User
    #: The session the person came with, if they came with a session cookie.
    session: Session | None
    #: Their own instances, discarded ones left out, and those shared with them (not their own).
    instances: list[Instance]
    shared: list[Instance]
    #: Only with ``full``: what they may start (catalogue, own images, images shared with
    #: them), the name of every image their instances use, the schedulers they may use, and
    #: for each of their instances how many people it is shared with (none: left out).
    images: list[Image] = field(default_factory=list)
    imageNames: dict[str, str] = field(default_factory=dict)
    schedulers: list[Scheduler] = field(default_factory=list)
    sharedCounts: dict[str, int] = field(default_factory=dict)
