"""
``twistd dit4c-portal --routing-domain D`` (repeatable): with several
routing servers, each serving its own domain, an instance may report a
URL under any of them (it moves when its routing server dies) and under
no other; without the option any domain is taken, as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from dit4c.portal import tap
from dit4c.portal.errors import ReportError


def parsed(tmp_path: Path, *arguments: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(
        ["--data-dir", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1", *arguments]
    )
    return options


def test_without_the_option_any_domain_is_taken(tmp_path: Path) -> None:
    assert tap.makeService(parsed(tmp_path), reactor).routingDomains == ()  # type: ignore[attr-defined]


def test_an_empty_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--routing-domain"):
        parsed(tmp_path, "--routing-domain", ".")


@pytest_twisted.ensureDeferred
async def test_a_running_portal_takes_urls_under_its_routing_domains_only(tmp_path: Path) -> None:
    service = tap.makeService(
        parsed(tmp_path, "--routing-domain", "R1.example.org.", "--routing-domain", "r2.example.org"), reactor
    )
    service.startService()
    try:
        portal = await service.ready  # type: ignore[attr-defined]
        reports = portal.reports
        assert reports.instanceDomains == ("r1.example.org", "r2.example.org")
        from dit4c.portal.reportrules import checkInstanceURL

        for url in ("http://abc.r1.example.org:8080/", "https://abc.r2.example.org/"):
            assert checkInstanceURL(url, "abc", reports.instanceDomains) == url
        with pytest.raises(ReportError, match="routing domains"):
            checkInstanceURL("http://abc.elsewhere.example/", "abc", reports.instanceDomains)
    finally:
        await service.stopService()
