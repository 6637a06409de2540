"""
The registry of ``dit4c`` subcommands: each is a function registered with
:func:`command`, together with a function that declares its arguments; the
parser is built from the registry, so adding a subcommand touches nothing
else.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["COMMANDS", "Command", "CommandError", "command", "printJSON"]


class CommandError(Exception):
    """The command could not do what was asked; the message says why."""


Run = Callable[[argparse.Namespace, TextIO], int]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, arguments and body."""

    name: str
    help: str
    arguments: Arguments
    run: Run


#: Every subcommand, by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Arguments) -> Callable[[Run], Run]:
    """Register the decorated function as subcommand ``name``."""

    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = Command(name, help, arguments, run)
        return run

    return register


def printJSON(document: Any, out: TextIO) -> None:
    out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
