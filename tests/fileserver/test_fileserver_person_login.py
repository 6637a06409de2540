"""
The portal's login to the file server for one person (docs/protocols.md
13.6): SSH user ``user:<id>``, a password that is a token the portal signed
for that person (audience ``dit4c-fileserver``, at most two minutes), checked
against the portal's JWKS over a real loopback connection. Anything else is
refused, and an accepted login reaches that person's storage only.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
import pytest_twisted
from fileserver_world import portOf
from twisted.conch.ssh.filetransfer import SFTPError
from twisted.internet import reactor

from dit4c.common.keys import generatePrivateKey, keyID
from dit4c.common.tokens import TokenSigner
from dit4c.fileserver.personlogin import PERSON_AUDIENCE
from dit4c.portal.fileclient import FileClient, Unavailable


def clientOf(w: Any) -> tuple[FileClient, Any]:
    """A file server whose clock is the portal's (tokens are signed on that clock), and the portal's client of it."""
    server = w.startServer(clock=w.portal.clock)
    client = FileClient(reactor, f"tcp:host=127.0.0.1:port={portOf(server)}", w.hostKey, w.portal.keys, timeout=10)
    return client, server


async def refused(client: FileClient, user: str, password: str) -> None:
    with pytest.raises(Unavailable):
        async with client.loggedIn(user, password) as files:
            await files.listdir(".")


def signed(w: Any, sub: str, *, audience: str = PERSON_AUDIENCE, lifetime: float = 60.0, key: Any = None, kid: str | None = None) -> str:
    keys = w.portal.keys
    signer = TokenSigner(key or keys.current, issuer=keys.issuer, kid=kid, clock=w.portal.clock)
    return signer.sign({"sub": sub}, audience=audience, lifetime=lifetime)


@pytest_twisted.ensureDeferred
async def test_the_portals_token_reaches_that_persons_storage_only(world: Any) -> None:
    w = world
    client, _ = clientOf(w)
    async with client.session(w.alice.id) as files:
        await files.write("notes.txt", b"alice's notes")
        assert [name for name, _ in await files.listdir(".")] == ["notes.txt"]
        # Out of the person's directory, by .. or by absolute path: refused by the file server.
        for escape in (f"../{w.bob.id}", f"/../{w.bob.id}"):
            with pytest.raises(SFTPError):
                await files.listdir(escape)
    assert (w.home(w.alice) / "notes.txt").read_bytes() == b"alice's notes"
    async with client.session(w.bob.id) as files:
        assert await files.listdir(".") == []


@pytest_twisted.ensureDeferred
async def test_tokens_that_are_not_the_portals_for_that_person_are_refused(world: Any) -> None:
    w = world
    client, server = clientOf(w)
    user = f"user:{w.alice.id}"
    await refused(client, user, signed(w, w.bob.id))  # another person's
    await refused(client, user, signed(w, w.alice.id, audience="dit4c-image-import"))  # another audience
    await refused(client, user, signed(w, w.alice.id, lifetime=3600))  # made to last
    forger = generatePrivateKey()
    await refused(client, user, signed(w, w.alice.id, key=forger, kid=keyID(w.portal.keys.current.public_key())))  # forged
    # An instance's own key (published in the JWKS) may not sign for its owner.
    await refused(client, user, signed(w, w.alice.id, key=w.keyA, kid=f"instance:{w.a.id}"))
    unsigned = jwt.encode({"sub": w.alice.id, "aud": PERSON_AUDIENCE, "iat": int(w.portal.clock.seconds()), "exp": int(w.portal.clock.seconds()) + 60}, "", algorithm="none")
    await refused(client, user, unsigned)
    await refused(client, user, "not a token")
    # Not a person's login name, or an instance's name with a password.
    await refused(client, w.alice.id, signed(w, w.alice.id))
    await refused(client, w.a.id, signed(w, w.alice.id))
    await refused(client, "user:../x", signed(w, "../x"))
    # Expired: signed, then kept past its 60 s and the 30 s of leeway.
    token = signed(w, w.alice.id)
    w.portal.clock.advance(91)
    await refused(client, user, token)
    assert not (w.tmp / "files" / "users").exists()  # no login got as far as a person's directory
    # Each was counted as a login with bad credentials.
    # None got in. Each token was refused by the checker (counted); a password in a name
    # that is not user:<id> never reaches it (only public keys are offered to those).
    assert server.metrics.logins["bad_credentials"] == 9 and server.metrics.logins["accepted"] == 0


@pytest_twisted.ensureDeferred
async def test_a_good_token_logs_in_after_refusals(world: Any) -> None:
    """A refused token costs nothing but that login: the next good one is taken."""
    w = world
    client, _ = clientOf(w)
    await refused(client, f"user:{w.alice.id}", signed(w, w.bob.id))
    async with client.loggedIn(f"user:{w.alice.id}", signed(w, w.alice.id)) as files:
        assert await files.listdir(".") == []
