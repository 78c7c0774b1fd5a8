"""Showing untrusted log text: as text, never as markup.

Prompts, responses, cluster names and keywords all come from logs that anyone could have
typed into a chat box. Streamlit renders Markdown in titles, captions, expander labels and
`st.markdown` (links, images that fetch remote URLs, colour directives, LaTeX), and Plotly
hover labels accept a subset of HTML. So text from the logs is shown with `st.text` (no
interpretation at all), Markdown-escaped when it must sit in a Markdown context, and
HTML-escaped in hover labels. Nothing here ever passes `unsafe_allow_html`.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import streamlit as st

# Every ASCII punctuation character CommonMark lets a backslash escape, plus ':' (Streamlit's
# `:red[...]` directives and `:emoji:` codes) and '$' (LaTeX).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&\"'=^@%;,?/])")
_WHITESPACE = re.compile(r"\s+")

ROLE_AVATARS = {
    "user": "user",
    "assistant": "assistant",
    "system": ":material/settings:",
    "tool": ":material/build:",
}


def escape_markdown(text: str) -> str:
    """Text that renders literally inside any Streamlit Markdown context."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def one_line(text: str | None, limit: int = 120) -> str:
    """Whitespace collapsed and cut to `limit` characters (with "…")."""
    flat = _WHITESPACE.sub(" ", text or "").strip()
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def safe_label(text: str | None, limit: int = 120) -> str:
    """For Markdown-rendering labels (expanders, titles, captions): one line, escaped."""
    return escape_markdown(one_line(text, limit))


def hover_text(text: str | None, limit: int = 160) -> str:
    """For Plotly hover labels: one line, HTML-escaped (Plotly renders a subset of HTML)."""
    return html.escape(one_line(text, limit), quote=True)


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


def fmt_ci(ci: Any, digits: int = 2) -> str:
    """[lo, hi] → "lo – hi"; nothing known → "—"."""
    if not ci or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return MISSING
    return f"{float(ci[0]):.{digits}f} – {float(ci[1]):.{digits}f}"


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
        st.text(text)


def exchange_block(row: Mapping[str, Any], *, index: int, expanded: bool = False) -> None:
    """One exchange in an expander: label is its escaped prompt, then the chat and signals."""
    label = f"{index}. {safe_label(row.get('prompt'), 90)}"
    with st.expander(label, expanded=expanded):
        model = safe_label(row.get("model") or "unknown model", 60)
        st.caption(f"{model} · {signals_line(row)}")
        chat_turns(row)
        if row.get("feedback_text"):
            st.caption("The user's feedback on this conversation:")
            st.text(str(row["feedback_text"]))  # st.text: log text is never rendered as markup
