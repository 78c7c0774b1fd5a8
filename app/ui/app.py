"""Streamlit entry point: `streamlit run app/ui/app.py -- --db URL` (or `convoscope ui`).

Sets the page up (wide), reads the database URL, draws the sidebar filter and hands over to
the page the user is on. Each page is a script under screens/ that reads `shell.ctx()`; the
folder is not called pages/, which Streamlit would also run on its own (v1 multipage apps).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts this script's folder first on sys.path, where this very file would
# shadow the `app` package; the repository root is what the imports below need.
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT))
if not hasattr(sys.modules.get("app"), "__path__"):  # this file, imported as "app" earlier
    sys.modules.pop("app", None)

import streamlit as st  # noqa: E402

from app.ui import data, shell  # noqa: E402

st.set_page_config(page_title="convoscope", page_icon=":material/travel_explore:", layout="wide")

PAGES = [
    st.Page(
        "screens/overview.py",
        title="Overview",
        icon=":material/dashboard:",
        url_path="overview",
        default=True,
    ),
    st.Page("screens/cluster.py", title="Cluster", icon=":material/hub:", url_path="cluster"),
    st.Page("screens/search.py", title="Search", icon=":material/search:", url_path="search"),
    st.Page(
        "screens/experts.py", title="Experts", icon=":material/leaderboard:", url_path="experts"
    ),
    st.Page("screens/export.py", title="Export", icon=":material/download:", url_path="export"),
    st.Page("screens/replay.py", title="Replay", icon=":material/replay:", url_path="replay"),
]


def main() -> None:
    url = data.database_url(sys.argv[1:])
    page = st.navigation(PAGES)
    st.sidebar.markdown("### :material/travel_explore: convoscope")
    try:
        data.ensure_database(url)
        on = shell.sidebar_clustering(url)
        flt = shell.sidebar_filter(url)
        st.session_state["_ctx"] = data.context(url, flt, on)
    except data.DatabaseBusy as busy:
        st.warning(str(busy), icon=":material/hourglass_top:")
        st.stop()
    try:
        page.run()
    except data.DatabaseBusy as busy:
        st.warning(str(busy), icon=":material/hourglass_top:")


main()
