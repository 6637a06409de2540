"""
``SQLStore``: ``IStore`` over a DB-API driver through ``adbapi.ConnectionPool``,
for SQLite and PostgreSQL alike (``_dialect`` holds what differs).

It is made of one class per area, each beside the interface it provides:
people and failed logins (``_people``), sessions and tokens
(``_sessions``), schedulers and their commands (``_schedulers``), images
(``_images``), instances and their shares (``_instances``), and reports
(``_reports``), over what they share (``_core``: the pool, transactions,
rows to records).
"""

from __future__ import annotations

from zope.interface import implementer

from ._images import SQLImages
from ._instances import SQLInstances
from ._people import SQLPeople
from ._reports import SQLReports
from ._schedulers import SQLSchedulers
from ._sessions import SQLSessions
from .interfaces import IStore


@implementer(IStore)
class SQLStore(SQLPeople, SQLSessions, SQLSchedulers, SQLImages, SQLInstances, SQLReports):
    """The portal's store in an SQL database. Open one with ``openStore``."""
