"""What a person does in the browser, for the end-to-end tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import threads

from dit4c.testing import deferLater


async def logIn(browser: Any, portal: str, name: str, password: str) -> None:
    await browser.get(portal + "/login")
    await browser.waitFor("#username")
    await browser.fill("#username", name)
    await browser.fill("#password", password)
    await browser.click("#submit")
    await browser.waitFor("#who", 15)


async def startTool(browser: Any, portal: str, toolName: str) -> str:
    """Start the catalogue entry whose name begins with ``toolName``; its URL once running."""
    await browser.get(portal + "/")
    await browser.waitFor("#start-button")
    chosen = await browser.execute(
        "const o = [...document.querySelectorAll('#image option')].find(o => o.text.startsWith(arguments[0]));"
        "if (o) { document.getElementById('image').value = o.value; } return !!o;",
        toolName,
    )
    assert chosen, f"no {toolName} in the catalogue"
    await browser.click("#start-button")
    await browser.waitFor('td.state[data-state="starting"], td.state[data-state="running"]', 15)
    await browser.waitFor('td.state[data-state="running"]', 90)
    await browser.waitFor("td.url a", 30)
    url: str = await browser.execute("return document.querySelector('td.url a').href")
    return url


async def otherBrowser() -> Any:
    from dit4c.testing_browser import startBrowser

    return await threads.deferToThread(startBrowser)


async def openTool(browser: Any, url: str, greeting: str, timeout: float = 60) -> None:
    """Open the instance's URL until the tool greets the person (it may be coming back)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    waited = 0.0
    while True:
        try:
            await browser.get(url)
            await browser.waitForText("#greeting", greeting, 5)
            return
        except (TimeoutException, WebDriverException):  # not yet, or refused
            waited += 5
            if waited >= timeout:
                raise
            await deferLater(0.5)
