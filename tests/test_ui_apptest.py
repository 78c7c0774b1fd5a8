"""Each page's logic through Streamlit's AppTest, on real DuckDB files built in tmp_path."""

from __future__ import annotations

import base64
import csv
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy.engine import Engine
from streamlit.testing.v1 import AppTest

from app.export import COLUMNS
from app.ui.launch import LAUNCH_DIR_ENV, child_environment, command, is_loopback
from app.ui.render import escape_markdown, one_line
from storage.clusters import exchanges_in_clusters, load_clusters, save_cluster_run
from storage.engine import open_database
from storage.views import ViewFilter, keyword_search
from tests.ui_database import (
    MODELS,
    SCORER,
    XSS_FEEDBACK,
    XSS_GROUP,
    XSS_NAME,
    XSS_PROMPT_SHOWN,
    BuiltDatabase,
    build,
)

APP = str(Path(__file__).resolve().parents[1] / "app" / "ui" / "app.py")


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> BuiltDatabase:
    """A database the read-only tests share (nothing here writes to it)."""
    return build(f"duckdb:///{tmp_path_factory.mktemp('ui') / 'shared.duckdb'}", seed=1)


@pytest.fixture
def fresh_db(tmp_path: Path) -> BuiltDatabase:
    return build(f"duckdb:///{tmp_path / 'fresh.duckdb'}", n_exchanges=200, seed=2)


def _app(url: str, monkeypatch: pytest.MonkeyPatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv("CONVOSCOPE_DB", url)
    at = AppTest.from_file(APP, default_timeout=60)
    if page:
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _by_label(widgets: Iterable[Any], label: str) -> Any:
    return next(w for w in widgets if w.label == label)


def _all_markdown_text(at: AppTest) -> list[str]:
    """Every string the app hands to a Markdown renderer (bodies, titles, captions, labels)."""
    texts = [e.value for e in (*at.markdown, *at.title, *at.caption, *at.header, *at.subheader)]
    texts += [e.label for e in at.expander]
    texts += [e.proto.body for e in (*at.warning, *at.info)]
    texts += [b.label for b in at.button]
    return texts


# What remark-gfm (Streamlit's Markdown) links in plain text once backslash escapes are
# resolved: mdast-util-gfm-autolink-literal's URL, www and e-mail patterns.
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
_AUTOLINK = re.compile(
    r"(?i)(?:https?://|www(?=\.))[-.\w]+|[-.\w+]+@[-\w]+(?:\.[-\w]+)+", flags=re.ASCII
)


def _autolinks(markdown: str) -> list[str]:
    """The links GFM would make of bare URLs and addresses in `markdown`."""
    return _AUTOLINK.findall(_ESCAPED.sub(r"\1", markdown))


def test_overview_headline_figures_and_weakest_first(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(shared_db.url, monkeypatch)
    assert _metric(at, "Exchanges") == f"{shared_db.n_exchanges:,}"
    assert _metric(at, "Models") == str(len(MODELS))
    assert _metric(at, "Clusters") == "8"
    assert _metric(at, "Mean reward") not in ("—", "")
    table = at.dataframe[0].value
    assert table["Cluster"].iloc[0] == XSS_NAME  # the weakest, shown as plain text
    assert at.dataframe[0].proto.placeholder == "—"  # an unknown rate is a dash, not "None"
    weakness = list(table["Weakness"])
    assert weakness == sorted(weakness, reverse=True)
    # Shares and rates with one decimal, as percentages: Streamlit's "percent" dropped
    # trailing zeros, so "2.8%" stood beside "3.74%" in one column.
    columns = json.loads(at.dataframe[0].proto.columns)
    assert columns["Share"]["type_config"]["format"] == "%.1f %%"
    rates = next(d for d in at.dataframe if "Ended" in d.value.columns)  # the groups' rates
    assert json.loads(rates.proto.columns)["Ended"]["type_config"]["format"] == "%.1f %%"
    assert table["Share"].sum() == pytest.approx(100.0)
    assert len(at.get("plotly_chart")) == 1
    assert not at.warning


def test_overview_says_when_its_ranking_is_from_an_older_reward_model(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newer reward scores than the reports were made from (a `score` stopped half-way): the
    rewards shown are the new model's, the weakness order the old one's, and the page says so."""
    from storage.scores import store_scores

    engine = open_database(fresh_db.url)
    store_scores(engine, "reward:newer0002", {fresh_db.xss_exchange_id: 0.25})
    engine.dispose()
    at = _app(fresh_db.url, monkeypatch)
    (warning,) = [w.proto.body for w in at.warning]
    assert warning.startswith("Stale ranking") and "reward:newer0002" in warning
    assert SCORER in warning and "convoscope score" in warning


def test_overview_says_what_new_logs_are_waiting_for(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Logs ingested after the clustering are in no topic and have no reward until `assign`
    and `score reward apply` run: the tables left them out and nothing on the page said so."""
    from ingest.pipeline import IngestConfig, ingest_paths

    at = _app(fresh_db.url, monkeypatch)
    assert not [i for i in at.info if "convoscope assign" in i.proto.body]
    log = tmp_path / "later.jsonl"
    chats = [[{"role": "user", "content": f"later question {i}"}] for i in range(3)]
    log.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    engine = open_database(fresh_db.url)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    assert ingest_paths([log], engine=engine, config=config).stored == 3
    engine.dispose()
    time.sleep(1.2)  # the database version is re-read at most once a second
    at = _app(fresh_db.url, monkeypatch)
    infos = [i.proto.body for i in at.info]
    assert any(i.startswith("3 exchanges came after") and "convoscope assign" in i for i in infos)
    assert any(i.startswith("3 exchanges have no reward") for i in infos), infos


def test_overview_of_a_clustering_newer_than_its_scores_says_how_it_is_ordered(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-clustering after `score`: no reports yet, but the exchanges keep their rewards, so
    the rows come lowest mean reward first, and the page must not say "by size"."""
    import sqlalchemy as sa

    from storage.schema import cluster_reports

    engine = open_database(fresh_db.url)
    with engine.begin() as conn:
        conn.execute(sa.delete(cluster_reports))
    engine.dispose()
    at = _app(fresh_db.url, monkeypatch)
    hints = [i.proto.body for i in at.info]
    assert any("newer than the last `convoscope score`" in h for h in hints), hints
    assert not any("ordered by size" in h for h in hints)
    subheaders = [h.value for h in at.subheader]
    assert "Clusters, lowest reward first" in subheaders
    rewards = list(at.dataframe[0].value["Reward"])
    assert rewards == sorted(rewards)
    # The groups come the same way, and nothing claims a weakness or CI they lack.
    assert "Groups, lowest reward first" in subheaders
    headings = [*subheaders, *(c.value for c in at.caption)]
    assert not [t for t in headings if "weakest first" in t or "reward CI" in t]
    group_rewards = list(_group_table(at)["Reward"])
    assert group_rewards == sorted(group_rewards)
    # The cluster page says the same, not "no scores yet, ordered by size".
    at.button(key="open_weakest").click().run()
    hints = [i.proto.body for i in at.info]
    assert any("newer than the last `convoscope score`" in h for h in hints), hints
    assert not any("ordered by size" in h for h in hints)
    assert at.selectbox(key="cluster_pick").label == "Cluster (lowest reward first)"


def _group_table(at: AppTest) -> Any:
    return next(d.value for d in at.dataframe if "Weakest topics" in d.value.columns)


def test_overview_lists_groups_weakest_first_scored_over_their_exchanges(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.clusters import load_assignments
    from storage.scores import load_scores

    engine = open_database(shared_db.url, read_only=True)
    clusters = load_clusters(engine, shared_db.run_id)
    assignment = load_assignments(engine, shared_db.run_id)
    rewards = load_scores(engine, SCORER)
    engine.dispose()
    parent_of = {c["id"]: c["parent_id"] for c in clusters if c["level"] == 0}
    name_of = {c["id"]: c["name"] for c in clusters}
    members: dict[str, list[float]] = {}
    for exchange, topic in assignment.items():
        if topic is not None:
            members.setdefault(name_of[parent_of[topic]], []).append(rewards[exchange])

    at = _app(shared_db.url, monkeypatch)
    groups = _group_table(at)
    assert sorted(groups["Group"]) == sorted(members)  # names verbatim, as text
    assert XSS_GROUP in list(groups["Group"])
    weakness = list(groups["Weakness"])
    assert weakness == sorted(weakness, reverse=True) and weakness[0] > 0
    for row in groups.to_dict("records"):
        assert row["Size"] == len(members[row["Group"]]) and row["Topics"] == 4
        assert row["Reward"] == pytest.approx(np.mean(members[row["Group"]]))  # pooled
        assert row["Reward 95 % CI"] != "—" and "the clustered mean" in row["Why"].split(":")[0]
        mine = {name_of[t] for t, g in parent_of.items() if name_of[g] == row["Group"]}
        weakest = row["Weakest topics"].split("; ")
        assert len(weakest) == 3 and set(weakest) <= mine

    at.multiselect(key="f_models").select(MODELS[0]).run()  # a filter recomputes the figures
    filtered = _group_table(at)
    assert sum(filtered["Size"]) == sum(at.dataframe[0].value["Size"]) < sum(groups["Size"])
    assert set(filtered["Reward 95 % CI"]) == {"—"}  # the run's CI does not describe a slice
    # Nor do the weakness, its reason and the weakest topics, which rank the whole run: they
    # are left out, and the slice comes lowest filtered reward first.
    assert filtered["Weakness"].isna().all() and filtered["Why"].isna().all()
    assert set(filtered["Weakest topics"]) == {""}
    rewards = list(filtered["Reward"].dropna())
    assert rewards == sorted(rewards)
    assert "Groups, lowest reward first" in [h.value for h in at.subheader]

    at = _app(shared_db.url, monkeypatch)  # the weakest topic's page names its group
    at.button(key="open_weakest").click().run()
    named = [t for t in _all_markdown_text(at) if "help desk" in t]
    assert named  # handed to Markdown escaped: no raw tag, link or emphasis
    assert all(re.search(r"(?<!\\)[<>\[\]*]", t) is None for t in named), named


def test_filters_apply_to_the_overview(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(shared_db.url, monkeypatch)
    at.multiselect(key="f_models").select(MODELS[0]).run()
    engine = open_database(shared_db.url, read_only=True)
    with engine.connect() as conn:
        expected = conn.exec_driver_sql(
            "SELECT count(*) FROM exchanges WHERE model = ?", (MODELS[0],)
        ).scalar_one()
    engine.dispose()
    assert _metric(at, "Exchanges") == f"{expected:,}"
    assert _metric(at, "Models") == "1"
    topics = at.dataframe[0].value
    assert sum(topics["Size"]) <= expected
    # The run's weakness ranking does not describe the slice: left out, lowest reward first.
    assert topics["Weakness"].isna().all() and topics["Why"].isna().all()
    rewards = list(topics["Reward"].dropna())
    assert rewards == sorted(rewards)
    assert not [e for e in at.info if "reward" in e.value.lower()]  # no "not scored" state


def test_a_filter_that_matches_nothing_is_not_an_empty_database(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag on one exchange and a model it is not by: no row passes. The figures count no
    cluster, and Search says nothing matched rather than that the database is empty."""
    from storage.clusters import add_tag

    engine = open_database(fresh_db.url)
    with engine.connect() as conn:
        model = conn.exec_driver_sql(
            "SELECT model FROM exchanges WHERE id = ?", (fresh_db.xss_exchange_id,)
        ).scalar_one()
    add_tag(engine, "exchange", fresh_db.xss_exchange_id, "lonely")
    engine.dispose()
    other = next(m for m in MODELS if m != model)

    at = _app(fresh_db.url, monkeypatch)
    assert _metric(at, "Clusters") == "8"
    at.multiselect(key="f_models").select(MODELS[0]).run()
    assert _metric(at, "Clusters") == str(len(at.dataframe[0].value))
    at.multiselect(key="f_tags").select("lonely").run()
    at.multiselect(key="f_models").unselect(MODELS[0]).select(other).run()
    assert _metric(at, "Exchanges") == "0"
    assert _metric(at, "Clusters") == "0"

    at.switch_page("screens/search.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not [i for i in at.info if "No conversations in this database" in i.proto.body]
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("refund").run()
    assert [i.proto.body for i in at.info] == ["Nothing found."]


def test_overview_says_when_the_logs_name_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ShareGPT names no model: "0 models" read like a failed ingest, so a dash says it."""
    from ingest.pipeline import IngestConfig, ingest_paths

    log = tmp_path / "chats.jsonl"
    chat = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    log.write_text(json.dumps(chat) + "\n")
    url = f"duckdb:///{tmp_path / 'nomodel.duckdb'}"
    engine = open_database(url)
    ingest_paths([log], engine=engine, config=IngestConfig(progress=False))
    engine.dispose()
    at = _app(url, monkeypatch)
    assert _metric(at, "Exchanges") == "1"
    assert _metric(at, "Models") == "—"


def test_cluster_page_rename_tags_and_note_persist(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(fresh_db.url, monkeypatch)
    at.button(key="open_weakest").click().run()
    assert at.selectbox(key="cluster_pick").value == fresh_db.weakest_id
    # The share is of the clustered exchanges, which the table's shares sum to.
    size = next(m for m in at.metric if m.label == "Exchanges")
    assert size.proto.help.endswith("of the clustered exchanges")
    cheapest = [c.value for c in at.caption if c.value.startswith("Cheapest expert")]
    assert cheapest and cheapest[0].endswith("(predicted win rate 61.0 %), cost 0.5")
    board = next(d.value for d in at.dataframe if "Elo" in d.value.columns)
    assert list(board["Battles"].unique()) == [25] and list(board["Predicted"].unique()) == [10]
    assert any(c.value.startswith("Bradley–Terry over the topic's judged") for c in at.caption)

    _by_label(at.text_input, "Name").input("Refund trouble")
    _by_label(at.button, "Rename").click().run()
    assert at.title[0].value == "Refund trouble"

    _by_label(at.text_input, "Add a tag").input("needs-instruction")
    _by_label(at.button, "Add tag").click().run()
    _by_label(at.text_input, "Add a tag").input("urgent")
    _by_label(at.button, "Add tag").click().run()
    at.button(key="untag_urgent").click().run()

    _by_label(at.text_area, "Note").input("users want the refund policy link")
    _by_label(at.button, "Save note").click().run()
    assert not at.exception

    engine = open_database(fresh_db.url)
    stored = {c["id"]: c for c in load_clusters(engine, fresh_db.run_id)}[fresh_db.weakest_id]
    assert stored["name"] == "Refund trouble"
    assert stored["tags"] == ["needs-instruction"]
    assert stored["note"] == "users want the refund policy link"

    # A re-clustering that keeps the stable id: the person's name, tag and note stay.
    _recluster(engine, fresh_db)
    engine.dispose()
    at = _app(fresh_db.url, monkeypatch)
    assert at.dataframe[0].value["Cluster"].iloc[0] == "Refund trouble"
    at.button(key="open_weakest").click().run()
    assert at.title[0].value == "Refund trouble"
    assert _by_label(at.text_area, "Note").value == "users want the refund policy link"
    assert at.button(key="untag_needs-instruction")


def _recluster(engine: Engine, built: BuiltDatabase) -> None:
    """Store a newer run whose clusters carry the same stable ids (as matching would)."""
    import uuid
    from datetime import datetime

    import sqlalchemy as sa

    from storage.reports import load_cluster_reports, save_scored
    from storage.schema import assignments, clusters

    run_id = uuid.uuid4().hex
    with engine.connect() as conn:
        old = [
            dict(r)
            for r in conn.execute(
                sa.select(clusters).where(clusters.c.run_id == built.run_id)
            ).mappings()
        ]
        rows = [
            dict(r)
            for r in conn.execute(
                sa.select(assignments).where(assignments.c.run_id == built.run_id)
            ).mappings()
        ]
    for row in (*old, *rows):
        row["run_id"] = run_id
    run = {
        "id": run_id,
        "created_at": datetime(2030, 1, 1),
        "on_field": "prompt",
        "embedder": "all-MiniLM-L6-v2",
        "params": json.dumps({}),
        "n_rows": len(rows),
        "n_clusters": 8,
        "unassigned_share": 0.0,
        "events": None,
    }
    save_cluster_run(engine, run, old, rows)
    save_scored(engine, run_id, load_cluster_reports(engine, built.run_id))


def test_a_link_to_a_group_opens_its_first_topic_and_says_so(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`?cluster=` with a group's id (`convoscope clusters` lists groups with topics) said
    there was no such topic, "re-clustered away", and showed the run's weakest topic."""
    group = shared_db.group_ids[1]
    engine = open_database(shared_db.url, read_only=True)
    members = {
        one_line(c["name"], 80): c["id"]
        for c in load_clusters(engine, shared_db.run_id)
        if c["parent_id"] == group
    }
    engine.dispose()
    monkeypatch.setenv("CONVOSCOPE_DB", shared_db.url)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("screens/cluster.py")
    at.query_params["cluster"] = group
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not [w.value for w in at.warning if w.value.startswith("No topic")]
    (note,) = at.info
    assert f"is a group of {len(members)} topics" in note.value
    picker = at.selectbox(key="cluster_pick")  # options read "1. name", weakest first
    first = next(
        label.split(". ", 1)[1] for label in picker.options if label.split(". ", 1)[1] in members
    )
    assert picker.value == members[first]


def test_log_text_is_shown_as_text_never_markup(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(shared_db.url, monkeypatch)
    at.button(key="open_weakest").click().run()
    # The injected prompt, and its conversation's feedback, reach the page verbatim, in
    # plain-text elements.
    assert {XSS_PROMPT_SHOWN, XSS_FEEDBACK} <= {t.value for t in at.text}
    # Bidi controls are spelled out everywhere: "\u202eevil" must not display as "live".
    assert not [t for t in (*[t.value for t in at.text], *_all_markdown_text(at)) if "\u202e" in t]
    # Wherever log text enters Markdown it is escaped: no raw tag, link or directive.
    injected = [
        t for t in _all_markdown_text(at) if any(m in t for m in ("script", "onerror", "kw"))
    ]
    assert injected  # the cluster name, keywords and the prompt's expander label
    for text in injected:
        unescaped = re.search(r"(?<!\\)[<>\[\]$`*]", text)
        assert unescaped is None, f"unescaped markup {unescaped.group()!r} in {text!r}"
    assert any("\\<script\\>" in label for label in (e.label for e in at.expander))
    # Bare URLs and addresses (the prompt's, the group name's) do not become links either.
    label = next(e.label for e in at.expander if "script" in e.label)
    assert "http\\:" in label and "www" in label and "\\@" in label
    assert "http\\:" in " ".join(c.value for c in at.caption)  # "group: … [go](http://…"
    linked = {t: _autolinks(t) for t in _all_markdown_text(at) if _autolinks(t)}
    assert not linked, linked
    # And no element is ever allowed to render HTML.
    assert all(not m.proto.allow_html for m in at.markdown)
    assert not at.get("html")


@pytest.mark.parametrize(
    "text",
    [
        "![img](http://evil.example/x.png)",
        "see HTTPS://evil.example/a?b=c",
        "www.evil.example and WWW.evil.example, wwww.evil.example",
        "mail a@evil.example or mailto:b.c+d@evil.example",
    ],
)
def test_escaped_text_never_autolinks(text: str) -> None:
    """Backslash escapes do not stop GFM's autolink literals; the escaped text must."""
    assert _autolinks(text)  # the check sees these links before escaping
    escaped = escape_markdown(text)
    assert not _autolinks(escaped), escaped
    assert _ESCAPED.sub(r"\1", escaped).replace("\u2060", "") == text  # reads the same


def test_bidi_controls_are_spelled_out() -> None:
    controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"
    assert one_line(f"a{controls}b") == "a" + "".join(f"\\u{ord(c):04x}" for c in controls) + "b"


def test_keyword_search_escapes_patterns(shared_db: BuiltDatabase) -> None:
    engine = open_database(shared_db.url, read_only=True)
    try:
        hits = keyword_search(engine, shared_db.run_id, "refund", ViewFilter(), limit=500)
        assert hits and all("refund" in (h["prompt"] + h["response"]).lower() for h in hits)
        # Unescaped, "%" and "_" would match every row.
        assert keyword_search(engine, shared_db.run_id, "%", ViewFilter()) == []
        assert keyword_search(engine, shared_db.run_id, "_", ViewFilter()) == []
        assert keyword_search(engine, shared_db.run_id, "'; DROP TABLE x; --", ViewFilter()) == []
    finally:
        engine.dispose()


def test_search_page_words_and_meaning_jump_to_cluster(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest.embed_step import EmbedConfig, embed_exchanges

    engine = open_database(fresh_db.url)
    embed_exchanges(engine, config=EmbedConfig(on="prompt", progress=False, device="cpu"))
    engine.dispose()

    at = _app(fresh_db.url, monkeypatch, "screens/search.py")
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("sonnet").run()
    hits = at.dataframe[0].value
    assert len(hits) and all("sonnet" in p.lower() for p in hits["Prompt"])

    at.get("button_group")[0].set_value("Meaning").run()
    at.text_input(key="search_query").input("my flight got cancelled, I want my money back").run()
    assert not at.exception, [e.value for e in at.exception]
    hits = at.dataframe[0].value
    assert list(hits["Similarity"]) == sorted(hits["Similarity"], reverse=True)
    assert "refund" in hits["Prompt"].iloc[0].lower()
    # Clicking the selected "Meaning" again deselects it: still a search by meaning.
    at.get("button_group")[0].set_value(None).run()
    assert list(at.dataframe[0].value["Similarity"]) == list(hits["Similarity"])
    at.button(key="search_open").click().run()
    assert at.selectbox(key="cluster_pick").value == fresh_db.weakest_id


def test_search_by_words_says_how_many_hits_past_those_shown(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A word found in 400 exchanges was reported as "50 hits": the page's limit, read as
    the number of exchanges that contain it."""
    from storage.scores import latest_scorer

    engine = open_database(shared_db.url, read_only=True)
    scorer = latest_scorer(engine, "reward:")
    every = keyword_search(engine, shared_db.run_id, "e", ViewFilter(), scorer=scorer, limit=10**5)
    engine.dispose()
    at = _app(shared_db.url, monkeypatch, "screens/search.py")
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("e").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = at.dataframe[0].value
    assert len(every) > len(shown)
    first = f"The first {len(shown)} of {len(every):,} hits, lowest reward first"
    assert any(c.value.startswith(first) for c in at.caption)
    # The lowest rewards of all the hits, not the first ids: an arbitrary draw of them.
    lowest = sorted(h["reward"] for h in every if h["reward"] is not None)[: len(shown)]
    assert list(shown["Reward"]) == pytest.approx(lowest, abs=1e-6)


def test_experts_page_leaderboard_and_heat_map(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(shared_db.url, monkeypatch, "screens/experts.py")
    board = at.dataframe[0].value
    assert set(board["model"]) <= set(MODELS) and len(board) >= 2
    assert list(board["rank"]) == sorted(board["rank"])
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    heat = json.loads(charts[0].proto.spec)["data"][0]
    assert heat["type"] == "heatmap"
    z = _array(heat["z"])
    assert z.shape == (8, len(MODELS))
    cells = z[~np.isnan(z)]
    assert cells.size and ((cells >= 0) & (cells <= 1)).all()
    whole_run = "the sidebar filter does not apply here"
    assert not [c for c in at.caption if whole_run in c.value]
    at.multiselect(key="f_models").select(MODELS[0]).run()  # the heat map is the run's still
    assert len([c for c in at.caption if whole_run in c.value]) == 2  # heat map, routing


def _array(value: object) -> np.ndarray:
    """A Plotly data array, whether a list or typed-array JSON ({"bdata", "dtype", "shape"})."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in str(value.get("shape", len(flat))).split(",")])
    return np.asarray(value, dtype=float)


def test_export_page_writes_names_tags_and_scores(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from storage.clusters import add_tag, annotate_cluster

    engine = open_database(fresh_db.url)
    annotate_cluster(engine, fresh_db.weakest_id, name="Refund trouble")
    add_tag(engine, "cluster", fresh_db.weakest_id, "needs-instruction")
    engine.dispose()

    at = _app(fresh_db.url, monkeypatch, "screens/export.py")
    assert _metric(at, "Rows to export") == f"{fresh_db.n_exchanges:,}"
    out = tmp_path / "out.csv"
    _by_label(at.text_input, "Or write to a file on the server").input(str(out))
    _by_label(at.button, "Write file").click().run()
    assert not at.exception
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == fresh_db.n_exchanges
    weakest = [r for r in rows if r["cluster_id"] == fresh_db.weakest_id]
    assert weakest and {r["cluster_label"] for r in weakest} == {"Refund trouble"}
    assert all(r["tags"] == "needs-instruction" for r in weakest)
    # The columns of `convoscope export`: one reward and its scorer, the group; safe for
    # spreadsheets by default, and marked so (ingest takes the quotes off again).
    assert list(rows[0]) == [*COLUMNS, "spreadsheet_safe"]
    assert all(r["reward"] != "" and r["reward_scorer"] == SCORER for r in rows)
    assert all(r["parent_cluster_id"] in fresh_db.group_ids for r in weakest)

    # Restricted to one cluster, as OpenAI fine-tune JSONL.
    at.radio(key="export_format").set_value("openai").run()
    at.multiselect(key="export_clusters").select(fresh_db.weakest_id).run()
    assert _metric(at, "Rows to export") == str(len(weakest))
    out = tmp_path / "out.jsonl"
    _by_label(at.text_input, "Or write to a file on the server").input(str(out))
    _by_label(at.button, "Write file").click().run()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(weakest)
    assert records[0]["messages"][-1]["role"] == "assistant"
    assert records[0]["metadata"]["cluster_label"] == "Refund trouble"


def test_export_page_exports_the_cluster_picked_when_two_share_a_name(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two topics named alike were one label in "Only these clusters": picking the first
    selected the other, and its rows were counted and exported instead."""
    from storage.clusters import annotate_cluster

    first, second = fresh_db.cluster_ids[:2]
    engine = open_database(fresh_db.url)
    for cid in (first, second):
        annotate_cluster(engine, cid, name="Billing")
    engine.dispose()

    engine = open_database(fresh_db.url, read_only=True)
    sizes = {
        cid: len(exchanges_in_clusters(engine, fresh_db.run_id, cluster_id=cid))
        for cid in (first, second)
    }
    engine.dispose()
    for cid in (first, second):
        at = _app(fresh_db.url, monkeypatch, "screens/export.py")
        at.multiselect(key="export_clusters").select(cid).run()
        assert at.multiselect(key="export_clusters").value == [cid]
        assert _metric(at, "Rows to export") == f"{sizes[cid]:,}"


def test_export_page_csv_is_safe_for_spreadsheets_unless_unticked(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A CSV from the browser usually goes to a spreadsheet, which would run a cell such as a
    cluster named =HYPERLINK(...): the page prefixes such cells by default; unticked, the
    cells are written as stored."""
    from storage.clusters import annotate_cluster

    formula = '=HYPERLINK("http://example.com","click")'
    engine = open_database(fresh_db.url)
    annotate_cluster(engine, fresh_db.weakest_id, name=formula)
    engine.dispose()

    def labels(path: Path) -> set[str]:
        rows = csv.DictReader(path.open(encoding="utf-8"))
        return {r["cluster_label"] for r in rows if r["cluster_id"] == fresh_db.weakest_id}

    at = _app(fresh_db.url, monkeypatch, "screens/export.py")
    assert at.checkbox(key="export_spreadsheet_safe").value is True
    safe = tmp_path / "safe.csv"
    _by_label(at.text_input, "Or write to a file on the server").input(str(safe))
    _by_label(at.button, "Write file").click().run()
    assert labels(safe) == {"'" + formula}
    at.checkbox(key="export_spreadsheet_safe").uncheck().run()
    raw = tmp_path / "raw.csv"
    _by_label(at.text_input, "Or write to a file on the server").input(str(raw))
    _by_label(at.button, "Write file").click().run()
    assert labels(raw) == {formula}
    at.radio(key="export_format").set_value("parquet").run()  # CSV only
    assert not [b for b in at.checkbox if b.key == "export_spreadsheet_safe"]


def test_tables_quote_cells_a_spreadsheet_would_run(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `st.dataframe` has a CSV download Streamlit cannot switch off per table: its text
    cells are quoted as the Export page's "Safe for spreadsheets" does."""
    from ingest.exported import FORMULA_STARTS
    from storage.clusters import annotate_cluster

    formula = '=HYPERLINK("http://evil.example","click")'
    engine = open_database(fresh_db.url)
    annotate_cluster(engine, fresh_db.weakest_id, name=formula)
    engine.dispose()

    def formula_cells(at: AppTest) -> list[str]:
        return [
            cell
            for frame in at.dataframe
            for column in frame.value.columns
            for cell in frame.value[column]
            if isinstance(cell, str) and cell.startswith(FORMULA_STARTS)
        ]

    at = _app(fresh_db.url, monkeypatch)
    assert at.dataframe[0].value["Cluster"].iloc[0] == "'" + formula
    assert not formula_cells(at)
    at.switch_page("screens/search.py").run()
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("refund").run()
    assert "'" + formula in set(at.dataframe[0].value["Cluster"])
    assert not formula_cells(at)


def test_tables_show_negative_intervals_unquoted(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quoting is for text from the logs: an interval the UI writes itself showed every weak
    cluster's reward CI as '-2.65 – -1.75. Negative bounds take the minus sign instead."""
    from app.ui.render import fmt_ci, table_cells

    shown = table_cells(pd.DataFrame({"ci": [fmt_ci((-2.65, -1.752)), fmt_ci((-0.5, 0.25))]}))
    assert list(shown["ci"]) == ["\u22122.65 – \u22121.75", "\u22120.50 – 0.25"]
    at = _app(fresh_db.url, monkeypatch)
    cells = [c for frame in at.dataframe for c in frame.value.get("Reward 95 % CI", [])]
    assert cells and not [c for c in cells if c.startswith("'")], cells
    for cell in cells:
        lo, hi = (float(bound.replace("\u2212", "-")) for bound in cell.split(" – "))
        assert lo <= hi


def test_export_page_writes_a_relative_path_where_the_ui_was_started(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`convoscope ui` runs Streamlit in the install folder: a relative path is taken from
    the folder the command was run from, which launch hands to the app."""
    started, server = tmp_path / "started", tmp_path / "server"
    started.mkdir()
    server.mkdir()
    monkeypatch.chdir(started)
    monkeypatch.setenv(LAUNCH_DIR_ENV, child_environment()[LAUNCH_DIR_ENV])
    monkeypatch.chdir(server)  # where the Streamlit process runs
    at = _app(fresh_db.url, monkeypatch, "screens/export.py")
    target = _by_label(at.text_input, "Or write to a file on the server")
    assert target.value == "./convoscope-export.csv"
    _by_label(at.button, "Write file").click().run()
    written = started / "convoscope-export.csv"
    assert [s.proto.body for s in at.success] == [
        f"Wrote {fresh_db.n_exchanges:,} rows to {written}"
    ]
    assert written.is_file() and not list(server.iterdir())


def test_export_page_writes_judged_battles_that_ingest_back(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ingest.pipeline import IngestConfig, ingest_paths
    from storage.logs import table_counts

    engine = open_database(fresh_db.url)
    stored = table_counts(engine)["battles"]
    engine.dispose()
    at = _app(fresh_db.url, monkeypatch, "screens/export.py")
    at.radio(key="export_format").set_value("battles").run()
    assert _metric(at, "Battles to export") == f"{stored:,}"
    out = tmp_path / "battles.jsonl"
    _by_label(at.text_input, "Or write to a file on the server").input(str(out))
    _by_label(at.button, "Write file").click().run()
    assert not at.exception
    assert [s.proto.body for s in at.success] == [f"Wrote {stored:,} battles to {out}"]
    # The fixture's battles pair answers taken from conversations: the page says so.
    assert any("will not ingest back under their own ids" in w.proto.body for w in at.warning)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == stored and {r["winner"] for r in lines} <= {"model_a", "model_b"}

    fresh = open_database(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    summary = ingest_paths([out], engine=fresh, config=config)
    fresh.dispose()
    assert (summary.battles_stored, summary.rejected) == (stored, 0)

    # The battles' own sources select them (the sidebar's are the exchanges').
    at.multiselect(key="export_battle_sources").select("fixture-battles.jsonl").run()
    assert _metric(at, "Battles to export") == f"{stored:,}"
    # A path that is the database itself, or a folder, is refused and the database kept.
    database = Path(fresh_db.url.removeprefix("duckdb:///"))
    for target in (database, tmp_path):
        _by_label(at.text_input, "Or write to a file on the server").input(str(target))
        _by_label(at.button, "Write file").click().run()
        assert not at.exception
        assert next(e.proto.body for e in at.error).startswith("Not written: --out")
    engine = open_database(fresh_db.url)
    assert table_counts(engine)["battles"] == stored
    engine.dispose()


@pytest.mark.parametrize(
    "page",
    [
        None,
        "screens/cluster.py",
        "screens/search.py",
        "screens/experts.py",
        "screens/export.py",
        "screens/replay.py",
    ],
)
def test_every_page_has_a_helpful_empty_state(
    page: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app(f"duckdb:///{tmp_path / 'empty.duckdb'}", monkeypatch, page)
    hints = [i.proto.body for i in at.info]
    assert any("convoscope ingest" in h or "convoscope demo" in h for h in hints), hints


def test_busy_database_gives_a_clear_message(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest holding DuckDB's write lock: the page says so instead of failing."""
    path = fresh_db.url.split(":///", 1)[1]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({path!r})
            print("locked", flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("CONVOSCOPE_DB", fresh_db.url)
        at = AppTest.from_file(APP, default_timeout=60)
        started = time.monotonic()
        at.run()
        assert time.monotonic() - started < 30
        assert not at.exception
        assert any("busy" in w.proto.body for w in at.warning)
    finally:
        holder.kill()
        holder.wait()


def test_launch_command_binds_loopback_and_passes_the_database() -> None:
    cmd = command("duckdb:////tmp/x.duckdb", port=8765)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[-2:] == ["--db", "duckdb:////tmp/x.duckdb"]
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_the_heat_map_draws_every_cluster_and_expert_when_their_labels_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plotly draws equal category labels as one row (or column): two topics a person named
    alike, or two fine-tunes whose names share their first 30 characters, were drawn over
    each other, one row's numbers under the other's name and the other row gone."""
    import tests.ui_database as ui_database
    from storage.clusters import annotate_cluster

    fine_tunes = tuple(f"ft:gpt-4o-mini-2024-07-18:acme:support-{k}" for k in "abcd")
    monkeypatch.setattr(ui_database, "MODELS", fine_tunes)  # the test data's expert names
    built = build(f"duckdb:///{tmp_path / 'alike.duckdb'}", n_exchanges=200, seed=4)
    engine = open_database(built.url)
    topics = [c["id"] for c in load_clusters(engine, built.run_id) if c["level"] == 0]
    for cluster_id in topics[:2]:
        annotate_cluster(engine, cluster_id, name="Refunds")
    engine.dispose()
    at = _app(built.url, monkeypatch, "screens/experts.py")
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    rows, columns = _array(heat["z"]).shape
    assert len(set(heat["y"])) == len(heat["y"]) == rows
    assert len(set(heat["x"])) == len(heat["x"]) == columns == len(fine_tunes)
    assert sum(label.startswith("Refunds") for label in heat["y"]) == 2


def test_the_topic_map_colours_every_cluster_when_names_repeat(
    fresh_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map draws a trace per cluster name: two topics named alike were one colour, and a
    topic named "unassigned" merged with the points no topic holds."""
    from storage.clusters import annotate_cluster

    engine = open_database(fresh_db.url)
    first, second, third = fresh_db.cluster_ids[:3]
    annotate_cluster(engine, first, name="Refunds")
    annotate_cluster(engine, second, name="Refunds")
    annotate_cluster(engine, third, name="unassigned")
    engine.dispose()
    at = _app(fresh_db.url, monkeypatch)
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    names = [trace["name"] for trace in traces]
    assert len(names) == len(set(names))
    for cluster_id in (first, second, third):  # the id kept whole within the legend's width
        assert sum(name.endswith(f" ({cluster_id})") for name in names) == 1


# The page's main column at a 1,400 px window (sidebar open), as Chromium lays it out; the
# row-selection checkbox takes the first 33 px.
MAIN_PX_AT_1400 = 938


def test_the_cluster_table_and_map_legend_fit_a_1400_px_window(
    shared_db: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster table had 14 columns, 1,800 px wide, that scrolled sideways at 1,400 px,
    and the map's legend beside it listed about 24 of a demo's 33 topics before scrolling.
    The table keeps the columns that rank a topic, each sized, within the page's width (the
    rest are on the topic's page), and the legend lies under the map, every topic listed.
    The groups table (about 1,875 px) keeps what ranks and explains a group, sized within
    the page too; its retry, edit and end rates moved to a table under it."""
    at = _app(shared_db.url, monkeypatch)
    columns = json.loads(at.dataframe[0].proto.columns)
    shown = list(at.dataframe[0].value.columns)
    # The log names experts: where to route each topic stays beside its weakness.
    assert shown == [
        "Cluster", "Group", "Size", "Share", "Reward", "Reward 95 % CI", "Weakness",
        "Best expert", "Gain", "Why",
    ]  # fmt: skip
    widths = [columns[name]["width"] for name in shown]
    assert all(isinstance(w, int) for w in widths), widths  # none left to its content
    assert 33 + sum(widths) <= MAIN_PX_AT_1400
    assert any("on each cluster's page" in c.value for c in at.caption)

    groups = next(d for d in at.dataframe if "Weakest topics" in d.value.columns)
    columns = json.loads(groups.proto.columns)
    shown = list(groups.value.columns)
    assert shown == [
        "Group", "Topics", "Size", "Share", "Reward", "Reward 95 % CI", "Weakness", "Why",
        "Weakest topics",
    ]  # fmt: skip
    assert groups.value["Weakness"].notna().all()  # ranked: every column has something to show
    widths = [columns[name]["width"] for name in shown]
    assert all(isinstance(w, int) for w in widths), widths
    assert sum(widths) <= MAIN_PX_AT_1400  # no row-selection checkbox in this one
    rates = next(d for d in at.dataframe if "Ended" in d.value.columns)
    assert list(rates.value.columns) == ["Group", "Retry", "Edited", "Ended"]
    assert list(rates.value["Group"]) == list(groups.value["Group"])
    assert any("retry, edit and end rates are below" in c.value for c in at.caption)

    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    legend, height = spec["layout"]["legend"], spec["layout"]["height"]
    listed = [t for t in spec["data"] if t.get("showlegend", True)]
    assert len(listed) == len(spec["data"]) > 8  # every topic, and the unassigned points
    assert legend["orientation"] == "h" and legend["y"] < 0  # under the map, not beside it
    columns_fit = (MAIN_PX_AT_1400 - 40) // legend["entrywidth"]
    rows = -(-len(listed) // columns_fit)
    assert height >= 560 + rows * 19  # the figure grows by the legend's rows: none scrolls
