"""
A small harness for testing pages in a real browser: Debian's headless
Chromium driven by Selenium through Debian's chromedriver.

Nothing is downloaded: the driver's path is given to Selenium, so Selenium
Manager is never run, and the browser is started with the flags that keep it
off the (closed) network. Chromium resolves ``*.localhost`` to loopback by
itself, so a test can open ``http://anything.localhost:PORT/`` against a
server listening on 127.0.0.1.

Selenium's calls block. A test running in the Twisted reactor (pytest-twisted)
makes them with ``await browser.run(fn, *args)`` or the helpers built on it,
which run one call at a time in a worker thread, so the reactor, and the
servers under test in it, keep running while the browser waits::

    browser = await threads.deferToThread(startBrowser)
    try:
        await browser.get(f"http://app.localhost:{port}/")
        await browser.fill("input[name=q]", "hello")
        await browser.click("button")
        assert await browser.waitForText("#out", "hello") == "hello"
    finally:
        await browser.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import DeferredLock

#: Debian's ``chromium`` and ``chromium-driver`` packages.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: The flags this project's machines need (see MACHINE-NOTES, "Browser tests").
#: ``--no-sandbox`` because tests run as root; the ``--disable-*`` networking
#: flags because without them Chromium keeps dialling out to a closed network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

WINDOW_SIZE = (1280, 900)

#: Seconds between two looks of a waiting test at the page. Every look is a
#: WebDriver round trip through chromedriver into Chromium: at 20 a second
#: a waiting browser used 15 % of a core (8 ms of CPU a look), at 5 a second
#: 3 %, which on a 2-core machine running tests in parallel is time the
#: servers under test did not get.
POLL = 0.2

_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")

_T = TypeVar("_T")

#: What Chromium ends a request with when the host's addresses change while it
#: is in flight (it drops every connection then): podman adds and removes
#: containers' links all through a run. Not the page's doing; a person would
#: press Reload, and :meth:`Browser.again` does.
NETWORK_CHANGED = "ERR_NETWORK_CHANGED"

#: In a page: Chromium's own error page's code (``ERR_...``), or null on any other page.
_NET_ERROR = """
if (!String(document.documentURI).startsWith("chrome-error:")) { return null; }
return (window.loadTimeDataRaw || {}).errorCode || document.body.innerText;
"""


def browserAvailable(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> str | None:
    """``None`` if a browser can be started here, else the reason it cannot."""
    missing = []
    for path, package in ((chromium, "chromium"), (chromedriver, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (Debian package {package})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium (pip install selenium)")
    if missing:
        return "browser tests need " + ", ".join(missing)
    return None


def startBrowser(
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
    windowSize: tuple[int, int] = WINDOW_SIZE,
    *,
    hostResolverRules: str | None = None,
    ignoreCertificateErrors: bool = False,
) -> Browser:
    """
    Start headless Chromium under chromedriver with a fresh profile.

    ``hostResolverRules``: Chromium's ``--host-resolver-rules``, e.g.
    ``"MAP *.example.org 127.0.0.1"``, so that a test can use real-looking
    names (several hosts under one parent domain, as a site deploys them)
    for servers on loopback. ``ignoreCertificateErrors``: accept any TLS
    certificate (a test's own, from ``support.tls.makeCertificate``);
    only for a test that needs https, since nothing else is checked then.

    This blocks for a second or so; from the reactor thread call it as
    ``await threads.deferToThread(startBrowser)``.
    """
    reason = browserAvailable(chromium, chromedriver)
    if reason:
        raise RuntimeError(reason)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="dit4c-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile / 'profile'}")
    options.add_argument(f"--window-size={windowSize[0]},{windowSize[1]}")
    if hostResolverRules:
        options.add_argument(f"--host-resolver-rules={hostResolverRules}")
    if ignoreCertificateErrors:
        options.add_argument("--ignore-certificate-errors")
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        # Talk to chromedriver on loopback directly, whatever *_proxy says
        # (the only switch for it that webdriver.Chrome takes, deprecated).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            options.ignore_local_proxy_environment_variables()
    # The driver's path is given, so Selenium Manager is never run (it would
    # try to download a driver and a browser).
    # Everything the browser writes (crash reports under $XDG_CONFIG_HOME,
    # scratch files under $TMPDIR) goes under the one directory quit() removes.
    # This also puts the directory in the crash handler's command line, which
    # is how quit() finds it: it leaves chromedriver's process group.
    home = profile / "home"
    scratch = profile / "tmp"
    home.mkdir()
    scratch.mkdir()
    env = dict(
        os.environ,
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        TMPDIR=str(scratch),
    )
    service = Service(
        executable_path=chromedriver,
        log_output=str(profile / "chromedriver.log"),
        env=env,
        # chromedriver, and the Chromium it starts, in a process group of
        # their own: quit() can then kill whatever survives.
        popen_kw={"start_new_session": True},
    )
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except BaseException as e:
        try:
            log = (profile / "chromedriver.log").read_text(errors="replace")[-4000:]
        except OSError:
            log = ""
        _killAll(_processGroup(service), profile)
        shutil.rmtree(profile, ignore_errors=True)
        if isinstance(e, Exception):
            raise RuntimeError(f"could not start {chromium}: {e}\nchromedriver log:\n{log}") from e
        raise
    return Browser(driver, profile)


def _processGroup(service: Any) -> int | None:
    process = getattr(service, "process", None)
    return process.pid if process is not None else None


def _survivors(pgid: int | None, profile: Path) -> list[int]:
    """Processes in chromedriver's group, or whose command line names our profile."""
    marker = str(profile).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if pgid is not None and os.getpgid(pid) == pgid:
                found.append(pid)
                continue
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def _isZombieOrGone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _livePids(pgid: int | None, profile: Path) -> list[int]:
    return [pid for pid in _survivors(pgid, profile) if not _isZombieOrGone(pid)]


def _killAll(pgid: int | None, profile: Path, timeout: float = 10.0) -> None:
    """SIGKILL chromedriver's process group and any Chromium using ``profile``; wait for them."""
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = _livePids(pgid, profile)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"browser processes survived SIGKILL: {left}")
        time.sleep(0.05)


class Browser:
    """
    A running headless Chromium: ``.driver`` is Selenium's WebDriver.

    The async methods run their Selenium call in a worker thread, one at a
    time; use them (or :meth:`run`) from the reactor thread.
    """

    #: seconds that driver.quit() is given before the processes are killed
    quitTimeout = 15.0

    def __init__(self, driver: Any, profile: Path) -> None:
        self.driver = driver
        self.profile = profile
        self._pgid = _processGroup(driver.service)
        self._lock = DeferredLock()
        self._quitLock = threading.Lock()
        self.closed = False

    def processes(self) -> list[int]:
        """The pids of this browser's chromedriver and Chromium processes still running."""
        return _livePids(self._pgid, self.profile)

    # -- running Selenium calls off the reactor thread -----------------------------

    async def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` in a worker thread, after any earlier call finished."""
        if self.closed:
            raise RuntimeError("the browser has been quit")
        result: _T = await self._lock.run(threads.deferToThread, fn, *args, **kwargs)
        return result

    # -- conveniences --------------------------------------------------------------

    async def get(self, url: str) -> None:
        """Open ``url`` and wait for its load event (again if the host's network changed meanwhile)."""
        await self.again(lambda: self.run(self.driver.get, url))

    async def netError(self) -> str | None:
        """The error Chromium's error page shows (``ERR_...``), or None on any other page (or none yet)."""
        try:
            error: str | None = await self.execute(_NET_ERROR)
        except Exception:
            return None
        return error

    async def again(self, action: Callable[[], Awaitable[_T]], attempts: int = 3) -> _T:
        """
        ``action()``, and again (up to ``attempts`` in all) while it ends on
        Chromium's error page for a change of the host's network
        (:data:`NETWORK_CHANGED`), whether it raised or not; any other
        outcome stands. For steps that load pages: the test's assertions
        are the same each time, only the machine's own interruption is
        taken away.
        """
        for attempt in range(1, attempts + 1):
            try:
                result = await action()
            except Exception:
                if attempt < attempts and await self.netError() == NETWORK_CHANGED:
                    continue
                raise
            if attempt < attempts and await self.netError() == NETWORK_CHANGED:
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def find(self, css: str) -> Any:
        """The first element matching ``css`` (raises NoSuchElementException)."""
        from selenium.webdriver.common.by import By

        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def _onElement(self, css: str, act: Callable[[Any], object], timeout: float, what: str) -> None:
        """
        ``act`` on the element matching ``css``, once it is there, found again
        if the page is redrawn between finding it and acting on it (the home
        page reloads itself when an instance comes or goes), as a person acts
        on what the page shows now.
        """
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
            WebDriverException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def attempt(driver: Any) -> bool:
            try:
                act(driver.find_element(By.CSS_SELECTOR, css))
            except (NoSuchElementException, StaleElementReferenceException):
                return False
            except WebDriverException as e:
                # The same race, as chromedriver words it when the page
                # replaced the element while the action was on its way.
                if "does not belong to the document" in str(e.msg):
                    return False
                raise
            return True

        await self.run(
            lambda: WebDriverWait(self.driver, timeout, poll_frequency=POLL).until(
                attempt, f"could not {what} {css!r} within {timeout}s"
            )
        )

    async def click(self, css: str, timeout: float = 10.0) -> None:
        """Click the element matching ``css`` (see :meth:`_onElement`)."""
        await self._onElement(css, lambda element: element.click(), timeout, "click")

    async def submit(self, css: str, timeout: float = 30) -> None:
        """Click a form's button and wait until the page it leads to has loaded (not the old one)."""
        await self.execute("document.body.dataset.before = 'submit'")
        await self.click(css)
        await self.waitFor("body:not([data-before])", timeout)

    async def fill(self, css: str, text: str, timeout: float = 10.0) -> None:
        """
        Clear the field matching ``css`` and type ``text`` into it, once the
        field is there (see :meth:`_onElement`).
        """

        def typeIn(element: Any) -> None:
            element.clear()
            element.send_keys(text)

        await self._onElement(css, typeIn, timeout, "fill")

    async def text(self, css: str) -> str:
        """The rendered text of the first element matching ``css``."""
        from selenium.webdriver.common.by import By

        return await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    async def waitFor(self, css: str, timeout: float = 10.0) -> Any:
        """
        Wait until an element matching ``css`` is visible; return it. An
        element found in a page that a navigation replaces before its
        visibility is read (Chromium: stale, or "does not belong to the
        document") is looked for again in the new page.
        """
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        visible = EC.visibility_of_element_located((By.CSS_SELECTOR, css))

        def found(driver: Any) -> Any:
            try:
                return visible(driver)
            except StaleElementReferenceException:
                return False
            except WebDriverException as e:
                if "does not belong to the document" in (e.msg or ""):
                    return False
                raise

        def wait() -> Any:
            return WebDriverWait(self.driver, timeout, poll_frequency=POLL).until(
                found, f"no visible element {css!r} after {timeout}s"
            )

        return await self.run(wait)

    async def waitForText(self, css: str, text: str, timeout: float = 10.0) -> str:
        """Wait until the element matching ``css`` shows text containing ``text``; return its text."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
            TimeoutException,
            WebDriverException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        seen: list[str] = []

        def current(driver: Any) -> str | bool:
            try:
                shown = driver.find_element(By.CSS_SELECTOR, css).text
            except WebDriverException as e:
                if isinstance(e, (NoSuchElementException, StaleElementReferenceException)):
                    raise
                if "does not belong to the document" in (e.msg or ""):
                    return False  # found in a page a navigation replaced: look again
                raise
            seen[:] = [shown]
            return shown if text in shown else False

        def wait() -> str:
            try:
                shown = WebDriverWait(
                    self.driver,
                    timeout,
                    poll_frequency=POLL,
                    ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
                ).until(current)
                return str(shown)
            except TimeoutException:
                last = repr(seen[0]) if seen else "no such element"
                raise TimeoutException(
                    f"{css!r} did not show {text!r} within {timeout}s (last: {last})"
                ) from None

        return await self.run(wait)

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Save a PNG of the viewport to ``path``."""
        path = Path(path)

        def save() -> None:
            if not self.driver.save_screenshot(str(path)):
                raise RuntimeError(f"could not save a screenshot to {path}")

        await self.run(save)
        return path

    async def logIn(self, portal: str, name: str, password: str) -> None:
        """Log in on ``portal``'s login page as a person does; until the page names who is logged in."""
        await self.get(portal + "/login")
        await self.waitFor("#username")
        await self.fill("#username", name)
        await self.fill("#password", password)
        await self.click("#submit")
        await self.waitFor("#who", 15)

    async def cookies(self) -> list[dict[str, Any]]:
        """Every cookie of the current page, HttpOnly ones included."""
        return await self.run(self.driver.get_cookies)

    async def execute(self, js: str, *args: Any) -> Any:
        """Run ``js`` as a function body in the page (``return`` gives the result)."""
        return await self.run(self.driver.execute_script, js, *args)

    # -- one browser for many tests -------------------------------------------------

    async def forget(self) -> bool:
        """
        Leave nothing of this test for the next one to see: one blank tab
        (its pages' scripts and WebSockets gone, before the servers they
        talk to stop), no cookies (they are per host, not per port: the
        next test's portal on ``localhost`` would get them), no cache, the
        default size. False if the browser no longer answers (crashed,
        wedged, or an alert open): then it is to be stopped, not reused.
        """
        if self.closed:
            return False

        def forget() -> None:
            driver = self.driver
            handles = driver.window_handles
            for handle in handles[1:]:
                driver.switch_to.window(handle)
                driver.close()
            driver.switch_to.window(handles[0])
            driver.get("about:blank")
            driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
            driver.execute_cdp_cmd("Network.clearBrowserCache", {})
            driver.set_window_size(*WINDOW_SIZE)

        try:
            await self.run(forget)
        except Exception:
            return False
        return True

    # -- stopping ----------------------------------------------------------------

    def quit(self) -> None:
        """
        Stop the browser and chromedriver, kill whatever of them survives and
        remove the profile. Blocks; safe to call more than once.
        """
        with self._quitLock:
            if self.closed:
                return
            self.closed = True
            try:
                # driver.quit() can hang on a wedged browser: give it a while,
                # then kill the lot regardless.
                quitter = threading.Thread(target=self._quietQuit, daemon=True)
                quitter.start()
                quitter.join(self.quitTimeout)
            finally:
                try:
                    _killAll(self._pgid, self.profile)
                finally:
                    shutil.rmtree(self.profile, ignore_errors=True)

    def _quietQuit(self) -> None:
        try:
            self.driver.quit()
        except Exception:
            pass  # whatever is left is killed by quit()

    async def stop(self) -> None:
        """:meth:`quit` from the reactor thread without blocking it.

        Not serialized behind earlier calls: it works even if one is stuck.
        """
        await threads.deferToThread(self.quit)


def requireBrowser() -> None:
    """Skip a test without a browser here; under CI (``CI=true``) fail it instead."""
    import os

    import pytest

    reason = browserAvailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, where browser tests must run", pytrace=False)
        pytest.skip(reason)
