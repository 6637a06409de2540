"""
Instances in ``SQLStore``: their records and life (a claim against a
person's quota, compare-and-set changes of state), and how they are
shared, with people directly or by links.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from dit4c.common.life import ACTIVE, State
from dit4c.common.limits import ToolLimits

from ._core import (
    _INSTANCE,
    SQLCore,
    _checkState,
    _cols,
    _deferred,
    _given,
    _instance,
    _marks,
    _Txn,
)
from ._dialect import Row
from .errors import Conflict, NotFound, QuotaReached
from .ids import hashToken, newId, newInstanceId, newToken
from .interfaces import IInstances
from .model import UNSET, Grant, Instance, ShareLink, Unset

_SHARE_LINK = ("id", "instance_id", "token_hash", "created", "revoked")

#: The states that count against a person's quota, as the database holds them.
_ACTIVE: tuple[str, ...] = tuple(sorted(state.value for state in ACTIVE))


#: Who may use instances: shared with directly (no link id), or through a live link.
_ACCESS = "SELECT u.id, u.name, s.created, NULL FROM instance_shares s JOIN users u ON u.id = s.user_id"
_ACCESS_LINKS = (
    " UNION ALL"
    " SELECT u.id, u.name, g.created, l.id FROM share_link_grants g"
    " JOIN share_links l ON l.id = g.link_id JOIN users u ON u.id = g.user_id"
)


def instancesOf(t: _Txn, user_id: str) -> list[Instance]:
    """``user_id``'s instances but the discarded ones, oldest first."""
    rows = t.all(
        f"SELECT {_cols(_INSTANCE)} FROM instances WHERE owner_id = ? AND state <> ? ORDER BY id",
        (user_id, State.DISCARDED.value),
    )
    return [_instance(row) for row in rows]


def sharedWith(t: _Txn, user_id: str) -> list[Instance]:
    """The instances of others shared with ``user_id`` (directly or by a live link), discarded ones left out."""
    # Start from this person's shares and grants (indexed by user), not
    # from every instance: the cost follows what is shared with them, not
    # the size of the portal.
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


def sharedCounts(t: _Txn, owner_id: str) -> dict[str, int]:
    """For each instance of ``owner_id``'s shared with anyone, how many people may use it (as ``listInstanceAccess``)."""
    rows = t.all(
        "SELECT a.instance_id, COUNT(DISTINCT a.user_id) FROM ("
        " SELECT s.instance_id, s.user_id FROM instance_shares s JOIN instances i ON i.id = s.instance_id"
        " WHERE i.owner_id = ?"
        " UNION SELECT l.instance_id, g.user_id FROM share_link_grants g JOIN share_links l ON l.id = g.link_id"
        " JOIN instances i ON i.id = l.instance_id WHERE i.owner_id = ? AND l.revoked = 0"
        ") a GROUP BY a.instance_id",
        (owner_id, owner_id),
    )
    return {row[0]: int(row[1]) for row in rows}


def _shareLink(row: Row) -> ShareLink:
    return ShareLink(row[0], row[1], row[2], row[3], bool(row[4]))


@implementer(IInstances)
class SQLInstances(SQLCore):
    """``IInstances`` in SQL."""

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
                    t.must(
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
                    public_jwk, now, now, None,
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

    def _listInstances(self, where: str, params: tuple[object, ...], includeDiscarded: bool) -> Deferred[list[Instance]]:
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
    async def markActive(self, instance_id: str, when: float) -> bool:
        def work(t: _Txn) -> bool:
            return bool(
                t.execute(
                    "UPDATE instances SET active_at = ? WHERE id = ? AND (active_at IS NULL OR active_at < ?)",
                    (when, instance_id, when),
                )
            )

        return await self._run(work)

    @_deferred
    async def listRunningWithIdleLimits(self) -> list[tuple[Instance, ToolLimits]]:
        def work(t: _Txn) -> list[tuple[Instance, ToolLimits]]:
            rows = t.all(
                f"SELECT {_cols(_INSTANCE, 'i')}, m.limits FROM instances i JOIN images m ON m.id = i.image_id"
                " WHERE i.state = ? AND m.limits IS NOT NULL ORDER BY i.id",
                (State.RUNNING.value,),
            )
            found = [(_instance(row[:-1]), ToolLimits.loads(row[-1])) for row in rows]
            return [(instance, limits) for instance, limits in found if limits.idle is not None]

        return await self._run(work)

    @_deferred
    async def listInstancesOfScheduler(self, scheduler_id: str, includeDiscarded: bool = False) -> list[Instance]:
        return await self._listInstances("scheduler_id = ?", (scheduler_id,), includeDiscarded)

    @_deferred
    async def listInstancesSharedWith(self, user_id: str) -> list[Instance]:
        return await self._run(lambda t: sharedWith(t, user_id))

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
        quota: int | None = None,
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

        dialect = self._dialect

        def work(t: _Txn) -> Instance:
            if quota is not None:
                # As a start claims: the owner's row held, the others counted.
                owner = t.one("SELECT owner_id FROM instances WHERE id = ?", (instance_id,))
                if owner is None:
                    raise NotFound(f"there is no instance {instance_id!r}")
                t.one(dialect.forUpdate("SELECT id FROM users WHERE id = ?"), (owner[0],))
                active = int(
                    t.must(
                        f"SELECT COUNT(*) FROM instances WHERE owner_id = ? AND id != ? AND state IN ({_marks(len(_ACTIVE))})",
                        (owner[0], instance_id, *_ACTIVE),
                    )[0]
                )
                if active >= quota:
                    raise QuotaReached(quota, active)
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
            return _instance(t.must(f"SELECT {_cols(_INSTANCE)} FROM instances WHERE id = ?", (instance_id,)))

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
            t.execute(
                "DELETE FROM share_link_grants WHERE user_id = ?"
                " AND link_id IN (SELECT id FROM share_links WHERE instance_id = ?)",
                (user_id, instance_id),
            )

        await self._run(work)

    @_deferred
    async def countInstancesByState(self) -> dict[str, int]:
        def work(t: _Txn) -> dict[str, int]:
            return {str(row[0]): int(row[1]) for row in t.all("SELECT state, COUNT(*) FROM instances GROUP BY state")}

        return await self._run(work)

    @_deferred
    async def listInstanceAccess(self, instance_id: str) -> list[Grant]:
        def work(t: _Txn) -> list[Grant]:
            rows = t.all(
                f"{_ACCESS} WHERE s.instance_id = ?{_ACCESS_LINKS} WHERE l.instance_id = ? AND l.revoked = 0 ORDER BY 3, 2",
                (instance_id, instance_id),
            )
            return [Grant(row[0], row[1], row[2], row[3]) for row in rows]

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
