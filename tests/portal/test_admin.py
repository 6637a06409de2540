"""Administrators' pages: only administrators, CSRF on every form, and what each form does."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest_twisted
from portal_client import Browser, csrfOf, logIn
from support.passwords import cheapHash

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.portal.app import Portal


def location(response: object) -> str:
    return response.headers.getRawHeaders("location")[0]  # type: ignore[attr-defined,no-any-return]


async def adminBrowser(portal: Portal) -> Browser:
    await portal.store.createUser(
        "root", password_hash=cheapHash("root password!"), is_admin=True
    )
    browser = Browser(portal)
    assert (await logIn(browser, "root", "root password!")).code == 303
    return browser


@pytest_twisted.ensureDeferred
async def test_only_administrators_see_the_admin_pages(portal: Portal) -> None:
    anonymous = Browser(portal)
    response, _ = await anonymous.get("/admin/")
    assert response.code == 303 and response.headers.getRawHeaders("location")[0].startswith("/login")
    alice = Browser(portal)
    await logIn(alice)
    response, page = await alice.get("/admin/")
    assert response.code == 403
    _, home = await alice.get("/")
    response, _ = await alice.post("/admin/users", {"csrf": csrfOf(home), "name": "mallory"})
    assert response.code == 403
    assert await portal.store.userByName("mallory") is None


@pytest_twisted.ensureDeferred
async def test_add_a_person_who_can_then_log_in(portal: Portal) -> None:
    admin = await adminBrowser(portal)
    _, page = await admin.get("/admin/")
    response, page = await admin.post(
        "/admin/users", {"csrf": csrfOf(page), "name": "Dana", "display_name": "Dana D."}
    )
    assert response.code == 200
    password = re.search(r'<code id="new-password">([^<]+)</code>', page).group(1)  # type: ignore[union-attr]
    dana = Browser(portal)
    assert (await logIn(dana, "dana", password)).code == 303
    # A taken name is refused with a reason.
    response, page = await admin.post("/admin/users", {"csrf": csrfOf(page), "name": "dana"})
    assert response.code == 400 and "taken" in page


@pytest_twisted.ensureDeferred
async def test_forms_need_the_csrf_token(portal: Portal) -> None:
    admin = await adminBrowser(portal)
    response, _ = await admin.post("/admin/users", {"csrf": "forged", "name": "eve"})
    assert response.code == 400
    assert await portal.store.userByName("eve") is None


@pytest_twisted.ensureDeferred
async def test_disable_ends_sessions_and_quota_is_saved(portal: Portal) -> None:
    admin = await adminBrowser(portal)
    alice = Browser(portal)
    await logIn(alice)
    user = await portal.store.userByName("alice")
    _, page = await admin.get("/admin/")
    response, _ = await admin.post(f"/admin/users/{user.id}", {"csrf": csrfOf(page), "action": "quota", "max_instances": "3"})
    # Done: back to the page (a reload sends nothing again), which says so.
    assert (response.code, location(response)) == (303, "/admin/?done=saved")
    assert (await portal.store.userById(user.id)).max_instances == 3
    _, page = await admin.get("/admin/?done=saved")
    assert '<p class="notice" id="message">Saved.</p>' in page
    _, page = await admin.get("/admin/?done=<b>forged</b>")
    assert 'id="message"' not in page and "forged" not in page
    response, page = await admin.post(
        f"/admin/users/{user.id}", {"csrf": csrfOf(page), "action": "quota", "max_instances": "lots"}
    )
    assert response.code == 400
    await admin.post(f"/admin/users/{user.id}", {"csrf": csrfOf(page), "action": "disable"})
    response, _ = await alice.get("/")
    assert response.code == 303  # logged out: the session went with the account
    assert (await logIn(alice)).code == 401


@pytest_twisted.ensureDeferred
async def test_catalogue_and_schedulers(portal: Portal) -> None:
    admin = await adminBrowser(portal)
    _, page = await admin.get("/admin/")
    csrf = csrfOf(page)
    response, page = await admin.post("/admin/images", {"csrf": csrf, "name": "JupyterLab", "ref": "jupyter", "port": "8888"})
    assert (response.code, location(response)) == (303, "/admin/?done=image-added")
    [image] = await portal.store.listCatalogue()
    assert (image.name, image.ref, image.port) == ("JupyterLab", "jupyter", 8888)

    key = generatePrivateKey()
    response, page = await admin.post(
        "/admin/schedulers", {"csrf": csrf, "name": "cluster-a", "public_jwk": json.dumps(publicJWK(key))}
    )
    assert (response.code, location(response)) == (303, "/admin/?done=scheduler-added")
    [scheduler] = await portal.store.listSchedulers()
    assert scheduler.name == "cluster-a"
    # A private key is refused: only public keys are ever registered.
    from jwt.algorithms import ECAlgorithm

    private = json.loads(ECAlgorithm.to_jwk(key))
    response, page = await admin.post("/admin/schedulers", {"csrf": csrf, "name": "oops", "public_jwk": json.dumps(private)})
    assert response.code == 400 and "private key" in page
    assert len(await portal.store.listSchedulers()) == 1


@pytest_twisted.ensureDeferred
async def test_rotate_the_signing_key(portal: Portal) -> None:
    admin = await adminBrowser(portal)
    before = portal.keys.signer().kid
    _, page = await admin.get("/admin/")
    assert before in page
    response, _ = await admin.post("/admin/keys/rotate", {"csrf": csrfOf(page)})
    assert (response.code, location(response)) == (303, "/admin/?done=key-rotated")
    after = portal.keys.signer().kid
    _, page = await admin.get(location(response))
    assert after != before and f'<code id="current-kid">{after}</code>' in page
    assert "now signs with a new key" in page
    _, body = await admin.get("/.well-known/jwks.json")
    kids = {k["kid"] for k in json.loads(body)["keys"]}
    assert {before, after} <= kids


@pytest_twisted.ensureDeferred
async def test_a_reload_sends_no_form_again_in_a_browser(api: Portal, browser: Any) -> None:
    """
    Chromium: a person added (their password shown once) and a quota set;
    reloading after each sends nothing again and shows no password.
    """
    base = api.testURL  # type: ignore[attr-defined]
    await browser.logIn(base, "root", "root password!")
    await browser.get(base + "/admin/")
    await browser.fill("#new-name", "erin")
    await browser.submit("#add-user-submit")
    password = await browser.text("#new-password")
    assert await browser.execute("return location.pathname + location.search") == "/admin/"
    await browser.run(browser.driver.refresh)
    await browser.waitFor('tr[data-user="erin"]')
    assert await browser.execute("return document.querySelectorAll('#new-password, #error').length") == 0
    assert (await logIn(Browser(api), "erin", password)).code == 303

    await browser.fill('input[aria-label="quota of erin"]', "2")
    await browser.submit('tr[data-user="erin"] input[name="max_instances"] ~ button')
    await browser.waitForText("#message", "Saved.")
    assert await browser.execute("return location.pathname + location.search") == "/admin/?done=saved"
    await browser.run(browser.driver.refresh)
    await browser.waitForText("#message", "Saved.")
    assert (await api.store.userByName("erin")).max_instances == 2


@pytest_twisted.ensureDeferred
async def test_a_catalogue_entrys_limits_are_set_on_the_form(portal: Portal) -> None:
    from dit4c.common.limits import ToolLimits

    admin = await adminBrowser(portal)
    _, page = await admin.get("/admin/")
    fields = {"csrf": csrfOf(page), "name": "Lab", "ref": "lab", "port": ""}
    response, _ = await admin.post("/admin/images", {**fields, "cpus": "1.5", "memory": "2048", "idle": "30", "idle_action": "save"})
    assert (response.code, location(response)) == (303, "/admin/?done=image-added")
    [image] = await portal.store.listCatalogue()
    assert image.limits == ToolLimits(1.5, 2048, 30, "save")
    _, page = await admin.get("/admin/")
    assert "1.5 CPUs, 2048 MiB, saved after 30 min unused" in page

    response, _ = await admin.post(
        f"/admin/images/{image.id}/limits", {"csrf": csrfOf(page), "cpus": "", "memory": "512", "idle": "", "idle_action": "stop"}
    )
    assert (response.code, location(response)) == (303, "/admin/?done=limits-set")
    assert (await portal.store.imageById(image.id)).limits == ToolLimits(memory=512)  # type: ignore[union-attr]
    # Refused with why, and nothing changed; without the form's token, nothing either.
    response, page = await admin.post(f"/admin/images/{image.id}/limits", {"csrf": csrfOf(page), "memory": "8"})
    assert response.code == 400 and "between 16 and" in page
    response, page = await admin.post(f"/admin/images/{image.id}/limits", {"memory": "1024"})
    assert response.code == 400 and "Form expired" in page
    _, page = await admin.get("/admin/")
    response, _ = await admin.post("/admin/images/nope/limits", {"csrf": csrfOf(page), "memory": "1024"})
    assert response.code == 404
    assert (await portal.store.imageById(image.id)).limits == ToolLimits(memory=512)  # type: ignore[union-attr]
