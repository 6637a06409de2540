"""``twistd dit4c-helper-auth``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from dit4c.common.errors import HelperEnvironmentError, KeyFileError
from dit4c.common.helperenv import fromEnvironment
from dit4c.common.keys import loadPrivateKey
from dit4c.common.options import endpointList, positiveFloat


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--tool ENDPOINT] [--portal URL] [--instance ID] [--key-file PATH]"
    longdesc = (
        "Guard an instance's tool: a reverse proxy that lets through only the "
        "people the portal allows (OAuth 2 authorization code with PKCE; "
        "sessions survive a restart). Every option defaults to the helper "
        "environment a compute node sets: DIT4C_AUTH_LISTEN, DIT4C_TOOL, "
        "DIT4C_PORTAL, DIT4C_PORTAL_INTERNAL, DIT4C_INSTANCE, DIT4C_INSTANCE_KEY."
    )
    optParameters = [
        ["listen", None, None, "Server endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1 ($DIT4C_AUTH_LISTEN)."],
        ["tool", None, None, "Client endpoint of the tool, e.g. tcp:host=127.0.0.1:port=8888 ($DIT4C_TOOL)."],
        ["portal", None, None, "The portal's public URL, as browsers reach it ($DIT4C_PORTAL)."],
        ["portal-internal", None, None, "The portal's URL as this helper reaches it ($DIT4C_PORTAL_INTERNAL; default: --portal)."],
        ["instance", None, None, "The instance id: the OAuth client id ($DIT4C_INSTANCE)."],
        ["key-file", None, None, "The instance's private key (PEM); cookie keys are derived from it ($DIT4C_INSTANCE_KEY)."],
        ["recheck", None, 30.0, "Seconds between asking the portal again whether a session's person may still use the instance.", positiveFloat],
        ["timeout", None, 10.0, "Seconds to wait for the portal.", positiveFloat],
    ]

    def postOptions(self) -> None:
        try:
            env = fromEnvironment(
                instance=self["instance"],
                keyFile=self["key-file"],
                portal=self["portal"],
                portalInternal=self["portal-internal"],
                tool=self["tool"],
                authListen=self["listen"],
            )
        except HelperEnvironmentError as e:
            raise usage.UsageError(f"{e} (or give the option)") from None
        if not env.tool:
            raise usage.UsageError("--tool (or DIT4C_TOOL) is required")
        if not env.authListen:
            raise usage.UsageError("--listen (or DIT4C_AUTH_LISTEN) is required")
        endpointList([env.authListen], server=True, option="listen")
        endpointList([env.tool], server=False, option="tool")
        try:
            loadPrivateKey(env.keyFile)
        except (OSError, KeyFileError) as e:
            raise usage.UsageError(f"--key-file: {e}") from None
        self.env = env


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from dit4c.auth.service import AuthService

    env = config.env
    return AuthService(
        reactor,
        instance=env.instance,
        keyFile=env.keyFile,
        portal=env.portal,
        portalInternal=env.portalInternal,
        listen=serverFromString(reactor, env.authListen),
        tool=clientFromString(reactor, env.tool),
        recheck=config["recheck"],
        timeout=config["timeout"],
    )
