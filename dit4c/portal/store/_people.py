"""
The people in ``SQLStore``: users, the external logins linked to them,
and the failed logins counted against an address or a name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from zope.interface import implementer

from ._core import _IMAGE, _USER, SQLCore, _cols, _deferred, _given, _image, _marks, _Txn, _user
from .errors import Conflict, InvalidName, NotFound
from .ids import newId
from .interfaces import ILoginFailures, IPeople
from .model import LOGIN_NAME_RE, UNSET, Identity, LoginFailures, Removed, Unset, User


def _loginName(name: str) -> str:
    """``name`` as stored (lower case, no spaces around), if it is a login name; else ``InvalidName``."""
    name = name.strip().lower()
    if LOGIN_NAME_RE.fullmatch(name) is None:
        raise InvalidName()
    return name


@implementer(IPeople, ILoginFailures)
class SQLPeople(SQLCore):
    """``IPeople`` and ``ILoginFailures`` in SQL."""

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
                    int(user.is_admin), user.max_instances, user.created, int(user.disabled), int(user.password_reset),
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
            return int(t.must("SELECT COUNT(*) FROM users")[0])

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
        password_reset: bool | Unset = UNSET,
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
            password_reset=password_reset,
        )

        def work(t: _Txn) -> User:
            if not t.update("users", "id", user_id, fields):
                raise NotFound(f"there is no user {user_id!r}")
            return _user(t.must(f"SELECT {_cols(_USER)} FROM users WHERE id = ?", (user_id,)))

        return await self._run(work, conflict=f"the login name {name!r} is taken")
    @_deferred
    async def removeUser(self, user_id: str) -> Removed:
        def work(t: _Txn) -> Removed:
            row = t.one(self._dialect.forUpdate("SELECT disabled FROM users WHERE id = ?"), (user_id,))
            if row is None:
                raise NotFound(f"there is no user {user_id!r}")
            if not row[0]:
                raise Conflict("disable them first: a person is removed only once nothing of theirs runs")
            left = int(t.must("SELECT COUNT(*) FROM instances WHERE owner_id = ? AND state <> 'discarded'", (user_id,))[0])
            if left:
                raise Conflict(f"{left} of their instances are not discarded yet")
            # Their saved images stay where instances started from them point
            # (another person's, through a share), but nothing lists, shares
            # or serves them again.
            images = tuple(
                _image(row)
                for row in t.all(f"SELECT {_cols(_IMAGE)} FROM images WHERE owner_id = ? AND deleted = 0", (user_id,))
            )
            t.execute("DELETE FROM image_shares WHERE image_id IN (SELECT id FROM images WHERE owner_id = ?)", (user_id,))
            t.execute("UPDATE images SET deleted = 1, owner_id = NULL WHERE owner_id = ?", (user_id,))
            instances = t.execute("DELETE FROM instances WHERE owner_id = ?", (user_id,))
            # Sessions, tokens, identities, shares to them, link grants, codes: with the row.
            t.execute("DELETE FROM users WHERE id = ?", (user_id,))
            return Removed(instances=instances, images=images)

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
                failures, latest = t.must(
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
