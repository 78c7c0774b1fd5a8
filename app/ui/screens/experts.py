"""Experts: the global leaderboard, the expert × cluster heat map of predicted win rates, and
the routing suggestions ranked by what they would gain."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app.ui import data, shell
from app.ui.render import (
    MISSING,
    PERCENT_FORMAT,
    as_percent,
    distinct_labels,
    fmt_ci,
    hover_text,
    table_cells,
)

# The heat map and routing come from `convoscope score`'s reports, computed over the whole
# clustering run: the sidebar filter cannot narrow them, so the page says so.
RUN_WIDE_NOTE = (
    "Whole run: the sidebar filter does not apply here (these come from the last "
    "`convoscope score`, over every exchange of the clustering)."
)


c = shell.ctx()
st.title("Experts")
shell.filter_note(c.flt)

board = data.global_leaderboard(c.url, c.version, c.flt)
matrix = data.expert_matrix(c.url, c.version, c.run_id) if c.run_id else None
if board.empty and (matrix is None or matrix.empty):
    has_rows = data.overview(c.url, c.version, c.run_id, c.flt, None)["exchanges"]
    if not has_rows:
        shell.empty_state("exchanges")
    else:
        st.info(
            "No expert comparisons yet: ingest judged battles (`convoscope ingest "
            "battles.jsonl`), then run `convoscope score` for per-cluster leaderboards and "
            "routing.",
            icon=":material/info:",
        )
    st.stop()

left, right = st.columns([2, 3], gap="large")
with left:
    st.subheader("Global leaderboard")
    if board.empty:
        st.caption("No judged battles pass the filter.")
    else:
        # By rank, then rating: a wide CI can give a higher-rated model a lower rank (fewer
        # models are surely better than it), and rows sorted by rating alone then read 4, 3.
        board = board.sort_values(["rank", "rating"], ascending=[True, False])
        st.dataframe(
            table_cells(
                board.assign(
                    ci=[
                        fmt_ci((lo, hi), 0)
                        for lo, hi in zip(board["lower"], board["upper"], strict=True)
                    ],
                    win_share=as_percent(board["wins"] / board["battles"]),
                    tied_with=board["tied_with"].map(lambda t: ", ".join(t)),
                )[["rank", "model", "rating", "ci", "battles", "win_share", "tied_with"]]
            ),
            hide_index=True,
            placeholder=MISSING,
            width="stretch",
            column_config={
                "rank": "Rank",
                "model": "Model",
                "rating": st.column_config.NumberColumn("Elo", format="%.0f"),
                "ci": "95 % CI",
                "battles": "Battles",
                "win_share": st.column_config.ProgressColumn(
                    "Wins", format=PERCENT_FORMAT, min_value=0.0, max_value=100.0
                ),
                "tied_with": "Tied with",
            },
        )
        st.caption("Bradley–Terry on every judged battle, Elo-scaled; ties count half.")

with right:
    st.subheader("Win rate by cluster")
    if matrix is None or matrix.empty:
        st.caption("Run `convoscope score` for per-cluster leaderboards.")
    else:
        order = (
            matrix.drop_duplicates("cluster_id")
            .sort_values("weakness", ascending=False, na_position="last")
            .head(40)
        )
        clusters = list(order["cluster_id"])
        models = sorted(matrix["model"].dropna().unique())
        pivot = matrix.pivot_table(
            index="cluster_id", columns="model", values="win_rate", aggfunc="mean"
        ).reindex(index=clusters, columns=models)
        heat = go.Figure(
            go.Heatmap(
                z=pivot.to_numpy(),
                x=distinct_labels(
                    [hover_text(m, 30) for m in models], [hover_text(m, 200) for m in models]
                ),
                y=distinct_labels(
                    [hover_text(n, 40) for n in order["cluster"]],
                    [
                        f"{hover_text(n, 40)} ({hover_text(cid, 40)})"
                        for n, cid in zip(order["cluster"], clusters, strict=True)
                    ],
                ),
                colorscale="RdBu",
                zmid=0.5,
                zmin=0.0,
                zmax=1.0,
                colorbar={"title": "win rate"},
                hovertemplate="%{y}<br>%{x}: %{z:.0%}<extra></extra>",
                text=pivot.to_numpy(),
                texttemplate="%{text:.0%}",
            )
        )
        heat.update_layout(
            height=max(260, 28 * len(clusters) + 80),
            margin={"l": 0, "r": 0, "t": 10, "b": 0},
            yaxis={"autorange": "reversed"},
        )
        st.plotly_chart(heat, width="stretch", key="expert_heat")
        st.caption(
            "Each cell: the share of the expert's battles in the cluster that it won (ties "
            "count half). Clusters weakest first (top 40); a cluster with too few battles for "
            "a leaderboard has no row."
        )
        if c.flt.active:
            st.caption(RUN_WIDE_NOTE)

if c.run_id:
    routes = data.routing_rows(c.url, c.version, c.run_id)
    if not routes.empty:
        st.subheader("Routing suggestions, biggest gain first")
        st.dataframe(
            table_cells(
                routes.drop(columns=["cluster_id"]).assign(
                    share=as_percent(routes["share"]),
                    predicted_win_rate=as_percent(routes["predicted_win_rate"]),
                )
            ),
            hide_index=True,
            placeholder=MISSING,
            width="stretch",
            column_config={
                "cluster": st.column_config.TextColumn("Cluster", width="large"),
                "share": st.column_config.ProgressColumn(
                    "Share",
                    format=PERCENT_FORMAT,
                    min_value=0.0,
                    max_value=float(routes["share"].max() or 1.0) * 100,
                ),
                "served_by": "Served by today",
                "best_expert": "Best expert",
                "predicted_win_rate": st.column_config.NumberColumn(
                    "Predicted win rate", format=PERCENT_FORMAT
                ),
                "gain": st.column_config.NumberColumn("Gain", format="%+.2f"),
                "cheapest_within_tolerance": "Cheapest within tolerance",
            },
        )
        if c.flt.active:
            st.caption(RUN_WIDE_NOTE)
