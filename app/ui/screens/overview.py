"""Overview: headline figures, the clusters weakest first, their groups weakest first, and
the topic map."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import data, shell
from app.ui.render import (
    MISSING,
    PERCENT_FORMAT,
    as_percent,
    fmt_ci,
    fmt_float,
    fmt_share,
    safe_label,
    table_cells,
)

c = shell.ctx()
st.title("Overview")
shell.filter_note(c.flt)

figures = data.overview(c.url, c.version, c.run_id, c.flt, c.scorer)
if not figures["exchanges"] and not c.flt.active:
    shell.empty_state("exchanges")
    st.stop()

cols = st.columns(6)
cols[0].metric("Exchanges", f"{figures['exchanges']:,}")
cols[1].metric("Conversations", f"{figures['conversations']:,}")
cols[2].metric(
    "Models",
    f"{figures['models']:,}" if figures["models"] or c.flt.active else "—",
    help=None if figures["models"] or c.flt.active else "The logs name no model",
)
# Under a filter, the topics its exchanges fall in (those the cluster table lists), not the run's.
table = data.cluster_table(c.url, c.version, c.run_id, c.flt, c.scorer) if c.run_id else None
cols[3].metric(
    "Clusters",
    f"{len(table) if table is not None and c.flt.active else figures['clusters']:,}",
    help=(
        "Topics of the latest clustering run holding a filtered exchange"
        if c.flt.active
        else "Topics of the latest clustering run"
    )
    + (f"; {fmt_share(figures['assigned_share'])} of exchanges assigned" if c.run_id else ""),
)
cols[4].metric(
    "Mean reward",
    fmt_float(figures["reward_mean"]),
    help=(
        f"Over every exchange the scores cover, unassigned ones included (a topic's 'why' "
        f"compares it with the clustered mean). Scorer: {c.scorer}"
        if c.scorer
        else "Run `convoscope score` to get rewards"
    ),
)
cols[5].metric("Retry rate", fmt_share(figures["retry_rate"]))

if c.run_id is None or table is None:
    shell.empty_state("clusters")
    st.stop()

if table.empty:
    st.info("No cluster holds an exchange that passes the filter.", icon=":material/info:")
    st.stop()
ranked = table["weakness"].notna().any()  # reports exist: `score` ran on this clustering
rewarded = table["reward_mean"].notna().any()  # exchanges carry rewards from an earlier one
if not ranked and not c.flt.active:
    shell.empty_state("unreported" if rewarded else "reports")
elif ranked and (stale := data.stale_reports(c.url, c.version, c.run_id)):
    st.warning(f"Stale ranking: {stale}.", icon=":material/history:")
new_rows, unscored = data.behind(c.url, c.version, c.run_id, c.scorer)
if new_rows:
    st.info(
        f"{new_rows:,} exchanges came after this clustering and are in no topic yet: run "
        "`convoscope assign` to place them in these topics (no refit, ids kept).",
        icon=":material/schedule:",
    )
if unscored:
    st.info(
        f"{unscored:,} exchanges have no reward yet: run `convoscope score reward apply` to "
        "score them with the current model.",
        icon=":material/schedule:",
    )

if c.scorer:
    period, latest, worse = data.worsened(c.url, c.version, c.run_id, c.flt, c.scorer)
    if worse:
        listed = "; ".join(
            f"{safe_label(t['name'], 40)} ({t['reward_change']:+.2f})" for t in worse[:3]
        )
        more = f", and {len(worse) - 3} more" if len(worse) > 3 else ""
        st.warning(
            f"Worse in the {period} of {latest} than the {period} before, by more than chance "
            f"explains across the topics: {listed}{more}. Each topic's page charts it "
            "(*Over time*); `convoscope trend` lists every topic this way.",
            icon=":material/trending_down:",
        )

# Weakness ranks the whole run's traffic: a filtered slice is ordered by its own mean reward.
SLICE_NOTE = (
    "Under the filter: lowest filtered reward first. Weakness, why and the CI rank the whole "
    "run, so they are left out here."
)
if c.flt.active or (rewarded and not ranked):
    st.subheader("Clusters, lowest reward first")
else:
    st.subheader("Clusters, weakest first" if ranked else "Clusters, largest first")
weakest = table.iloc[0]
left, right = st.columns([3, 1], vertical_alignment="center")
if c.flt.active:
    left.caption(f"Select a row to open its cluster. {SLICE_NOTE}")
elif ranked:
    left.caption(
        "Select a row to open its cluster. Weakness combines low reward with retries, edits "
        "and abandoned conversations; the reason column says which weighed most."
    )
else:
    left.caption("Select a row to open its cluster.")
if right.button(
    f"Open {'weakest' if ranked or rewarded else 'largest'}: {safe_label(weakest['name'], 40)}",
    type="primary",
    key="open_weakest",
    width="stretch",
):
    shell.jump_to_cluster(weakest["id"])

# The columns that rank and explain a topic, sized to fit a 1,400 px window without scrolling
# sideways (with every column it was 1,800 px wide); keywords, retry and end rates and tags are
# on the topic's own page, which selecting its row opens. Where the log names experts, where
# to route each topic is what its routing owner reads here, so the best expert and the gain
# stay, and the other text columns narrow for them.
routed = bool(table["best_expert"].notna().any())
shown = pd.DataFrame(
    {
        "Cluster": table["name"],
        "Group": table["parent"],
        "Size": table["n"],
        "Share": as_percent(table["share"]),
        "Reward": table["reward_mean"],
        "Reward 95 % CI": table["reward_ci"].map(fmt_ci),
        "Weakness": table["weakness"],
        **({"Best expert": table["best_expert"], "Gain": table["gain"]} if routed else {}),
        "Why": table["reason"],
    }
)
max_share = float(max(table["share"].max(), 1e-9)) * 100
selection = st.dataframe(
    table_cells(shown),
    hide_index=True,
    placeholder=MISSING,
    width="stretch",
    height=min(38 + 35 * len(shown), 420),
    on_select="rerun",
    selection_mode="single-row",
    key="cluster_table",
    column_config={
        "Cluster": st.column_config.TextColumn(width=160 if routed else 190, pinned=True),
        "Group": st.column_config.TextColumn(width=95 if routed else 120),
        "Size": st.column_config.NumberColumn(format="%d", width=55),
        "Share": st.column_config.ProgressColumn(
            format=PERCENT_FORMAT, min_value=0.0, max_value=max_share, width=80
        ),
        "Reward": st.column_config.NumberColumn(format="%.2f", width=60),
        "Reward 95 % CI": st.column_config.TextColumn(width=110),
        "Weakness": st.column_config.ProgressColumn(
            format="%.2f",
            min_value=0.0,
            max_value=float(table["weakness"].fillna(0.0).max() or 1.0),
            width=80,
        ),
        "Best expert": st.column_config.TextColumn(width=110),
        "Gain": st.column_config.NumberColumn(
            format="%+.2f", width=55, help="Predicted win-rate gain of routing to the best expert"
        ),
        "Why": st.column_config.TextColumn(width=100 if routed else 190),
    },
)
st.caption(
    "Keywords, retry and end rates"
    + ("" if routed else ", the best expert to route to")
    + " and tags: on each cluster's page (select its row)."
)
rows = selection.selection.rows if selection else []
if rows:
    shell.jump_to_cluster(table.iloc[rows[0]]["id"])

# Groups of related topics, scored over all their exchanges: a broad area that goes badly
# shows here as one line even when each of its topics alone looks only a little weak.
groups = data.group_table(c.url, c.version, c.run_id, c.flt, c.scorer)
if not groups.empty:
    # Ordered as `views.group_table` sorts: by weakness when `score` ranked this clustering,
    # else by mean reward (a filter, or a clustering newer than the last score), else by size.
    groups_ranked = groups["weakness"].notna().any()
    groups_rewarded = groups["reward_mean"].notna().any()
    if c.flt.active:
        st.subheader("Groups, lowest reward first")
        st.caption(f"Each group pools the exchanges of its topics. {SLICE_NOTE}")
    elif groups_ranked:
        st.subheader("Groups, weakest first")
        st.caption(
            "Each group pools the exchanges of its topics: its reward CI and weakness are "
            "computed over them the same way as a topic's, and its weakest topics are named."
        )
    else:
        st.subheader("Groups, lowest reward first" if groups_rewarded else "Groups, largest first")
        st.caption(
            "Each group pools the exchanges of its topics. This clustering has no "
            "`convoscope score` report yet, so there is no weakness, CI or weakest topic."
        )
    # What ranks and explains a group, sized to fit a 1,400 px window as the cluster table
    # does (with every column it was about 1,875 px wide and scrolled sideways). Its topics
    # are the cluster table's rows naming it; its retry, edit and end rates are one click away.
    st.dataframe(
        table_cells(
            pd.DataFrame(
                {
                    "Group": groups["name"],
                    "Topics": groups["topics"],
                    "Size": groups["n"],
                    "Share": as_percent(groups["share"]),
                    "Reward": groups["reward_mean"],
                    "Reward 95 % CI": groups["reward_ci"].map(fmt_ci),
                    "Weakness": groups["weakness"],
                    "Why": groups["reason"],
                    "Weakest topics": groups["weakest_topics"].map(lambda t: "; ".join(t)),
                }
            )
        ),
        hide_index=True,
        placeholder=MISSING,
        width="stretch",
        key="group_table",
        column_config={
            "Group": st.column_config.TextColumn(width=170, pinned=True),
            "Topics": st.column_config.NumberColumn(format="%d", width=55),
            "Size": st.column_config.NumberColumn(format="%d", width=55),
            "Share": st.column_config.ProgressColumn(
                format=PERCENT_FORMAT, min_value=0.0, max_value=100.0, width=80
            ),
            "Reward": st.column_config.NumberColumn(format="%.2f", width=60),
            "Reward 95 % CI": st.column_config.TextColumn(width=110),
            "Weakness": st.column_config.ProgressColumn(
                format="%.2f",
                min_value=0.0,
                max_value=float(groups["weakness"].fillna(0.0).max() or 1.0),
                width=80,
            ),
            "Why": st.column_config.TextColumn(width=150),
            "Weakest topics": st.column_config.TextColumn(width=175),
        },
    )
    st.caption(
        "A group's topics are the cluster table's rows that name it as their group (select "
        "one to open it); its retry, edit and end rates are below."
    )
    with st.expander("Retry, edit and end rates of each group"):
        st.dataframe(
            table_cells(
                pd.DataFrame(
                    {
                        "Group": groups["name"],
                        "Retry": as_percent(groups["retry_rate"]),
                        "Edited": as_percent(groups["edit_rate"]),
                        "Ended": as_percent(groups["end_rate"]),
                    }
                )
            ),
            hide_index=True,
            placeholder=MISSING,
            width="content",
            key="group_rates",
            column_config={
                "Group": st.column_config.TextColumn(width=240),
                "Retry": st.column_config.NumberColumn(format=PERCENT_FORMAT, width=80),
                "Edited": st.column_config.NumberColumn(format=PERCENT_FORMAT, width=80),
                "Ended": st.column_config.NumberColumn(format=PERCENT_FORMAT, width=80),
            },
        )

st.subheader("Topic map")
color_by = st.segmented_control(
    "Colour by", ["Cluster", "Reward", "Model"], default="Cluster", key="map_colour"
)
points, total = data.map_points(c.url, c.version, c.run_id, c.flt, c.scorer)
if points.empty:
    st.info("This clustering run stored no 2-D layout.", icon=":material/info:")
    st.stop()
if total > len(points):
    st.caption(f"Showing a uniform sample of {len(points):,} of {total:,} exchanges.")

figure = data.topic_map(c.url, c.version, c.run_id, c.flt, c.scorer, color_by or "Cluster")
st.plotly_chart(figure, width="stretch", key="topic_map")
st.caption(
    f"{len(points):,} points · hover a point to read its prompt · "
    "drag to zoom, double-click to reset"
)
