"""Export: the current filter (optionally some clusters) as a download or to a path, in the
columns of `convoscope export` (cluster, its name, group, tags and reward on each row); or the
judged battles, as the battles JSONL that `convoscope ingest` reads back."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from app.ui import data, exporting, shell
from app.ui.render import option_labels

c = shell.ctx()
st.title("Export")
shell.filter_note(c.flt)

if not data.overview(c.url, c.version, c.run_id, c.flt, None)["exchanges"] and not c.flt.active:
    shell.empty_state("exchanges")
    st.stop()

BATTLES = "battles"
left, right = st.columns([2, 3], gap="large")
with left:
    fmt = st.radio(
        "Format",
        [*exporting.FORMATS, BATTLES],
        format_func=lambda f: "Judged battles" if f == BATTLES else exporting.FORMATS[f][0],
        key="export_format",
        horizontal=True,
    )
if fmt == BATTLES:
    options = data.battle_options(c.url, c.version)
    with left:
        if not options["battles"]:
            st.info(exporting.no_battles_message(), icon=":material/info:")
            st.stop()
        sources = tuple(
            st.multiselect(
                "Only battles from",
                options["sources"],
                placeholder="Every source (a battles file, or judge:<run> for a replay judge)",
                key="export_battle_sources",
            )
        )
        where = exporting.battle_filter(c.flt, sources)
        battles = data.count_battles(c.url, c.version, where)
        st.metric("Battles to export", f"{battles:,}")
        st.caption(
            "The sidebar's models apply (a battle passes when either answer is by one); its "
            "sources, dates and tags select exchanges, not battles."
        )
        stamp = datetime.now().strftime("%Y%m%d-%H%M")
        st.download_button(
            "Download battles JSONL",
            data=lambda: data.read(c.url, lambda e: exporting.battles_bytes(e, where=where)),
            file_name=f"convoscope-battles-{stamp}.jsonl",
            mime="application/jsonl",
            type="primary",
            disabled=battles == 0,
            key="export_battles_download",
            width="stretch",
        )
        with st.form("export_battles_path", border=False):
            target = st.text_input(
                "Or write to a file on the server", value="./convoscope-battles.jsonl"
            )
            if st.form_submit_button("Write file", disabled=battles == 0):
                out = exporting.resolve_target(target)
                try:
                    result = data.read(
                        c.url, lambda e: exporting.export_battles(e, out, where=where)
                    )
                except (ValueError, OSError) as error:  # a folder, no permission, the database
                    st.error(f"Not written: {error}")
                else:  # none only when the data changed since the count: nothing is written
                    if not result.rows:
                        st.warning(f"No battles matched, so nothing was written to {out}")
                    else:
                        st.success(f"Wrote {result.rows:,} battles to {out}")
                    for reason, count in result.not_round_trip.items():
                        st.warning(f"{count:,} will not ingest back under their own ids: {reason}")
    with right:
        st.subheader("What each line carries")
        st.markdown(
            "One judged battle a line, in the `battles` format `convoscope ingest` reads: "
            "`battle_id`, `prompt`, `model_a`, `response_a`, `model_b`, `response_b`, "
            "`winner` (`model_a`, `model_b` or `tie`), `judge_preference`, `judge`, then the "
            "other keys the battle was logged with. Ingested into another database, a battle "
            "read from a battles file comes back with its two answers under their own ids; a "
            "replay judge's verdict (source `judge:<run>`) judged answers from conversations, "
            "which a battles line cannot carry, so it comes back under new ids. *Write file* "
            "counts any such battle."
        )
    st.stop()

with left:
    cluster_ids: tuple[str, ...] = ()
    if c.run_id:
        table = data.cluster_table(c.url, c.version, c.run_id, c.flt, c.scorer)
        if not table.empty:
            labels = option_labels(
                list(table["id"]), dict(zip(table["id"], table["name"], strict=True)), 60
            )
            cluster_ids = tuple(
                st.multiselect(
                    "Only these clusters",
                    list(table["id"]),
                    format_func=labels.__getitem__,
                    placeholder="All clusters",
                    key="export_clusters",
                )
            )
    # On by default here: a CSV downloaded from a browser is usually opened in a spreadsheet,
    # which would run a logged prompt such as =HYPERLINK(...) as a formula.
    safe = fmt == "csv" and st.checkbox(
        "Safe for spreadsheets",
        value=True,
        key="export_spreadsheet_safe",
        help="Prefix text cells starting with =, +, -, @, a tab or a carriage return with ' so "
        "Excel or LibreOffice shows them instead of running them. Off: cells exactly as "
        "stored (for pandas and other readers).",
    )
    rows = data.count_rows(c.url, c.version, c.run_id, c.flt, cluster_ids)
    st.metric("Rows to export", f"{rows:,}")
    label, mime, suffix = exporting.FORMATS[fmt]
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    file_name = f"convoscope-{stamp}{'-openai' if fmt == 'openai' else ''}{suffix}"

    def build() -> bytes:
        return data.read(
            c.url,
            lambda e: exporting.export_bytes(
                e, c.run_id, c.flt, format=fmt, cluster_ids=cluster_ids, safe_for_spreadsheets=safe
            ),
        )

    st.download_button(
        f"Download {label}",
        data=build,  # built when clicked, not on every rerun
        file_name=file_name,
        mime=mime,
        type="primary",
        disabled=rows == 0,
        key="export_download",
        width="stretch",
    )

    with st.form("export_path", border=False):
        # A default without the minute stamp: Streamlit keys a widget on its default value,
        # so a stamp that changes between reruns would drop what the user typed.
        target = st.text_input(
            "Or write to a file on the server",
            value=f"./convoscope-export{'-openai' if fmt == 'openai' else ''}{suffix}",
        )
        if st.form_submit_button("Write file", disabled=rows == 0):
            out = exporting.resolve_target(target)
            try:
                written = data.read(
                    c.url,
                    lambda e: exporting.export_to_path(
                        e,
                        c.run_id,
                        c.flt,
                        out,
                        format=fmt,
                        cluster_ids=cluster_ids,
                        safe_for_spreadsheets=safe,
                    ),
                )
            except (ValueError, OSError) as error:  # a folder, no permission, the database
                st.error(f"Not written: {error}")
            else:  # no rows only when the data changed since the count: nothing is written
                if written:
                    st.success(f"Wrote {written:,} rows to {out}")
                else:
                    st.warning(f"No rows matched, so nothing was written to {out}")

with right:
    st.subheader("What each row carries")
    st.markdown(
        "- **ids to join back:** `external_id`, `conversation_id`, "
        "`conversation_external_id`, `turn_index`, `model`, `source`, `id`\n"
        "- **the exchange:** `instruction`, `context`, `prompt`, `response`, `created_at`, "
        "`feedback_text` (the conversation's)\n"
        "- **signals:** `retried`, `edited`, `deleted`, `rating`, `thumbs`, "
        "`user_turns_after`, `ended_conversation`, `seconds_to_next_user_message`\n"
        "- **where it landed:** `cluster_id`, `cluster_label` (your name when you gave one), "
        "`parent_cluster_id` (its group), `tags` (the cluster's, its group's and the "
        "exchange's, `; `-separated)\n"
        "- **score:** `reward` (the latest reward scorer's) and `reward_scorer` (which one)\n\n"
        "OpenAI fine-tune JSONL keeps exchanges that have a response, as "
        '`{"messages": [...]}` with the instruction as the system message.'
    )
    st.caption("The sidebar filters apply. Same columns as `convoscope export`.")
