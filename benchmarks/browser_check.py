"""The search page in a real browser: app.py served on loopback, driven as a person would in headless Chromium, with
screenshots for the docs.

    python -m benchmarks.browser_check [--index search_index] [--query "..."] [--output_dir docs]
                                       [--chromium /usr/bin/chromium]

Needs Playwright (`pip install playwright`; not in requirements.txt) and a Chromium: the Debian package
(`apt-get install chromium`) is used as it is, no browser is downloaded. Types a query, picks the domain the page
predicts, presses Search and waits for the results table; then asks for papers like the first hit; then compares two
abstracts. Each view is checked (rows shown, a cosine given) and saved as a PNG; the seconds each took are printed.
"""

import argparse
import time
from pathlib import Path

from benchmarks.app_server import free_port, serve

ROOT = Path(__file__).resolve().parents[1]
QUERY = "Intrathecal baclofen for severe spasticity in children with cerebral palsy"


def table_rows(page) -> list[list[str]]:
    """The results table's rows as the page holds them (cell texts), waiting until it has one."""
    script = ("Array.from(document.querySelectorAll('[role=row]'))"
              ".map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.textContent.trim()))")
    page.wait_for_function(f"{script}.some(r => r.length >= 7 && r[0] !== '')", timeout=60_000)
    return [row for row in page.evaluate(script) if len(row) >= 7 and row[0]]


def drive(url: str, args) -> dict:
    from playwright.sync_api import sync_playwright

    seconds = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        started = time.perf_counter()
        page.goto(url)
        page.get_by_label("Query: a title, an abstract or a few words").fill(args.query)
        page.get_by_role("button", name="Search", exact=True).click()
        page.get_by_text("(predicted, p =").wait_for(timeout=120_000)
        seconds["search"] = time.perf_counter() - started
        rows = table_rows(page)
        print(f"search: {len(rows)} rows; first: {rows[0][:3]}")
        page.screenshot(path=str(args.output_dir / "search_page.png"), full_page=True)
        first_id = rows[0][6]
        started = time.perf_counter()
        page.get_by_label("Or papers like these: paper ids, separated by commas").fill(first_id)
        page.get_by_role("button", name="Papers like these").click()
        page.get_by_text(f"Papers likely co-cited with {first_id}.").wait_for(timeout=120_000)
        seconds["papers like these"] = time.perf_counter() - started
        rows = table_rows(page)
        print(f"papers like {first_id}: {len(rows)} rows; first: {rows[0][:3]}")
        page.get_by_role("tab", name="Compare two abstracts").click()
        page.get_by_label("First abstract").fill(args.query + ". We report outcomes of 40 children.")
        page.get_by_label("Second abstract").fill("Selective dorsal rhizotomy for spastic diplegia: long-term outcome.")
        started = time.perf_counter()
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("cosine").wait_for(timeout=120_000)
        seconds["compare"] = time.perf_counter() - started
        print("compare: " + page.get_by_text("cosine").inner_text())
        page.screenshot(path=str(args.output_dir / "search_page_compare.png"), full_page=True)
        browser.close()
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="search_index")
    parser.add_argument("--query", default=QUERY)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    port = free_port()
    server = serve(args.index, port)
    try:
        seconds = drive(f"http://127.0.0.1:{port}/", args)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("seconds in the browser (click to answer shown): "
          + ", ".join(f"{view} {s:.2f}" for view, s in seconds.items()))
    print(f"screenshots: {args.output_dir / 'search_page.png'}, {args.output_dir / 'search_page_compare.png'}")


if __name__ == "__main__":
    main()
