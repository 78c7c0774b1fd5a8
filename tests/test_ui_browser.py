"""End to end in real headless Chromium: start the UI the way `convoscope ui` does, open the
overview, go to the weakest cluster, rename it, tag it, and download a CSV whose rows carry
the new name and tag. Screenshots of every page land in test-artifacts/ for a person to look
at. Debian's chromium is driven by Playwright's Python package; no browser is downloaded.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.ui.launch import free_port, launch, wait_until_up
from tests.ui_database import SCORER, XSS_PROMPT_SHOWN, BuiltDatabase, build

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NEW_NAME = "Refund trouble"
NEW_TAG = "needs-instruction"
TIMEOUT_MS = 30_000


def _require_browser() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install playwright)")
    if missing:
        message = "end-to-end UI test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, BuiltDatabase]]:
    _require_browser()
    folder = tmp_path_factory.mktemp("ui_browser")
    built = build(f"duckdb:///{folder / 'ui.duckdb'}", n_exchanges=300)
    port = free_port()
    process = launch(built.url, port=port)
    url = f"http://127.0.0.1:{port}/"
    try:
        if not wait_until_up(url, timeout=60):
            pytest.fail("the Streamlit server did not come up within 60 s")
        yield url, built
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except Exception:
            process.kill()


def test_rename_tag_and_download_in_chromium(server: tuple[str, BuiltDatabase]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, built = server
    expect.set_options(timeout=TIMEOUT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

            page.goto(url)
            expect(page.get_by_text("Clusters, weakest first")).to_be_visible()
            expect(page.get_by_text("Exchanges", exact=True)).to_be_visible()
            page.wait_for_selector(".js-plotly-plot")
            _settle(page)
            page.screenshot(path=ARTIFACTS / "overview.png", full_page=True)

            page.get_by_role("button", name=re.compile("Open weakest")).click()
            expect(page.get_by_text("Your notes")).to_be_visible()
            # The injected prompt is the weakest cluster's worst exchange: shown as text.
            expect(page.get_by_text(XSS_PROMPT_SHOWN).first).to_be_visible()
            # Its bare URLs, and the group name's, are text: no link from log text.
            assert page.locator("a[href*='evil.example']").count() == 0
            _settle(page)
            page.screenshot(path=ARTIFACTS / "cluster.png", full_page=True)

            name = page.get_by_label("Name", exact=True)
            name.fill(NEW_NAME)
            page.get_by_role("button", name="Rename").click()
            expect(page.get_by_role("heading", name=NEW_NAME)).to_be_visible()

            page.get_by_label("Add a tag").fill(NEW_TAG)
            page.get_by_role("button", name="Add tag").click()
            expect(page.get_by_role("button", name=f"✕ {NEW_TAG}")).to_be_visible()
            _settle(page)
            page.screenshot(path=ARTIFACTS / "cluster-renamed.png", full_page=True)

            # A note typed but not saved stays with its cluster: the next one with no note
            # showed it, and "Save note" there would have stored it on the wrong cluster.
            note = page.locator('textarea[aria-label="Note"]')
            note.fill("draft, not saved")
            page.get_by_label(re.compile(r"^Cluster \(")).click()
            page.get_by_role("option", name=re.compile(r"^2\. ")).click()
            expect(page.get_by_role("heading", name=NEW_NAME)).to_have_count(0)
            _settle(page)
            assert note.input_value() == ""

            page.get_by_role("link", name="Search").click()
            page.get_by_role("radio", name="Words").click()
            page.get_by_label("Query").fill("refund")
            page.get_by_label("Query").press("Enter")
            expect(page.get_by_text(re.compile(r"\d+ hits"))).to_be_visible()
            _settle(page)
            page.screenshot(path=ARTIFACTS / "search.png", full_page=True)

            page.get_by_role("link", name="Experts").click()
            expect(page.get_by_text("Global leaderboard")).to_be_visible()
            page.wait_for_selector(".js-plotly-plot")
            _settle(page)
            page.screenshot(path=ARTIFACTS / "experts.png", full_page=True)

            page.get_by_role("link", name="Export").click()
            expect(page.get_by_text("Rows to export")).to_be_visible()
            _settle(page)
            page.screenshot(path=ARTIFACTS / "export.png", full_page=True)
            with page.expect_download() as info:
                page.get_by_role("button", name="Download CSV").click()
            download = info.value
            saved = ARTIFACTS / "export.csv"
            download.save_as(saved)
        finally:
            browser.close()

    assert dialogs == [], f"log text ran as script: {dialogs}"
    rows = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8"))))
    assert len(rows) == built.n_exchanges
    weakest = [r for r in rows if r["cluster_id"] == built.weakest_id]
    assert weakest, "the download holds no row of the renamed cluster"
    assert {r["cluster_label"] for r in weakest} == {NEW_NAME}
    assert all(NEW_TAG in r["tags"].split("; ") for r in weakest)
    others = [r for r in rows if r["cluster_id"] and r["cluster_id"] != built.weakest_id]
    assert others and all(NEW_TAG not in r["tags"] for r in others)
    assert {r["reward_scorer"] for r in rows if r["reward"]} == {SCORER}


def _settle(page: Page) -> None:
    """Wait until Streamlit has finished running the page (no spinner, app idle)."""
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')"
        "?.getAttribute('data-test-script-state') === 'notRunning'",
        timeout=TIMEOUT_MS,
    )
    page.wait_for_timeout(400)


def teardown_module() -> None:
    shutil.rmtree(ARTIFACTS / "tmp", ignore_errors=True)
