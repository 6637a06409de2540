"""
The ``dit4c`` subcommands that need no running server: keys, JWKS, tokens
signed by hand, and a portal user added to its database.

What each needs is imported when it runs: every ``dit4c`` command would
otherwise pay for the cryptography and HTTP libraries at start.
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path
from typing import Any, TextIO

from dit4c.common.errors import InvalidToken, KeyFileError
from dit4c.common.tokenclaims import ROUTING_AUDIENCE, ROUTING_MAX_LIFETIME, checkInstanceID

from .registry import CommandError, command, printJSON

# -- keygen ----------------------------------------------------------------


def _keygenArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", type=Path, help="where to write the PEM key")
    parser.add_argument("--force", action="store_true", help="replace an existing file")


@command(
    "keygen",
    help="create an EC P-256 private key and print its public JWKS",
    arguments=_keygenArguments,
)
def keygen(args: argparse.Namespace, out: TextIO) -> int:
    """
    Without ``--force`` an existing file is never replaced, checked at the
    moment of writing, so a second keygen cannot silently change a
    component's identity.
    """
    path: Path = args.path
    if path.exists() and not args.force:
        raise CommandError(f"{path} exists; use --force to replace it")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    from dit4c.common.keys import generatePrivateKey, jwks, savePrivateKey

    key = generatePrivateKey()
    try:
        savePrivateKey(key, path, overwrite=args.force)
    except FileExistsError:
        raise CommandError(f"{path} exists; use --force to replace it") from None
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    printJSON(jwks(key), out)
    return 0


# -- jwks ------------------------------------------------------------------


def _jwksArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        metavar="PATH",
        type=Path,
        nargs="+",
        help="a PEM private or public key (only public halves are printed)",
    )


@command("jwks", help="print the public JWKS of key files", arguments=_jwksArguments)
def printJWKS(args: argparse.Namespace, out: TextIO) -> int:
    from dit4c.common.keys import jwks, loadPublicKey

    keys = []
    for path in args.paths:
        try:
            keys.append(loadPublicKey(path))
        except KeyFileError as e:
            raise CommandError(str(e)) from None
        except OSError as e:
            raise CommandError(f"cannot read {path}: {e.strerror}") from None
    printJSON(jwks(*keys), out)
    return 0


# -- token -----------------------------------------------------------------

#: Claims the token subcommand sets itself, each from its own option.
_RESERVED_CLAIMS = {
    "sub": "--subject",
    "aud": "--audience",
    "iss": "--issuer",
    "iat": "--lifetime",
    "exp": "--lifetime",
}


def _claim(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``; VALUE is read as JSON when it parses, else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name == "jti":
        raise argparse.ArgumentTypeError("'jti' is set afresh for every token (a routing server takes a token once)")
    if name in _RESERVED_CLAIMS:
        raise argparse.ArgumentTypeError(f"set {name!r} with {_RESERVED_CLAIMS[name]}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _tokenArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, type=Path, help="PEM private key to sign with")
    parser.add_argument(
        "--audience",
        default=ROUTING_AUDIENCE,
        help=f"the aud claim (default: {ROUTING_AUDIENCE})",
    )
    parser.add_argument(
        "--subject",
        required=True,
        help=f"the sub claim; for {ROUTING_AUDIENCE} an instance id (a DNS label)",
    )
    parser.add_argument("--issuer", help="the iss claim (default: none)")
    parser.add_argument(
        "--lifetime",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help=(
            f"seconds until the token expires (default: {ROUTING_MAX_LIFETIME:g} for {ROUTING_AUDIENCE}, "
            "and no more, as routing servers refuse longer ones; 3600 for other audiences)"
        ),
    )
    parser.add_argument("--kid", help="the kid header (default: the key's RFC 7638 thumbprint)")
    parser.add_argument(
        "--claim",
        type=_claim,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra claim; VALUE is JSON if it parses, else a string (repeatable)",
    )


@command("token", help="print a signed, single-use token (JWT with a fresh jti)", arguments=_tokenArguments)
def token(args: argparse.Namespace, out: TextIO) -> int:
    """
    Routing tokens are checked here too, so a typo fails now, not at
    connect time. Every token carries a new random ``jti``: a routing
    server accepts a token once, so one printed here serves one dial (a
    listener that dials again and again signs its own, with --key-file).
    """
    from dit4c.common.keys import loadPrivateKey
    from dit4c.common.tokens import TokenSigner

    lifetime: float | None = args.lifetime
    if args.audience == ROUTING_AUDIENCE:
        try:
            checkInstanceID(args.subject)
        except InvalidToken:
            raise CommandError(
                f"--subject {args.subject!r} is not an instance id "
                "(lower-case letters, digits and '-', 1 to 63 characters, "
                "not starting or ending with '-')"
            ) from None
        if lifetime is None:
            lifetime = ROUTING_MAX_LIFETIME
        elif lifetime > ROUTING_MAX_LIFETIME:
            raise CommandError(
                f"--lifetime {lifetime:g}: routing servers refuse tokens that live longer than "
                f"{ROUTING_MAX_LIFETIME:g} s (their --max-token-lifetime)"
            )
    elif lifetime is None:
        lifetime = 3600.0
    try:
        key = loadPrivateKey(args.key)
    except KeyFileError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot read {args.key}: {e.strerror}") from None
    signer = TokenSigner(key, issuer=args.issuer, kid=args.kid)
    claims = dict(args.claim)
    claims["sub"] = args.subject
    claims["jti"] = secrets.token_urlsafe(16)
    out.write(signer.sign(claims, audience=args.audience, lifetime=lifetime) + "\n")
    return 0


# -- portal users ------------------------------------------------------------


def _userAddArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="login name (lower case)")
    parser.add_argument("--admin", action="store_true", help="make the user an administrator")
    parser.add_argument("--display-name", default=None, help="name shown on pages")
    parser.add_argument("--email", default=None)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--database", help="the portal's database URL (sqlite:///... or postgresql://...)")
    where.add_argument(
        "--data-dir", default="data/portal", help="the portal's data directory (its SQLite database)"
    )
    parser.add_argument(
        "--create",
        action="store_true",
        help="make the data directory's database if it has none (a portal that never ran)",
    )


@command("user-add", help="add a portal user and print a new password once", arguments=_userAddArguments)
def userAdd(args: argparse.Namespace, out: TextIO) -> int:
    """
    The password is generated, printed once here and stored only as a hash;
    it goes to standard output, never to a log.
    """
    import secrets
    from pathlib import Path

    from twisted.internet import defer, reactor

    from dit4c.portal import security
    from dit4c.portal.store import openStore
    from dit4c.portal.store.errors import StoreError

    database = args.database or "sqlite:///" + str(Path(args.data_dir).resolve() / "portal.db")
    if not args.database:
        if not (Path(args.data_dir) / "portal.db").exists() and not args.create:
            # A mistyped --data-dir would otherwise make a new, empty portal
            # that no running portal reads, and say "created".
            raise CommandError(
                f"there is no portal database in {args.data_dir}: is --data-dir right? "
                "(--create makes one, for a portal that has not run yet)"
            )
        Path(args.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(15)

    async def run() -> None:
        store = await openStore(database, reactor)
        try:
            await store.createUser(
                args.name,
                password_hash=await security.hashPassword(password),
                display_name=args.display_name,
                email=args.email,
                is_admin=args.admin,
            )
        finally:
            await store.close()

    outcome: list[Any] = []

    def start() -> None:
        d = defer.ensureDeferred(run())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    result = outcome[0] if outcome else None
    if result is not None:
        if result.check(StoreError):
            raise CommandError(str(result.value))
        raise CommandError(f"cannot add the user: {result.getErrorMessage()}")
    kind = "administrator" if args.admin else "user"
    out.write(f"{kind} {args.name} created; password (shown only now): {password}\n")
    return 0


