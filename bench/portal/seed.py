#!/usr/bin/env python3
"""Fill an empty portal database with a realistic population, for bench/portal/run.py.

    python bench/portal/seed.py --database sqlite:////tmp/x/portal.db [--people 1000]
        [--per-person 10] [--images 10] [--timings 200]

The store opens the database (so its own migrations make the schema), then one
transaction bulk-inserts every row with ``executemany``. The typical user's
session and API token are made through the store itself (``createSession``,
``createApiToken``), exactly as a login or ``POST /api/v1/tokens`` would.

With ``--timings N`` it then calls, N times each, every store method that
``GET /`` and ``GET /api/v1/instances`` use, for the typical user, records the
SQL each one sends (by wrapping the store's cursor helper in this process
only) and asks the database for the plan of each SELECT.

Prints one JSON object on stdout: the typical user's name, cookie and token,
the row counts, the seeding times, and the timings and plans.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from dit4c.portal.store import (  # noqa: E402
    _core,  # noqa: E402
    hashToken,
    newInstanceId,
    openStore,
)
from dit4c.portal.store.ids import newId, newToken  # noqa: E402

#: Every person's ten instances, in these states (shuffled per person): a mix
#: of live, parked and finished ones. ``discarded`` ones are not listed by
#: either page, so each page shows eight of the ten.
STATE_MIX = [
    "running", "running", "stopped", "stopped", "saved",
    "discarded", "discarded", "errored", "requested", "starting",
]  # fmt: skip

IMAGE_NAMES = [
    ("Jupyter base", "docker.io/jupyter/base-notebook:latest", 8888),
    ("Jupyter SciPy", "docker.io/jupyter/scipy-notebook:latest", 8888),
    ("Jupyter data science", "docker.io/jupyter/datascience-notebook:latest", 8888),
    ("RStudio", "docker.io/rocker/rstudio:4", 8787),
    ("VS Code", "docker.io/codercom/code-server:latest", 8080),
    ("Julia", "docker.io/jupyter/julia-notebook:latest", 8888),
    ("TensorFlow", "docker.io/jupyter/tensorflow-notebook:latest", 8888),
    ("PyTorch", "quay.io/jupyter/pytorch-notebook:latest", 8888),
    ("Spark", "docker.io/jupyter/pyspark-notebook:latest", 8888),
    ("Octave", "docker.io/gnuoctave/octave:latest", 8888),
]

_USER_COLS = (
    "id, name, email, password_hash, display_name, is_admin, max_instances, created, disabled"
)
_INSTANCE_COLS = (
    "id, owner_id, image_id, scheduler_id, state, reason, url, public_jwk, created, updated"
)


def plan(
    people: int, perPerson: int, images: int, now: float, rng: random.Random
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row to insert, by table."""
    day = 86400.0
    rows: dict[str, list[tuple[Any, ...]]] = {k: [] for k in (
        "users", "schedulers", "images", "instances", "instance_shares", "sessions", "api_tokens",
    )}  # fmt: skip
    schedulers = []
    for n in range(2):
        sid = newId()
        schedulers.append(sid)
        jwk = json.dumps(
            {
                "kty": "EC",
                "crv": "P-256",
                "x": secrets.token_urlsafe(32),
                "y": secrets.token_urlsafe(32),
            }
        )
        rows["schedulers"].append((sid, f"cluster-{n + 1}", jwk, now - 365 * day, 0))
    imageIds = []
    for n in range(images):
        name, ref, port = IMAGE_NAMES[n % len(IMAGE_NAMES)]
        if n >= len(IMAGE_NAMES):
            name = f"{name} {n // len(IMAGE_NAMES) + 1}"
        iid = newId()
        imageIds.append(iid)
        rows["images"].append((iid, name, ref, None, None, port, now - 300 * day + n, 0))
    users = []
    for n in range(people):
        uid = newId()
        users.append(uid)
        name = f"user{n:04d}"
        rows["users"].append(
            (
                uid,
                name,
                f"{name}@example.org",
                None,
                f"Person {n:04d}",
                0,
                None,
                now - 200 * day + n,
                0,
            )
        )
        # every person has a session and an API token of their own: the
        # lookups by hash then search tables of realistic size
        rows["sessions"].append(
            (hashToken(newToken()), uid, newToken(), now - day, now + 30 * day, now - 60)
        )
        rows["api_tokens"].append(
            (newId(), uid, "laptop", hashToken("dit4c_" + newToken()), now - 10 * day, None, 0)
        )
    instancesOf: dict[str, list[str]] = {}
    for n, uid in enumerate(users):
        states = [STATE_MIX[k % len(STATE_MIX)] for k in range(perPerson)]
        rng.shuffle(states)
        mine = []
        for k, state in enumerate(states):
            created = now - rng.uniform(0, 90) * day
            iid = newInstanceId(created)
            mine.append(iid)
            url = (
                f"https://{iid}.instances.example.org/"
                if state in ("running", "starting")
                else None
            )
            reason = "The container exited with status 137." if state == "errored" else None
            rows["instances"].append((
                iid, uid, imageIds[rng.randrange(len(imageIds))], schedulers[(n + k) % 2], state,
                reason, url, None, created, created + rng.uniform(0, 3600),
            ))  # fmt: skip
        instancesOf[uid] = mine
    # each person shares one instance with the next person, so each person
    # also sees one instance shared with them
    for n, uid in enumerate(users):
        other = users[(n + 1) % len(users)]
        if other != uid and instancesOf[uid]:
            rows["instance_shares"].append((instancesOf[uid][0], other, now - day))
    return rows


_INSERTS = {
    "users": f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "schedulers": "INSERT INTO schedulers (id, name, public_jwk, created, disabled) VALUES (?, ?, ?, ?, ?)",
    "images": "INSERT INTO images (id, name, ref, digest, owner_id, port, created, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "instances": f"INSERT INTO instances ({_INSTANCE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "instance_shares": "INSERT INTO instance_shares (instance_id, user_id, created) VALUES (?, ?, ?)",
    "sessions": "INSERT INTO sessions (token_hash, user_id, csrf, created, expires, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
    "api_tokens": "INSERT INTO api_tokens (id, user_id, name, token_hash, created, last_used, revoked) VALUES (?, ?, ?, ?, ?, ?, ?)",
}


def bulkInsert(cursor: Any, dialect: Any, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """One transaction (adbapi commits it); runs in a pool thread."""
    dialect.begin(cursor)
    for table in (
        "users",
        "schedulers",
        "images",
        "instances",
        "instance_shares",
        "sessions",
        "api_tokens",
    ):
        if rows[table]:
            cursor.executemany(dialect.sql(_INSERTS[table]), rows[table])


def analyze(cursor: Any, dialect: Any) -> None:
    dialect.begin(cursor)
    cursor.execute("ANALYZE")


# -- timings and plans of the pages' store calls ------------------------------------------

#: Statements sent through ``_Txn.execute`` while tracing, as (sql, params).
_TRACE: list[tuple[str, tuple[Any, ...]]] | None = None
_origExecute = _core._Txn.execute


def _tracedExecute(self: Any, sql: str, params: Any = ()) -> int:
    params = tuple(params)
    if _TRACE is not None:
        _TRACE.append((self._dialect.sql(sql), params))
    return _origExecute(self, sql, params)


_core._Txn.execute = _tracedExecute  # type: ignore[method-assign]


def explain(cursor: Any, dialect: Any, sql: str, params: tuple[Any, ...]) -> list[str]:
    if dialect.name == "sqlite":
        cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
        return [str(row[-1]) for row in cursor.fetchall()]
    cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params)
    return [str(row[0]) for row in cursor.fetchall()]


async def timings(
    store: Any, user: Any, sessionToken: str, apiToken: str, n: int
) -> list[dict[str, Any]]:
    global _TRACE
    calls: list[tuple[str, Any, list[str]]] = [
        # (name, zero-argument call, which pages use it)
        ("sessionByToken", lambda: store.sessionByToken(sessionToken), ["/"]),
        ("userById", lambda: store.userById(user.id), ["/"]),
        ("userByApiToken", lambda: store.userByApiToken(apiToken), ["api"]),
        ("listInstancesOf", lambda: store.listInstancesOf(user.id), ["/", "api"]),
        ("listInstancesSharedWith", lambda: store.listInstancesSharedWith(user.id), ["/", "api"]),
        ("listCatalogue", lambda: store.listCatalogue(), ["/"]),
        ("listImagesOf", lambda: store.listImagesOf(user.id), ["/"]),
        ("listImagesSharedWith", lambda: store.listImagesSharedWith(user.id), ["/"]),
        ("listSchedulers", lambda: store.listSchedulers(), ["/"]),
    ]
    out = []
    for name, call, pages in calls:
        _TRACE = []
        result = await call()
        statements = list(_TRACE)
        _TRACE = None
        for _ in range(max(1, n // 10)):  # warm up
            await call()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        plans = []
        for sql, params in statements:
            if sql.lstrip().upper().startswith("SELECT"):
                plans.append(await store._pool.runInteraction(explain, store.dialect, sql, params))
        out.append({
            "method": name,
            "pages": pages,
            "rows": len(result) if isinstance(result, list) else (0 if result is None else 1),
            "statements": [sql for sql, _ in statements],
            "mean_ms": sum(samples) / len(samples),
            "p50_ms": samples[len(samples) // 2],
            "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "plans": plans,
        })  # fmt: skip
    return out


async def seed(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    now = time.time()
    t0 = time.monotonic()
    store: Any = await openStore(args.database, reactor)
    tMigrated = time.monotonic()
    try:
        rows = plan(args.people, args.per_person, args.images, now, rng)
        tPlanned = time.monotonic()
        await store._pool.runInteraction(bulkInsert, store.dialect, rows)
        tInserted = time.monotonic()
        if store.dialect.name == "postgresql":
            # what autovacuum would have done long before anyone measured
            await store._pool.runInteraction(analyze, store.dialect)
        tAnalyzed = time.monotonic()
        # the typical user: one from the middle, with the same mix as everyone
        typical = await store.userByName(f"user{args.people // 2:04d}")
        assert typical is not None
        session = await store.createSession(typical.id, 30 * 86400.0)
        _, apiToken = await store.createApiToken(typical.id, "bench")
        result: dict[str, Any] = {
            "database": store.dialect.name,
            "user": typical.name,
            "user_id": typical.id,
            "cookie": session.id,
            "api_token": apiToken,
            "rows": {table: len(r) for table, r in rows.items()},
            "state_mix": [STATE_MIX[k % len(STATE_MIX)] for k in range(args.per_person)],
            "seconds": {
                "open_and_migrate": round(tMigrated - t0, 3),
                "generate_rows": round(tPlanned - tMigrated, 3),
                "insert_one_transaction": round(tInserted - tPlanned, 3),
                "analyze": round(tAnalyzed - tInserted, 3)
                if store.dialect.name == "postgresql"
                else None,
                "total": round(time.monotonic() - t0, 3),
            },
            "typical": {
                "own_instances": len([r for r in rows["instances"] if r[1] == typical.id]),
                "own_listed": len(await store.listInstancesOf(typical.id)),
                "shared_listed": len(await store.listInstancesSharedWith(typical.id)),
            },
        }
        if args.timings:
            result["timings"] = await timings(store, typical, session.id, apiToken, args.timings)
        return result
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database", required=True, help="sqlite:///PATH or postgresql://... (empty)")
    p.add_argument("--people", type=int, default=1000)
    p.add_argument("--per-person", type=int, default=10)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--seed", type=int, default=4, help="random seed for states and images")
    p.add_argument(
        "--timings", type=int, default=0, metavar="N", help="time each page's store calls N times"
    )
    args = p.parse_args()

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            print(json.dumps(await seed(reactor, args)), flush=True)

        return ensureDeferred(go())

    react(run)


if __name__ == "__main__":
    main()
