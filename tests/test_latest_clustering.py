"""One rule for "the latest clustering": the newest run of one `--on` field, prompt unless
`--on` names another, in `clusters`, `export`, `replay` and the UI alike. They took the
newest run of any field, except `clusters`: after `cluster --on response`, exports carried
response topics while `clusters` listed prompt ones. Real DuckDB files, real runs of the CLI
and a real Streamlit AppTest."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tests.openai_server import OpenAIServer
from tests.test_ingest_pipeline import convoscope_here as convoscope
from tests.test_ingest_pipeline import write_openai_jsonl

APP = str(Path(__file__).resolve().parents[1] / "app" / "ui" / "app.py")
KMEANS = ("--device", "cpu", "--reducer", "pca", "--clusterer", "kmeans", "--k", "2")


def _clustered(tmp_path: Path, fields: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """A database of 15 chats clustered on each of `fields` in turn: its URL, and the run id
    of each field's clustering."""
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 15)
    db = f"duckdb:///{tmp_path / 'fields.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    runs = {}
    for field in fields:
        done = convoscope("cluster", "--on", field, *KMEANS, "--json", db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs[field] = json.loads(done.stdout)["run_id"]
    return db, runs


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str], Path]:
    """Clustered on prompt, then on response (the newer run); nothing here changes a run."""
    where = tmp_path_factory.mktemp("twice")
    db, runs = _clustered(where, ("prompt", "response"))
    return db, runs, where


def _topics(db: str, cwd: Path, *on: str) -> tuple[str, set[str]]:
    """`clusters [--on F] --json`: the run it lists and its topic ids."""
    listing = convoscope("clusters", *on, "--json", db=db, cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    result = json.loads(listing.stdout)
    return result["run_id"], {c["id"] for c in result["clusters"] if c["level"] == 0}


def _export(db: str, cwd: Path, name: str, *on: str) -> tuple[dict, pd.DataFrame]:
    done = convoscope("export", "--out", name, "--format", "csv", *on, "--json", db=db, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), pd.read_csv(cwd / name)


def test_export_replay_and_clusters_take_the_same_latest_clustering(twice) -> None:
    db, runs, cwd = twice
    listed_run, prompt_topics = _topics(db, cwd)
    assert listed_run == runs["prompt"]
    response_run, response_topics = _topics(db, cwd, "--on", "response")
    assert response_run == runs["response"] and not prompt_topics & response_topics

    summary, rows = _export(db, cwd, "default.csv")
    assert summary["clustering"] == {"on": "prompt", "run_id": runs["prompt"]}
    assert set(rows["cluster_id"]) <= prompt_topics  # response topics came out before
    summary, by_response = _export(db, cwd, "response.csv", "--on", "response")
    assert summary["clustering"] == {"on": "response", "run_id": runs["response"]}
    assert set(by_response["cluster_id"]) <= response_topics

    prompt_topic, response_topic = min(prompt_topics), min(response_topics)
    expected = {
        prompt_topic: int((rows["cluster_id"] == prompt_topic).sum()),
        response_topic: int((by_response["cluster_id"] == response_topic).sum()),
    }
    # A topic of the other field's clustering is refused, naming the --on that picks it.
    other = convoscope("export", "--out", "t.csv", "--cluster", response_topic, db=db, cwd=cwd)
    assert other.returncode == 2 and "pass --on response" in other.stderr, other.stderr
    wrong = convoscope(
        "replay", "--model", "m", "--base-url", "http://127.0.0.1:1/v1",
        "--cluster", response_topic, db=db, cwd=cwd,
    )  # fmt: skip
    assert wrong.returncode == 2
    assert f"no cluster {response_topic!r} in the latest clustering on prompt" in wrong.stderr
    assert "pass --on response" in wrong.stderr
    for topic, on in ((prompt_topic, ()), (response_topic, ("--on", "response"))):
        with OpenAIServer() as server:
            sent = convoscope(
                "replay", "--model", "m", "--base-url", server.base_url, "--cluster", topic,
                *on, "--json", db=db, cwd=cwd,
            )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["sent"] == expected[topic] > 0
    run_id = json.loads(sent.stdout)["run_id"]
    report = convoscope("replay", "report", run_id, "--json", db=db, cwd=cwd)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["clustering"] == {"on": "prompt", "run_id": runs["prompt"]}


def test_a_field_never_clustered_is_said_with_the_option_that_picks_another(
    tmp_path: Path,
) -> None:
    db, _ = _clustered(tmp_path, ("response",))
    hint = "no clusters on prompt yet, only on response: pass --on response"
    listed = convoscope("clusters", db=db, cwd=tmp_path)
    assert listed.returncode == 0 and hint in listed.stdout, listed.stdout

    exported = convoscope("export", "--out", "all.csv", "--json", db=db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["clustering"] == {"on": "prompt", "run_id": None}
    assert f"the rows carry no cluster: {hint}" in exported.stderr
    assert pd.read_csv(tmp_path / "all.csv")["cluster_id"].isna().all()

    topic = min(_topics(db, tmp_path, "--on", "response")[1])
    for option in (("--cluster", topic), ("--tag", "billing")):
        refused = convoscope(
            "replay", "--model", "m", "--base-url", "http://127.0.0.1:1/v1", *option,
            db=db, cwd=tmp_path,
        )  # fmt: skip
        assert refused.returncode == 2 and hint in refused.stderr, refused.stderr
    filtered = convoscope("export", "--out", "t.csv", "--cluster", topic, db=db, cwd=tmp_path)
    assert filtered.returncode == 2 and hint in filtered.stderr, filtered.stderr
    # `assign` said "no clustering yet: run `convoscope cluster` first" of a clustered database
    assigned = convoscope("assign", "--device", "cpu", db=db, cwd=tmp_path)
    assert assigned.returncode == 2 and hint in assigned.stderr, assigned.stderr


def _cluster_page(db: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CONVOSCOPE_DB", db)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("screens/cluster.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _topic_names(db: str, cwd: Path, *on: str) -> set[str]:
    listing = json.loads(convoscope("clusters", *on, "--json", db=db, cwd=cwd).stdout)
    return {c["name"] for c in listing["clusters"] if c["level"] == 0}


def _picked_names(at: AppTest) -> set[str]:
    """The topics the cluster page offers, by name (its options read "1. name")."""
    picker = at.selectbox(key="cluster_pick")
    return {option.split(". ", 1)[1] for option in picker.options}


def _shown_clustering(at: AppTest) -> str:
    return next(c.value for c in at.sidebar.caption if c.value.startswith("Clusters:"))


def test_the_ui_shows_the_same_clustering_and_offers_the_others(
    twice, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, runs, cwd = twice
    at = _cluster_page(db, monkeypatch)
    assert _shown_clustering(at) == (
        f"Clusters: the latest clustering on prompt (run `{runs['prompt']}`)"
    )
    assert at.selectbox(key="cluster_pick").value in _topics(db, cwd)[1]
    assert _picked_names(at) == _topic_names(db, cwd) != _topic_names(db, cwd, "--on", "response")

    picker = at.sidebar.selectbox(key="clustering_on")
    assert picker.label == "Clustering" and picker.options == ["on prompt", "on response"]
    picker.select("response").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "on response" in _shown_clustering(at) and runs["response"] in _shown_clustering(at)
    assert at.selectbox(key="cluster_pick").value in _topics(db, cwd, "--on", "response")[1]
    assert _picked_names(at) == _topic_names(db, cwd, "--on", "response")


def test_the_ui_shows_the_only_field_clustered_and_offers_no_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, runs = _clustered(tmp_path, ("response",))
    at = _cluster_page(db, monkeypatch)
    assert _shown_clustering(at) == (
        f"Clusters: the latest clustering on response (run `{runs['response']}`)"
    )
    assert not [s for s in at.sidebar.selectbox if s.key == "clustering_on"]


def _linked(db: str, monkeypatch: pytest.MonkeyPatch, cluster: str) -> AppTest:
    """The cluster page opened from a link to `cluster` (`/cluster?cluster=ID`), fresh."""
    monkeypatch.setenv("CONVOSCOPE_DB", db)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("screens/cluster.py")
    at.query_params["cluster"] = cluster
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_link_to_a_topic_of_another_fields_clustering_opens_that_clustering(
    twice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to a topic of the latest clustering on response opened the page on prompt's
    clustering, which has no such topic, and showed prompt's weakest topic instead, without a
    word. It now opens the response clustering at that topic; the sidebar still switches."""
    db, runs, cwd = twice
    topic = min(_topics(db, cwd, "--on", "response")[1])
    at = _linked(db, monkeypatch, topic)
    assert _shown_clustering(at) == (
        f"Clusters: the latest clustering on response (run `{runs['response']}`)"
    )
    assert at.selectbox(key="cluster_pick").value == topic and not at.warning
    assert at.sidebar.selectbox(key="clustering_on").value == "response"

    at.sidebar.selectbox(key="clustering_on").select("prompt").run()  # the link pins nothing
    assert not at.exception, [e.value for e in at.exception]
    assert "on prompt" in _shown_clustering(at) and not at.warning
    assert at.selectbox(key="cluster_pick").value in _topics(db, cwd)[1]


def test_a_link_to_a_topic_no_latest_clustering_holds_says_so(
    twice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to a topic that is in no latest clustering (re-clustered away, another
    database's) silently showed the weakest topic as if it were the one linked."""
    db, _, cwd = twice
    at = _linked(db, monkeypatch, "t999")
    (warning,) = at.warning
    assert "No topic t999 in the latest clustering on prompt or response" in warning.value
    assert "on prompt" in _shown_clustering(at)
    assert at.selectbox(key="cluster_pick").value in _topics(db, cwd)[1]
