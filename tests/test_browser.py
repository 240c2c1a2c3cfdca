"""The report in a real browser: headless Chromium opens report.html, logs no console error, and shows every plot.

`make test` installs Debian's chromium and chromium-driver where they are missing (as root); without them this
test is skipped with the reason. The screenshot is kept in build/test-artifacts/report.png.
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import full_report_results

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def open_in_chromium(html: Path, screenshot: Path) -> dict:
    """Load a page from disk; its console messages, its images' load state, and a full-page screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(html.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
            "width: i.naturalWidth, height: i.naturalHeight}));")
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1280, min(max(height, 900), 8000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return {"console": driver.get_log("browser"), "images": images, "title": driver.title,
                "headings": [h.text for h in driver.find_elements("css selector", "h2")],
                "text": driver.find_element("tag name", "body").text}
    finally:
        driver.quit()


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                                      "(make test installs them when run as root)")
def test_report_opens_in_chromium_without_errors_and_with_every_plot(tmp_path):
    from medpeft.report import main

    path = tmp_path / "evaluation_results.json"
    path.write_text(json.dumps(full_report_results()))
    assert main([str(path)]) == 0
    shot = ROOT / "build" / "test-artifacts" / "report.png"
    page = open_in_chromium(tmp_path / "report.html", shot)
    errors = [m for m in page["console"] if m["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    assert [i["alt"] for i in page["images"]] == ["metrics", "loss_curves", "time_memory"]
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in page["images"]), page["images"]
    assert page["headings"] == ["Classification: against the base and the label prior", "Choosing a method",
                                "Standard benchmarks (lm-evaluation-harness)", "How the numbers were computed",
                                "Answers side by side"]
    assert "Coverage: 2 of 2 test items scored" in page["text"]
    assert "Majority-class baseline: always answering 'yes'" in page["text"]
    assert "Forgetting check: general tasks" in page["text"]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
