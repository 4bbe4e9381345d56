"""The web console in a real browser: Debian's Chromium, headless, driven by Playwright.

Sign in with a token, register the lab VM, create an isolation request, trigger it in
the guest and see the event appear live. The file name the guest opens is HTML; the
console must show it as text (no element made from it). The screenshot is kept as a test
artifact (build/artifacts/console.png).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from vmshield.lab.vmstest import kv
from vmshield.paths import build_dir

from .conftest import Lab, boot
from .daemonlib import Daemon, make_token

pytestmark = pytest.mark.vm
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "/tmp/<img src=x onerror=window.pwned=1>"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from boot("6.1", "web-6.1")


def test_console_sign_in_isolate_and_see_the_event(lab: Lab, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (apt chromium)")
    d = Daemon(tmp_path / "state", host="web")
    shot = build_dir() / "artifacts" / "console.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        d.start()
        token = make_token(d.state, "acme")
        lab.sh(f"touch '{HOSTILE}'")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(d.url + "/")
                page.fill("#token", "vms_wrong")
                page.click("#signin-form button")
                page.locator("#signin-error", has_text="not valid").wait_for()
                page.fill("#token", token)
                page.click("#signin-form button")
                page.locator("#console").wait_for(state="visible")

                page.fill("#vm-target", lab.name)
                page.fill("#vm-name", "web-1")
                page.click("#vm-form button")
                row = page.locator("#vms tbody tr", has_text="web-1")
                row.wait_for(timeout=120_000)
                assert "6.1" in row.inner_text()

                page.select_option("#iso-vm", index=0)
                page.fill("#iso-object", "file.open")
                page.fill("#iso-filters", "path=/tmp/*")
                page.click("#iso-form button")
                iso = page.locator("#isolations tbody tr", has_text="file.open")
                iso.locator("td.state-armed").wait_for(timeout=300_000)
                page.locator("#stream-state", has_text="live").wait_for()

                pid = kv(lab.sh(f"vmstest open '{HOSTILE}'", check=False))["pid"]
                ev = page.locator("#events tbody tr", has_text="onerror=window.pwned")
                ev.first.wait_for(timeout=120_000)
                text = ev.first.inner_text()
                assert f"pid {pid}" in text and HOSTILE in text
                assert page.locator("#events img").count() == 0
                assert page.evaluate("window.pwned === undefined")
                page.wait_for_timeout(1500)  # one chart refresh with the event in it
                page.screenshot(path=str(shot), full_page=True)

                iso.locator("button", has_text="Release").click()
                page.locator("#isolations tbody tr", has_text="file.open").wait_for(
                    state="detached", timeout=300_000
                )
            finally:
                browser.close()
        assert d.term() == 0
    finally:
        d.kill()
    assert shot.stat().st_size > 10_000
    docs = Path(__file__).resolve().parents[2] / "docs" / "console.png"
    if not docs.exists():  # the README's picture: one copy kept in the repository
        shutil.copy(shot, docs)
