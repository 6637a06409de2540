"""
What can go wrong in a compute node's runtime (docs/protocols.md 9.1).

- ``RuntimeError_``: a pod could not be made, changed, saved or removed.
  Its message is shown to the person (podman's own last ``Error:`` line,
  shortened, for the podman runtime): a start that fails this way leaves
  the instance ``errored`` with it; a discard that fails keeps the record
  so that discarding again tries again.
- ``PodmanError``: a podman command failed or did not finish in time; a
  ``RuntimeError_`` to everyone but the podman runtime itself, which reads
  a few of them (an address already in use) and tries again.
"""

from __future__ import annotations

__all__ = ["NotHere", "PodmanError", "RuntimeError_"]


class RuntimeError_(Exception):
    """A pod could not be made or changed; the message is shown to the person."""


class PodmanError(RuntimeError_):
    """A podman command failed."""


class NotHere(Exception):
    """This node holds nothing of that instance."""
