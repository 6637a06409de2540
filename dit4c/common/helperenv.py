"""
The node → helper contract: environment variables (docs/protocols.md,
"Helper environment").

A compute node starts each instance's helpers (listener, auth, and later
storage and upload) with these variables set, whatever the runtime; every
helper reads them through :func:`fromEnvironment`, and the node writes them
through :func:`toEnvironment`, so there is one list of names and one set of
checks. Command-line options of each helper override the environment, so
a helper can also be run by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dit4c.common.errors import HelperEnvironmentError
from dit4c.common.portalhttp import isPortalAddress
from dit4c.common.tokens import INSTANCE_ID_RE

__all__ = ["HelperEnvironment", "fromEnvironment", "toEnvironment", "inherited", "PREFIX", "VARIABLES"]

PREFIX = "DIT4C_"

#: name → (attribute, required)
_VARIABLES: dict[str, tuple[str, bool]] = {
    "DIT4C_INSTANCE": ("instance", True),
    "DIT4C_INSTANCE_KEY": ("keyFile", True),
    "DIT4C_PORTAL": ("portal", True),
    "DIT4C_PORTAL_INTERNAL": ("portalInternal", False),
    "DIT4C_TOOL": ("tool", False),
    "DIT4C_AUTH_LISTEN": ("authListen", False),
    "DIT4C_AUTH": ("auth", False),
    "DIT4C_ROUTING": ("routing", False),
    "DIT4C_ROUTING_AUDIENCE": ("routingAudience", False),
    "DIT4C_STATE_DIR": ("stateDir", False),
    "DIT4C_ONION": ("onion", False),
    "DIT4C_IMAGE_SERVER": ("imageServer", False),
    "DIT4C_IMAGE_FILE": ("imageFile", False),
    "DIT4C_IMAGE_DIGEST": ("imageDigest", False),
    "DIT4C_FILE_SERVER": ("fileServer", False),
    "DIT4C_FILE_SERVER_HOST_KEY": ("fileServerHostKey", False),
    "DIT4C_STORAGE_MOUNT": ("storageMount", False),
}

#: attribute → name: where a runtime looks a variable up in a pod's environment.
VARIABLES: dict[str, str] = {attribute: name for name, (attribute, _) in _VARIABLES.items()}


@dataclass(frozen=True)
class HelperEnvironment:
    """What a node tells an instance's helpers."""

    #: The instance id (one DNS label): the host name label, the OAuth client id.
    instance: str
    #: Path of the instance's private key (PEM, mode 0600).
    keyFile: str
    #: The portal's public URL, as browsers reach it (OAuth authorize).
    portal: str
    #: The portal as the helpers reach it (token, userinfo, JWKS, reports):
    #: a URL, or ``unix:/path`` of a socket it listens on; the public URL
    #: unless the node's network differs.
    portalInternal: str = ""
    #: Client endpoint of the tool (``tcp:host=127.0.0.1:port=8888``).
    tool: str | None = None
    #: Server endpoint the auth helper listens on.
    authListen: str | None = None
    #: Client endpoint of the auth helper (the listener's target).
    auth: str | None = None
    #: Client endpoints of the routing servers' tunnel ports.
    routing: tuple[str, ...] = field(default_factory=tuple)
    #: The routing servers' token audience.
    routingAudience: str = "dit4c-routing"
    #: A directory the helpers may keep state in across restarts.
    stateDir: str | None = None
    #: Client endpoint of a tor's control port: the listener publishes the
    #: instance as an onion service there instead of dialling a routing server.
    onion: str | None = None
    #: The upload helper's: the image server's base URL, the saved image
    #: (an archive the node made) and its digest (``sha256:<hex>``).
    imageServer: str | None = None
    imageFile: str | None = None
    imageDigest: str | None = None
    #: The storage helper's: the file server (``host:port``, or a client
    #: endpoint ``tcp:host=H:port=P``), its SSH host key (a public key or
    #: known_hosts line, or the path of a file holding one) and the
    #: directory to mount the person's storage at.
    fileServer: str | None = None
    fileServerHostKey: str | None = None
    storageMount: str | None = None

    @property
    def portalBase(self) -> str:
        """Where the helpers themselves talk to the portal."""
        return self.portalInternal or self.portal


def toEnvironment(helper: HelperEnvironment | None = None, /, **values: Any) -> dict[str, str]:
    """
    The variables to start a helper with (the node's side; the inverse of
    :func:`fromEnvironment`): those of ``helper``, and ``values`` by
    attribute name over them, which is how a runtime adds what it chooses
    (``tool=``, ``authListen=``, ``auth=``, ``storageMount=``) to a pod's
    environment. None and empty values are left out.
    """
    attributes: dict[str, Any] = {}
    if helper is not None:
        attributes = {name: getattr(helper, name) for name in VARIABLES}
    unknown = set(values) - set(VARIABLES)
    if unknown:
        raise TypeError(f"not a helper environment attribute: {', '.join(sorted(unknown))}")
    attributes.update(values)
    environment: dict[str, str] = {}
    for attribute, value in attributes.items():
        if isinstance(value, (tuple, list)):
            value = " ".join(value)
        if value is not None and value != "":
            environment[VARIABLES[attribute]] = str(value)
    return environment


def _url(name: str, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise HelperEnvironmentError(f"{name} must be an http(s) URL, not {value!r}")
    return value.rstrip("/")


def inherited() -> dict[str, str]:
    """
    What a process a node starts inherits of the node's own environment:
    all of it but the ``DIT4C_`` variables, which are set for it alone.
    """
    return {name: value for name, value in os.environ.items() if not name.startswith(PREFIX)}


def fromEnvironment(environ: Mapping[str, str] | None = None, **overrides: Any) -> HelperEnvironment:
    """
    The helper environment from ``environ`` (``os.environ`` by default);
    ``overrides`` (attribute names, None ignored) win over it.

    :raises HelperEnvironmentError: a required variable is missing, or one
        is malformed.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (attribute, _) in _VARIABLES.items():
        if environ.get(name):
            values[attribute] = environ[name]
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name, (attribute, required) in _VARIABLES.items():
        if required and not values.get(attribute):
            raise HelperEnvironmentError(f"{name} is not set")
    if INSTANCE_ID_RE.fullmatch(values["instance"]) is None:
        raise HelperEnvironmentError(f"DIT4C_INSTANCE is not an instance id: {values['instance']!r}")
    values["portal"] = _url("DIT4C_PORTAL", values["portal"])
    if values.get("portalInternal"):
        internal = values["portalInternal"]
        if not isPortalAddress(internal):
            raise HelperEnvironmentError(f"DIT4C_PORTAL_INTERNAL must be an http(s) URL or unix:/path, not {internal!r}")
        values["portalInternal"] = internal.rstrip("/")
    routing = values.get("routing")
    if isinstance(routing, str):
        values["routing"] = tuple(routing.split())
    elif routing is not None:
        values["routing"] = tuple(routing)
    return HelperEnvironment(**values)
