"""
What a catalogue entry allows each of its instances: CPUs, memory, and how
long it may sit unused before it is stopped (or saved) for its owner.

One value, :class:`ToolLimits`, read and checked here for every place that
holds or carries it: the portal's store (a JSON column of the image), the
administrators' form and API, the ``start`` command's ``limits`` parameter
(docs/protocols.md 7.3), and the compute node's runtimes, which enforce the
CPUs and memory. The idle limit is the portal's to enforce
(:mod:`dit4c.portal.culling`): only it sees an instance's whole life.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["IDLE_ACTIONS", "MAX_CPUS", "MAX_IDLE_MINUTES", "MAX_MEMORY_MIB", "MIN_MEMORY_MIB", "LimitError", "ToolLimits"]

#: What happens to an instance left unused past its idle limit.
IDLE_ACTIONS = ("stop", "save")
#: Bounds an administrator's figures must fall within.
MAX_CPUS = 1024.0
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_IDLE_MINUTES = 60 * 24 * 365


class LimitError(ValueError):
    """A limit that is not one (the message says which and why, for the person who set it)."""


@dataclass(frozen=True)
class ToolLimits:
    """A catalogue entry's limits; None is "no limit"."""

    #: CPUs an instance may use at once (1.5: one and a half cores' time).
    cpus: float | None = None
    #: Memory in MiB; past it the tool is killed (the instance is errored with the reason).
    memory: int | None = None
    #: Minutes without traffic through the routing server before ``idleAction``.
    idle: int | None = None
    #: ``stop`` or ``save``.
    idleAction: str = "stop"

    @property
    def empty(self) -> bool:
        return self.cpus is None and self.memory is None and self.idle is None

    def toJSON(self) -> dict[str, Any]:
        """As the API, the store and the ``start`` command carry it."""
        return {"cpus": self.cpus, "memory": self.memory, "idle": self.idle, "idle_action": self.idleAction}

    def dumps(self) -> str | None:
        """The store's column: None for no limits at all."""
        return None if self.empty and self.idleAction == "stop" else json.dumps(self.toJSON(), sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> ToolLimits:
        """From the store's column (None: no limits)."""
        return cls() if not text else cls.fromJSON(json.loads(text))

    @classmethod
    def fromJSON(cls, value: object) -> ToolLimits:
        """From the API or the wire: an object with any of ``cpus``, ``memory``, ``idle``, ``idle_action``."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise LimitError("Limits must be an object with cpus, memory, idle and idle_action.")
        unknown = set(value) - {"cpus", "memory", "idle", "idle_action"}
        if unknown:
            raise LimitError(f"Unknown limit {sorted(unknown)[0]!r}: cpus, memory, idle and idle_action are.")
        return cls(
            cpus=_cpus(value.get("cpus")),
            memory=_whole(value.get("memory"), "memory", MIN_MEMORY_MIB, MAX_MEMORY_MIB, "MiB"),
            idle=_whole(value.get("idle"), "idle", 1, MAX_IDLE_MINUTES, "minutes"),
            idleAction=_action(value.get("idle_action")),
        )

    @classmethod
    def fromForm(cls, cpus: str, memory: str, idle: str, idleAction: str) -> ToolLimits:
        """From an administrator's form: empty fields are no limit."""

        def number(text: str, name: str) -> float | int | None:
            text = text.strip()
            if not text:
                return None
            try:
                return int(text) if text.isdigit() else float(text)
            except ValueError:
                raise LimitError(f"The {name} limit must be a number.") from None

        return cls.fromJSON(
            {
                "cpus": number(cpus, "CPU"),
                "memory": number(memory, "memory"),
                "idle": number(idle, "idle"),
                "idle_action": idleAction.strip() or "stop",
            }
        )

    def describe(self) -> str:
        """For people: ``2 CPUs, 4096 MiB, stopped after 30 min unused``."""
        parts = []
        if self.cpus is not None:
            parts.append(f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}")
        if self.memory is not None:
            parts.append(f"{self.memory} MiB")
        if self.idle is not None:
            parts.append(f"{'stopped' if self.idleAction == 'stop' else 'saved'} after {self.idle} min unused")
        return ", ".join(parts) or "no limits"


def _cpus(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LimitError("The CPU limit must be a number of CPUs, such as 0.5 or 2.")
    if not 0.01 <= value <= MAX_CPUS:
        raise LimitError(f"The CPU limit must be between 0.01 and {MAX_CPUS:g} CPUs.")
    return float(value)


def _whole(value: object, name: str, low: int, high: int, unit: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitError(f"The {name} limit must be a whole number of {unit}.")
    if not low <= value <= high:
        raise LimitError(f"The {name} limit must be between {low} and {high} {unit}.")
    return value


def _action(value: object) -> str:
    if value is None:
        return "stop"
    if value not in IDLE_ACTIONS:
        raise LimitError("What happens to an unused instance must be stop or save.")
    return str(value)
