"""
Stand-ins for the node's tests: helpers that record their environment and
wait, small tools, and an observer that records what a node says.
"""

from __future__ import annotations

import sys
from typing import Any

from support.waiting import eventually

from dit4c.channel.interfaces import observer
from dit4c.channel.wire import InstanceStatus
from dit4c.node.process import Tool

#: A stand-in helper: writes its environment to <role>.env (and its arguments
#: to <role>.argv) in the pod directory, then waits. (The auth stand-in, and
#: the pod helper's, also listens where it is told, as the real one does:
#: on its Unix socket: the node counts a pod ready once its auth helper
#: accepts connections.)
RECORD_ENV = (
    "import json, os, pathlib, socket, sys, time;"
    "d = pathlib.Path(os.environ['DIT4C_INSTANCE_KEY']).parent;"
    "(d / (sys.argv[1] + '.env')).write_text(json.dumps(dict(os.environ)));"
    "(d / (sys.argv[1] + '.argv')).write_text(json.dumps(sys.argv[2:]));"
    "listen = os.environ.get('DIT4C_AUTH_LISTEN') if sys.argv[1] in ('auth', 'helpers') else None;"
    "s = socket.socket(socket.AF_UNIX) if listen else None;"
    "s and s.bind(listen.split(':')[1].split('=', 1)[1]); s and s.listen();"
    "time.sleep(3600)"
)
#: Stand-ins for the auth helper and the listener (``podHelpers="separate"``).
HELPERS = {
    "auth": [sys.executable, "-c", RECORD_ENV, "auth"],
    "listener": [sys.executable, "-c", RECORD_ENV, "listener"],
}
#: A stand-in for a pod's one helper process (given, it is started rather than forked).
POD_HELPER = {"helpers": [sys.executable, "-c", RECORD_ENV, "helpers"]}
TOOLS = {
    "web": Tool("web", ("{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1")),
    "quits": Tool("quits", ("{python}", "-c", "import time; time.sleep(0.5)")),
    "silent": Tool("silent", ("{python}", "-c", "import time; time.sleep(3600)")),
}


class Watcher:
    def __init__(self) -> None:
        self.states: list[InstanceStatus] = []
        self.keys: dict[str, dict[str, Any]] = {}

    def observer(self) -> Any:
        return observer(lambda node, status: self.states.append(status), self.key)

    def key(self, node: Any, instance: str, jwk: dict[str, Any]) -> None:
        self.keys[instance] = jwk

    def history(self, instance: str) -> list[str]:
        return [s.state for s in self.states if s.instance == instance]

    async def waitFor(self, instance: str, state: str, timeout: float = 20) -> InstanceStatus:
        def reached() -> InstanceStatus | None:
            return next((s for s in self.states if s.instance == instance and s.state == state), None)

        found: InstanceStatus = await eventually(
            reached, timeout, what=lambda: f"{instance} {state}: {self.history(instance)}"
        )
        return found
