"""The page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), walked as a user
would: Ctrl+Enter starts a job whose status on the result says "step k/N" and an ETA; Cancel ends in
"Cancelled"; a run gives the before/after slider whose download is the PNG with A1111 `parameters`;
a PNG without settings gives one message; the settings come back from our PNG and from a click on
the history; and on a phone
(390×844) Run is on the first screen after the upload. No "Error" pill appears anywhere.

UI_SCREENSHOTS=DIR copies the screenshots of the main states there (docs/ holds the committed ones).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

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
DESKTOP, PHONE = (1440, 900), (390, 844)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def set_slider(page, elem_id: str, value) -> None:
    """Type a slider's value; again if the page had not taken it yet (a box filled while its
    accordion still opens can be reset), so a job never starts with the old value."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(3):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        page.wait_for_timeout(300)
        if box.input_value() == str(value):
            return
    assert box.input_value() == str(value), f"#{elem_id} did not take {value}"


def no_error_pills(page) -> None:
    """Gradio marks a failed event on each of its outputs with a red "Error" label."""
    pills = page.locator(".error", has_text=re.compile(r"^\s*Error\s*$"))
    assert pills.count() == 0, "an Error pill is shown"


def shoot(page, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=full_page)
    assert shot.stat().st_size > 10_000
    if os.environ.get("UI_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["UI_SCREENSHOTS"]) / shot.name)
    return shot


def upload(page, photo: str) -> None:
    page.locator("#input-image input[type=file]").set_input_files(photo)
    page.wait_for_selector("#size-info :text('generated at')", timeout=30_000)


def test_the_page_walked_as_a_user(app_url, example_photo, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    expect = sync_api.expect
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport=dict(zip(("width", "height"), DESKTOP)), accept_downloads=True)
            page.goto(app_url)
            page.wait_for_selector("#run", timeout=30_000)
            assert "random weights" in page.locator("#demo-notice").inner_text()
            assert page.locator("#tier input").input_value() == "Auto (CPU)"  # the GPU tiers are not offered
            assert "Not offered: 4–48 GB (needs a CUDA GPU" in page.locator("#tier").inner_text()
            expect(page.locator("#cancel")).to_be_disabled()  # nothing runs yet

            upload(page, example_photo)
            page.locator("#prompt textarea").fill("an astronaut, studio light")
            page.locator("#control-2 input").click()
            page.get_by_role("option", name="Pose (body keypoints)").click()
            expect(page.locator("#scale-2")).to_be_visible()  # a row set to None hides its sliders
            # the row takes pose's scale and control end from the model card
            expect(page.locator("#scale-2 input[type=number]")).to_have_value("0.9", timeout=10_000)
            expect(page.locator("#end-2 input[type=number]")).to_have_value("0.65", timeout=10_000)
            expect(page.locator("#scale-3")).to_be_hidden()
            page.get_by_text("Advanced", exact=True).click()
            set_slider(page, "steps", 100)  # long enough to watch and cancel (~0.3 s a step here)
            page.locator("#upscale").get_by_text("2×", exact=True).click()  # and an upscale stage after them
            page.wait_for_selector("#size-info :text('832×832')", timeout=30_000)
            expect(page.locator(".control-preview img")).to_have_count(2, timeout=60_000)

            # Ctrl+Enter runs; the status on the result says the phase, step k/N and an ETA
            page.locator("#prompt textarea").press("Control+Enter")
            status = page.locator("#status")
            expect(status).to_contain_text(re.compile(r"step \d+/100"), timeout=60_000)
            expect(status).to_contain_text(re.compile(r"about \d+ (s|min) left"), timeout=30_000)
            expect(page.locator("#live img")).to_have_count(1, timeout=30_000)  # the live preview
            shoot(page, tmp_path, "desktop-running")
            page.locator("#cancel").click()
            expect(status).to_contain_text("Cancelled after step", timeout=30_000)
            expect(page.locator("#cancel")).to_be_disabled()
            no_error_pills(page)
            shoot(page, tmp_path, "desktop-cancelled")

            set_slider(page, "steps", 2)
            page.locator("#upscale").get_by_text("1×", exact=True).click()
            set_slider(page, "max-side", 192)
            page.wait_for_selector("#size-info :text('192×192')", timeout=30_000)
            page.locator("#run").click()
            expect(page.locator("#result img")).to_have_count(2, timeout=120_000)
            expect(status).to_contain_text("Done in", timeout=30_000)
            page.wait_for_selector("#memory-plot img", timeout=60_000)
            assert "| Tier | CPU (demo model) |".split("|")[2].strip() in page.locator("#plan").inner_text()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=10_000)
            seed = page.locator("#seed input").input_value()
            shoot(page, tmp_path, "desktop-result")

            # the slider's download is the PNG, with the A1111 parameters Forge's PNG Info reads
            with page.expect_download() as dl:
                page.locator("#result [data-testid=download-link] button").click()
            png = tmp_path / "download.png"
            dl.value.save_as(png)
            img = Image.open(png)
            assert img.format == "PNG" and png.suffix == ".png"
            params = img.text["parameters"]
            assert params.startswith("an astronaut, studio light\nSteps: 2, Sampler: Euler, ")
            assert f"Seed: {seed}," in params and "Size: 192x192" in params and 'ControlNet 1: "Module: pose' in params

            # a PNG without settings: one message, nothing changed, no pills
            plain = tmp_path / "photo.png"
            Image.new("RGB", (64, 64), "gray").save(plain)
            page.locator("#prompt textarea").fill("something else")
            page.get_by_text("Load settings from a PNG", exact=True).click()
            page.locator("#settings-png input[type=file]").set_input_files(str(plain))
            expect(page.locator("#settings-msg")).to_contain_text("holds no generation settings", timeout=30_000)
            assert page.locator("#prompt textarea").input_value() == "something else"
            no_error_pills(page)
            # ours: the settings come back, seed fixed
            page.locator("#settings-png button[aria-label='Clear']").first.click()
            page.locator("#settings-png input[type=file]").set_input_files(str(png))
            expect(page.locator("#prompt textarea")).to_have_value("an astronaut, studio light", timeout=30_000)
            assert page.locator("#seed input").input_value() == seed
            assert not page.locator("#randomize input").is_checked()
            expect(page.locator("#settings-msg")).to_contain_text("Loaded the settings of this app's PNG")
            no_error_pills(page)
            # the history: a click restores that result's settings and its before/after
            page.locator("#prompt textarea").fill("yet another prompt")
            set_slider(page, "steps", 7)
            page.locator("#gallery img").first.click()
            expect(page.locator("#prompt textarea")).to_have_value("an astronaut, studio light", timeout=30_000)
            expect(page.locator("#steps input[type=number]")).to_have_value("2")
            expect(status).to_contain_text("Restored the settings")
            expect(page.locator("#result img")).to_have_count(2)
            no_error_pills(page)

            # a phone: Run is on the first screen after the upload
            phone = browser.new_page(viewport=dict(zip(("width", "height"), PHONE)))
            phone.goto(app_url)
            phone.wait_for_selector("#run", timeout=30_000)
            upload(phone, example_photo)
            phone.locator("#prompt textarea").fill("an astronaut, studio light")
            phone.evaluate("window.scrollTo(0, 0)")
            box = phone.locator("#run").bounding_box()
            assert box and box["y"] + box["height"] <= PHONE[1], box
            shoot(phone, tmp_path, "phone")
            phone.locator("#run").click()
            expect(phone.locator("#result img")).to_have_count(2, timeout=120_000)
            phone.locator("#status").scroll_into_view_if_needed()
            shoot(phone, tmp_path, "phone-result")
            shoot(phone, tmp_path, "phone-full", full_page=True)
            no_error_pills(phone)
        finally:
            browser.close()
