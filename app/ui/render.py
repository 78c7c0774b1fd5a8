"""Showing untrusted log text: as text, never as markup.

Prompts, responses, cluster names and keywords all come from logs that anyone could have
typed into a chat box. Streamlit renders Markdown in titles, captions, expander labels and
`st.markdown` (links, images that fetch remote URLs, colour directives, LaTeX), and Plotly
hover labels accept a subset of HTML. So text from the logs is shown with `st.text` (no
interpretation at all), Markdown-escaped when it must sit in a Markdown context, and
HTML-escaped in hover labels. Nothing here ever passes `unsafe_allow_html`.

Escaping is not enough for links: Streamlit's GitHub-flavoured Markdown turns bare
`http://…`, `www.…` and `name@host.tld` in plain text into live links, escapes or not. So
escaped text also gets an invisible word joiner (U+2060) where those patterns would start.
Bidirectional controls (U+202E and kin) would let text display as something else ("evil"
reversed reads "live"), so they are shown as visible `\\u202e`-style codes instead.
Table cells a spreadsheet would run as formulas are quoted: `st.dataframe`'s built-in CSV
download (which Streamlit cannot switch off per table) would hand them to Excel as formulas.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import streamlit as st

from ingest.exported import spreadsheet_safe

# Every ASCII punctuation character CommonMark lets a backslash escape, plus ':' (Streamlit's
# `:red[...]` directives and `:emoji:` codes) and '$' (LaTeX).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&\"'=^@%;,?/])")
_WHITESPACE = re.compile(r"\s+")
# Where GFM's autolink literals start: a scheme's "://", "www." and an e-mail's "@" (the
# domain after it must begin with a letter or digit). A word joiner there breaks the match.
_AUTOLINK_START = re.compile(r"(?<=:)(?=//)|(?i:(?<=www)(?=\.))|(?<=@)")
_WORD_JOINER = "\u2060"
# Bidirectional embeddings, overrides, isolates and marks: invisible, yet they reorder what
# is shown around them.
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

ROLE_AVATARS = {
    "user": "user",
    "assistant": "assistant",
    "system": ":material/settings:",
    "tool": ":material/build:",
}


def escape_markdown(text: str) -> str:
    """Text that renders literally inside any Streamlit Markdown context: markup escaped, and
    no URL or e-mail address in it autolinked."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _AUTOLINK_START.sub(_WORD_JOINER, text))


def visible_controls(text: str) -> str:
    """Bidirectional control characters spelled out (U+202E → `\\u202e`), so text cannot
    disguise itself by reordering what follows."""
    return _BIDI_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def one_line(text: str | None, limit: int = 120) -> str:
    """Whitespace collapsed, bidi controls made visible, cut to `limit` characters (with
    "…")."""
    flat = visible_controls(_WHITESPACE.sub(" ", text or "").strip())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def safe_label(text: str | None, limit: int = 120) -> str:
    """For Markdown-rendering labels (expanders, titles, captions): one line, escaped."""
    return escape_markdown(one_line(text, limit))


def hover_text(text: str | None, limit: int = 160) -> str:
    """For Plotly hover labels: one line, HTML-escaped (Plotly renders a subset of HTML)."""
    return html.escape(one_line(text, limit), quote=True)


def table_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` to show with `st.dataframe`: text cells with bidi controls made
    visible and, where a spreadsheet would run them as formulas, quoted as the Export page's
    "Safe for spreadsheets" does, since the table's own CSV download cannot be turned off."""
    shown = frame.copy()
    for name in shown.columns:
        if shown[name].dtype == object or pd.api.types.is_string_dtype(shown[name]):
            shown[name] = shown[name].map(
                lambda v: spreadsheet_safe(visible_controls(v)) if isinstance(v, str) else v
            )
    return shown


# What the UI shows for an unknown value (NULL signal, no CI), in text and in tables alike.
MISSING = "—"


def fmt_float(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{float(value):.{digits}f}"


def fmt_share(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{100 * float(value):.1f} %"


# Shares and rates in tables, as `fmt_share` writes them elsewhere: Streamlit's "percent"
# format drops trailing zeros, so "2.8%" stood beside "3.74%" and "28%" in one column.
PERCENT_FORMAT = "%.1f %%"


def as_percent(values: pd.Series) -> pd.Series:
    """Shares or rates (0–1; None unknown) as the percentages a PERCENT_FORMAT column shows."""
    return pd.to_numeric(values, errors="coerce") * 100


def fmt_ci(ci: Any, digits: int = 2) -> str:
    """[lo, hi] → "lo – hi"; nothing known → "—". A negative bound takes the minus sign
    (U+2212), not a hyphen: `table_cells` quotes a cell that starts with "-" for spreadsheets,
    and every weak cluster's interval showed as '-2.65 – -1.75."""
    if not ci or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return MISSING
    lo, hi = (f"{float(bound):.{digits}f}".replace("-", "\u2212") for bound in ci)
    return f"{lo} – {hi}"


def signals_line(row: Mapping[str, Any]) -> str:
    """The exchange's signals in a few words (numbers and fixed words only: safe to render)."""
    parts = []
    if row.get("reward") is not None:
        parts.append(f"reward {fmt_float(row['reward'])}")
    for key, word in (
        ("retried", "retried"),
        ("edited", "edited"),
        ("deleted", "deleted"),
        ("ended_conversation", "ended the conversation"),
    ):
        if row.get(key):
            parts.append(word)
    if row.get("rating") is not None:
        parts.append(f"rated {fmt_float(row['rating'], 1)}")
    if row.get("thumbs") is not None:
        parts.append("thumbs up" if row["thumbs"] > 0 else "thumbs down")
    if row.get("user_turns_after") is not None:
        parts.append(f"{int(row['user_turns_after'])} user turns after")
    return " · ".join(parts) or "no signals"


def chat_turns(row: Mapping[str, Any], *, context_turns: int = 4) -> None:
    """An exchange as chat bubbles: the last few context turns, the prompt, the response."""
    context = row.get("context") or "[]"
    messages = json.loads(context) if isinstance(context, str) else list(context)
    if len(messages) > context_turns:
        st.caption(f"{len(messages) - context_turns} earlier messages not shown")
    for message in messages[-context_turns:]:
        role = str(message.get("role") or "user")
        _bubble(role if role in ROLE_AVATARS else "user", str(message.get("content") or ""))
    _bubble("user", str(row.get("prompt") or ""))
    _bubble("assistant", str(row.get("response") or "") or "(no response stored)")


def _bubble(role: str, text: str) -> None:
    with st.chat_message(
        role if role in ("user", "assistant") else "user", avatar=ROLE_AVATARS.get(role)
    ):
        st.text(visible_controls(text))


def exchange_block(row: Mapping[str, Any], *, index: int, expanded: bool = False) -> None:
    """One exchange in an expander: label is its escaped prompt, then the chat and signals."""
    label = f"{index}. {safe_label(row.get('prompt'), 90)}"
    with st.expander(label, expanded=expanded):
        model = safe_label(row.get("model") or "unknown model", 60)
        st.caption(f"{model} · {signals_line(row)}")
        chat_turns(row)
        if row.get("feedback_text"):
            st.caption("The user's feedback on this conversation:")
            # st.text: log text is never rendered as markup
            st.text(visible_controls(str(row["feedback_text"])))


def distinct_labels(
    labels: Sequence[str], fuller: Sequence[str], *, taken: Iterable[str] = ()
) -> list[str]:
    """Labels a Plotly chart draws one trace, row or column each: it draws equal labels as one,
    over each other. A label shown for more than one item (two topics named alike, two experts
    whose names begin alike), or one of `taken`, becomes that item's fuller label."""
    counts = Counter([*labels, *taken])
    return [f if counts[label] > 1 else label for label, f in zip(labels, fuller, strict=True)]


def option_labels(ids: Sequence[str], names: Mapping[str, str], limit: int) -> dict[str, str]:
    """One-line labels for a selectbox or multiselect of clusters, by id, all distinct.
    Streamlit hands back the label the browser sends and maps it to the last option labelled
    so: two clusters named alike (a group often takes its weakest topic's name) made a pick
    of one select the other. A shared label is followed by the cluster's id."""
    labels = [one_line(names.get(cid, cid), limit) for cid in ids]
    fuller = [f"{label} ({cid})" for label, cid in zip(labels, ids, strict=True)]
    return dict(zip(ids, distinct_labels(labels, fuller), strict=True))
