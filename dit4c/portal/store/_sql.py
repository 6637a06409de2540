"""
``SQLStore``: ``IStore`` over a DB-API driver through ``adbapi.ConnectionPool``,
for SQLite and PostgreSQL alike (``_dialect`` holds what differs).

It is made of one class per area, each beside the interface it provides:
people and failed logins (``_people``), sessions and tokens
(``_sessions``), schedulers and their commands (``_schedulers``), images
(``_images``), instances and their shares (``_instances``), reports
(``_reports``), what the portal processes share (``_portals``), and a
person's page read at once (``_views``), over what they share (``_core``:
the pool, transactions, rows to records).
"""

from __future__ import annotations

from zope.interface import implementer

from ._images import SQLImages
from ._instances import SQLInstances
from ._people import SQLPeople
from ._portals import SQLPortals
from ._reports import SQLReports
from ._schedulers import SQLSchedulers
from ._sessions import SQLSessions
from ._views import SQLPageViews
from .interfaces import IStore


@implementer(IStore)
class SQLStore(SQLPageViews, SQLPeople, SQLPortals, SQLSessions, SQLSchedulers, SQLImages, SQLInstances, SQLReports):
    """The portal's store in an SQL database. Open one with ``openStore``."""
