"""Plotly figures the pages show, built from cached frames (and cached themselves: building a
100K-point figure costs about a second, most of it Plotly validating its traces).

Labels that come from the logs (prompts, cluster names, model names) are HTML-escaped here,
because Plotly renders a subset of HTML in hover labels and legends.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from app.ui.render import hover_text
from scoring.trend import Z95

MAX_LEGEND = 60  # clusters beyond this are drawn but not listed in the legend
MAP_HEIGHT = 560  # px of the map itself; the legend below it adds its rows
# The legend lies under the map in columns of this width (a 40-character label fits), so
# every topic listed shows at once: beside the map it listed about 24 of a demo's 33 topics
# at 1,400 px and scrolled the rest out of sight.
LEGEND_ENTRY_PX = 250
LEGEND_ROW_PX = 20
LEGEND_COLUMNS = 3  # per row at the narrowest width planned for (about 900 px of page)


def topic_map(points: pd.DataFrame, color_by: str) -> go.Figure:
    """The 2-D topic map as WebGL scatter: one trace per cluster or model, or one trace
    coloured by reward. `points` carries x, y, cluster, model, reward and an escaped `hover`."""
    figure = go.Figure()
    listed = 0
    if color_by == "Reward" and points["reward"].notna().any():
        figure.add_trace(
            go.Scattergl(
                x=points["x"],
                y=points["y"],
                mode="markers",
                marker={
                    "size": 4,
                    "color": points["reward"],
                    "colorscale": "RdYlGn",
                    "colorbar": {"title": "reward"},
                    "opacity": 0.75,
                },
                text=points["hover"],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    else:
        key = "model" if color_by == "Model" else "cluster"
        groups = points[key].fillna("unknown")
        for rank, name in enumerate(groups.value_counts().index):
            mask = (groups == name).to_numpy()
            label = hover_text(name, 40)
            figure.add_trace(
                go.Scattergl(
                    x=points["x"][mask],
                    y=points["y"][mask],
                    mode="markers",
                    name=label,
                    marker={"size": 4, "opacity": 0.75},
                    text=points["hover"][mask],
                    hovertemplate="%{text}<extra>" + label + "</extra>",
                    showlegend=rank < MAX_LEGEND,
                )
            )
        listed = min(groups.nunique(), MAX_LEGEND)
    figure.update_layout(
        height=MAP_HEIGHT + _legend_rows(listed) * LEGEND_ROW_PX,
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
        xaxis={"visible": False},
        yaxis={"visible": False},
        legend=_legend_below(),
        hoverlabel={"align": "left"},
        plot_bgcolor="rgba(0,0,0,0)",
    )
    return figure


def _legend_rows(listed: int) -> int:
    """Rows the legend below the map takes for `listed` entries (rounded up)."""
    return -(-listed // LEGEND_COLUMNS)


def _legend_below() -> dict[str, object]:
    """A legend in fixed-width columns under the map: it wraps into as many columns as the
    page's width holds, and the figure grows by its rows, so no entry scrolls out of view."""
    return {
        "orientation": "h",
        "yanchor": "top",
        "y": -0.01,
        "xanchor": "left",
        "x": 0,
        "entrywidth": LEGEND_ENTRY_PX,
        "itemsizing": "constant",
        "font": {"size": 11},
    }


def trend_chart(trend: dict[str, Any]) -> go.Figure:
    """A topic over time: its exchanges per period as bars, its mean reward as a line on a
    second axis (a gap where a period has no scored exchange) with each mean's 95 % interval
    as an error bar, so a swing over a handful of exchanges looks as unsure as it is."""
    by_start = {row["start"]: row for row in trend["rows"]}
    periods = trend["periods"]
    counts = [by_start[p]["exchanges"] if p in by_start else 0 for p in periods]
    rewards = [by_start[p]["reward_mean"] if p in by_start else None for p in periods]
    margins = [_margin(by_start.get(p)) for p in periods]
    figure = go.Figure(
        go.Bar(x=periods, y=counts, name="exchanges", marker={"color": "#b0c4de"}, yaxis="y")
    )
    if any(r is not None for r in rewards):
        figure.add_trace(
            go.Scatter(
                x=periods,
                y=rewards,
                name="mean reward",
                mode="lines+markers",
                connectgaps=False,
                line={"color": "#d9534f"},
                error_y={"type": "data", "array": margins, "thickness": 1, "width": 3},
                yaxis="y2",
            )
        )
    figure.update_layout(
        height=260,
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
        yaxis={"title": "exchanges"},
        yaxis2={"title": "mean reward", "overlaying": "y", "side": "right", "showgrid": False},
        xaxis={"type": "category", "title": f"{trend['period']} of (UTC)"},
        legend={"orientation": "h", "y": 1.12, "x": 0},
        bargap=0.2,
    )
    return figure


def _margin(row: dict[str, Any] | None) -> float | None:
    """Half the 95 % interval of a period's mean reward (None below two scored exchanges)."""
    if row is None or row["reward_sd"] is None:
        return None
    return Z95 * row["reward_sd"] / math.sqrt(row["scored"])
