"""``twistd dit4c-helper-listener``: options and service construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString
from twisted.python import usage

from dit4c.common.options import endpointList
from dit4c.listener.service import ListenerService


class Options(usage.Options):
    synopsis = "--routing ENDPOINT --token-file PATH --target ENDPOINT"
    longdesc = (
        "Keep a tunnel open to a DIT4C routing server and forward every "
        "connection that arrives through it to a target endpoint (the auth "
        "helper, or any local web server). The token file is read again at "
        "every reconnect, so it can be renewed while the listener runs."
    )
    optParameters = [
        ["routing", None, None, "Client endpoint of the routing server's tunnel port: tcp:host=H:port=P, tls:H:P, or dit4c-ws:url=wss\\://H/.dit4c/tunnel."],
        ["token-file", None, None, "File holding the routing token (a JWT from the portal)."],
        ["target", None, None, "Client endpoint to forward each stream to, e.g. tcp:host=127.0.0.1:port=8888."],
    ]

    def postOptions(self) -> None:
        for key in ("routing", "token-file", "target"):
            if not self[key]:
                raise usage.UsageError(f"--{key} is required")
        endpointList([self["routing"]], server=False, option="routing")
        endpointList([self["target"]], server=False, option="target")
        if not Path(self["token-file"]).is_file():
            raise usage.UsageError(f"--token-file: {self['token-file']} is not a file")


def tokenFromFile(path: str) -> Any:
    def read() -> str:
        return Path(path).read_text().strip()

    return read


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return ListenerService(
        reactor,
        clientFromString(reactor, config["routing"]),
        clientFromString(reactor, config["target"]),
        tokenFromFile(config["token-file"]),
    )
