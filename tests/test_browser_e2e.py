"""The feature browser end to end in headless Chromium (Debian's ``chromium``, driven by Playwright): load the page,
search a feature, open it, run a steered generation beside the unsteered one, save the steering as a preset.

The texts the page shows must be the ones the API returns for the same requests; the screenshot is kept in
``test-artifacts/browser.png``. Without Chromium this test fails (``apt-get install chromium``); it never skips.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright
from test_browser_support import PLANTED, browser_app
from test_server_support import MODEL_NAME, SAE_LAYER, serving

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT, STRENGTH, MAX_TOKENS = "w30 w31 w32", 40.0, 8


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).is_file(), "Chromium is missing: apt-get install -y chromium (the browser test needs it)"
    return path


def api_chat(client: httpx.Client, steering: object) -> str:
    """The request the page sends for "try it" (browser.js chatBody), sent directly."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "steering": steering,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def search_and_open(page: Page) -> None:
    expect(page.locator("#index-select")).to_have_value("tiny")
    page.fill("#q", "weather")
    page.click("#search-btn")
    hits = page.locator("#results li")
    expect(hits).to_have_count(1)
    expect(hits.first).to_have_attribute("data-feature", str(PLANTED))
    expect(hits.first).to_contain_text("planted weather feature")
    hits.first.click()
    expect(page.locator("#detail-title")).to_have_text(f"Feature {PLANTED}")
    expect(page.locator("#histogram svg rect")).to_have_count(24)
    expect(page.locator("#vocab-top li")).to_have_count(5)


def try_it(page: Page) -> tuple[str, str]:
    page.select_option("#try-mode", "clamp")
    page.fill("#try-strength", str(STRENGTH))
    page.fill("#try-max-tokens", str(MAX_TOKENS))
    page.fill("#try-prompt", PROMPT)
    page.click("#try-btn")
    expect(page.locator("body")).to_have_attribute("data-generated", "1", timeout=60_000)
    return page.locator("#out-plain").inner_text(), page.locator("#out-steered").inner_text()


def test_search_try_and_save_in_headless_chromium(tmp_path: Path) -> None:
    app, _, _ = browser_app(tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/browser")
            search_and_open(page)
            contexts = page.locator("#contexts .ctx")
            assert contexts.count() >= 1 and contexts.first.locator(".tok").count() >= 2
            plain, steered = try_it(page)
            sae_op = {"op": "sae", "layer": SAE_LAYER, "site": "resid_post", "sae": "tiny"}
            edit = {"feature": PLANTED, "mode": "set", "value": STRENGTH}
            assert plain == api_chat(client, [])
            assert steered == api_chat(client, {"interventions": [sae_op | {"edits": [edit]}]})
            assert plain != steered
            expect(page.locator("#preset-name")).to_have_value(f"tiny_f{PLANTED}")
            page.click("#preset-btn")
            expect(page.locator("#preset-status")).to_have_text(f"saved preset tiny_f{PLANTED}")
            expect(page.locator("#preset-list")).to_contain_text(f"tiny_f{PLANTED}: clamp feature {PLANTED} of tiny")
            assert api_chat(client, [f"tiny_f{PLANTED}"]) == steered
            page.fill("#align-vector", "planted")
            page.click("#align-btn")
            expect(page.locator("#align-results li").first).to_have_attribute("data-feature", str(PLANTED))
            page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    assert (ARTIFACTS / "browser.png").stat().st_size > 10_000
