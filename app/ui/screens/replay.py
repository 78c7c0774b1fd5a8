"""Replay: rewrite a cluster's instruction, send its saved inputs to a model with it, and read
the original and new answers side by side. Each run saves the instruction as the cluster's next
version, linked to the run, so the best-scoring version can ship with the routing table.

The API key never reaches the page: the user names the environment variable that holds it, and
the replay reads it at call time.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import openai
import sqlalchemy as sa
import streamlit as st

from app.ui import data, run_comparison, shell
from app.ui.render import (
    distinct_labels,
    escape_markdown,
    fmt_float,
    fmt_share,
    one_line,
    option_labels,
    safe_label,
    visible_controls,
)
from ingest.replay import ReplayConfig, ReplayError, selection_text
from scoring.judge import JudgeConfig, JudgeError

PAIRS_SHOWN = 50  # side-by-side answers drawn at once; the rest are counted

c = shell.ctx()
st.title("Replay")
st.caption(
    "Send a cluster's saved inputs to a model with a rewritten instruction, then compare the "
    "new answers with the originals. Sidebar filters do not apply here: a replay takes the "
    "whole cluster."
)
if c.run_id is None:
    shell.empty_state(
        "exchanges"
        if not data.overview(c.url, c.version, None, c.flt, None)["exchanges"]
        else "clusters"
    )
    st.stop()

names = data.cluster_names(c.url, c.version, c.run_id)
table = data.cluster_table(c.url, c.version, c.run_id, c.flt, c.scorer)
weakest_first = [cid for cid in table["id"] if cid in names] if not table.empty else []
ids = weakest_first + sorted(set(names) - set(weakest_first), key=lambda cid: names[cid].lower())
labels = option_labels(ids, names, 80)
if st.session_state.get("replay_cluster") not in names:
    picked_before = st.session_state.get(shell.PICK_KEY)
    st.session_state["replay_cluster"] = picked_before if picked_before in names else ids[0]
picked: str = st.selectbox(
    f"Cluster ({shell.cluster_order(table)})" if weakest_first else "Cluster",
    ids,
    key="replay_cluster",
    format_func=labels.__getitem__,
)


def _version_label(row: dict[str, Any]) -> str:
    """Numbers and dates only: safe in an expander label."""
    parts = [f"Version {row['version']}", f"{row['created_at']:%Y-%m-%d %H:%M}"]
    if row.get("mean_reward") is not None:
        parts.append(f"mean reward {fmt_float(row['mean_reward'])}")
    if row.get("original_mean_reward") is not None:
        parts.append(f"original answers {fmt_float(row['original_mean_reward'])}")
    return " · ".join(parts)


def _versions_list(versions: list[dict[str, Any]]) -> None:
    """The cluster's saved instructions, newest first (drawn after a run, so it lists the
    version that run just saved)."""
    st.subheader("Instruction versions")
    if not versions:
        st.caption("No saved instruction for this cluster yet: the first run saves version 1.")
    for i, row in enumerate(versions):
        with st.expander(_version_label(row), expanded=i == 0):
            st.text(visible_controls(row["text"]))
            if row.get("replay_run_id"):
                st.caption(f"Replay run `{escape_markdown(row['replay_run_id'])}`")


versions = data.instruction_versions(c.url, picked)
form_side, versions_side = st.columns([3, 2], gap="large")

with form_side:
    with st.form("replay_form", border=False):
        instruction = st.text_area(
            "Instruction (system message)",
            value=versions[0]["text"] if versions else "",
            height=180,
            key=f"replay_instruction_{picked}",
            help="Replaces the inputs' own system messages. Leave empty to keep them.",
        )
        left, right = st.columns(2)
        model = left.text_input("Model", key="replay_model", placeholder="gpt-4o-mini")
        base_url = right.text_input(
            "Base URL",
            key="replay_base_url",
            placeholder="http://127.0.0.1:8000/v1",
            help="Any OpenAI-compatible chat completions endpoint.",
        )
        key_env = left.text_input(
            "API key variable",
            value="OPENAI_API_KEY",
            key="replay_key_env",
            help="The environment variable holding the key; the key itself is never shown or "
            "stored.",
        )
        sample = right.number_input(
            "Sample size", min_value=1, max_value=100_000, value=20, step=10, key="replay_sample"
        )
        concurrency = left.number_input(
            "Concurrency", min_value=1, max_value=256, value=8, key="replay_concurrency"
        )
        submitted = st.form_submit_button("Run replay", type="primary", key="replay_run")

    if key_env.strip() and not os.environ.get(key_env.strip()):
        st.caption(
            f"{escape_markdown(key_env.strip())} is not set: a placeholder key is sent "
            "(enough for local servers)."
        )

    if submitted:
        if not model.strip() or not base_url.strip().startswith(("http://", "https://")):
            st.error("Give a model name and an http(s) base URL first.", icon=":material/error:")
        else:
            with st.status(
                f"Replaying up to {int(sample)} inputs of this cluster…", expanded=True
            ) as status:
                bar = st.progress(0.0, text="Sending…")
                config = ReplayConfig(
                    model=model.strip(),
                    base_url=base_url.strip(),
                    instruction=instruction if instruction.strip() else None,
                    api_key_env=key_env.strip() or "OPENAI_API_KEY",
                    concurrency=int(concurrency),
                    sample=int(sample),
                    progress=False,
                    on_progress=lambda done, total: bar.progress(
                        done / total, text=f"{done:,} of {total:,} inputs finished"
                    ),
                )
                try:
                    summary, saved = data.run_replay(c.url, c.run_id, picked, config)
                except (ReplayError, openai.OpenAIError, ValueError) as error:
                    status.update(label="Replay could not start", state="error")
                    st.error(escape_markdown(str(error)), icon=":material/error:")
                else:
                    st.session_state["replay_open"] = summary.run_id
                    done_label = (
                        f"Replay {summary.status}: {summary.done} answered, "
                        f"{summary.failed} failed, {summary.retried} retries "
                        f"in {summary.seconds:.1f} s"
                    )
                    status.update(
                        label=done_label,
                        state="complete" if summary.status == "done" else "error",
                        expanded=False,
                    )
                    if saved is not None:
                        st.toast(f"Instruction saved as version {saved['version']}")
                        versions = data.instruction_versions(c.url, picked)  # cleared by the run

with versions_side:
    _versions_list(versions)

st.divider()
st.subheader("Replay runs")
runs = data.replay_runs(c.url)
if not runs:
    st.info(
        "No replay runs yet. Write an instruction above and press Run replay, or use "
        "`convoscope replay` from the command line.",
        icon=":material/info:",
    )
    st.stop()

by_id = {run["id"]: run for run in runs}
if st.session_state.get("replay_open") not in by_id:
    st.session_state["replay_open"] = runs[0]["id"]


HELD_KEY = "judge_held"  # (run id, judge) whose judging another process held at the last try


def _judge_form(run_id: str) -> None:
    """Ask a chat model which answer is better, pair by pair, in a random order."""
    with st.expander("Judge these answers with an LLM", expanded=_held_here(run_id)):
        st.caption(
            "Sends each input with both answers, in a random order, to the judge model. Log "
            "text leaves this machine only when you press Judge."
        )
        with st.form("judge_form", border=False):
            left, right = st.columns(2)
            left.text_input("Judge model", key="judge_model")
            right.text_input(
                "Judge base URL", key="judge_base_url", placeholder="http://127.0.0.1:8000/v1"
            )
            left.text_input("API key variable", value="OPENAI_API_KEY", key="judge_key_env")
            right.number_input(
                "Pairs to judge", min_value=1, max_value=100_000, value=50, key="judge_sample"
            )
            go = st.form_submit_button("Judge", key="judge_run")
        if go:
            _judge(run_id, take_over=False)
        elif _held_here(run_id):
            _take_over_control(run_id)


def _judge_config() -> JudgeConfig | None:
    """The judge form's values as a config (None, said why, when they cannot be sent)."""
    judge_model = st.session_state["judge_model"].strip()
    judge_url = st.session_state["judge_base_url"].strip()
    if not judge_model or not judge_url.startswith(("http://", "https://")):
        st.error("Give a judge model and an http(s) base URL.", icon=":material/error:")
        return None
    return JudgeConfig(
        model=judge_model,
        base_url=judge_url,
        api_key_env=st.session_state["judge_key_env"].strip() or "OPENAI_API_KEY",
        sample=int(st.session_state["judge_sample"]),
        progress=False,
    )


def _judge(run_id: str, *, take_over: bool) -> None:
    """Judge the run with the form's judge; a judging another live process holds is not
    sent but offered for take-over (`replay judge --take-over`), never taken silently."""
    st.session_state.pop(HELD_KEY, None)
    config = _judge_config()
    if config is None:
        return
    with st.spinner("Judging…"):
        try:
            summary = data.run_judge(c.url, run_id, config, take_over=take_over)
        except (JudgeError, openai.OpenAIError, ValueError) as error:
            if not take_over and data.judge_holder(c.url, run_id, config.model) is not None:
                st.session_state[HELD_KEY] = (run_id, config.model)
                _take_over_control(run_id)
            else:
                st.error(escape_markdown(str(error)), icon=":material/error:")
            return
    left_out = summary.without_original
    st.success(
        f"{summary.judged} judged, {summary.already_judged} judged before, "
        f"{summary.failed} without a verdict"
        + (f", {left_out} saved inputs without an original answer left out" if left_out else "")
    )
    for reason in summary.errors:
        st.text(reason)


def _held_here(run_id: str) -> bool:
    """Whether the last try to judge this run found the form's judge held elsewhere."""
    held = st.session_state.get(HELD_KEY)
    return held is not None and held == (run_id, st.session_state.get("judge_model", "").strip())


def _take_over_control(run_id: str) -> None:
    """Say who holds the judging and offer to take it over, once the user confirms that
    process is dead. When its lease has lapsed (or it let go) meanwhile, Judge takes it:
    there is nothing to take over."""
    judge = st.session_state[HELD_KEY][1]
    holder = data.judge_holder(c.url, run_id, judge)
    if holder is None:
        st.session_state.pop(HELD_KEY, None)
        st.info(
            f"The process judging with {safe_label(judge, 60)} let go or its lease lapsed: "
            "press Judge to finish the judging.",
            icon=":material/info:",
        )
        return
    since, until = (
        f"{holder[key]:%Y-%m-%d %H:%M:%S} UTC" for key in ("owner_since", "lease_until")
    )
    slot = st.empty()  # emptied once taken over: what follows is the judging's own outcome
    with slot.container():
        st.warning(
            f"Another process has been judging this run with {safe_label(judge, 60)} since "
            f"{since}; it renews its lease while it works (now until {until}). Let it finish: "
            f"its verdicts show here as they are stored, and after {until} with no renewal "
            "Judge takes the judging. If that process is dead, take it over now. A process "
            "still alive stops at its next renewal, but the pairs it had in flight were sent.",
            icon=":material/lock:",
        )
        sure = st.checkbox(
            f"The process judging with {safe_label(judge, 60)} is dead",
            key="judge_take_over_sure",
        )
        taking = st.button("Take over and judge", key="judge_take_over", disabled=not sure)
    if taking:
        slot.empty()
        _judge(run_id, take_over=True)


def _resume_command(url: str, run_id: str) -> str:
    """The command that finishes a run, runnable as shown from any folder: it names this
    page's database (its password hidden, as the command line prints it)."""
    safe = sa.make_url(url).render_as_string(hide_password=True)
    return f"convoscope --db {shlex.quote(safe)} replay --resume {shlex.quote(run_id)}"


def _run_label(run_id: str) -> str:
    """Plain text (a selectbox renders no Markdown): when, which model, what it replayed (a
    run stored before runs recorded that says nothing of it), how far it got."""
    run = by_id[run_id]
    counts = run["counts"]
    total = sum(counts.values())
    selection = run["params"].get("selection")
    short = selection_text(_names_cut(selection, 40), short=True) if selection else ""
    covered = f"{one_line(short, 60)} · " if selection else ""
    return (
        f"{run['created_at']:%Y-%m-%d %H:%M} · {one_line(run['model'], 40)} · {covered}"
        f"{counts['done']}/{total} answered · {run['status']}"
    )


def _selection_fact(selection: dict[str, Any] | None) -> str:
    """What the opened run replayed, for its caption (escaped: cluster names and filter
    values come from the logs)."""
    if not selection:
        return "selection not recorded"
    return f"replayed {safe_label(selection_text(_names_cut(selection, 60)), 1000)}"


def _names_cut(selection: dict[str, Any], limit: int) -> dict[str, Any]:
    """The selection with each cluster name cut to `limit` characters: a long topic name
    pushed what follows it (the clustering, the count) off the end of the line."""
    clusters = selection.get("clusters") or []
    cut = [{**c, "label": one_line(str(c.get("label") or c.get("id")), limit)} for c in clusters]
    return {**selection, "clusters": cut}


# Two runs of one model started in the same minute read alike, and a pick of one opened the
# other (Streamlit maps a label back to the last option so labelled): the run id tells them apart.
run_labels = dict(
    zip(
        by_id,
        distinct_labels(
            [_run_label(rid) for rid in by_id], [f"{_run_label(rid)} · run {rid}" for rid in by_id]
        ),
        strict=True,
    )
)
opened: str = st.selectbox(
    "Open a run", list(by_id), key="replay_open", format_func=run_labels.__getitem__
)
run = by_id[opened]
rows, overall = data.replay_pairs(c.url, c.version, opened, run["counts"]["done"])

facts = [
    _selection_fact(run["params"].get("selection")),
    f"model {safe_label(run['model'], 60)}",
    f"endpoint {safe_label(run['base_url'], 80)}",
    f"{run['counts']['done']} answered",
    f"{run['counts']['failed']} failed",
    f"{run['counts']['pending']} pending",
]
st.caption(" · ".join(facts))
if run["instruction"]:
    with st.expander("Instruction of this run"):
        st.text(visible_controls(run["instruction"]))
if overall is not None:
    m = st.columns(4)
    m[0].metric("Original reward", fmt_float(overall.mean_original))
    m[1].metric(
        "New reward",
        fmt_float(overall.mean_new),
        delta=f"{overall.mean_diff:+.2f}",
        help=(
            "One scored pair: too few for a CI of the difference"
            if overall.ci_low is None or overall.ci_high is None
            else f"95 % CI of the difference {overall.ci_low:+.2f} – {overall.ci_high:+.2f}"
        ),
    )
    m[2].metric("Win rate of new", fmt_share(overall.win_rate))
    m[3].metric("Scored pairs", f"{overall.n:,}")
elif rows and not any(pair["original_response"] for pair in rows):
    st.caption(
        "These inputs were logged without answers (saved inputs): there is no original "
        "answer to compare the new ones with."
    )
elif rows:
    st.caption(
        "The new answers have no reward yet: run `convoscope score` to score them, then "
        "compare here."
    )
for judge, verdict in data.judge_result(c.url, opened).items():
    st.metric(
        f"LLM judge {escape_markdown(judge)}: new answer wins",
        fmt_share(verdict.win_rate),
        help=f"95 % CI {fmt_share(verdict.ci_low)} – {fmt_share(verdict.ci_high)} over "
        f"{verdict.n} judged pairs: {verdict.new_wins} won, {verdict.ties} tied, "
        f"{verdict.original_wins} lost",
    )
_JUDGE_STATUS = {
    "running": "at work in another process: its verdicts show here as they are stored (if "
    "that process is dead, Judge with this model offers to take it over)",
    "incomplete": "stopped before judging every pair; judge again with this model to finish",
}
for judge, status in data.judge_statuses(c.url, opened).items():
    if status in _JUDGE_STATUS:  # said beside the verdicts, which are partial until done
        st.caption(f"LLM judge {escape_markdown(judge)}: {_JUDGE_STATUS[status]}")
run_comparison.comparison(c, opened, by_id, run_labels, names, PAIRS_SHOWN)
if rows:
    _judge_form(opened)

if run["counts"]["failed"]:
    failures = data.replay_failures(c.url, opened, run["counts"]["failed"])
    with st.expander(f"{len(failures)} failed inputs: why"):
        st.caption(
            "Send them again from a shell: the run keeps its model, base URL and instruction "
            "(add `--base-url` when its URL carried a key or a query string, never stored)."
        )
        st.code(_resume_command(c.url, opened), language="bash")
        for failure in failures[:PAIRS_SHOWN]:
            st.text(f"{failure['exchange_id']}: {failure['error'] or 'unknown error'}")
if not rows:
    st.caption("This run has no answered input yet.")
if len(rows) > PAIRS_SHOWN:
    st.caption(f"Showing {PAIRS_SHOWN} of {len(rows):,} answered inputs.")
for i, pair in enumerate(rows[:PAIRS_SHOWN], start=1):
    with st.expander(f"{i}. {safe_label(pair['prompt'], 90)}", expanded=i == 1):
        st.text(visible_controls(pair["prompt"]))
        old, new = st.columns(2)
        old.caption(
            f"Original · {safe_label(pair['original_model'] or 'unknown model', 50)} · "
            f"reward {fmt_float(pair['original_reward'])}"
        )
        old.text(visible_controls(pair["original_response"] or "(no response stored)"))
        latency = f" · {pair['latency_s']:.2f} s" if pair["latency_s"] is not None else ""
        new.caption(
            f"New · {safe_label(run['model'], 50)} · reward {fmt_float(pair['new_reward'])}"
            f"{latency}"
        )
        new.text(visible_controls(pair["new_response"] or "(empty answer)"))
        if pair["judges"]:  # every judge's verdict: judges disagree, and that is worth seeing
            outcome = {"a": "the original", "b": "the new answer", "tie": "a tie"}
            st.caption(
                " · ".join(
                    f"Judge {safe_label(judge, 40)}: {outcome[winner]}"
                    for judge, winner in pair["judges"].items()
                )
            )
