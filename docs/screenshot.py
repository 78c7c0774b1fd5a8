"""Regenerate the README's pictures (docs/overview.png, docs/cluster.png): the UI's overview of
a database and its weakest cluster's page, as headless Chromium shows them at 1600×1000, so
the pictures match what `convoscope demo` opens.

    cd "$(mktemp -d)" && convoscope demo --no-ui     # the demo's convoscope.duckdb
    python /path/to/convoscope/docs/screenshot.py --db duckdb:///$PWD/convoscope.duckdb

Needs Debian's chromium (`apt-get install chromium`) and the playwright package (in the dev
extras), the same as the end-to-end browser test; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.ui.launch import free_port, launch, wait_until_up  # noqa: E402

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="database URL (the demo's DuckDB file)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    port = free_port()
    server = launch(args.db, port=port)
    url = f"http://127.0.0.1:{port}/"
    try:
        if not wait_until_up(url, timeout=120):
            sys.exit("the UI did not come up within 120 s")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector(".js-plotly-plot")
            _settle(page)
            page.screenshot(path=args.out / "overview.png")
            page.get_by_role("button", name=re.compile("Open weakest")).click()
            page.get_by_text("Your notes").wait_for()
            _settle(page)
            page.screenshot(path=args.out / "cluster.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"wrote overview.png and cluster.png in {args.out}")


def _settle(page: Page) -> None:
    """Wait until Streamlit has finished running the page, and for the charts' last frame."""
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')"
        "?.getAttribute('data-test-script-state') === 'notRunning'"
    )
    page.wait_for_timeout(1000)


if __name__ == "__main__":
    main()
