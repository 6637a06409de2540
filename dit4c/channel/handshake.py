"""
The challenge, proof and welcome that open every channel link, sans I/O.

Both links of the channel open the same way (docs/protocols.md 7.2 and 11):
the side that is dialled (the portal; a compute node) sends a fresh nonce,
the side that dials (the scheduler) answers with a ``hello`` holding a
*proof*, a short JWT signed with its own key that names it, answers that
nonce and names the side it is for; the dialled side checks the proof
against the public key it knows for the dialler and sends a ``welcome``.
On a *mutual* link (scheduler-node) the ``hello`` carries a nonce of the
dialler's too, and the ``welcome`` a proof answering it, so each side
proves itself to the other with no certificate authority between them.

:class:`Dialled` and :class:`Dialler` hold each side's part: they take the
messages received, say what to send, and raise :class:`ProtocolError` for
a message out of turn; the WebSocket protocols around them only move
messages, keep the timers and look up keys. :func:`checkProof` is the one
check of a proof, :func:`signProof` the one way to make one.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IReactorTime

from dit4c.channel.errors import AuthRefused, ProtocolError
from dit4c.channel.wire import AUDIENCE, MAX_ID, MAX_NONCE, MAX_URL, PROOF_LIFETIME, text
from dit4c.common.errors import InvalidToken
from dit4c.common.keys import PrivateKey
from dit4c.common.tokens import MAX_TOKEN_LENGTH, IKeySource, TokenSigner, TokenVerifier

__all__ = [
    "NODE_LINK",
    "PORTAL_LINK",
    "Dialled",
    "Dialler",
    "Hello",
    "Link",
    "Welcome",
    "checkProof",
    "newNonce",
    "signProof",
]


@dataclass(frozen=True)
class Link:
    """One kind of link: who proves what to whom, and what its messages call things."""

    #: The ``aud`` of the dialler's proof.
    audience: str
    #: The field of the challenge that names the dialled side.
    nameField: str
    #: What the dialler and the dialled side are, in reasons: ``scheduler``, ``portal``.
    diallerRole: str
    dialledRole: str
    #: On a mutual link, the ``aud`` of the dialled side's proof in its welcome.
    welcomeAudience: str | None = None
    #: Whether the dialled side's name is a URL (longer than an id).
    nameLimit: int = MAX_URL

    @property
    def mutual(self) -> bool:
        return self.welcomeAudience is not None


#: Portal ↔ scheduler (docs/protocols.md 7.2): the scheduler proves itself.
PORTAL_LINK = Link(audience=AUDIENCE, nameField="portal", diallerRole="scheduler", dialledRole="portal")
#: Scheduler ↔ compute node (docs/protocols.md 11): each proves itself to the other.
NODE_LINK = Link(
    audience="dit4c-node",
    nameField="node",
    diallerRole="scheduler",
    dialledRole="node",
    welcomeAudience="dit4c-scheduler",
    nameLimit=MAX_ID,
)


def newNonce() -> str:
    """32 random bytes, base64url without padding: a fresh challenge."""
    return secrets.token_urlsafe(32)


def signProof(
    key: PrivateKey,
    subject: str,
    nonce: str,
    forWhom: str,
    *,
    clock: IReactorTime | None = None,
    lifetime: float = PROOF_LIFETIME,
    audience: str = AUDIENCE,
) -> str:
    """
    A proof: a JWT signed with ``key`` for ``audience``, naming its signer
    (``sub``), answering one challenge (``nonce``) and naming the side it is
    for (the ``portal`` claim: the portal's URL, a node's name or a
    scheduler's id), so no other peer can relay it.
    """
    signer = TokenSigner(key, clock=clock)
    return signer.sign({"sub": subject, "nonce": nonce, "portal": forWhom}, audience=audience, lifetime=lifetime)


async def checkProof(
    keys: IKeySource,
    proof: str,
    *,
    audience: str,
    subject: str,
    nonce: str,
    forWhom: str | None,
    clock: IReactorTime,
    subjectRole: str,
    forRole: str,
    leeway: float = 30.0,
    scopedKeys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """
    The claims of ``proof`` if it is good: signed by a key of ``keys``
    (algorithms pinned, section 2), for ``audience``, by ``subject``,
    answering ``nonce``, for ``forWhom`` (None: any), and living no longer
    than a proof may.

    :raises InvalidToken: it is not; the reason says why.
    """
    verifier = TokenVerifier(keys, audience=audience, leeway=leeway, clock=clock, scopedKeys=scopedKeys)
    claims = await verifier.verify(proof)
    if claims.get("sub") != subject:
        raise InvalidToken(f"it names another {subjectRole}")
    if claims.get("nonce") != nonce:
        raise InvalidToken("it does not answer this challenge")
    if forWhom is not None and claims.get("portal") != forWhom:
        raise InvalidToken(f"it is for another {forRole}")
    if claims["exp"] - claims["iat"] > PROOF_LIFETIME:
        raise InvalidToken(f"it is valid for longer than {PROOF_LIFETIME} s")
    return claims


class Phase(Enum):
    """Where a side's handshake is."""

    #: Dialled: the challenge is not sent yet. Dialler: waiting for the challenge.
    CHALLENGE = "waiting for the challenge"
    #: Dialled: the challenge is out, waiting for the hello.
    HELLO = "waiting for the hello"
    #: Dialler: the hello is out, waiting for the welcome.
    WELCOME = "waiting for the welcome"
    #: A proof is being checked.
    CHECKING = "checking a proof"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Hello:
    """The dialler's hello, as the dialled side received it."""

    #: Who the dialler says it is.
    peer: str
    #: Its proof, to check with :func:`checkProof` against its key.
    proof: str
    #: On a mutual link, the nonce the welcome's proof must answer.
    nonce: str | None
    message: Mapping[str, Any]


@dataclass(frozen=True)
class Welcome:
    """The dialled side's welcome, as the dialler received it."""

    #: On a mutual link, the dialled side's proof (to check before :meth:`Dialler.opened`).
    proof: str | None
    message: Mapping[str, Any]


class Dialled:
    """The dialled side's handshake (the portal; a compute node)."""

    def __init__(self, link: Link, name: str, *, nonce: str | None = None) -> None:
        """:param name: this side's name, sent in the challenge (the portal's URL, the node's name)."""
        self.link = link
        self.name = name
        self.nonce = nonce or newNonce()
        self.phase = Phase.CHALLENGE
        #: Who the dialler proved to be, once open.
        self.peer: str | None = None
        self._theirNonce: str | None = None

    @property
    def open(self) -> bool:
        return self.phase is Phase.OPEN

    def challenge(self) -> dict[str, Any]:
        """The first message, sent as the link opens."""
        if self.phase is not Phase.CHALLENGE:
            raise ProtocolError("challenge sent twice")
        self.phase = Phase.HELLO
        return {"type": "challenge", "nonce": self.nonce, self.link.nameField: self.name}

    def receive(self, message: Mapping[str, Any]) -> Hello | None:
        """
        A message received: the :class:`Hello` while the handshake runs
        (check its proof, then :meth:`welcome` or :meth:`refuse`), None once
        the link is open (the message is the caller's to handle).

        :raises ProtocolError: a message out of turn, or a malformed hello.
        """
        kind = message["type"]
        if self.phase is Phase.OPEN:
            return None
        if self.phase is Phase.HELLO:
            if kind != "hello":
                raise ProtocolError(f"expected a hello, not {kind!r}")
            peer = text(message, self.link.diallerRole)
            proof = text(message, "proof", limit=MAX_TOKEN_LENGTH)
            theirs = text(message, "nonce", limit=MAX_NONCE) if self.link.mutual else None
            self.phase = Phase.CHECKING
            self._theirNonce = theirs
            return Hello(peer, proof, theirs, message)
        if self.phase is Phase.CHECKING:
            raise ProtocolError(f"{kind} before the welcome")
        raise ProtocolError(f"{kind} on a link that is {self.phase.value}")

    async def check(
        self, hello: Hello, keys: IKeySource, *, clock: IReactorTime, leeway: float = 30.0, scopedKeys: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """
        Check ``hello``'s proof against ``keys`` (the dialler's).

        :raises AuthRefused: it is no good.
        """
        try:
            return await checkProof(
                keys, hello.proof, audience=self.link.audience, subject=hello.peer, nonce=self.nonce,
                forWhom=self.name, clock=clock, subjectRole=self.link.diallerRole,
                forRole=self.link.dialledRole, leeway=leeway, scopedKeys=scopedKeys,
            )  # fmt: skip
        except InvalidToken as e:
            raise AuthRefused(f"bad proof: {e.reason}") from None

    def welcome(
        self, peer: str, fields: Mapping[str, Any], *, key: PrivateKey | None = None, clock: IReactorTime | None = None
    ) -> dict[str, Any]:
        """
        The welcome, once ``peer``'s proof was checked: ``fields`` and, on a
        mutual link, this side's own proof (signed with ``key``).
        """
        if self.phase is not Phase.CHECKING:
            raise ProtocolError(f"welcome on a link that is {self.phase.value}")
        message = {"type": "welcome", **fields}
        if self.link.mutual:
            assert key is not None and self._theirNonce is not None and self.link.welcomeAudience is not None
            message["proof"] = signProof(
                key, self.name, self._theirNonce, peer, clock=clock, audience=self.link.welcomeAudience
            )
        self.phase = Phase.OPEN
        self.peer = peer
        return message

    def close(self) -> None:
        self.phase = Phase.CLOSED


class Dialler:
    """The dialling side's handshake (the scheduler, on either link)."""

    def __init__(
        self,
        link: Link,
        name: str,
        key: PrivateKey,
        *,
        clock: IReactorTime | None = None,
        expected: str | None = None,
        nonce: str | None = None,
    ) -> None:
        """
        :param name: this side's name (the scheduler's id).
        :param key: its private key, which signs its proof.
        :param expected: the dialled side's name, if it must be this one
            (a challenge naming another is refused: no one can relay this
            side's proofs to a third).
        """
        self.link = link
        self.name = name
        self.key = key
        self.clock = clock
        self.expected = expected
        self.nonce = (nonce or newNonce()) if link.mutual else None
        self.phase = Phase.CHALLENGE
        #: The dialled side's name, from its challenge.
        self.peer: str | None = None

    @property
    def open(self) -> bool:
        return self.phase is Phase.OPEN

    def receive(self, message: Mapping[str, Any]) -> dict[str, Any] | Welcome | None:
        """
        A message received: for the challenge, the hello to send; for the
        welcome, the :class:`Welcome` (on a mutual link, check its proof
        with :meth:`check`, then :meth:`opened`); None once the link is open.

        :raises ProtocolError: a message out of turn, or malformed.
        :raises AuthRefused: the challenge names another peer than expected.
        """
        kind = message["type"]
        if self.phase is Phase.OPEN:
            return None
        if self.phase is Phase.CHALLENGE:
            if kind != "challenge":
                raise ProtocolError(f"expected a challenge, not {kind!r}")
            nonce = text(message, "nonce", limit=MAX_NONCE)
            peer = text(message, self.link.nameField, limit=self.link.nameLimit)
            if self.expected is not None and peer != self.expected:
                raise AuthRefused(f"the {self.link.dialledRole} says it is {peer!r}, not {self.expected!r}")
            self.peer = peer
            self.phase = Phase.WELCOME
            proof = signProof(self.key, self.name, nonce, peer, clock=self.clock, audience=self.link.audience)
            hello = {"type": "hello", self.link.diallerRole: self.name, "proof": proof}
            if self.nonce is not None:
                hello["nonce"] = self.nonce
            return hello
        if self.phase is Phase.WELCOME:
            if kind != "welcome":
                raise ProtocolError(f"expected a welcome, not {kind!r}")
            if self.link.mutual:
                self.phase = Phase.CHECKING
                return Welcome(text(message, "proof", limit=MAX_TOKEN_LENGTH), message)
            self.phase = Phase.OPEN
            return Welcome(None, message)
        raise ProtocolError(f"{kind} on a link that is {self.phase.value}")

    async def check(self, welcome: Welcome, keys: IKeySource, *, leeway: float = 30.0) -> dict[str, Any]:
        """
        Check a mutual welcome's proof against ``keys`` (the dialled side's).

        :raises AuthRefused: it is no good.
        """
        assert welcome.proof is not None and self.nonce is not None and self.link.welcomeAudience is not None
        assert self.peer is not None and self.clock is not None
        try:
            return await checkProof(
                keys, welcome.proof, audience=self.link.welcomeAudience, subject=self.peer, nonce=self.nonce,
                forWhom=self.name, clock=self.clock, subjectRole=self.link.dialledRole,
                forRole=self.link.diallerRole, leeway=leeway,
            )  # fmt: skip
        except InvalidToken as e:
            raise AuthRefused(f"the {self.link.dialledRole}'s proof was refused: {e.reason}") from None

    def opened(self) -> None:
        """The welcome's proof was good: the link is open."""
        if self.phase is not Phase.CHECKING:
            raise ProtocolError(f"opened on a link that is {self.phase.value}")
        self.phase = Phase.OPEN

    def close(self) -> None:
        self.phase = Phase.CLOSED
