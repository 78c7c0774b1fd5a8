"""What every page shares: the sidebar filter, the page context, jumps and empty states."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from app.ui import data
from app.ui.render import escape_markdown
from storage.clusters import DEFAULT_ON
from storage.views import ViewFilter

CLUSTER_PAGE = "screens/cluster.py"
PICK_KEY = "cluster_pick"  # the cluster page's selectbox; a jump sets it first
CLUSTERING_KEY = "clustering_on"  # which field's latest clustering the pages show
LINK_PARAM = "cluster"  # the cluster page's address names its cluster: ?cluster=ID

EMPTY_HINTS = {
    "exchanges": (
        "No conversations in this database yet. Load some with "
        "`convoscope ingest LOGS.jsonl` (OpenAI chat, ShareGPT, Chai, battles, CSV or "
        "Parquet), or try `convoscope demo` for a ready-made sample."
    ),
    "clusters": (
        "The conversations are stored but not clustered yet. Run `convoscope embed` and then "
        "`convoscope cluster` (or `convoscope run LOGS…` for every step at once)."
    ),
    "reports": (
        "Clusters have no scores yet, so they are ordered by size. Run `convoscope score` to "
        "rank them weakest first, with reward, behaviour rates and expert leaderboards."
    ),
    "unreported": (
        "This clustering is newer than the last `convoscope score`: its clusters are ordered "
        "by their exchanges' mean reward, lowest first. Run `convoscope score` to rank them "
        "weakest first, with CIs, behaviour rates and expert leaderboards."
    ),
}


def sidebar_filter(url: str) -> ViewFilter:
    """Model, source, date and tag filters; they apply to every page."""
    version = data.database_version(url)
    options = data.filter_options(url, version)
    side = st.sidebar
    side.subheader("Filters")
    models = side.multiselect("Model", options["models"], key="f_models", placeholder="All")
    sources = side.multiselect("Source", options["sources"], key="f_sources", placeholder="All")
    tags = side.multiselect("Tag", options["tags"], key="f_tags", placeholder="Any")
    since = until = None
    first, last = options["first"], options["last"]
    if first is not None and last is not None and first.date() < last.date():
        picked = side.date_input(
            "Dates",
            value=(first.date(), last.date()),
            min_value=first.date(),
            max_value=last.date(),
            key="f_dates",
        )
        if isinstance(picked, tuple) and len(picked) == 2:
            start, end = picked
            if start > first.date():
                since = datetime.combine(start, time.min)
            if end < last.date():
                until = datetime.combine(end + timedelta(days=1), time.min)
    flt = ViewFilter(
        models=tuple(models), sources=tuple(sources), since=since, until=until, tags=tuple(tags)
    )
    if flt.active:
        side.button("Clear filters", on_click=_clear_filters, width="stretch")
    side.caption("Database: " + escape_markdown(_short(url)))
    return flt


def sidebar_clustering(url: str) -> str | None:
    """The `on` field whose latest clustering the pages show, said in the sidebar: `prompt`
    by default, as `convoscope clusters` and `export`; the only field clustered when that is
    another; a pick of the user's when several are (None: nothing is clustered)."""
    runs = data.clusterings(url, data.database_version(url))
    if not runs:
        return None
    fields = list(runs)
    on = fields[0]
    if len(fields) > 1:
        _follow_link(url)
        default = fields.index(DEFAULT_ON) if DEFAULT_ON in fields else 0
        on = st.sidebar.selectbox(
            "Clustering", fields, index=default, key=CLUSTERING_KEY, format_func=_on_label
        )
    st.sidebar.caption(
        f"Clusters: the latest clustering {_on_label(on)} (run `{escape_markdown(runs[on])}`)"
    )
    return on


def _follow_link(url: str) -> None:
    """A link to a cluster (`?cluster=ID`, the cluster page's address) opens the clustering
    that holds it (ids are unique across fields): the default one has no such topic, and its
    weakest topic was shown instead. Only on the session's first run: after that the
    sidebar's pick is the user's, whatever the address still says."""
    linked = st.query_params.get(LINK_PARAM)
    if not linked or CLUSTERING_KEY in st.session_state:
        return
    field = data.field_of_cluster(url, data.database_version(url), linked)
    if field is not None:
        st.session_state[CLUSTERING_KEY] = field


def _on_label(on: str) -> str:
    return f"on {on}"


def _clear_filters() -> None:
    for key in ("f_models", "f_sources", "f_tags", "f_dates"):
        st.session_state.pop(key, None)


def _short(url: str) -> str:
    import sqlalchemy as sa

    safe = sa.make_url(url).render_as_string(hide_password=True)
    return safe if len(safe) <= 60 else "…" + safe[-59:]


def ctx() -> data.Context:
    """The context app.py computed for this run."""
    return st.session_state["_ctx"]


def jump_to_cluster(cluster_id: str) -> None:
    st.session_state[PICK_KEY] = cluster_id
    st.switch_page(CLUSTER_PAGE)


def cluster_order(table: pd.DataFrame) -> str:
    """How `views.cluster_table` ordered `table`, in words for a label: by weakness once
    `score` reported on this clustering (unfiltered), else by mean reward when exchanges
    carry rewards, else by size."""
    if table["weakness"].notna().any():
        return "weakest first"
    return "lowest reward first" if table["reward_mean"].notna().any() else "largest first"


def empty_state(kind: str) -> None:
    st.info(EMPTY_HINTS[kind], icon=":material/info:")


def filter_note(flt: ViewFilter) -> None:
    """One line saying which filter is on (the values come from the logs: escaped)."""
    if not flt.active:
        return
    parts: list[str] = []
    for label, values in (("models", flt.models), ("sources", flt.sources), ("tags", flt.tags)):
        if values:
            parts.append(f"{label}: " + ", ".join(escape_markdown(v) for v in values))
    if flt.since or flt.until:
        parts.append(f"dates: {_day(flt.since)} to {_day(flt.until, end=True)}")
    st.caption("Filtered — " + " · ".join(parts))


def _day(value: datetime | None, *, end: bool = False) -> Any:
    if value is None:
        return "…"
    day: date = (value - timedelta(days=1)).date() if end else value.date()
    return day.isoformat()
