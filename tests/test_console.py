"""The moderators' console in a real browser: Chromium (Debian's, Ubuntu's or the snap: the
search of scripts/find-chromium) driven by Playwright."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import ARTIFACTS, ROOT, Node, token
from wire import Raw, plain

from realtime_safety.loadtests.fakeproviders import FakeProviders


def find_chromium() -> str | None:
    """The Chromium to drive: the same search as scripts/test's (scripts/find-chromium)."""
    found = subprocess.run(
        ["sh", str(ROOT / "scripts" / "find-chromium")], capture_output=True, text=True
    )
    return found.stdout.strip() or None


@pytest.fixture
async def page() -> Any:
    chromium = find_chromium()
    if chromium is None:
        pytest.fail(
            "Chromium is not installed (scripts/test installs it with apt-get; "
            "or set CHROMIUM=/path/to/chromium)"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium,
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


class RecordingProxy:
    """A TCP proxy in front of a node that keeps every byte the browser sends: Playwright does
    not report the browser's own requests (the favicon's), the server is where they land."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sent = bytearray()
        self.port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                if keep:
                    self.sent += data
                w.write(data)
                await w.drain()
        w.close()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.node.port)
        await asyncio.gather(self._pipe(r, up_w, True), self._pipe(up_r, w, False))


@contextlib.asynccontextmanager
async def recording_proxy(node: Node) -> AsyncIterator[RecordingProxy]:
    proxy = RecordingProxy(node)
    server = await asyncio.start_server(proxy._client, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()


async def sign_in(page: Any, base: str) -> None:
    await page.goto(f"{base}/console")
    await page.fill("#token", token("mona", roles=["user", "moderator"]))
    await page.click("#signin-button")
    await page.wait_for_selector("#app:not([hidden])")


async def test_console_watch_delete_and_alerts(single_node: Node, page: Any) -> None:
    async with recording_proxy(single_node) as proxy:
        await console_session(single_node, proxy, page)
        # the page's icon is inline: the browser never asked the server for /favicon.ico
        await page.wait_for_timeout(500)
        assert b"GET /console " in proxy.sent  # the proxy saw the page's requests
        assert b"/favicon.ico" not in proxy.sent, "the browser asked the server for /favicon.ico"


async def console_session(single_node: Node, proxy: RecordingProxy, page: Any) -> None:
    channel = f"public:lobby-{uuid.uuid4().hex[:6]}"
    subscriber = await Raw.open(single_node.url, token("sue"))
    await subscriber.ok("subscribe", channel=channel)
    await page.goto(f"{proxy.http}/console")
    # signed out, only the sign-in box shows: none of the (dead) console under it
    assert await page.locator("#signin").is_visible()
    for hidden in ("#app", "#watch", "#map", "#ban"):
        assert not await page.locator(hidden).is_visible(), hidden
    await page.fill("#token", token("mona", roles=["user", "moderator"]))
    await page.click("#signin-button")
    await page.wait_for_selector("#app:not([hidden])")
    assert not await page.locator("#signin").is_visible()
    assert "mona" in await page.inner_text("#who")
    # the pattern picker offers the protocol's namespaces; its default watches public:
    # channels (the quick start's public:lobby) and rooms, with nothing typed
    offered = await page.locator("#pattern-preset option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    for pattern in ("public:*", "room:*", "user:*"):
        assert any(pattern in value for value in offered), (pattern, offered)
    assert "public:*" in await page.input_value("#pattern")
    await page.click("#watch")
    await page.wait_for_selector("text=watching 2 patterns: public:*, room:*")

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

    # an end-to-end encrypted (v2) message in a room shows as such, never as text
    from v2_devices import publish_device

    from realtime_safety.crypto.envelope import DeviceAccount, OutboundSession, encrypt_v2
    from realtime_safety.crypto.user_keys import UserKeys

    room, rosa = f"room:{uuid.uuid4().hex[:8]}", f"rosa-{uuid.uuid4().hex[:4]}"
    single_node.add_member(room, rosa)
    account = DeviceAccount.generate()
    sender = await Raw.open(
        single_node.url, token(rosa, device=account.device), proto="rt.v1.msgpack"
    )
    await publish_device(sender, UserKeys.generate(rosa), account)
    session = OutboundSession.new(room, 1)
    body = encrypt_v2(account, session, room, rosa, "c1", "meet at the back door")
    sealed = await sender.ok("publish", channel=room, client_msg_id="c1", body=body)
    sealed_row = page.locator(f'tr[data-key="{room}#{sealed["seq"]}"]')
    await sealed_row.wait_for()
    shown = await sealed_row.inner_text()
    assert "encrypted v2 (" in shown and f"session {session.session_id[:8]}…, message 0)" in shown
    assert "meet at" not in shown

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
    # the map has an offline base layer, zoomed to the alerts: Berlin is on its land, with a
    # lat/lon graticule; each alert links to its location on OpenStreetMap
    on_land = await page.evaluate(
        """() => document.querySelector('#map path.land')
                   .isPointInFill(new DOMPoint(13.405, -52.52))"""
    )
    assert on_land
    assert len(await page.get_attribute("#map path.land", "d") or "") > 1000
    assert await page.locator("#map line.graticule").count() >= 3
    labels = await page.locator("#map text.grid-label").all_text_contents()
    assert any(t.startswith("52.5") and t.endswith("°N") for t in labels), labels
    assert any(t.startswith("13.4") and t.endswith("°E") for t in labels), labels
    osm = panel.locator("a.osm")
    assert await osm.get_attribute("href") == (
        "https://www.openstreetmap.org/?mlat=52.52&mlon=13.405#map=17/52.52/13.405"
    )
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
    # a console whose connection closed is signed out: the sign-in box alone, saying why
    await page.evaluate("() => ws.close(4000, 'test')")
    await page.wait_for_selector("#app", state="hidden")
    assert await page.locator("#signin").is_visible()
    assert "disconnected (4000: test): sign in again" in await page.inner_text("#error")
    for r in (subscriber, poster, ana, alone):
        await r.close()


async def test_console_failed_recipient_shows_its_reason(
    alert_node: Node, fakes: FakeProviders, page: Any
) -> None:
    """An SMS that Twilio refuses (an invalid number) shows failed, why, and how often it was
    tried; counts are in the singular when there is one."""
    number = "+15550001111"
    fakes.script.twilio_permanent.add(number)
    owner = f"olga-{uuid.uuid4().hex[:4]}"
    r = alert_node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": number}]})
    assert r.status_code in (200, 201, 204), r.text
    await sign_in(page, alert_node.http)
    olga = await Raw.open(alert_node.url, token(owner))
    alert = await olga.ok(
        "alert.trigger", kind="sos", location={"lat": 51.5, "lon": -0.12}, client_alert_id="f1"
    )
    panel = page.locator(f'div.alert[data-alert="{alert["alert_id"]}"]')
    row = panel.locator("tr.recipient", has=page.locator("td.status-failed"))
    await row.wait_for(timeout=15_000)
    reason = await row.locator("td.reason").inner_text()
    assert "21211" in reason and "not a valid phone number" in reason, reason
    assert "The 'To' number is not valid." in reason, reason  # Twilio's own words too
    assert await row.locator("td.attempts").inner_text() == "1 try"
    assert await page.inner_text("#alert-count") == "· 1 active alert"
    summary = await panel.locator(".recipients-summary").inner_text()
    assert summary == "1 delivery, 0 confirmed received", summary
    await olga.close()
