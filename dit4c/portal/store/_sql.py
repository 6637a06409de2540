"""
``SQLStore``: ``IStore`` over a DB-API driver through ``adbapi.ConnectionPool``,
for SQLite and PostgreSQL alike (``_dialect`` holds what differs).

Each public method is a coroutine turned into a ``Deferred``: it reads the
clock and checks its arguments on the reactor thread, then runs one
transaction in a pool thread.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from twisted.enterprise.adbapi import ConnectionLost, ConnectionPool
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.life import ACTIVE, STATES, State

from ._dialect import IDialect
from .errors import Conflict, NotFound, QuotaReached, StoreError
from .ids import hashToken, newId, newInstanceId, newToken
from .interfaces import COMMAND_OPS, MAX_COMMAND_PARAMS, Command, IStore, OAuthCode
from .migrations import MIGRATIONS, Migration, applyNext
from .model import (
    UNSET,
    ApiToken,
    Identity,
    Image,
    Instance,
    LoginFailures,
    Scheduler,
    Session,
    ShareLink,
    Unset,
    User,
)

P = ParamSpec("P")
T = TypeVar("T")


def _deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Make an ``async def`` method return a ``Deferred``."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


# -- rows to records ------------------------------------------------------------------------

_USER = ("id", "name", "email", "password_hash", "display_name", "is_admin", "max_instances", "created", "disabled")
_API_TOKEN = ("id", "user_id", "name", "token_hash", "created", "last_used", "revoked")
_SCHEDULER = ("id", "name", "public_jwk", "created", "disabled")
_IMAGE = ("id", "name", "ref", "digest", "owner_id", "port", "created", "deleted")
_INSTANCE = (
    "id", "owner_id", "image_id", "scheduler_id", "state", "reason", "url", "public_jwk", "created", "updated",
)  # fmt: skip
_SHARE_LINK = ("id", "instance_id", "token_hash", "created", "revoked")


#: The states that count against a person's quota, as the database holds them.
_ACTIVE: tuple[str, ...] = tuple(sorted(state.value for state in ACTIVE))


def _cols(columns: Sequence[str], alias: str | None = None) -> str:
    return ", ".join(f"{alias}.{c}" if alias else c for c in columns)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _user(row: Sequence[Any]) -> User:
    return User(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7], bool(row[8]))


def _apiToken(row: Sequence[Any]) -> ApiToken:
    return ApiToken(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


def _scheduler(row: Sequence[Any]) -> Scheduler:
    return Scheduler(row[0], row[1], row[2], row[3], bool(row[4]))


def _image(row: Sequence[Any]) -> Image:
    return Image(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]))


def _instance(row: Sequence[Any]) -> Instance:
    return Instance(*row)


def _shareLink(row: Sequence[Any]) -> ShareLink:
    return ShareLink(row[0], row[1], row[2], row[3], bool(row[4]))


_OAUTH_CODE = (
    "code_hash", "client_id", "redirect_uri", "user_id", "code_challenge", "created", "expires", "used", "session_hash",
)  # fmt: skip


def _oauthCode(row: Sequence[Any]) -> OAuthCode:
    return OAuthCode(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])


def _loginName(name: str) -> str:
    name = name.strip().lower()
    if not name:
        raise ValueError("a login name must not be empty")
    return name


def _checkState(state: str) -> str:
    try:
        return State(state).value
    except ValueError:
        raise ValueError(f"{state!r} is not an instance state (one of {', '.join(STATES)})") from None


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that are not ``UNSET``, flags as 0/1 (PostgreSQL will not take a bool for INTEGER)."""
    return {
        name: int(value) if isinstance(value, bool) else value
        for name, value in fields.items()
        if value is not UNSET
    }


class _Txn:
    """One transaction's cursor, taking SQL with ``?`` placeholders. Used in a pool thread."""

    def __init__(self, cursor: Any, dialect: IDialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        self.execute(sql, params)
        return self._cursor.fetchone()

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        self.execute(sql, params)
        return list(self._cursor.fetchall())

    def update(self, table: str, key: str, keyValue: Any, fields: dict[str, Any]) -> int:
        """``UPDATE table SET fields WHERE key = keyValue`` (names from code only)."""
        if not fields:
            return len(self.all(f"SELECT {key} FROM {table} WHERE {key} = ?", (keyValue,)))
        sets = ", ".join(f"{name} = ?" for name in fields)
        return self.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?", (*fields.values(), keyValue))


@implementer(IStore)
class SQLStore:
    """The portal's store in an SQL database. Open one with ``openStore``."""

    log = Logger()

    def __init__(self, pool: ConnectionPool, dialect: IDialect, clock: IReactorTime) -> None:
        self._pool = pool
        self._dialect = dialect
        self._clock = clock
        self._closed = False

    @property
    def dialect(self) -> IDialect:
        return self._dialect

    def _now(self) -> float:
        return self._clock.seconds()

    def _run(
        self,
        work: Callable[[_Txn], T],
        *,
        conflict: str | None = None,
        missing: str | None = None,
    ) -> Deferred[T]:
        """
        Run ``work`` in one transaction in a pool thread. Driver errors
        become store errors: ``conflict`` and ``missing`` are the messages
        for a uniqueness and a reference violation.
        """
        if self._closed:
            raise StoreError("the store is closed")
        dialect = self._dialect

        def interaction(cursor: Any) -> T:
            dialect.begin(cursor)
            return work(_Txn(cursor, dialect))

        def translate(failure: Failure) -> Failure:
            error = failure.value
            if error is None or isinstance(error, StoreError):
                return failure
            if isinstance(error, ConnectionLost):
                raise StoreError("lost the connection to the database: try again") from error
            kind = dialect.classify(error)
            if kind is None:
                return failure
            if kind is Conflict:
                raise Conflict(conflict or "") from error
            if kind is NotFound:
                raise NotFound(missing or "") from error
            raise kind(f"the database failed: {error}") from error

        d: Deferred[T] = self._pool.runInteraction(interaction)
        d.addErrback(translate)
        return d

    async def _migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        """Apply, one transaction each, the migrations the database lacks."""
        dialect = self._dialect
        while True:
            applied = await self._pool.runInteraction(applyNext, dialect, migrations, self._now())
            if applied is None:
                return
            self.log.info("store schema migrated to version {version}", version=applied)

    # -- users and external identities -------------------------------------------------------

    @_deferred
    async def createUser(
        self,
        name: str,
        *,
        email: str | None = None,
        password_hash: str | None = None,
        display_name: str | None = None,
        is_admin: bool = False,
        max_instances: int | None = None,
    ) -> User:
        name = _loginName(name)
        user = User(
            id=newId(),
            name=name,
            email=email,
            password_hash=password_hash,
            display_name=name if display_name is None else display_name,
            is_admin=is_admin,
            max_instances=max_instances,
            created=self._now(),
            disabled=False,
        )

        def work(t: _Txn) -> User:
            t.execute(
                f"INSERT INTO users ({_cols(_USER)}) VALUES ({_marks(len(_USER))})",
                (
                    user.id, user.name, user.email, user.password_hash, user.display_name,
                    int(user.is_admin), user.max_instances, user.created, int(user.disabled),
                ),
            )  # fmt: skip
            return user

        return await self._run(work, conflict=f"the login name {name!r} is taken")

    @_deferred
    async def userById(self, user_id: str) -> User | None:
        def work(t: _Txn) -> User | None:
            row = t.one(f"SELECT {_cols(_USER)} FROM users WHERE id = ?", (user_id,))
            return _user(row) if row else None

        return await self._run(work)

    @_deferred
    async def userByName(self, name: str) -> User | None:
        name = name.strip().lower()

        def work(t: _Txn) -> User | None:
            row = t.one(f"SELECT {_cols(_USER)} FROM users WHERE name = ?", (name,))
            return _user(row) if row else None

        return await self._run(work)

    @_deferred
    async def userByIdentity(self, provider: str, subject: str) -> User | None:
        def work(t: _Txn) -> User | None:
            row = t.one(
                f"SELECT {_cols(_USER, 'u')} FROM identities i JOIN users u ON u.id = i.user_id"
                " WHERE i.provider = ? AND i.subject = ?",
                (provider, subject),
            )
            return _user(row) if row else None

        return await self._run(work)

    @_deferred
    async def linkIdentity(self, user_id: str, provider: str, subject: str) -> Identity:
        now = self._now()

        def work(t: _Txn) -> Identity:
            t.execute(
                "INSERT INTO identities (provider, subject, user_id, created) VALUES (?, ?, ?, ?)",
                (provider, subject, user_id, now),
            )
            return Identity(provider, subject, user_id)

        return await self._run(
            work,
            conflict=f"that {provider} login is linked to a user already",
            missing=f"there is no user {user_id!r}",
        )

    @_deferred
    async def identitiesOf(self, user_id: str) -> list[Identity]:
        def work(t: _Txn) -> list[Identity]:
            rows = t.all(
                "SELECT provider, subject, user_id FROM identities WHERE user_id = ?"
                " ORDER BY provider, subject",
                (user_id,),
            )
            return [Identity(*row) for row in rows]

        return await self._run(work)

    @_deferred
    async def listUsers(self, offset: int = 0, limit: int = 100) -> list[User]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")

        def work(t: _Txn) -> list[User]:
            rows = t.all(
                f"SELECT {_cols(_USER)} FROM users ORDER BY name LIMIT ? OFFSET ?", (limit, offset)
            )
            return [_user(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def countUsers(self) -> int:
        def work(t: _Txn) -> int:
            return int(t.one("SELECT COUNT(*) FROM users")[0])

        return await self._run(work)

    @_deferred
    async def updateUser(
        self,
        user_id: str,
        *,
        name: str | Unset = UNSET,
        email: str | None | Unset = UNSET,
        password_hash: str | None | Unset = UNSET,
        display_name: str | Unset = UNSET,
        is_admin: bool | Unset = UNSET,
        max_instances: int | None | Unset = UNSET,
        disabled: bool | Unset = UNSET,
    ) -> User:
        if not isinstance(name, Unset):
            name = _loginName(name)
        fields = _given(
            name=name,
            email=email,
            password_hash=password_hash,
            display_name=display_name,
            is_admin=is_admin,
            max_instances=max_instances,
            disabled=disabled,
        )

        def work(t: _Txn) -> User:
            if not t.update("users", "id", user_id, fields):
                raise NotFound(f"there is no user {user_id!r}")
            return _user(t.one(f"SELECT {_cols(_USER)} FROM users WHERE id = ?", (user_id,)))

        return await self._run(work, conflict=f"the login name {name!r} is taken")

    # -- browser sessions ----------------------------------------------------------------------

    @_deferred
    async def createSession(self, user_id: str, lifetime: float) -> Session:
        now = self._now()
        session = Session(
            id=newToken(), user_id=user_id, csrf=newToken(), created=now, expires=now + lifetime, last_seen=now
        )

        def work(t: _Txn) -> Session:
            t.execute(
                "INSERT INTO sessions (token_hash, user_id, csrf, created, expires, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (hashToken(session.id), user_id, session.csrf, now, session.expires, now),
            )
            return session

        return await self._run(work, missing=f"there is no user {user_id!r}")

    @_deferred
    async def sessionByToken(self, token: str) -> Session | None:
        now = self._now()

        def work(t: _Txn) -> Session | None:
            row = t.one(
                "SELECT s.user_id, s.csrf, s.created, s.expires, s.last_seen"
                " FROM sessions s JOIN users u ON u.id = s.user_id"
                " WHERE s.token_hash = ? AND s.expires > ? AND u.disabled = 0",
                (hashToken(token), now),
            )
            return Session(token, *row) if row else None

        return await self._run(work)

    @_deferred
    async def touchSession(self, token: str, expires: float | None = None) -> None:
        now = self._now()
        fields: dict[str, Any] = {"last_seen": now}
        if expires is not None:
            fields["expires"] = expires

        def work(t: _Txn) -> None:
            t.update("sessions", "token_hash", hashToken(token), fields)

        await self._run(work)

    @_deferred
    async def deleteSession(self, token: str) -> None:
        def work(t: _Txn) -> None:
            t.execute("DELETE FROM sessions WHERE token_hash = ?", (hashToken(token),))

        await self._run(work)

    @_deferred
    async def sessionLive(self, token_hash: str) -> bool:
        now = self._now()

        def work(t: _Txn) -> bool:
            row = t.one(
                "SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id"
                " WHERE s.token_hash = ? AND s.expires > ? AND u.disabled = 0",
                (token_hash, now),
            )
            return row is not None

        return await self._run(work)

    @_deferred
    async def deleteSessionsOfUser(self, user_id: str) -> int:
        def work(t: _Txn) -> int:
            return t.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))

        return await self._run(work)

    @_deferred
    async def deleteExpiredSessions(self) -> int:
        now = self._now()

        def work(t: _Txn) -> int:
            return t.execute("DELETE FROM sessions WHERE expires <= ?", (now,))

        return await self._run(work)

    # -- API tokens ---------------------------------------------------------------------------------

    @_deferred
    async def createApiToken(self, user_id: str, name: str) -> tuple[ApiToken, str]:
        token = "dit4c_" + newToken()
        record = ApiToken(
            id=newId(), user_id=user_id, name=name, token_hash=hashToken(token),
            created=self._now(), last_used=None, revoked=False,
        )  # fmt: skip

        def work(t: _Txn) -> tuple[ApiToken, str]:
            t.execute(
                f"INSERT INTO api_tokens ({_cols(_API_TOKEN)}) VALUES ({_marks(len(_API_TOKEN))})",
                (record.id, user_id, name, record.token_hash, record.created, None, 0),
            )
            return record, token

        return await self._run(work, missing=f"there is no user {user_id!r}")

    @_deferred
    async def userByApiToken(self, token: str) -> User | None:
        now = self._now()

        def work(t: _Txn) -> User | None:
            row = t.one(
                f"SELECT t.id, {_cols(_USER, 'u')} FROM api_tokens t JOIN users u ON u.id = t.user_id"
                " WHERE t.token_hash = ? AND t.revoked = 0 AND u.disabled = 0",
                (hashToken(token),),
            )
            if not row:
                return None
            t.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, row[0]))
            return _user(row[1:])

        return await self._run(work)

    @_deferred
    async def revokeApiToken(self, token_id: str, user_id: str | None = None) -> None:
        def work(t: _Txn) -> None:
            if user_id is None:
                changed = t.execute("UPDATE api_tokens SET revoked = 1 WHERE id = ?", (token_id,))
            else:
                changed = t.execute(
                    "UPDATE api_tokens SET revoked = 1 WHERE id = ? AND user_id = ?", (token_id, user_id)
                )
            if not changed:
                raise NotFound(f"there is no API token {token_id!r}")

        await self._run(work)

    @_deferred
    async def listApiTokens(self, user_id: str) -> list[ApiToken]:
        def work(t: _Txn) -> list[ApiToken]:
            rows = t.all(
                f"SELECT {_cols(_API_TOKEN)} FROM api_tokens WHERE user_id = ? ORDER BY created, id",
                (user_id,),
            )
            return [_apiToken(row) for row in rows]

        return await self._run(work)

    # -- schedulers -------------------------------------------------------------------------------

    @_deferred
    async def createScheduler(self, name: str, public_jwk: str, *, id: str | None = None) -> Scheduler:
        scheduler = Scheduler(id or newId(), name, public_jwk, self._now(), False)

        def work(t: _Txn) -> Scheduler:
            t.execute(
                f"INSERT INTO schedulers ({_cols(_SCHEDULER)}) VALUES ({_marks(len(_SCHEDULER))})",
                (scheduler.id, name, public_jwk, scheduler.created, 0),
            )
            return scheduler

        return await self._run(work, conflict=f"a scheduler named {name!r} (or with that id) exists")

    @_deferred
    async def listSchedulers(self) -> list[Scheduler]:
        def work(t: _Txn) -> list[Scheduler]:
            return [_scheduler(row) for row in t.all(f"SELECT {_cols(_SCHEDULER)} FROM schedulers ORDER BY name")]

        return await self._run(work)

    @_deferred
    async def schedulerById(self, scheduler_id: str) -> Scheduler | None:
        def work(t: _Txn) -> Scheduler | None:
            row = t.one(f"SELECT {_cols(_SCHEDULER)} FROM schedulers WHERE id = ?", (scheduler_id,))
            return _scheduler(row) if row else None

        return await self._run(work)

    @_deferred
    async def updateScheduler(
        self,
        scheduler_id: str,
        *,
        name: str | Unset = UNSET,
        public_jwk: str | Unset = UNSET,
        disabled: bool | Unset = UNSET,
    ) -> Scheduler:
        fields = _given(name=name, public_jwk=public_jwk, disabled=disabled)

        def work(t: _Txn) -> Scheduler:
            if not t.update("schedulers", "id", scheduler_id, fields):
                raise NotFound(f"there is no scheduler {scheduler_id!r}")
            return _scheduler(t.one(f"SELECT {_cols(_SCHEDULER)} FROM schedulers WHERE id = ?", (scheduler_id,)))

        return await self._run(work, conflict=f"a scheduler named {name!r} exists")

    # -- images ---------------------------------------------------------------------------------------

    @_deferred
    async def createImage(
        self,
        name: str,
        ref: str,
        *,
        owner_id: str | None = None,
        digest: str | None = None,
        port: int | None = None,
    ) -> Image:
        image = Image(newId(), name, ref, digest, owner_id, port, self._now(), False)

        def work(t: _Txn) -> Image:
            t.execute(
                f"INSERT INTO images ({_cols(_IMAGE)}) VALUES ({_marks(len(_IMAGE))})",
                (image.id, name, ref, digest, owner_id, port, image.created, 0),
            )
            return image

        return await self._run(work, missing=f"there is no user {owner_id!r}")

    @_deferred
    async def listCatalogue(self) -> list[Image]:
        def work(t: _Txn) -> list[Image]:
            rows = t.all(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id IS NULL AND deleted = 0 ORDER BY name, id"
            )
            return [_image(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def listImagesOf(self, user_id: str) -> list[Image]:
        def work(t: _Txn) -> list[Image]:
            rows = t.all(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND deleted = 0 ORDER BY created, id",
                (user_id,),
            )
            return [_image(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def listImagesSharedWith(self, user_id: str) -> list[Image]:
        def work(t: _Txn) -> list[Image]:
            rows = t.all(
                f"SELECT {_cols(_IMAGE, 'i')} FROM images i JOIN image_shares s ON s.image_id = i.id"
                " WHERE s.user_id = ? AND i.deleted = 0 ORDER BY i.created, i.id",
                (user_id,),
            )
            return [_image(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def imageById(self, image_id: str) -> Image | None:
        def work(t: _Txn) -> Image | None:
            row = t.one(f"SELECT {_cols(_IMAGE)} FROM images WHERE id = ?", (image_id,))
            return _image(row) if row else None

        return await self._run(work)

    @_deferred
    async def deleteImage(self, image_id: str) -> None:
        def work(t: _Txn) -> None:
            if not t.execute("UPDATE images SET deleted = 1 WHERE id = ?", (image_id,)):
                raise NotFound(f"there is no image {image_id!r}")

        await self._run(work)

    @_deferred
    async def shareImage(self, image_id: str, user_id: str) -> None:
        now = self._now()

        def work(t: _Txn) -> None:
            t.execute(
                "INSERT INTO image_shares (image_id, user_id, created) VALUES (?, ?, ?)"
                " ON CONFLICT (image_id, user_id) DO NOTHING",
                (image_id, user_id, now),
            )

        await self._run(work, missing=f"there is no image {image_id!r} or no user {user_id!r}")

    @_deferred
    async def unshareImage(self, image_id: str, user_id: str) -> None:
        def work(t: _Txn) -> None:
            t.execute("DELETE FROM image_shares WHERE image_id = ? AND user_id = ?", (image_id, user_id))

        await self._run(work)

    @_deferred
    async def mayUseImage(self, user_id: str, image_id: str) -> bool:
        def work(t: _Txn) -> bool:
            row = t.one(
                "SELECT 1 FROM images i WHERE i.id = ? AND i.deleted = 0 AND ("
                " i.owner_id IS NULL OR i.owner_id = ?"
                " OR EXISTS (SELECT 1 FROM image_shares s WHERE s.image_id = i.id AND s.user_id = ?))",
                (image_id, user_id, user_id),
            )
            return row is not None

        return await self._run(work)

    # -- instances --------------------------------------------------------------------------------------

    @_deferred
    async def createInstance(
        self,
        owner_id: str,
        image_id: str,
        *,
        scheduler_id: str | None = None,
        public_jwk: str | None = None,
        quota: int | None = None,
    ) -> Instance:
        if quota is not None and quota < 0:
            raise ValueError("a quota must not be negative")
        now = self._now()
        instance = Instance(
            id=newInstanceId(now), owner_id=owner_id, image_id=image_id, scheduler_id=scheduler_id,
            state=State.REQUESTED, reason=None, url=None, public_jwk=public_jwk, created=now, updated=now,
        )  # fmt: skip
        dialect = self._dialect

        def work(t: _Txn) -> Instance:
            if quota is not None:
                # The count and the insert are one claim: the owner's row is
                # held first, so of concurrent claims for one person each
                # counts what the ones before it made. Claims for other
                # people lock other rows (PostgreSQL) and wait only for the
                # one writer SQLite has anyway (BEGIN IMMEDIATE).
                if t.one(dialect.forUpdate("SELECT id FROM users WHERE id = ?"), (owner_id,)) is None:
                    raise NotFound(f"there is no user {owner_id!r}")
            image = t.one("SELECT deleted FROM images WHERE id = ?", (image_id,))
            if not image or image[0]:
                raise NotFound(f"there is no image {image_id!r}")
            if quota is not None:
                active = int(
                    t.one(
                        f"SELECT COUNT(*) FROM instances WHERE owner_id = ? AND state IN ({_marks(len(_ACTIVE))})",
                        (owner_id, *_ACTIVE),
                    )[0]
                )
                if active >= quota:
                    raise QuotaReached(quota, active)
            t.execute(
                f"INSERT INTO instances ({_cols(_INSTANCE)}) VALUES ({_marks(len(_INSTANCE))})",
                (
                    instance.id, owner_id, image_id, scheduler_id, instance.state, None, None,
                    public_jwk, now, now,
                ),
            )  # fmt: skip
            return instance

        return await self._run(
            work, missing=f"there is no user {owner_id!r}" + (f" or no scheduler {scheduler_id!r}" if scheduler_id else "")
        )

    @_deferred
    async def instanceById(self, instance_id: str) -> Instance | None:
        def work(t: _Txn) -> Instance | None:
            row = t.one(f"SELECT {_cols(_INSTANCE)} FROM instances WHERE id = ?", (instance_id,))
            return _instance(row) if row else None

        return await self._run(work)

    def _listInstances(self, where: str, params: tuple[Any, ...], includeDiscarded: bool) -> Deferred[list[Instance]]:
        if not includeDiscarded:
            where += " AND state <> ?"
            params += (State.DISCARDED.value,)

        def work(t: _Txn) -> list[Instance]:
            rows = t.all(f"SELECT {_cols(_INSTANCE)} FROM instances WHERE {where} ORDER BY id", params)
            return [_instance(row) for row in rows]

        return self._run(work)

    @_deferred
    async def listInstancesOf(self, user_id: str, includeDiscarded: bool = False) -> list[Instance]:
        return await self._listInstances("owner_id = ?", (user_id,), includeDiscarded)

    @_deferred
    async def listInstancesIn(self, states: Iterable[str], updatedBefore: float) -> list[Instance]:
        wanted = tuple(_checkState(state) for state in states)
        if not wanted:
            return []

        def work(t: _Txn) -> list[Instance]:
            rows = t.all(
                f"SELECT {_cols(_INSTANCE)} FROM instances"
                f" WHERE state IN ({_marks(len(wanted))}) AND updated < ? ORDER BY updated",
                (*wanted, updatedBefore),
            )
            return [_instance(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def listInstancesOfScheduler(self, scheduler_id: str, includeDiscarded: bool = False) -> list[Instance]:
        return await self._listInstances("scheduler_id = ?", (scheduler_id,), includeDiscarded)

    @_deferred
    async def listInstancesSharedWith(self, user_id: str) -> list[Instance]:
        def work(t: _Txn) -> list[Instance]:
            # Start from this person's shares and grants (indexed by user),
            # not from every instance: the cost follows what is shared with
            # them, not the size of the portal.
            rows = t.all(
                f"SELECT {_cols(_INSTANCE, 'i')} FROM instances i"
                " WHERE i.id IN ("
                "  SELECT s.instance_id FROM instance_shares s WHERE s.user_id = ?"
                "  UNION SELECT l.instance_id FROM share_link_grants g JOIN share_links l ON l.id = g.link_id"
                "  WHERE g.user_id = ? AND l.revoked = 0)"
                " AND i.state <> ? AND i.owner_id <> ?"
                " ORDER BY i.id",
                (user_id, user_id, State.DISCARDED.value, user_id),
            )
            return [_instance(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def updateInstance(
        self,
        instance_id: str,
        *,
        state: str | Unset = UNSET,
        reason: str | None | Unset = UNSET,
        url: str | None | Unset = UNSET,
        public_jwk: str | None | Unset = UNSET,
        scheduler_id: str | None | Unset = UNSET,
        expected_state: str | Collection[str] | None = None,
    ) -> Instance:
        if not isinstance(state, Unset):
            _checkState(state)
        expected: tuple[str, ...] | None = None
        if expected_state is not None:
            expected = (expected_state,) if isinstance(expected_state, str) else tuple(expected_state)
            for each in expected:
                _checkState(each)
            if not expected:
                raise ValueError("expected_state must name at least one state")
        fields = _given(state=state, reason=reason, url=url, public_jwk=public_jwk, scheduler_id=scheduler_id)
        fields["updated"] = self._now()
        sets = ", ".join(f"{name} = ?" for name in fields)

        def work(t: _Txn) -> Instance:
            where, params = "id = ?", [instance_id]
            if expected is not None:
                where += f" AND state IN ({_marks(len(expected))})"
                params += expected
            if not t.execute(f"UPDATE instances SET {sets} WHERE {where}", (*fields.values(), *params)):
                row = t.one("SELECT state FROM instances WHERE id = ?", (instance_id,))
                if row is None:
                    raise NotFound(f"there is no instance {instance_id!r}")
                raise Conflict(
                    f"instance {instance_id} is {row[0]}, not {' or '.join(expected or ())}"
                )
            return _instance(t.one(f"SELECT {_cols(_INSTANCE)} FROM instances WHERE id = ?", (instance_id,)))

        return await self._run(work, missing=f"there is no scheduler {scheduler_id!r}")

    # -- sharing instances -----------------------------------------------------------------------------

    @_deferred
    async def shareInstance(self, instance_id: str, user_id: str) -> None:
        now = self._now()

        def work(t: _Txn) -> None:
            t.execute(
                "INSERT INTO instance_shares (instance_id, user_id, created) VALUES (?, ?, ?)"
                " ON CONFLICT (instance_id, user_id) DO NOTHING",
                (instance_id, user_id, now),
            )

        await self._run(work, missing=f"there is no instance {instance_id!r} or no user {user_id!r}")

    @_deferred
    async def unshareInstance(self, instance_id: str, user_id: str) -> None:
        def work(t: _Txn) -> None:
            t.execute("DELETE FROM instance_shares WHERE instance_id = ? AND user_id = ?", (instance_id, user_id))

        await self._run(work)

    @_deferred
    async def listInstanceShares(self, instance_id: str) -> list[str]:
        def work(t: _Txn) -> list[str]:
            rows = t.all(
                "SELECT user_id FROM instance_shares WHERE instance_id = ? ORDER BY created, user_id",
                (instance_id,),
            )
            return [row[0] for row in rows]

        return await self._run(work)

    @_deferred
    async def createShareLink(self, instance_id: str) -> tuple[ShareLink, str]:
        token = newToken()
        link = ShareLink(newId(), instance_id, hashToken(token), self._now(), False)

        def work(t: _Txn) -> tuple[ShareLink, str]:
            t.execute(
                f"INSERT INTO share_links ({_cols(_SHARE_LINK)}) VALUES ({_marks(len(_SHARE_LINK))})",
                (link.id, instance_id, link.token_hash, link.created, 0),
            )
            return link, token

        return await self._run(work, missing=f"there is no instance {instance_id!r}")

    @_deferred
    async def redeemShareLink(self, token: str, user_id: str) -> str | None:
        now = self._now()

        def work(t: _Txn) -> str | None:
            row = t.one(
                "SELECT id, instance_id FROM share_links WHERE token_hash = ? AND revoked = 0",
                (hashToken(token),),
            )
            if row is None:
                return None
            t.execute(
                "INSERT INTO share_link_grants (link_id, user_id, created) VALUES (?, ?, ?)"
                " ON CONFLICT (link_id, user_id) DO NOTHING",
                (row[0], user_id, now),
            )
            return str(row[1])

        return await self._run(work, missing=f"there is no user {user_id!r}")

    @_deferred
    async def revokeShareLink(self, link_id: str) -> None:
        def work(t: _Txn) -> None:
            if not t.execute("UPDATE share_links SET revoked = 1 WHERE id = ?", (link_id,)):
                raise NotFound(f"there is no share link {link_id!r}")

        await self._run(work)

    @_deferred
    async def listShareLinks(self, instance_id: str) -> list[ShareLink]:
        def work(t: _Txn) -> list[ShareLink]:
            rows = t.all(
                f"SELECT {_cols(_SHARE_LINK)} FROM share_links WHERE instance_id = ? ORDER BY created, id",
                (instance_id,),
            )
            return [_shareLink(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def mayUseInstance(self, user_id: str, instance_id: str) -> bool:
        def work(t: _Txn) -> bool:
            row = t.one(
                "SELECT 1 FROM instances i WHERE i.id = ? AND ("
                " i.owner_id = ?"
                " OR EXISTS (SELECT 1 FROM instance_shares s WHERE s.instance_id = i.id AND s.user_id = ?)"
                " OR EXISTS (SELECT 1 FROM share_link_grants g JOIN share_links l ON l.id = g.link_id"
                "  WHERE l.instance_id = i.id AND l.revoked = 0 AND g.user_id = ?))",
                (instance_id, user_id, user_id, user_id),
            )
            return row is not None

        return await self._run(work)

    # -- login throttling ------------------------------------------------------------------------------

    @_deferred
    async def claimLoginAttempt(
        self, delays: Mapping[str, Callable[[int], float]], now: float, forget: float
    ) -> float:
        # Rows are locked in one order (sorted keys), so two claims sharing
        # keys wait for each other instead of deadlocking.
        keys = sorted(delays)

        def work(t: _Txn) -> float:
            counted: dict[str, int] = {}
            wait = 0.0
            for key in keys:
                # The upsert locks the row (PostgreSQL) whether it was there or not.
                t.execute(
                    "INSERT INTO login_failures (key, failures, latest) VALUES (?, 0, ?)"
                    " ON CONFLICT (key) DO UPDATE SET latest = login_failures.latest",
                    (key, now),
                )
                failures, latest = t.one(
                    "SELECT failures, latest FROM login_failures WHERE key = ?", (key,)
                )
                if latest + forget <= now:
                    failures = 0
                counted[key] = failures
                wait = max(wait, latest + delays[key](failures) - now)
            if wait > 0:
                return wait
            for key in keys:
                t.execute(
                    "UPDATE login_failures SET failures = ?, latest = ? WHERE key = ?",
                    (counted[key] + 1, now, key),
                )
            return 0.0

        return await self._run(work)

    @_deferred
    async def loginSucceeded(self, clear: Sequence[str], takeBack: Sequence[str]) -> None:
        def work(t: _Txn) -> None:
            for key in sorted(set(clear) | set(takeBack)):
                if key in clear:
                    t.execute("DELETE FROM login_failures WHERE key = ?", (key,))
                else:
                    t.execute(
                        "UPDATE login_failures SET failures = failures - 1 WHERE key = ? AND failures > 0",
                        (key,),
                    )
                    t.execute("DELETE FROM login_failures WHERE key = ? AND failures = 0", (key,))

        await self._run(work)

    @_deferred
    async def loginFailures(self, key: str) -> LoginFailures | None:
        def work(t: _Txn) -> LoginFailures | None:
            row = t.one("SELECT key, failures, latest FROM login_failures WHERE key = ?", (key,))
            return LoginFailures(row[0], int(row[1]), float(row[2])) if row else None

        return await self._run(work)

    @_deferred
    async def forgetLoginFailures(self, before: float) -> int:
        def work(t: _Txn) -> int:
            return t.execute("DELETE FROM login_failures WHERE latest < ?", (before,))

        return await self._run(work)

    # -- the store ------------------------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._pool.close()
        return succeed(None)

    # -- OAuth 2 authorization codes -------------------------------------------------------------------

    @_deferred
    async def createOAuthCode(
        self,
        client_id: str,
        redirect_uri: str,
        user_id: str,
        code_challenge: str,
        lifetime: float,
        session: str | None = None,
    ) -> tuple[OAuthCode, str]:
        if not lifetime > 0:
            raise ValueError("lifetime must be positive")
        now = self._now()
        code = newToken()
        record = OAuthCode(
            code_hash=hashToken(code), client_id=client_id, redirect_uri=redirect_uri, user_id=user_id,
            code_challenge=code_challenge, created=now, expires=now + lifetime, used=False,
            session_hash=hashToken(session) if session is not None else None,
        )  # fmt: skip

        def work(t: _Txn) -> tuple[OAuthCode, str]:
            # Codes live a minute: forgetting the expired ones here keeps the
            # table small without a separate clean-up job.
            t.execute("DELETE FROM oauth_codes WHERE expires <= ?", (now,))
            t.execute(
                f"INSERT INTO oauth_codes ({_cols(_OAUTH_CODE)}) VALUES ({_marks(len(_OAUTH_CODE))})",
                (
                    record.code_hash, client_id, redirect_uri, user_id, code_challenge,
                    now, record.expires, 0, record.session_hash,
                ),
            )  # fmt: skip
            return record, code

        return await self._run(work, missing=f"there is no instance {client_id!r} or no user {user_id!r}")

    @_deferred
    async def redeemOAuthCode(self, code: str) -> OAuthCode | None:
        now = self._now()
        codeHash = hashToken(code)

        def work(t: _Txn) -> OAuthCode | None:
            # The compare-and-set: of concurrent attempts, only the one whose
            # UPDATE changed the row (the row lock on PostgreSQL, the write
            # lock on SQLite order them) gets the record.
            if not t.execute(
                "UPDATE oauth_codes SET used = 1 WHERE code_hash = ? AND used = 0 AND expires > ?",
                (codeHash, now),
            ):
                return None
            row = t.one(f"SELECT {_cols(_OAUTH_CODE)} FROM oauth_codes WHERE code_hash = ?", (codeHash,))
            return _oauthCode(row)

        return await self._run(work)

    # -- scheduler commands ------------------------------------------------------------------------------

    _COMMAND = ("id", "scheduler_id", "instance_id", "seq", "op", "params", "created", "acked")

    @staticmethod
    def _command(row: Sequence[Any]) -> Command:
        return Command(row[0], row[1], row[2], int(row[3]), row[4], json.loads(row[5]), row[6], row[7])

    @_deferred
    async def createCommand(
        self,
        scheduler_id: str,
        instance_id: str,
        op: str,
        params: Mapping[str, Any] | None = None,
    ) -> Command:
        if op not in COMMAND_OPS:
            raise ValueError(f"{op!r} is not a command (one of {', '.join(COMMAND_OPS)})")
        params = dict(params or {})
        try:
            text = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"command parameters must be JSON: {e}") from None
        if len(text.encode("utf-8")) > MAX_COMMAND_PARAMS:
            raise ValueError(f"command parameters are larger than {MAX_COMMAND_PARAMS} bytes")
        now = self._now()
        commandId = newId()
        columns = _cols(self._COMMAND)

        def work(t: _Txn) -> Command:
            # A no-op write to the scheduler's row locks it (PostgreSQL; on
            # SQLite the transaction is the only writer anyway), so that
            # concurrent commands for one scheduler take distinct, ordered seqs.
            if not t.execute("UPDATE schedulers SET name = name WHERE id = ?", (scheduler_id,)):
                raise NotFound(f"there is no scheduler {scheduler_id!r}")
            row = t.one("SELECT scheduler_id FROM instances WHERE id = ?", (instance_id,))
            if row is None:
                raise NotFound(f"there is no instance {instance_id!r}")
            if row[0] != scheduler_id:
                raise Conflict(f"instance {instance_id} is not placed on scheduler {scheduler_id}")
            seq = int(t.one("SELECT COALESCE(MAX(seq), 0) + 1 FROM commands WHERE scheduler_id = ?", (scheduler_id,))[0])
            t.execute(
                f"INSERT INTO commands ({columns}) VALUES ({_marks(len(self._COMMAND))})",
                (commandId, scheduler_id, instance_id, seq, op, text, now, None),
            )
            return Command(commandId, scheduler_id, instance_id, seq, op, json.loads(text), now, None)

        return await self._run(work)

    @_deferred
    async def pendingCommands(self, scheduler_id: str, limit: int = 1000) -> list[Command]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        columns = _cols(self._COMMAND)

        def work(t: _Txn) -> list[Command]:
            rows = t.all(
                f"SELECT {columns} FROM commands WHERE scheduler_id = ? AND acked IS NULL ORDER BY seq LIMIT ?",
                (scheduler_id, limit),
            )
            return [self._command(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def ackCommand(self, scheduler_id: str, command_id: str) -> bool:
        now = self._now()

        def work(t: _Txn) -> bool:
            return bool(
                t.execute(
                    "UPDATE commands SET acked = ? WHERE id = ? AND scheduler_id = ? AND acked IS NULL",
                    (now, command_id, scheduler_id),
                )
            )

        return await self._run(work)

    @_deferred
    async def commandById(self, command_id: str) -> Command | None:
        columns = _cols(self._COMMAND)

        def work(t: _Txn) -> Command | None:
            row = t.one(f"SELECT {columns} FROM commands WHERE id = ?", (command_id,))
            return self._command(row) if row else None

        return await self._run(work)

    @_deferred
    async def commandedInstances(self, scheduler_id: str) -> dict[str, bool]:
        def work(t: _Txn) -> dict[str, bool]:
            rows = t.all(
                "SELECT instance_id, COUNT(*) - COUNT(acked) FROM commands WHERE scheduler_id = ?"
                " GROUP BY instance_id",
                (scheduler_id,),
            )
            return {row[0]: int(row[1]) > 0 for row in rows}

        return await self._run(work)

    @_deferred
    async def deleteAckedCommands(self, before: float) -> int:
        def work(t: _Txn) -> int:
            return t.execute("DELETE FROM commands WHERE acked IS NOT NULL AND acked < ?", (before,))

        return await self._run(work)

    # -- reports from instances and the image server -----------------------------------------------------

    #: The longest token id (``jti``) remembered.
    MAX_TOKEN_ID = 255

    @_deferred
    async def spendTokenId(self, issuer: str, jti: str, expires: float) -> bool:
        if not jti or len(jti) > self.MAX_TOKEN_ID:
            raise ValueError(f"a token id must have 1 to {self.MAX_TOKEN_ID} characters")
        now = self._now()

        def work(t: _Txn) -> bool:
            # Ids live minutes: forgetting the expired ones here keeps the
            # table small without a separate clean-up job.
            t.execute("DELETE FROM used_token_ids WHERE expires <= ?", (now,))
            # The compare-and-set: the primary key lets one insert win.
            return bool(
                t.execute(
                    "INSERT INTO used_token_ids (issuer, jti, expires) VALUES (?, ?, ?)"
                    " ON CONFLICT (issuer, jti) DO NOTHING",
                    (issuer, jti, max(expires, now)),
                )
            )

        return await self._run(work)

    @_deferred
    async def findImages(self, reference: str) -> list[Image]:
        def work(t: _Txn) -> list[Image]:
            rows = t.all(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE deleted = 0 AND (id = ? OR ref = ? OR digest = ?)"
                " ORDER BY created, id",
                (reference, reference, reference),
            )
            return [_image(row) for row in rows]

        return await self._run(work)

    @_deferred
    async def saveInstanceImage(
        self,
        instance_id: str,
        name: str,
        ref: str,
        digest: str,
        *,
        states: Collection[str],
    ) -> tuple[Image, bool]:
        expected = tuple(states)
        for each in expected:
            _checkState(each)
        if not expected:
            raise ValueError("states must name at least one state")
        now = self._now()
        imageId = newId()

        def work(t: _Txn) -> tuple[Image, bool]:
            # A no-op write to the instance's row locks it (PostgreSQL; on
            # SQLite the transaction is the only writer anyway): concurrent
            # reports for one instance see each other's image.
            if not t.execute(
                f"UPDATE instances SET state = state WHERE id = ? AND state IN ({_marks(len(expected))})",
                (instance_id, *expected),
            ):
                row = t.one("SELECT state FROM instances WHERE id = ?", (instance_id,))
                if row is None:
                    raise NotFound(f"there is no instance {instance_id!r}")
                raise Conflict(f"instance {instance_id} is {row[0]}, not {' or '.join(expected)}")
            ownerId, port = t.one(
                "SELECT i.owner_id, m.port FROM instances i JOIN images m ON m.id = i.image_id WHERE i.id = ?",
                (instance_id,),
            )
            row = t.one(
                f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND digest = ? AND deleted = 0"
                " ORDER BY created, id",
                (ownerId, digest),
            )
            if row is not None:
                return _image(row), False
            image = Image(imageId, name, ref, digest, ownerId, port, now, False)
            t.execute(
                f"INSERT INTO images ({_cols(_IMAGE)}) VALUES ({_marks(len(_IMAGE))})",
                (image.id, name, ref, digest, ownerId, port, now, 0),
            )
            return image, True

        return await self._run(work)

    # -- who may run where ------------------------------------------------------------------------

    @_deferred
    async def setSchedulerUsers(self, scheduler_id: str, user_ids: Collection[str]) -> None:
        wanted = sorted(set(user_ids))

        def work(t: _Txn) -> None:
            if t.one("SELECT id FROM schedulers WHERE id = ?", (scheduler_id,)) is None:
                raise NotFound(f"there is no scheduler {scheduler_id!r}")
            t.execute("DELETE FROM scheduler_users WHERE scheduler_id = ?", (scheduler_id,))
            for user_id in wanted:
                t.execute(
                    "INSERT INTO scheduler_users (scheduler_id, user_id) VALUES (?, ?)", (scheduler_id, user_id)
                )

        await self._run(work)

    @_deferred
    async def schedulerUsers(self, scheduler_id: str) -> list[str]:
        def work(t: _Txn) -> list[str]:
            rows = t.all("SELECT user_id FROM scheduler_users WHERE scheduler_id = ? ORDER BY user_id", (scheduler_id,))
            return [row[0] for row in rows]

        return await self._run(work)

    @_deferred
    async def schedulersFor(self, user_id: str) -> list[Scheduler]:
        cols = ", ".join(f"s.{c}" for c in _SCHEDULER)

        def work(t: _Txn) -> list[Scheduler]:
            rows = t.all(
                f"SELECT {cols} FROM schedulers s WHERE s.disabled = 0 AND ("
                " NOT EXISTS (SELECT 1 FROM scheduler_users r WHERE r.scheduler_id = s.id)"
                " OR EXISTS (SELECT 1 FROM scheduler_users r WHERE r.scheduler_id = s.id AND r.user_id = ?)"
                ") ORDER BY s.name",
                (user_id,),
            )
            return [_scheduler(row) for row in rows]

        return await self._run(work)
