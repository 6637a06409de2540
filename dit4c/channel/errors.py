"""
What can go wrong on the channel (docs/protocols.md sections 7 and 11).

- ``LinkError`` and its kinds close one link, only that one, with a close
  code and ``reason`` (in the close frame and the log); the other links
  and the instances they carry go on. ``ProtocolError``: the peer sent
  what the channel does not allow (``PROTOCOL_ERROR``). ``AuthRefused``:
  the peer did not prove itself in the handshake (``AUTH_FAILED``).
- ``NodeFull``: a compute node takes no new instance now (at capacity, or
  cooling down); its scheduler tries another node, and with none left the
  instance is reported errored. Nothing is wrong with the link.
- ``NodeAway``: a compute node cannot be asked anything now (its link is
  down); said to the administrator who asked.
"""

from __future__ import annotations

__all__ = ["AuthRefused", "LinkError", "NodeAway", "NodeFull", "ProtocolError"]


class LinkError(Exception):
    """What closes one link (only that one); ``reason`` says why, in the close frame and the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self.args[0])


class ProtocolError(LinkError):
    """The peer broke the channel's protocol: the channel closes (``PROTOCOL_ERROR``)."""


class AuthRefused(LinkError):
    """The other side failed to prove itself: the link closes (``AUTH_FAILED``) with this reason."""


class NodeFull(Exception):
    """The node takes no more instances (at capacity, or cooling down)."""


class NodeAway(Exception):
    """The compute node cannot be reached now (its link to the scheduler is down); the message says so."""
