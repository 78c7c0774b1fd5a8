"""The Replay page's comparison of two runs: the opened run's answers against another run's
on the inputs both answered, as `replay report RUN --against OTHER` sets them. Apart from the
page script, which is long enough with running, judging and reading one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from app.ui import data
from app.ui.render import (
    MISSING,
    PERCENT_FORMAT,
    escape_markdown,
    fmt_ci,
    fmt_float,
    fmt_share,
    safe_label,
    table_cells,
    visible_controls,
)

NO_RUN = ""  # the comparison picker's "none": run ids are never empty


def comparison(
    c: data.Context,
    opened: str,
    by_id: Mapping[str, dict[str, Any]],
    run_labels: Mapping[str, str],
    names: Mapping[str, str],
    shown: int,
) -> None:
    """This run's answers against another run's on the inputs both answered, as `replay
    report RUN --against OTHER` sets them: a second instruction version or another model read
    only against the logged originals, never against the last try. The inputs one run alone
    answered are left out of the figures, and listed (`shown` of each at most). `by_id` and
    `run_labels` are the page's runs, newest first, and their picker labels; `names` the
    shown clustering's topic names."""
    sharing = data.runs_sharing_inputs(c.url, opened)
    others = [rid for rid in by_id if rid in sharing]  # newest first, as "Open a run"
    if not others:
        return
    options = [NO_RUN, *others]
    if st.session_state.get("replay_against") not in options:  # another run opened
        st.session_state["replay_against"] = NO_RUN
    against: str = st.selectbox(
        "Compare with another run",
        options,
        key="replay_against",
        format_func=lambda rid: "None" if rid == NO_RUN else run_labels[rid],
        help="The runs that replayed some of this run's inputs. Their answers are paired "
        "input by input with this run's, as `convoscope replay report RUN --against OTHER` "
        "does.",
    )
    if against == NO_RUN:
        return
    other = by_id[against]
    done = (by_id[opened]["counts"]["done"], other["counts"]["done"])
    compared, only_this, only_that = data.run_comparison(
        c.url, c.version, opened, against, done, c.run_id, shown
    )
    left_out = [
        f"{n:,} answered by {who} alone"
        for n, who in ((compared.only_run, "this run"), (compared.only_against, "that run"))
        if n
    ]
    st.caption(
        f"Against run `{escape_markdown(against)}` ({safe_label(other['model'], 60)}): "
        f"{compared.shared:,} inputs both answered"
        + (f" ({', '.join(left_out)}: left out)" if left_out else "")
    )
    o = compared.overall
    if o is not None:
        m = st.columns(4)
        m[0].metric("That run's reward", fmt_float(o.mean_original))
        m[1].metric("This run's reward", fmt_float(o.mean_new), delta=f"{o.mean_diff:+.2f}")
        m[2].metric("Win rate of this run", fmt_share(o.win_rate))
        m[3].metric("Paired inputs", f"{o.n:,}")
        ci = (
            "one pair: too few for a 95 % CI"
            if o.ci_low is None or o.ci_high is None
            else f"95 % CI {o.ci_low:+.2f} to {o.ci_high:+.2f}"
        )
        st.caption(
            f"Reward difference (this run − that run) {o.mean_diff:+.2f}, {ci}; this run wins "
            f"{o.wins:,}, ties {o.ties:,} and loses {o.losses:,} of {o.n:,}."
        )
    elif compared.shared:
        st.caption(
            "These answers have no reward yet: run `convoscope score` to score them, then "
            "compare here."
        )
    if compared.per_cluster:
        clusters = list(compared.per_cluster)
        diffs = list(compared.per_cluster.values())
        st.caption("Per topic of the clustering shown (the inputs' topics):")
        st.dataframe(
            table_cells(
                pd.DataFrame(
                    {
                        "Cluster": [names.get(cid, cid) for cid in clusters],
                        "Pairs": [d.n for d in diffs],
                        "That run": [d.mean_original for d in diffs],
                        "This run": [d.mean_new for d in diffs],
                        "Difference": [d.mean_diff for d in diffs],
                        "Difference 95 % CI": [fmt_ci([d.ci_low, d.ci_high]) for d in diffs],
                        "Wins": [d.wins for d in diffs],
                        "Win rate": [100 * d.win_rate for d in diffs],
                    }
                )
            ),
            hide_index=True,
            placeholder=MISSING,
            key="replay_against_clusters",
            column_config={
                "Cluster": st.column_config.TextColumn(width=240),
                "Pairs": st.column_config.NumberColumn(format="%d"),
                "That run": st.column_config.NumberColumn(format="%.2f"),
                "This run": st.column_config.NumberColumn(format="%.2f"),
                "Difference": st.column_config.NumberColumn(format="%+.2f"),
                "Wins": st.column_config.NumberColumn(format="%d"),
                "Win rate": st.column_config.NumberColumn(format=PERCENT_FORMAT),
            },
        )
    for alone, n, who in (
        (only_this, compared.only_run, "this run"),
        (only_that, compared.only_against, "that run"),
    ):
        if not n:
            continue
        with st.expander(f"{n:,} input{'s' * (n != 1)} answered by {who} alone (left out)"):
            if n > len(alone):
                st.caption(f"Showing {len(alone):,} of {n:,}.")
            for item in alone:
                st.text(visible_controls(item["prompt"] or f"(no prompt: {item['id']})"))
