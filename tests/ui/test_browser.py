"""The page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): upload a photo,
set two controls, run on the demo model, wait for the result slider and the memory plot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urljoin

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_page_runs_two_controls(app_url, example_photo, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(app_url)
            page.wait_for_selector("#run", timeout=30_000)
            assert "random weights" in page.locator("#demo-notice").inner_text()
            assert "Auto — no GPU: CPU" in page.locator("#tier input").input_value()

            page.locator("#input-image input[type=file]").set_input_files(example_photo)
            page.wait_for_selector("#size-info :text('generated at')", timeout=30_000)
            page.locator("#prompt textarea").fill("an astronaut, studio light")
            page.locator("#control-2 input").click()
            page.get_by_role("option", name="Pose (body keypoints)").click()
            # the row takes pose's scale and control end from the model card
            sync_api.expect(page.locator("#scale-2 input[type=number]")).to_have_value("0.9", timeout=10_000)
            sync_api.expect(page.locator("#end-2 input[type=number]")).to_have_value("0.65", timeout=10_000)
            page.get_by_text("Advanced", exact=True).click()
            set_slider(page, "steps", 2)
            set_slider(page, "max-side", 192)
            page.wait_for_selector("#size-info :text('192×192')", timeout=30_000)
            previews = page.locator(".control-preview img")
            sync_api.expect(previews).to_have_count(2, timeout=60_000)  # canny and pose previews

            page.locator("#run").click()
            sync_api.expect(page.locator("#result img")).to_have_count(2, timeout=120_000)
            page.wait_for_selector("#memory-plot img", timeout=60_000)
            page.wait_for_selector("#plan table", timeout=10_000)
            sync_api.expect(page.locator("#gallery img").first).to_be_visible(timeout=10_000)
            assert "cpu on CPU (demo model)" in page.locator("#plan").inner_text()
            seed = page.locator("#seed input").input_value()

            # the PNG's settings come back through "Load settings from a PNG"
            href = page.locator("#png a").first.get_attribute("href")
            png = tmp_path / "result.png"
            png.write_bytes(page.request.get(urljoin(app_url, href)).body())
            page.locator("#prompt textarea").fill("something else")
            page.get_by_text("Load settings from a PNG", exact=True).click()
            page.locator("#settings-png input[type=file]").set_input_files(str(png))
            sync_api.expect(page.locator("#prompt textarea")).to_have_value(
                "an astronaut, studio light", timeout=30_000
            )
            assert page.locator("#seed input").input_value() == seed
            assert not page.locator("#randomize input").is_checked()
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("UI_SCREENSHOT"):
                shutil.copy(shot, os.environ["UI_SCREENSHOT"])
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
