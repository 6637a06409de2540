"""
The file server's Prometheus figures (``twistd dit4c-fileserver --metrics
ENDPOINT``, ``/metrics`` and ``/health`` there): connections and SFTP
sessions open now, logins by outcome, bytes read from and written to
people's storage, files removed.

Everything is counted in memory as it happens, at the one place each thing
is decided (the login checker, the connection limit, the login deadline,
the SFTP file operations), so a scrape reads a few integers and never
touches the disk or the portal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["LOGIN_OUTCOMES", "FileServerMetrics"]

#: How a login can end; every one is always reported (0 until it happens).
LOGIN_OUTCOMES = (
    # The key was the instance's and the portal said whose storage it reaches.
    "accepted",
    # The portal said no (the instance is not active, its owner disabled...).
    "refused",
    # Not an instance id, not the instance's key, a bad signature, or no key published for it.
    "bad_credentials",
    # The portal gave no answer that counts (down, slow, or the shared secret is wrong).
    "portal_unavailable",
    # Closed at once: max-connections were already open.
    "over_limit",
    # Closed: no login within login-timeout seconds.
    "timed_out",
)


class FileServerMetrics:
    """The file server's figures since the process started; a ``prometheus_client`` collector."""

    def __init__(self) -> None:
        #: SSH connections open now (logged in or not).
        self.connections = 0
        #: SFTP sessions open now.
        self.sessions = 0
        #: Logins (attempts, for refusals) by outcome.
        self.logins: Counter[str] = Counter()
        self.bytesRead = 0
        self.bytesWritten = 0
        self.filesRemoved = 0

    def login(self, outcome: str) -> None:
        """Count a login that ended as ``outcome`` (one of :data:`LOGIN_OUTCOMES`)."""
        if outcome not in LOGIN_OUTCOMES:
            raise ValueError(f"unknown login outcome {outcome!r}")
        self.logins[outcome] += 1

    def connectionOpened(self) -> None:
        self.connections += 1

    def connectionClosed(self) -> None:
        self.connections -= 1

    def sessionOpened(self) -> None:
        self.sessions += 1

    def sessionClosed(self) -> None:
        self.sessions -= 1

    def read(self, count: int) -> None:
        """``count`` bytes were read from someone's storage for a client."""
        self.bytesRead += count

    def written(self, count: int) -> None:
        """``count`` bytes a client sent were written to someone's storage."""
        self.bytesWritten += count

    def removed(self) -> None:
        """A client removed a file (or a link)."""
        self.filesRemoved += 1

    def health(self) -> dict[str, int]:
        """What ``/health`` adds to its ``status``."""
        return {"connections": self.connections, "sessions": self.sessions}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("dit4c_files_connections", "SSH connections open now, logged in or not.", value=self.connections)
        yield GaugeMetricFamily("dit4c_files_sftp_sessions", "SFTP sessions open now (a mounted storage holds one).", value=self.sessions)
        logins = CounterMetricFamily(
            "dit4c_files_logins",
            "Logins by outcome since the file server started (refusals count each attempt).",
            labels=["outcome"],
        )
        for outcome in LOGIN_OUTCOMES:
            logins.add_metric([outcome], self.logins.get(outcome, 0))
        yield logins
        yield CounterMetricFamily("dit4c_files_read_bytes", "Bytes read from people's storage for clients.", value=self.bytesRead)
        yield CounterMetricFamily("dit4c_files_written_bytes", "Bytes clients wrote to people's storage.", value=self.bytesWritten)
        yield CounterMetricFamily("dit4c_files_removed_files", "Files (and links) clients removed.", value=self.filesRemoved)
