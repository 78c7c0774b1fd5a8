"""One cluster: what it is about, its worst and typical exchanges, who should serve it, and
what people have said about it (name, tags, note: stored by stable id, so they survive
re-clustering)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.ui import charts, data, shell
from app.ui.render import (
    MISSING,
    escape_markdown,
    exchange_block,
    fmt_ci,
    fmt_float,
    fmt_share,
    one_line,
    safe_label,
    table_cells,
)
from ingest.readers import spelled_time_keys
from storage.clusters import add_tag, annotate_cluster, remove_tag
from storage.views import PERIODS

c = shell.ctx()
if c.run_id is None:
    st.title("Cluster")
    shell.empty_state(
        "exchanges"
        if not data.overview(c.url, c.version, None, c.flt, None)["exchanges"]
        else "clusters"
    )
    st.stop()

table = data.cluster_table(c.url, c.version, c.run_id, c.flt, c.scorer)
if table.empty:
    st.title("Cluster")
    st.info("No cluster holds an exchange that passes the filter.", icon=":material/info:")
    st.stop()

ids = list(table["id"])
names = dict(zip(table["id"], table["name"], strict=True))
linked = None if shell.PICK_KEY in st.session_state else st.query_params.get(shell.LINK_PARAM)
wanted = st.session_state.get(shell.PICK_KEY) or linked
# A group's id (`convoscope clusters` lists groups with topics): the page shows one topic,
# so it opens the group's first in the list, said so; it was said to be no topic at all.
members = table[table["parent_id"] == wanted] if wanted not in names else table.iloc[:0]
if not members.empty:
    group_id, wanted = wanted, members["id"].iloc[0]
    st.info(
        f"{safe_label(group_id, 40)} is a group of {len(members)} topics "
        f"({safe_label(members['parent'].iloc[0], 60)}): showing its first topic "
        f"({shell.cluster_order(table)}). The Overview lists the groups.",
        icon=":material/account_tree:",
    )
elif wanted not in names:
    wanted = ids[0]
    if linked:  # opened from a link (not a pick gone with a switch of clustering): say so
        st.warning(
            f"No topic {safe_label(linked, 40)} in the latest clustering on "
            f"{' or '.join(data.clusterings(c.url, c.version))} (re-clustered away, or a link "
            f"to another database): showing the first topic ({shell.cluster_order(table)}).",
            icon=":material/link_off:",
        )
st.session_state[shell.PICK_KEY] = wanted
picked = st.selectbox(
    f"Cluster ({shell.cluster_order(table)})",
    ids,
    key=shell.PICK_KEY,
    format_func=lambda cid: f"{ids.index(cid) + 1}. {one_line(names[cid], 80)}",
)
st.query_params[shell.LINK_PARAM] = picked

detail = data.cluster_detail(c.url, c.version, c.run_id, picked)
if detail is None:
    st.warning("This cluster is not in the latest clustering run.")
    st.stop()
report = detail["report"]
row = table.set_index("id").loc[picked]

st.title(safe_label(detail["name"], 100))
facts = []
if detail["name"] != detail["auto_name"]:
    facts.append(f"automatic name: {safe_label(detail['auto_name'], 60)}")
if detail["parent"]:
    facts.append(f"group: {safe_label(detail['parent'], 60)}")
facts.append(f"id `{detail['id']}`")
st.caption(" · ".join(facts))
if detail["keywords"]:
    st.markdown("Keywords: " + ", ".join(escape_markdown(str(k)) for k in detail["keywords"][:12]))

m = st.columns(6)
m[0].metric(
    "Exchanges",
    f"{int(row['n']):,}",
    help=f"{fmt_share(row['share'])} of the clustered exchanges"
    + (" that pass the filter" if c.flt.active else ""),
)
m[1].metric(
    "Reward",
    fmt_float(row["reward_mean"]),
    help=f"95 % CI {fmt_ci(row['reward_ci'])}" if row["reward_ci"] is not None else None,
)
m[2].metric("Retry rate", fmt_share(row["retry_rate"]))
m[3].metric("Edit rate", fmt_share(row["edit_rate"]))
m[4].metric("Ended after", fmt_share(row["end_rate"]))
m[5].metric("Weakness", fmt_float(detail["weakness"]))
if report.get("reason"):
    st.warning(
        "Why it is weak: " + escape_markdown(str(report["reason"])), icon=":material/warning:"
    )
elif not report:
    # Exchanges that kept rewards from an earlier `score` order the clusters by reward.
    shell.empty_state("unreported" if table["reward_mean"].notna().any() else "reports")

main, side = st.columns([3, 2], gap="large")

with main:
    worst_tab, typical_tab, trend_tab = st.tabs(
        ["Worst exchanges", "Representative exchanges", "Over time"]
    )
    with worst_tab:
        worst = data.cluster_exchanges(
            c.url, c.version, c.run_id, picked, c.flt, c.scorer, "worst", 8
        )
        if not worst:
            st.caption("No exchange of this cluster passes the filter.")
        for i, exchange in enumerate(worst, start=1):
            exchange_block(exchange, index=i, expanded=i == 1)
    with typical_tab:
        typical = data.cluster_exchanges(
            c.url, c.version, c.run_id, picked, c.flt, c.scorer, "representative", 8
        )
        if not typical:
            st.caption("The clustering stored no representatives for this cluster.")
        for i, exchange in enumerate(typical, start=1):
            exchange_block(exchange, index=i, expanded=i == 1)
    with trend_tab:
        period = st.radio(
            "Per",
            ["auto", *PERIODS],
            horizontal=True,
            key="trend_period",
            label_visibility="collapsed",
        )
        trend = data.cluster_trend(
            c.url,
            c.version,
            c.run_id,
            picked,
            c.flt,
            c.scorer,
            None if period == "auto" else period,
        )
        if not trend["periods"]:
            st.caption(
                "No exchange of this cluster has a logged time (a log's "
                f"{spelled_time_keys()}), so there is nothing to show over time."
            )
        else:
            st.plotly_chart(charts.trend_chart(trend), width="stretch", key="trend_chart")
            undated = trend["undated"]
            st.caption(
                f"Exchanges and mean reward (bars: its 95 % interval) per {trend['period']} of "
                "their logged times"
                + (f" ({undated:,} with no logged time not shown)" if undated else "")
                + ". `convoscope trend` lists every topic this way, most worsened first."
            )

with side:
    st.subheader("Your notes")
    with st.form("rename", border=False):
        new_name = st.text_input("Name", value=detail["name"], max_chars=200, key=f"name_{picked}")
        if st.form_submit_button("Rename"):
            data.write(c.url, lambda e: annotate_cluster(e, picked, name=new_name))
            st.toast("Renamed")
            st.rerun()

    tags = detail["tags"]
    if tags:
        tag_cols = st.columns(min(len(tags), 4))
        for i, tag in enumerate(tags):
            if tag_cols[i % len(tag_cols)].button(
                f"✕ {safe_label(tag, 30)}", key=f"untag_{tag}", help="Remove this tag"
            ):
                data.write(c.url, lambda e, t=tag: remove_tag(e, "cluster", picked, t))
                st.rerun()
    else:
        st.caption("No tags yet.")
    with st.form("tag", clear_on_submit=True, border=False):
        new_tag = st.text_input("Add a tag", max_chars=100, placeholder="e.g. needs-instruction")
        if st.form_submit_button("Add tag") and new_tag.strip():
            data.write(c.url, lambda e: add_tag(e, "cluster", picked, new_tag.strip()))
            st.rerun()

    with st.form("note", border=False):
        # Keyed by cluster: the same box for every cluster with no note kept an unsaved note
        # typed on one, to be saved on the next.
        note = st.text_area("Note", value=detail["note"] or "", height=100, key=f"note_{picked}")
        if st.form_submit_button("Save note"):
            data.write(c.url, lambda e: annotate_cluster(e, picked, note=note))
            st.toast("Note saved")
            st.rerun()

    routing = report.get("routing")
    st.subheader("Routing")
    if routing:
        r = st.columns(2)
        r[0].metric("Best expert", one_line(str(routing.get("best_expert") or MISSING), 30))
        r[1].metric(
            "Predicted win rate",
            fmt_share(routing.get("predicted_win_rate")),
            delta=f"{100 * routing['gain']:+.1f} pts" if routing.get("gain") is not None else None,
            help="Gain: against the experts serving this cluster today",
        )
        served = routing.get("served_by") or {}
        if served:
            st.caption(
                "Served today by "
                + ", ".join(
                    f"{escape_markdown(str(k))} {fmt_share(v)}"
                    for k, v in sorted(served.items(), key=lambda kv: -kv[1])
                )
            )
        if routing.get("cheapest_within_tolerance"):
            rate, cost = routing.get("cheapest_win_rate"), routing.get("cheapest_cost")
            st.caption(
                "Cheapest expert within tolerance: "
                + escape_markdown(str(routing["cheapest_within_tolerance"]))
                + (f" (predicted win rate {fmt_share(rate)})" if rate is not None else "")
                + (f", cost {float(cost):g}" if cost is not None else "")
            )
    else:
        st.caption("No routing suggestion (needs battles or several experts).")

    board = report.get("leaderboard") or []
    if board:
        st.subheader("Expert leaderboard")
        st.dataframe(
            table_cells(
                pd.DataFrame(
                    {
                        "Rank": [line.get("rank") for line in board],
                        "Model": [line.get("model") for line in board],
                        "Elo": [line.get("elo") for line in board],
                        "95 % CI": [fmt_ci(line.get("ci"), 0) for line in board],
                        "Battles": [line.get("battles") for line in board],
                        "Predicted": [line.get("predicted_battles") for line in board],
                        "Tied with": [", ".join(line.get("tied_with") or []) for line in board],
                    }
                )
            ),
            hide_index=True,
            placeholder=MISSING,
            width="stretch",
            column_config={"Elo": st.column_config.NumberColumn(format="%.0f")},
        )
        if any(line.get("predicted_battles") for line in board):
            st.caption(
                "Bradley–Terry over the topic's judged battles and the win predictor's "
                "estimate, counted as the Predicted battles; a few dozen judged battles "
                "outweigh it."
            )

    if c.scorer:
        values = data.reward_values(c.url, c.version, c.run_id, picked, c.flt, c.scorer)
        if len(values):
            st.subheader("Reward distribution")
            histogram = go.Figure(
                go.Histogram(x=values, nbinsx=30, marker={"color": "#d9534f"}, name="cluster")
            )
            histogram.add_vline(x=float(np.mean(values)), line_dash="dash")
            histogram.update_layout(
                height=220,
                margin={"l": 0, "r": 0, "t": 10, "b": 0},
                xaxis_title="reward",
                yaxis_title="exchanges",
                bargap=0.05,
            )
            st.plotly_chart(histogram, width="stretch", key="reward_hist")
