"""``twistd dit4c-portal``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.common.options import endpointList, positiveFloat, positiveInt
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the DIT4C portal: the web pages people log in to, and the key "
        "directory (JWKS) every other component checks signatures against. "
        "Add users with 'dit4c user-add NAME --data-dir DIR'."
    )
    optParameters = [
        ["data-dir", None, "data/portal", "Directory for the portal's keys (and SQLite database)."],
        ["database", None, None, "sqlite:///PATH or postgresql://USER@HOST/DB. Default: SQLite in the data directory."],
        ["public-url", None, "http://localhost:8000", "The portal's public base URL (https:// makes cookies Secure)."],
        ["login-limit", None, 10, "Failed logins allowed per user name and per address in the window.", positiveInt],
        ["login-window", None, 900.0, "Seconds over which failed logins are counted.", positiveFloat],
        ["session-lifetime", None, 43200.0, "Seconds a login lasts.", positiveFloat],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """Endpoint to serve the portal on, e.g. tcp:8000:interface=127.0.0.1. Repeatable."""
        self["listen"].append(value)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:8000:interface=127.0.0.1"]
        endpointList(self["listen"], server=True, option="listen")
        self["public-url"] = self["public-url"].rstrip("/")
        if not self["public-url"].startswith(("http://", "https://")):
            raise usage.UsageError("--public-url must start with http:// or https://")
        if not self["database"]:
            self["database"] = "sqlite:///" + str(Path(self["data-dir"]).resolve() / "portal.db")


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return PortalService(
        reactor,
        database=config["database"],
        dataDir=Path(config["data-dir"]),
        config=PortalConfig(
            publicURL=config["public-url"],
            loginLimit=config["login-limit"],
            loginWindow=config["login-window"],
            sessionLifetime=config["session-lifetime"],
        ),
        endpoints=[serverFromString(reactor, e) for e in config["listen"]],
    )
