"""
Schedulers in ``SQLStore``: the schedulers and their keys, the people a
scheduler is restricted to, and the commands kept for each scheduler until
it acknowledges them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from zope.interface import implementer

from ._core import _SCHEDULER, SQLCore, _cols, _deferred, _given, _marks, _scheduler, _Txn
from ._dialect import Row
from .errors import Conflict, NotFound
from .ids import newId
from .interfaces import ICommands, ISchedulers
from .model import COMMAND_OPS, MAX_COMMAND_PARAMS, UNSET, Command, Scheduler, Unset

_COMMAND = ("id", "scheduler_id", "instance_id", "seq", "op", "params", "created", "acked")


def _command(row: Row) -> Command:
    return Command(row[0], row[1], row[2], int(row[3]), row[4], json.loads(row[5]), row[6], row[7])


def schedulersFor(t: _Txn, user_id: str) -> list[Scheduler]:
    """The schedulers ``user_id`` may start on: enabled, and open to all or to them, by name."""
    cols = ", ".join(f"s.{c}" for c in _SCHEDULER)
    rows = t.all(
        f"SELECT {cols} FROM schedulers s WHERE s.disabled = 0 AND ("
        " NOT EXISTS (SELECT 1 FROM scheduler_users r WHERE r.scheduler_id = s.id)"
        " OR EXISTS (SELECT 1 FROM scheduler_users r WHERE r.scheduler_id = s.id AND r.user_id = ?)"
        ") ORDER BY s.name",
        (user_id,),
    )
    return [_scheduler(row) for row in rows]


@implementer(ISchedulers, ICommands)
class SQLSchedulers(SQLCore):
    """``ISchedulers`` and ``ICommands`` in SQL."""

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
            return _scheduler(t.must(f"SELECT {_cols(_SCHEDULER)} FROM schedulers WHERE id = ?", (scheduler_id,)))

        return await self._run(work, conflict=f"a scheduler named {name!r} exists")
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
        return await self._run(lambda t: schedulersFor(t, user_id))
    # -- scheduler commands ------------------------------------------------------------------------------

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
        columns = _cols(_COMMAND)

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
            seq = int(t.must("SELECT COALESCE(MAX(seq), 0) + 1 FROM commands WHERE scheduler_id = ?", (scheduler_id,))[0])
            t.execute(
                f"INSERT INTO commands ({columns}) VALUES ({_marks(len(_COMMAND))})",
                (commandId, scheduler_id, instance_id, seq, op, text, now, None),
            )
            return Command(commandId, scheduler_id, instance_id, seq, op, json.loads(text), now, None)

        return await self._run(work)

    @_deferred
    async def pendingCommands(self, scheduler_id: str, limit: int = 1000) -> list[Command]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        columns = _cols(_COMMAND)

        def work(t: _Txn) -> list[Command]:
            rows = t.all(
                f"SELECT {columns} FROM commands WHERE scheduler_id = ? AND acked IS NULL ORDER BY seq LIMIT ?",
                (scheduler_id, limit),
            )
            return [_command(row) for row in rows]

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
        columns = _cols(_COMMAND)

        def work(t: _Txn) -> Command | None:
            row = t.one(f"SELECT {columns} FROM commands WHERE id = ?", (command_id,))
            return _command(row) if row else None

        return await self._run(work)

    @_deferred
    async def latestCommandOp(self, instance_id: str) -> str | None:
        def work(t: _Txn) -> str | None:
            row = t.one(
                "SELECT op FROM commands WHERE instance_id = ? ORDER BY created DESC, seq DESC LIMIT 1", (instance_id,)
            )
            return str(row[0]) if row is not None else None

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
