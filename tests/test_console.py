"""The moderators' console in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import ARTIFACTS, Node, token
from wire import Raw, plain

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
async def page(single_node: Node) -> Any:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test installs it with apt-get)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        await browser.close()
        assert not errors, errors


async def test_console_watch_delete_and_alerts(single_node: Node, page: Any) -> None:
    channel = f"public:lobby-{uuid.uuid4().hex[:6]}"
    subscriber = await Raw.open(single_node.url, token("sue"))
    await subscriber.ok("subscribe", channel=channel)
    await page.goto(f"{single_node.http}/console")
    await page.fill("#token", token("mona", roles=["user", "moderator"]))
    await page.click("#signin-button")
    await page.wait_for_selector("#app:not([hidden])")
    assert "mona" in await page.inner_text("#who")
    await page.fill("#pattern", "public:*")
    await page.click("#watch")
    await page.wait_for_selector("text=watching public:*")

    # a message published by a client appears live
    poster = await Raw.open(single_node.url, token("troll"))
    seq = (
        await poster.ok(
            "publish", channel=channel, client_msg_id="t1", body=plain("buy cheap pills")
        )
    )["seq"]
    row = page.locator(f'tr[data-key="{channel}#{seq}"]')
    await row.wait_for()
    assert "buy cheap pills" in await row.inner_text()
    assert (await subscriber.push(5))["seq"] == seq

    # delete it from the console: it vanishes from the subscriber and from the console
    await row.get_by_role("button", name="Delete").click()
    assert await subscriber.push(5) == {"push": "deleted", "channel": channel, "seq": seq}
    await row.wait_for(state="detached")
    await page.wait_for_selector("#audit >> text=delete")

    # a safety alert appears with its location drawn and its delivery status
    owner = f"ana-{uuid.uuid4().hex[:4]}"
    single_node.api(
        "PUT",
        f"/v1/users/{owner}/contacts",
        json={"contacts": [{"user": "sue"}, {"phone": "+15550009999"}]},
    )
    ana = await Raw.open(single_node.url, token(owner))
    alert = await ana.ok(
        "alert.trigger",
        kind="medical",
        note="fell down stairs",
        location={"lat": 52.52, "lon": 13.405},
        client_alert_id="c1",
    )
    await page.wait_for_selector(f'circle[data-alert="{alert["alert_id"]}"]')
    panel = page.locator(f'div.alert[data-alert="{alert["alert_id"]}"]')
    await panel.wait_for()
    # per-recipient delivery status follows (the console refreshes every 3 s): the SMS only
    # went to the development outbox; sue's app confirms, and only then is she `delivered`
    await panel.locator("td.status-outbox").first.wait_for(timeout=10_000)
    assert await panel.locator("td.status-delivered").count() == 0
    await subscriber.ok("alert.received", alert_id=alert["alert_id"])
    await panel.locator("td.status-delivered").first.wait_for(timeout=10_000)
    await page.click("#refresh-audit")
    text = await panel.inner_text()
    assert owner in text and "MEDICAL" in text and "fell down stairs" in text
    assert "sms" in text and "ws" in text
    assert await panel.locator("span.warning").count() == 0
    # an alert that reaches nobody says so
    alone = await Raw.open(single_node.url, token(f"al-{uuid.uuid4().hex[:4]}"))
    lonely = await alone.ok(
        "alert.trigger", kind="sos", location={"lat": 52.53, "lon": 13.41}, client_alert_id="c2"
    )
    assert lonely["warnings"] == ["no_recipients"]
    await page.locator(
        f'div.alert[data-alert="{lonely["alert_id"]}"] span[data-warning="no_recipients"]'
    ).wait_for()
    # an alert cancelled with the duress PIN looks cancelled on the phone, and says so here
    assert await panel.locator('span[data-warning="duress"]').count() == 0
    await alone.ok("pin.set", pin="2468", duress_pin="1357")
    held = await alone.ok(
        "alert.trigger",
        kind="sos",
        location={"lat": 52.51, "lon": 13.40},
        client_alert_id="c3",
        delay_s=30,
    )
    assert (await alone.ok("alert.cancel", alert_id=held["alert_id"], pin="1357"))[
        "state"
    ] == "cancelled"
    await page.locator(
        f'div.alert[data-alert="{held["alert_id"]}"] span[data-warning="duress"]'
    ).wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
    for r in (subscriber, poster, ana, alone):
        await r.close()
