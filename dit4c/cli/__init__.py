"""
The ``dit4c`` command: administrative tasks that need no running server
(``dit4c.cli.local``), and a person's daily use of a portal through its
REST API (``dit4c.cli.remote``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from . import local, remote, upload  # noqa: F401 (each registers its subcommands)
from .registry import COMMANDS, Command, CommandError, command

__all__ = ["COMMANDS", "Command", "CommandError", "command", "main"]


# -- entry point -------------------------------------------------------------


def makeParser() -> argparse.ArgumentParser:
    """The parser for every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="dit4c",
        description="DIT4C: Data Intensive Tools for the Cloud.",
        epilog="Start with 'dit4c login URL' (a token from the portal's account page). Exit status: 0 done; "
        "1 the portal refused or failed (it says why); 2 a usage error; 3 not logged in, or the token "
        "was refused; 4 no such thing.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run the ``dit4c`` command; returns the exit status (0 success, 1 the
    command failed, 2 usage error via argparse's ``SystemExit``).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    args = makeParser().parse_args(argv)
    try:
        status: int = args.run(args, out)
    except CommandError as e:
        err.write(f"dit4c {args.command}: error: {e}\n")
        return 1
    out.flush()
    return status
