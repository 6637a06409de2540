"""
The store's schema, as numbered migrations applied in order when a store opens.

A migration is ``(version, [statements])``. Statements are portable SQL with
``{timestamp}``, ``{blob}`` and ``{bigint}`` standing for the column types
that differ between SQLite and PostgreSQL (see ``_dialect``). Only ever
append: a released migration is never edited.

Flags are ``INTEGER`` 0/1 and times are epoch seconds in ``{timestamp}``
columns, on both databases. Ids are ``TEXT`` made by the store, so there is
no autoincrement to differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger

from ._dialect import Cursor, IDialect
from .errors import StoreError

Migration = tuple[int, Sequence[str]]

_log = Logger()

MIGRATIONS: list[Migration] = [
    (
        1,
        [
            """CREATE TABLE users (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                email TEXT,
                password_hash TEXT,
                display_name TEXT NOT NULL,
                is_admin INTEGER NOT NULL DEFAULT 0,
                max_instances INTEGER,
                created {timestamp} NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE identities (
                provider TEXT NOT NULL,
                subject TEXT NOT NULL,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created {timestamp} NOT NULL,
                PRIMARY KEY (provider, subject)
            )""",
            "CREATE INDEX identities_user ON identities (user_id)",
            """CREATE TABLE sessions (
                token_hash TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                csrf TEXT NOT NULL,
                created {timestamp} NOT NULL,
                expires {timestamp} NOT NULL,
                last_seen {timestamp} NOT NULL
            )""",
            "CREATE INDEX sessions_user ON sessions (user_id)",
            "CREATE INDEX sessions_expires ON sessions (expires)",
            """CREATE TABLE api_tokens (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                token_hash TEXT NOT NULL UNIQUE,
                created {timestamp} NOT NULL,
                last_used {timestamp},
                revoked INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX api_tokens_user ON api_tokens (user_id)",
            """CREATE TABLE schedulers (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                public_jwk TEXT NOT NULL,
                created {timestamp} NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE images (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                ref TEXT NOT NULL,
                digest TEXT,
                owner_id TEXT REFERENCES users (id),
                port INTEGER,
                created {timestamp} NOT NULL,
                deleted INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX images_owner ON images (owner_id)",
            """CREATE TABLE instances (
                id TEXT PRIMARY KEY,
                owner_id TEXT NOT NULL REFERENCES users (id),
                image_id TEXT NOT NULL REFERENCES images (id),
                scheduler_id TEXT REFERENCES schedulers (id),
                state TEXT NOT NULL,
                reason TEXT,
                url TEXT,
                public_jwk TEXT,
                created {timestamp} NOT NULL,
                updated {timestamp} NOT NULL
            )""",
            "CREATE INDEX instances_owner ON instances (owner_id, state)",
            "CREATE INDEX instances_scheduler ON instances (scheduler_id, state)",
            """CREATE TABLE instance_shares (
                instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created {timestamp} NOT NULL,
                PRIMARY KEY (instance_id, user_id)
            )""",
            "CREATE INDEX instance_shares_user ON instance_shares (user_id)",
            """CREATE TABLE image_shares (
                image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created {timestamp} NOT NULL,
                PRIMARY KEY (image_id, user_id)
            )""",
            "CREATE INDEX image_shares_user ON image_shares (user_id)",
            """CREATE TABLE share_links (
                id TEXT PRIMARY KEY,
                instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
                token_hash TEXT NOT NULL UNIQUE,
                created {timestamp} NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX share_links_instance ON share_links (instance_id)",
            """CREATE TABLE share_link_grants (
                link_id TEXT NOT NULL REFERENCES share_links (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created {timestamp} NOT NULL,
                PRIMARY KEY (link_id, user_id)
            )""",
            "CREATE INDEX share_link_grants_user ON share_link_grants (user_id)",
            """CREATE TABLE login_attempts (
                key TEXT PRIMARY KEY,
                window_start {timestamp} NOT NULL,
                count INTEGER NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            # OAuth 2 authorization codes (dit4c.portal.oauth): only the
            # code's hash is kept; ``used`` is set once, by compare-and-set.
            """CREATE TABLE oauth_codes (
                code_hash TEXT PRIMARY KEY,
                client_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
                redirect_uri TEXT NOT NULL,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                code_challenge TEXT NOT NULL,
                created {timestamp} NOT NULL,
                expires {timestamp} NOT NULL,
                used INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX oauth_codes_expires ON oauth_codes (expires)",
        ],
    ),
    (
        3,
        [
            # Commands for schedulers (the scheduler channel, dit4c.portal.channel):
            # kept until the scheduler acknowledges them, and re-sent after
            # every reconnect until then. ``seq`` orders one scheduler's commands.
            """CREATE TABLE commands (
                id TEXT PRIMARY KEY,
                scheduler_id TEXT NOT NULL REFERENCES schedulers (id) ON DELETE CASCADE,
                instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
                seq {bigint} NOT NULL,
                op TEXT NOT NULL,
                params TEXT NOT NULL,
                created {timestamp} NOT NULL,
                acked {timestamp},
                UNIQUE (scheduler_id, seq)
            )""",
            "CREATE INDEX commands_pending ON commands (scheduler_id, acked, seq)",
            "CREATE INDEX commands_instance ON commands (instance_id)",
        ],
    ),
    (
        4,
        [
            # Token ids (``jti``) of instances' signed reports
            # (dit4c.portal.reports), remembered until the token expires so
            # that no report is accepted twice, by any portal process.
            """CREATE TABLE used_token_ids (
                issuer TEXT NOT NULL,
                jti TEXT NOT NULL,
                expires {timestamp} NOT NULL,
                PRIMARY KEY (issuer, jti)
            )""",
            "CREATE INDEX used_token_ids_expires ON used_token_ids (expires)",
            # Saved images are found by digest (a retried image report, the
            # image server's question). ``ref`` gets no index: it is free
            # text of any length, too long for a PostgreSQL B-tree entry.
            "CREATE INDEX images_digest ON images (digest)",
        ],
    ),
    (
        5,
        [
            # A scheduler with rows here runs instances only for those
            # people; one without is open to everyone.
            """CREATE TABLE scheduler_users (
                scheduler_id TEXT NOT NULL REFERENCES schedulers (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                PRIMARY KEY (scheduler_id, user_id)
            )""",
            "CREATE INDEX scheduler_users_user ON scheduler_users (user_id)",
        ],
    ),
    (
        6,
        [
            # Instances stuck in a transient state past its deadline are
            # found by state and last change (dit4c.portal.deadlines).
            "CREATE INDEX instances_state_updated ON instances (state, updated)",
        ],
    ),
    (
        7,
        [
            # The portal session a code was issued in: the instance access
            # token made from it lasts only as long as that session
            # (docs/protocols.md 6.4), so a logout ends it.
            "ALTER TABLE oauth_codes ADD COLUMN session_hash TEXT",
        ],
    ),
    (
        8,
        [
            # Login throttling (dit4c.portal.security.LoginThrottle): failed
            # attempts per key (an address, a name at an address) and the
            # time of the key's latest attempt. What login_attempts counted
            # (every attempt, good ones too) is not carried over.
            "DROP TABLE login_attempts",
            """CREATE TABLE login_failures (
                key TEXT PRIMARY KEY,
                failures INTEGER NOT NULL,
                latest {timestamp} NOT NULL
            )""",
            "CREATE INDEX login_failures_latest ON login_failures (latest)",
        ],
    ),
    (
        9,
        [
            # A password an administrator set (a reset) is changed by its
            # person at their next login (dit4c.portal.account).
            "ALTER TABLE users ADD COLUMN password_reset INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        10,
        [
            # A catalogue entry's limits (dit4c.common.limits.ToolLimits, as
            # JSON; NULL: none), which a saved image keeps from its tool.
            "ALTER TABLE images ADD COLUMN limits TEXT",
            # When traffic last reached an instance (an activity report of
            # its helpers), for the idle limit (dit4c.portal.culling).
            "ALTER TABLE instances ADD COLUMN active_at {timestamp}",
        ],
    ),
    (
        11,
        [
            # Every portal process's public signing keys (dit4c.portal.keys):
            # each process signs with its own private key, and every process
            # takes and publishes the others' public keys, so a token one
            # signed verifies at every other.
            """CREATE TABLE portal_keys (
                kid TEXT PRIMARY KEY,
                public_jwk TEXT NOT NULL,
                published {timestamp} NOT NULL
            )""",
            # Which portal process holds each scheduler's channel (its id in
            # dit4c.portal.peers), for the questions the others relay to it.
            """CREATE TABLE scheduler_links (
                scheduler_id TEXT PRIMARY KEY REFERENCES schedulers (id) ON DELETE CASCADE,
                holder TEXT NOT NULL,
                since {timestamp} NOT NULL
            )""",
            # A relayed question's answer, from the holder to the asker, taken once.
            """CREATE TABLE relayed_answers (
                id TEXT PRIMARY KEY,
                body TEXT NOT NULL,
                created {timestamp} NOT NULL
            )""",
        ],
    ),
]

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied {timestamp} NOT NULL
)"""


def latestVersion(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return max((version for version, _ in migrations), default=0)


def checkMigrations(migrations: Sequence[Migration]) -> None:
    """Migrations must be numbered 1, 2, 3... in order."""
    versions = [version for version, _ in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3... in order, not {versions}")


def applyNext(cursor: Cursor, dialect: IDialect, migrations: Sequence[Migration], now: float) -> int | None:
    """
    In one transaction (the caller's): take the migration lock, and apply the
    first migration this database lacks. Returns its version, or None when
    the database is up to date.

    Runs in a database thread.
    """
    dialect.begin(cursor)
    # The lock comes before anything else, even CREATE TABLE IF NOT EXISTS,
    # which is not safe against itself on PostgreSQL.
    dialect.lockMigrations(cursor)
    cursor.execute(dialect.ddl(_CREATE_VERSION_TABLE))
    cursor.execute(dialect.sql("SELECT MAX(version) FROM schema_version"), ())
    row = cursor.fetchone()
    current = row[0] if row and row[0] is not None else 0
    latest = latestVersion(migrations)
    if current > latest:
        raise StoreError(
            f"the database's schema is version {current}, newer than this portal's {latest}: "
            "upgrade the portal"
        )
    for version, statements in migrations:
        if version <= current:
            continue
        for statement in statements:
            cursor.execute(dialect.ddl(statement))
        cursor.execute(
            dialect.sql("INSERT INTO schema_version (version, applied) VALUES (?, ?)"),
            (version, now),
        )
        return version
    return None
