"""
The browser harness (support.browser) against a tiny twisted.web site
on 127.0.0.1: a form, Server-Sent Events, cookies, screenshots, and cleanup.

Without chromium, chromium-driver or selenium these tests are skipped, or
fail when CI=true, where they must run.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.browser import NETWORK_CHANGED, Browser, browserAvailable, requireBrowser, startBrowser
from support.waiting import eventually
from twisted.internet import reactor, threads
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title></head>
<body>
<h1>Browser harness</h1>
<form method="post" action="/echo">
  <input name="field" autocomplete="off">
  <button type="submit">Send</button>
</form>
<p id="sse">waiting</p>
<script>
  let n = 0;
  const out = document.getElementById("sse");
  new EventSource("/events").onmessage = (e) => {
    n += 1;
    out.textContent = `event ${n}: ${e.data}`;
  };
</script>
</body></html>
"""

#: What /events sends, and how long after the stream opens.
EVENTS = [(0.3, "one"), (0.6, "two"), (0.9, "three")]


@dataclass
class HarnessSite:
    port: int = 0
    hosts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    echoed: list[str] = field(default_factory=list)
    streams: list[Request] = field(default_factory=list)
    streamsGone: list[Request] = field(default_factory=list)
    eventsSent: int = 0
    calls: list[IDelayedCall] = field(default_factory=list)


class _Page(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.body


class _Events(Resource):
    """text/event-stream: three events, then the stream stays open."""

    isLeaf = True

    def __init__(self, state: HarnessSite) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.write(b": open\n\n")  # sends the headers now
        self.state.streams.append(request)
        gone: list[bool] = []

        def ended(_: object) -> None:
            gone.append(True)
            self.state.streamsGone.append(request)

        request.notifyFinish().addBoth(ended)

        def send(data: str) -> None:
            if not gone:
                request.write(f"data: {data}\n\n".encode())
                self.state.eventsSent += 1

        for delay, data in EVENTS:
            self.state.calls.append(reactor.callLater(delay, send, data))  # type: ignore[attr-defined]
        return NOT_DONE_YET


class _Echo(Resource):
    isLeaf = True

    def __init__(self, state: HarnessSite) -> None:
        super().__init__()
        self.state = state

    def render_POST(self, request: Request) -> bytes:
        said = request.args.get(b"field", [b""])[0].decode()
        self.state.echoed.append(said)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return f'<!doctype html><p id="echo">You said: {html.escape(said)}</p>'.encode()


class _Cookie(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.addCookie(b"secret", b"s3cret", path=b"/", httpOnly=True)
        request.addCookie(b"visible", b"yes", path=b"/")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b"<!doctype html><p id='done'>cookies set</p>"


class _Root(Resource):
    def __init__(self, state: HarnessSite) -> None:
        super().__init__()
        self.state = state
        self.putChild(b"", _Page(PAGE))
        self.putChild(b"events", _Events(state))
        self.putChild(b"echo", _Echo(state))
        self.putChild(b"cookie", _Cookie())

    def getChild(self, path: bytes, request: Request) -> Resource:
        return pages.notFound()

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        self.state.hosts.append((request.getHeader(b"host") or b"").decode())
        self.state.paths.append(request.path.decode())
        return super().getChildWithDefault(path, request)


class _TrackingSite(Site):
    """A Site that can drop every connection it accepted (SSE streams never end)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.protocols.append(protocol)
        return protocol


@pytest_twisted.async_yield_fixture
async def site() -> AsyncIterator[HarnessSite]:
    state = HarnessSite()
    factory = _TrackingSite(_Root(state))
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    state.port = port.getHost().port
    try:
        yield state
    finally:
        for call in state.calls:
            if call.active():
                call.cancel()
        aborted = []
        for protocol in factory.protocols:
            transport = getattr(protocol, "transport", None)
            if transport is not None and transport.connected:
                transport.abortConnection()
                aborted.append(transport)
        await port.stopListening()
        # An aborted connection is lost in a later turn of the reactor.
        await eventually(lambda: not any(t.connected for t in aborted), what="the aborted connections were lost")


@pytest_twisted.ensureDeferred
async def test_form_sse_and_screenshot(site: HarnessSite, browser: Browser, tmp_path: Path) -> None:
    # The server listens on 127.0.0.1 only: Chromium reached it by this name.
    host = f"something.localhost:{site.port}"
    await browser.get(f"http://{host}/")
    assert site.hosts[0] == host
    assert await browser.text("h1") == "Browser harness"

    # The events are timed by the reactor: they arrive only because waiting in
    # the browser does not block it.
    await browser.execute("window.notReloaded = true")
    assert await browser.waitForText("#sse", "event 3: three", timeout=10) == "event 3: three"
    assert await browser.execute("return window.notReloaded") is True
    assert site.paths.count("/") == 1  # the text changed without a reload
    assert site.eventsSent == 3
    assert len(site.streams) == 1 and not site.streams[0].finished  # still open

    shot = await browser.screenshot(tmp_path / "page.png")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1024

    said = "hello <world> & co"
    await browser.fill("input[name=field]", said)
    await browser.click("button[type=submit]")
    assert await browser.waitForText("#echo", said, timeout=10) == f"You said: {said}"
    assert site.echoed == [said]
    assert (await browser.find("#echo")).tag_name == "p"
    await browser.waitFor("#echo", timeout=1)


@pytest_twisted.ensureDeferred
async def test_httponly_cookie_hidden_from_document_cookie(site: HarnessSite, browser: Browser) -> None:
    await browser.get(f"http://cookies.localhost:{site.port}/cookie")
    await browser.waitFor("#done", timeout=5)
    fromScript = await browser.execute("return document.cookie")
    assert "visible=yes" in fromScript
    assert "secret" not in fromScript
    cookies = {c["name"]: c for c in await browser.cookies()}
    assert cookies["secret"]["value"] == "s3cret"
    assert cookies["secret"]["httpOnly"] is True
    assert cookies["visible"]["httpOnly"] is False


@pytest_twisted.ensureDeferred
async def test_the_next_test_sees_nothing_of_this_one(site: HarnessSite, browser: Browser) -> None:
    """The worker's browser, handed on: no cookie of this test's host (on any port), no second tab, no open stream."""
    await browser.get(f"http://localhost:{site.port}/cookie")
    await browser.waitFor("#done", timeout=5)
    await browser.execute("window.open('about:blank')")
    await browser.get(f"http://localhost:{site.port}/")
    # The page's stream is open once an event came (which one depends on how busy the machine is).
    await browser.waitForText("#sse", "event ", timeout=10)
    assert len(site.streams) == 1 and not site.streams[0].finished
    assert len(await browser.run(lambda: browser.driver.window_handles)) == 2
    assert {c["name"] for c in await browser.cookies()} >= {"secret", "visible"}

    assert await browser.forget()
    assert await browser.run(lambda: browser.driver.window_handles) == [browser.driver.current_window_handle]
    assert await browser.run(lambda: browser.driver.current_url) == "about:blank"
    # The page is gone, and its event stream with it, before the test's servers stop.
    await eventually(lambda: site.streamsGone == site.streams, 10, what="the page's stream closed")
    await browser.get(f"http://localhost:{site.port}/nothing")
    assert await browser.cookies() == []


@pytest_twisted.ensureDeferred
async def test_chromiums_own_error_page_is_told_from_a_sites_page(site: HarnessSite, browser: Browser) -> None:
    """:meth:`Browser.netError`: the code on Chromium's error page, and nothing on a site's page (even one that says it)."""
    await browser.get(f"http://localhost:{site.port}/")
    assert await browser.netError() is None
    await browser.execute(f"document.body.innerText = {NETWORK_CHANGED!r}")
    assert await browser.netError() is None
    # Port 1 is one Chromium refuses to dial: its error page, with no server needed.
    await browser.get("http://127.0.0.1:1/")
    assert await browser.netError() == "ERR_UNSAFE_PORT"


@pytest_twisted.ensureDeferred
async def test_again_repeats_a_step_only_while_the_hosts_network_changed() -> None:
    """
    :meth:`Browser.again`: a step that ended on Chromium's page for a
    change of the host's network is taken again, whether it raised or
    not, up to its attempts; any other outcome stands at once.
    """
    browser = object.__new__(Browser)
    pages: list[str | None] = []

    async def netError() -> str | None:
        return pages.pop(0)

    browser.netError = netError  # type: ignore[method-assign]
    taken: list[int] = []

    async def step() -> int:
        taken.append(len(taken) + 1)
        if len(taken) < 3:
            raise TimeoutError("the page never came")
        return len(taken)

    pages[:] = [NETWORK_CHANGED, NETWORK_CHANGED, None]
    assert await browser.again(step) == 3 and taken == [1, 2, 3]

    taken.clear()
    pages[:] = ["ERR_CONNECTION_REFUSED"]
    with pytest.raises(TimeoutError):
        await browser.again(step)
    assert taken == [1]

    async def loads() -> str:
        taken.append(len(taken) + 1)
        return "loaded"

    taken.clear()
    pages[:] = [NETWORK_CHANGED, None]
    assert await browser.again(loads) == "loaded" and taken == [1, 2]

    # The last attempt's outcome stands, whatever page it ended on.
    taken.clear()
    pages[:] = [NETWORK_CHANGED]
    with pytest.raises(TimeoutError):
        await browser.again(step, attempts=2)
    assert taken == [1, 2] and pages == []


@pytest_twisted.ensureDeferred
async def test_a_browser_that_no_longer_answers_is_not_handed_on() -> None:
    requireBrowser()
    started = await threads.deferToThread(startBrowser)
    try:
        started.driver.service.process.kill()  # chromedriver gone: nothing answers
        assert not await started.forget()
    finally:
        await started.stop()
    assert not await started.forget()


@pytest_twisted.ensureDeferred
async def test_offline_start_and_cleanup_when_quit_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selenium Manager (which downloads) is never run; a failed quit still leaves nothing."""
    requireBrowser()
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def noDownloads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Selenium Manager was run")

    monkeypatch.setattr(SeleniumManager, "binary_paths", noDownloads)
    started = await threads.deferToThread(startBrowser)
    try:
        assert len(started.processes()) >= 2  # chromedriver and chromium
        await started.get("about:blank")
        assert await started.execute("return 6 * 7") == 42

        def broken() -> None:
            raise RuntimeError("quit failed")

        monkeypatch.setattr(started.driver, "quit", broken)
    finally:
        await started.stop()
    assert started.processes() == []
    assert not started.profile.exists()
    with pytest.raises(RuntimeError, match="quit"):
        await started.get("about:blank")


def test_missing_browser_skips_here_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = browserAvailable("/nonexistent/chromium", "/nonexistent/chromedriver")
    assert reason is not None
    assert "chromium-driver" in reason and "/nonexistent/chromium" in reason

    import support.browser

    monkeypatch.setattr(support.browser, "browserAvailable", lambda: reason)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium-driver"):
        requireBrowser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        requireBrowser()
