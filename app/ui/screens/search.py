"""Search: exchanges nearest in meaning to a typed query, or containing its words; any hit
opens its cluster."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import data, shell
from app.ui.render import MISSING, one_line, option_labels, table_cells

c = shell.ctx()
st.title("Search")
shell.filter_note(c.flt)

if not data.overview(c.url, c.version, c.run_id, c.flt, None)["exchanges"] and not c.flt.active:
    shell.empty_state("exchanges")
    st.stop()

left, right = st.columns([4, 1], vertical_alignment="bottom")
query = left.text_input(
    "Query", key="search_query", placeholder="e.g. refund for a cancelled flight"
)
default_mode = "Meaning" if c.run_id else "Words"
# Clicking the selected option deselects a segmented control (None): keep the default then,
# rather than silently switching to the other mode.
mode = (
    right.segmented_control("Match", ["Meaning", "Words"], default=default_mode, key="search_mode")
    or default_mode
)
limit = 50

if not query.strip():
    st.caption(
        "Meaning finds exchanges whose prompts are about the same thing, in the embedding "
        "space the clustering used; Words finds the exact text in prompts and responses."
    )
    st.stop()

similarity: dict[str, float] = {}
if mode == "Meaning":
    if c.run_id is None:
        shell.empty_state("clusters")
        st.stop()
    index = data.semantic_index(c.url, c.version, c.run_id)
    if index is None:
        st.warning(
            "The vectors of this clustering run are not all stored (was the database embedded "
            "with another model?). Run `convoscope embed` with the run's model, or search by "
            "words.",
            icon=":material/warning:",
        )
        st.stop()
    from ingest.embed_import import is_imported  # with the index's imports (torch), not before

    if is_imported(index.embedder):
        st.info(
            f"This clustering's vectors were imported ({index.embedder}): there is no model "
            "here to embed a query with. Search by words, or cluster with a model (`convoscope "
            "cluster --model NAME`) to search by meaning.",
            icon=":material/info:",
        )
        st.stop()
    # Ask for more than shown: the sidebar filter is applied to the nearest ones afterwards.
    nearest = data.semantic_search(index, query, limit * 4 if c.flt.active else limit)
    similarity = dict(nearest)
    hits = data.hits_by_ids(c.url, c.version, c.run_id, tuple(similarity), c.flt, c.scorer)
    hits = hits[:limit]
else:
    hits = data.keyword_search(c.url, c.version, c.run_id, query, c.flt, c.scorer, limit)

if not hits:
    st.info("Nothing found.", icon=":material/info:")
    st.stop()

names = data.cluster_names(c.url, c.version, c.run_id) if c.run_id else {}
frame = pd.DataFrame(hits)
shown = pd.DataFrame(
    {
        "Similarity": [similarity.get(h["id"]) for h in hits] if similarity else None,
        "Prompt": frame["prompt"].map(lambda t: one_line(t, 160)),
        "Response": frame["response"].map(lambda t: one_line(t, 120)),
        "Cluster": frame["cluster_id"].map(lambda cid: names.get(cid, "unassigned")),
        "Model": frame["model"],
        "Reward": frame["reward"],
    }
)
if not similarity:
    shown = shown.drop(columns=["Similarity"])
if similarity:
    found = f"The {len(hits)} nearest in meaning"
else:
    total = data.keyword_count(c.url, c.version, c.run_id, query, c.flt)
    found = (
        f"{len(hits)} hits" if total <= len(hits) else f"The first {len(hits)} of {total:,} hits"
    ) + (", lowest reward first" if c.scorer else "")
st.caption(f"{found} · select a row to open its cluster")
selection = st.dataframe(
    table_cells(shown),
    hide_index=True,
    placeholder=MISSING,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key="search_hits",
    column_config={
        "Similarity": st.column_config.ProgressColumn(format="%.2f", min_value=0, max_value=1),
        "Prompt": st.column_config.TextColumn(width="large"),
        "Response": st.column_config.TextColumn(width="medium"),
        "Reward": st.column_config.NumberColumn(format="%.2f"),
    },
)
rows = selection.selection.rows if selection else []
if rows:
    target = hits[rows[0]]["cluster_id"]
    if target:
        shell.jump_to_cluster(target)
    else:
        st.caption("That exchange is not in any cluster.")

clusters_hit = [cid for cid in dict.fromkeys(h["cluster_id"] for h in hits) if cid]
if clusters_hit:
    pick_col, go_col = st.columns([4, 1], vertical_alignment="bottom")
    hit_labels = option_labels(clusters_hit, names, 80)
    target = pick_col.selectbox(
        "Clusters of these hits",
        clusters_hit,
        format_func=hit_labels.__getitem__,
        key="search_cluster",
    )
    if go_col.button("Open cluster", key="search_open", width="stretch"):
        shell.jump_to_cluster(target)
