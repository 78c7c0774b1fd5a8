"""How long each UI page takes to render at 100K exchanges, once its caches are warm.

Builds a synthetic database (100K exchanges, 60 topics, battles, scores, reports; reused from
benchmarks/results/ when present) and runs every page with Streamlit's AppTest: a cold first
run fills the caches, then the same session reruns the page, as a click does. Beside each
median warm time it prints two baselines measured in the same run: opening the database
read-only and reading its version (the floor every page pays, since the UI never keeps DuckDB
open), and the page's main query run uncached. Target: every page under 2 s warm.

    python benchmarks/bench_ui.py [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from storage import views  # noqa: E402
from storage.clusters import latest_run  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from tests.ui_database import build  # noqa: E402

APP = str(ROOT / "app" / "ui" / "app.py")
TARGET_S = 2.0


def _time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _database(rows: int) -> str:
    folder = ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ui-{rows}.duckdb"
    marker = path.with_suffix(".ok")
    url = f"duckdb:///{path}"
    if not marker.exists():
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        build(url, n_exchanges=rows, n_clusters=60, n_battles=min(rows // 2, 5000), seed=7)
        marker.write_text("built\n")
        print(f"built {rows:,}-exchange database in {time.perf_counter() - start:.1f} s")
    return url


def _page_run(page: str | None, setup: Callable[[AppTest], None] | None) -> Callable[[], None]:
    def run() -> None:
        at = AppTest.from_file(APP, default_timeout=300)
        if page:
            at.switch_page(page)
        at.run()
        if setup:
            setup(at)
        if at.exception:
            raise RuntimeError(at.exception[0].value)

    return run


def _search(at: AppTest) -> None:
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("refund").run()


def _weekly(at: AppTest) -> None:
    """The cluster page's Over time tab, per week (tabs render together: the chart is drawn
    on every visit, so this is the page with its trend query rerun for another period)."""
    at.radio(key="trend_period").set_value("week").run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K rows, fewer repeats")
    parser.add_argument("--rows", type=int, help="exchanges in the synthetic database")
    args = parser.parse_args()
    rows = args.rows or (10_000 if args.quick else 100_000)
    repeat = 3 if args.quick else 5
    url = _database(rows)
    os.environ["CONVOSCOPE_DB"] = url

    engine = make_engine(url, read_only=True)
    run_id = latest_run(engine)["id"]
    scorer = views.reward_scorer(engine)
    engine.dispose()
    flt = views.ViewFilter()

    def raw(query: Callable[[object], object]) -> Callable[[], None]:
        def go() -> None:
            e = make_engine(url, read_only=True)
            try:
                query(e)
            finally:
                e.dispose()

        return go

    weakest = views.cluster_table(make_engine(url, read_only=True), run_id, flt, scorer=scorer)[0][
        "id"
    ]
    pages = [
        (
            "overview",
            None,
            None,
            raw(lambda e: views.map_points(e, run_id, flt, scorer=scorer, limit=100_000)),
        ),
        (
            "cluster",
            "screens/cluster.py",
            None,
            raw(lambda e: views.cluster_exchanges(e, run_id, weakest, flt, scorer=scorer)),
        ),
        (
            "cluster by week",
            "screens/cluster.py",
            _weekly,
            raw(
                lambda e: views.cluster_trend(
                    e, run_id, flt, scorer=scorer, period="week", cluster_id=weakest
                )
            ),
        ),
        (
            "search (words)",
            "screens/search.py",
            _search,
            raw(lambda e: views.keyword_search(e, run_id, "refund", flt, scorer=scorer)),
        ),
        ("experts", "screens/experts.py", None, raw(lambda e: views.expert_matrix(e, run_id))),
        ("export", "screens/export.py", None, raw(lambda e: views.count_rows(e, run_id, flt))),
    ]
    floor = _time(raw(lambda e: views.database_version(e)), repeat)

    print(
        f"\nUI page times, {rows:,} exchanges, median of {repeat} warm runs (target < "
        f"{TARGET_S:.0f} s)"
    )
    header = f"{'page':<16}{'cold s':>9}{'warm s':>9}{'open+version s':>16}{'raw query s':>13}  ok"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, page, setup, query in pages:
        run = _page_run(page, setup)
        cold = _time(run, 1)
        warm = _time(run, repeat)
        baseline = _time(query, repeat)
        worst = max(worst, warm)
        print(
            f"{name:<16}{cold:>9.2f}{warm:>9.2f}{floor:>16.3f}{baseline:>13.3f}  "
            f"{'yes' if warm < TARGET_S else 'NO'}"
        )
    print(
        f"\nslowest warm page: {worst:.2f} s ({'meets' if worst < TARGET_S else 'misses'} the "
        f"{TARGET_S:.0f} s target)"
    )


if __name__ == "__main__":
    main()
