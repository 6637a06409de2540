"""
Sessions and tokens in ``SQLStore``: browser sessions, personal API
tokens, and the OAuth 2 authorization codes the portal hands instances.
"""

from __future__ import annotations

from zope.interface import implementer

from ._core import _USER, SQLCore, _cols, _deferred, _marks, _Txn, _user
from ._dialect import Row
from .errors import NotFound
from .ids import hashToken, newId, newToken
from .interfaces import IApiTokens, IOAuthCodes, ISessions
from .model import ApiToken, OAuthCode, Session, User

_API_TOKEN = ("id", "user_id", "name", "token_hash", "created", "last_used", "revoked")

_OAUTH_CODE = (
    "code_hash", "client_id", "redirect_uri", "user_id", "code_challenge", "created", "expires", "used", "session_hash",
)  # fmt: skip


def _apiToken(row: Row) -> ApiToken:
    return ApiToken(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


def _oauthCode(row: Row) -> OAuthCode:
    return OAuthCode(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])


@implementer(ISessions, IApiTokens, IOAuthCodes)
class SQLSessions(SQLCore):
    """``ISessions``, ``IApiTokens`` and ``IOAuthCodes`` in SQL."""

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
        fields: dict[str, object] = {"last_seen": now}
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
    async def deleteSessionsOfUser(self, user_id: str, keep: str | None = None) -> int:
        def work(t: _Txn) -> int:
            if keep is not None:
                return t.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash != ?", (user_id, hashToken(keep)))
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
            row = t.must(f"SELECT {_cols(_OAUTH_CODE)} FROM oauth_codes WHERE code_hash = ?", (codeHash,))
            return _oauthCode(row)

        return await self._run(work)
