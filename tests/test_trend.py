"""`convoscope trend`: the topics over time, on real database files of each engine (each
buckets the times in its own SQL), through the CLI's `main`."""

from __future__ import annotations

import json
import math
import re
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app.ui.render import escape_markdown
from clustering.stages import kmeans_clusterer, pca_reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from clustering.topics import ClusterConfig
from ingest.embed_step import EmbedConfig
from storage.engine import open_database
from storage.logs import iter_exchanges
from storage.scores import store_scores
from tests.openai_server import OpenAIServer
from tests.test_ingest_pipeline import convoscope_here as convoscope

MONDAY = datetime(2026, 1, 12, 9, 30, tzinfo=UTC)
# (week, topic, chats, retried): refunds go badly in the fourth week (February), poems do not;
# nothing is logged in the third week.
PLAN = [
    (0, "refund", 4, False),
    (0, "poem", 3, False),
    (1, "refund", 5, False),
    (1, "poem", 3, False),
    (3, "refund", 6, True),
    (3, "poem", 2, False),
]


def _chat(topic: str, i: int, when: datetime | None, retried: bool, model: str) -> dict[str, Any]:
    prompt = (
        f"I want a refund for order {i}, the parcel arrived broken"
        if topic == "refund"
        else f"Write a short poem about the sea at dawn, number {i}"
    )
    answer: dict[str, Any] = {"role": "assistant", "content": f"Answer {i} about {topic}."}
    if retried:
        answer["retried"] = True
    record: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}, answer]}
    record["model"] = model
    if when is not None:
        record["created_at"] = when.isoformat()
    return record


def _log(path: Path, *, dated: bool = True, plan: list[tuple[int, str, int, bool]] = PLAN) -> Path:
    """The plan's chats (each day of its week one after another) and two without a time."""
    lines = []
    for week, topic, chats, retried in plan:
        for k in range(chats):
            when = MONDAY + timedelta(weeks=week, days=k % 7) if dated else None
            model = "bot-b" if topic == "refund" and k % 2 else "bot-a"
            lines.append(_chat(topic, len(lines), when, retried, model))
    lines += [_chat("poem", 100, None, False, "bot-a"), _chat("refund", 101, None, False, "bot-a")]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _clustered(db: str, tmp_path: Path, log: Path, *, rewards: bool = True) -> dict[str, str]:
    """Ingested, clustered into the two topics; a reward per exchange (its answer's number
    over 100, minus 0.5 when retried) stored as a scorer's. Returns topic word → cluster id."""
    done = convoscope(
        "ingest", str(log), "--rejects", str(tmp_path / "r.jsonl"), db=db, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    engine = open_database(db)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(device="cpu", progress=False), topics=ClusterConfig(layout=False)
        ),
        reducer=pca_reducer(2),
        clusterer=kmeans_clusterer(2),
    )
    if rewards:
        rows = [r for batch in iter_exchanges(engine) for r in batch]
        store_scores(engine, "reward:test", {r["id"]: _reward(r) for r in rows})
    engine.dispose()
    listed = convoscope("clusters", "--level", "0", "--json", db=db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    ids = {}
    for cluster in json.loads(listed.stdout)["clusters"]:
        word = "refund" if "refund" in cluster["keywords"] else "poem"
        ids[word] = cluster["id"]
    assert len(ids) == 2
    return ids


def _reward(row: dict[str, Any]) -> float:
    number = int(row["response"].split()[1])
    return number / 100 - (0.5 if row["retried"] else 0.0)


def _trend(db: str, cwd: Path, *args: str) -> dict[str, Any]:
    done = convoscope("trend", *args, "--json", db=db, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_topics_over_weeks_on_every_engine(db_url: str, tmp_path: Path) -> None:
    ids = _clustered(db_url, tmp_path, _log(tmp_path / "chats.jsonl"))
    result = _trend(db_url, tmp_path, "--by", "week")
    assert result["period"] == "week" and result["scorer"] == "reward:test"
    assert result["periods"] == ["2026-01-12", "2026-01-19", "2026-01-26", "2026-02-02"]
    assert result["undated"] == 2
    assert [p["exchanges"] for p in result["total"]["series"]] == [7, 8, 0, 8]

    # Refunds first: their reward fell from the second week to the fourth (no third).
    refund, poem = result["clusters"]
    assert (refund["id"], poem["id"]) == (ids["refund"], ids["poem"])
    assert [p["exchanges"] for p in refund["series"]] == [4, 5, 0, 6]
    assert [p["retry_rate"] for p in refund["series"]] == [0.0, 0.0, None, 1.0]
    assert refund["series"][0]["reward_mean"] == pytest.approx(0.015)  # answers 0-3 / 100
    assert refund["series"][3]["reward_mean"] == pytest.approx(0.175 - 0.5)  # 15-20, retried
    assert refund["series"][2]["reward_mean"] is None and refund["series"][2]["scored"] == 0
    # A change needs both of the last two periods: the third week is empty, so there is none.
    assert refund["reward_change"] is None and poem["reward_change"] is None

    daily = _trend(db_url, tmp_path)  # 26 days of logs: days, picked from the span
    assert daily["period"] == "day" and len(daily["periods"]) == 27
    assert daily["periods"][0] == "2026-01-12" and daily["periods"][-1] == "2026-02-07"

    only = _trend(db_url, tmp_path, "--by", "week", "--cluster", ids["refund"], "--model", "bot-b")
    assert [c["id"] for c in only["clusters"]] == [ids["refund"]]
    assert [p["exchanges"] for p in only["total"]["series"]] == [2, 2, 0, 3]
    assert only["undated"] == 0

    monthly = _trend(db_url, tmp_path, "--by", "month")
    assert monthly["periods"] == ["2026-01-01", "2026-02-01"]
    assert [p["exchanges"] for p in monthly["total"]["series"]] == [15, 8]
    said = convoscope("trend", "--by", "week", db=db_url, cwd=tmp_path).stdout
    assert "week of" in said and "2 exchanges have no logged time and are in no week" in said
    assert said.index(ids["refund"]) < said.index(ids["poem"])


def test_the_change_into_the_latest_period_ranks_the_topics(tmp_path: Path) -> None:
    """By month: the refunds' reward fell into February, the poems' rose, so refunds lead."""
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl"))
    result = _trend(db, tmp_path, "--by", "month")
    refund = next(c for c in result["clusters"] if c["id"] == ids["refund"])
    jan, feb = refund["series"]
    assert (jan["exchanges"], feb["exchanges"]) == (9, 6)
    assert refund["reward_change"] == pytest.approx(-0.325 - 0.51 / 9)
    january = [i / 100 for i in (0, 1, 2, 3, 7, 8, 9, 10, 11)]  # the answers' numbers
    february = [i / 100 - 0.5 for i in range(15, 21)]  # retried
    error = math.sqrt(statistics.variance(january) / 9 + statistics.variance(february) / 6)
    change = statistics.mean(february) - statistics.mean(january)
    assert refund["reward_change_ci"] == pytest.approx(
        [change - 1.96 * error, change + 1.96 * error], abs=1e-4
    )
    poem = next(c for c in result["clusters"] if c["id"] == ids["poem"])
    assert poem["reward_change"] == pytest.approx(0.215 - 0.09)
    assert [c["id"] for c in result["clusters"]] == [ids["refund"], ids["poem"]]


def test_a_sure_drop_outranks_a_larger_one_chance_could_explain(tmp_path: Path) -> None:
    """Poems fall further into February than refunds, but on two scattered rewards: the
    refunds' small drop over fifteen steady ones is the surer, and comes first."""
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl"))
    engine = open_database(db)
    rewards, february_poems = {}, 0
    for row in (r for batch in iter_exchanges(engine) for r in batch):
        if row["created_at"] is None:
            continue
        poem = "poem" in row["prompt"]
        later = row["created_at"].month == 2
        steady = 0.5 - (0.1 if later and not poem else 0.0)
        if poem and later:
            february_poems += 1
            steady = -0.5 if february_poems == 1 else 0.9  # mean 0.2: down 0.3
        rewards[row["id"]] = steady + (0.01 if row["response"].split()[1][-1] in "13579" else 0)
    store_scores(engine, "reward:scattered", rewards)
    engine.dispose()
    result = _trend(db, tmp_path, "--by", "month")
    assert result["scorer"] == "reward:scattered"
    poem, refund = (
        next(c for c in result["clusters"] if c["id"] == ids[t]) for t in ("poem", "refund")
    )
    assert poem["reward_change"] < refund["reward_change"] < 0
    assert poem["reward_change_ci"][1] > 0 > refund["reward_change_ci"][1]
    assert [c["id"] for c in result["clusters"]] == [ids["refund"], ids["poem"]]


def test_since_and_until_select_by_the_logged_time(tmp_path: Path) -> None:
    """`export` and `trend` take the UI's Dates filter: a day given to --until counts whole."""
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl"))

    def exported(*window: str) -> list[dict[str, Any]]:
        out = tmp_path / "w.jsonl"
        done = convoscope("export", "--out", str(out), *window, db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in out.read_text().splitlines()]

    second_week = exported("--since", "2026-01-19", "--until", "2026-01-25")
    assert len(second_week) == 8  # 5 refunds, 3 poems
    assert {row["created_at"][:10] for row in second_week} == {
        f"2026-01-{d}" for d in range(19, 24)
    }
    assert len(exported("--until", "2026-01-12")) == 2  # the first day, whole
    last = exported("--since", "2026-02-07T10:30:00+01:00")  # 09:30 UTC: the last refund
    assert [row["created_at"] for row in last] == ["2026-02-07T09:30:00"]

    status = convoscope("status", db=db, cwd=tmp_path).stdout
    assert "logged 2026-01-12 to 2026-02-07 (23 of 25 exchanges have a time" in status
    weekly = _trend(db, tmp_path, "--by", "week", "--since", "2026-01-19")
    assert weekly["periods"][0] == "2026-01-19"
    assert [p["exchanges"] for p in weekly["total"]["series"]] == [8, 0, 8]
    assert weekly["undated"] == 0  # an exchange without a time is in no window

    later = convoscope("export", "--out", "x.jsonl", "--since", "2026-03-01", db=db, cwd=tmp_path)
    assert later.returncode == 2
    assert "the logs run from 2026-01-12 09:30 to 2026-02-07 09:30" in later.stderr
    backwards = ("--since", "2026-02-02", "--until", "2026-01-31")
    refused = convoscope("export", "--out", "x.jsonl", *backwards, db=db, cwd=tmp_path)
    assert refused.returncode == 2
    assert "--since 2026-02-02 00:00 is not before --until 2026-02-01 00:00" in refused.stderr
    junk = convoscope("trend", "--since", "last week", db=db, cwd=tmp_path)
    assert junk.returncode == 2 and "expected a date (2026-01-31)" in junk.stderr
    battles = convoscope(
        "export",
        "--format",
        "battles",
        "--out",
        "b.jsonl",
        "--since",
        "2026-01-19",
        db=db,
        cwd=tmp_path,
    )
    assert battles.returncode == 2 and "--since selects exchanges" in battles.stderr


def test_a_replay_of_the_inputs_logged_in_a_window(tmp_path: Path) -> None:
    """`replay --filter since=,until=`: the fourth week's inputs go to the endpoint, and the run
    records the window."""
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    log = _log(tmp_path / "chats.jsonl")
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    endpoint = ("--model", "new-bot", "--json")
    with OpenAIServer() as server:
        # Before the replay below stores its answers, which are logged now (December).
        late = convoscope(
            "replay",
            *endpoint,
            "--base-url",
            server.base_url,
            "--filter",
            "since=2026-03-01",
            db=db,
            cwd=tmp_path,
        )
        window = "since=2026-02-02,until=2026-02-08,model=bot-a"
        done = convoscope(
            "replay",
            *endpoint,
            "--base-url",
            server.base_url,
            "--filter",
            window,
            db=db,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert server.total_requests() == 5  # 3 of the 6 refunds, both poems: bot-a's
        numbers = sorted(int(re.search(r"\d+", prompt).group()) for prompt in server.requests)
        assert numbers == [15, 17, 19, 21, 22]  # the log's numbering of its chats
        run_id = json.loads(done.stdout)["run_id"]
        report = convoscope("replay", "report", run_id, db=db, cwd=tmp_path)
        assert "since=2026-02-02T00:00:00 · until=2026-02-09T00:00:00" in report.stdout
        twice = convoscope(
            "replay", *endpoint, "--base-url", server.base_url, "--filter", "until=2026-02-01",
            "--filter", "until=2026-02-03", db=db, cwd=tmp_path,
        )  # fmt: skip
        assert server.total_requests() == 5
    assert late.returncode == 2
    assert "--filter since=/until=: the logs run from 2026-01-12 09:30" in late.stderr
    assert twice.returncode == 2 and "--filter gives until= twice" in twice.stderr


def test_before_any_reward_the_topics_come_largest_first(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 't.sqlite'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl"), rewards=False)
    result = _trend(db, tmp_path, "--by", "month")
    assert result["scorer"] is None
    assert [c["id"] for c in result["clusters"]] == [ids["refund"], ids["poem"]]  # 15, 8
    assert all(c["reward_change"] is None for c in result["clusters"])
    said = convoscope("trend", "--by", "month", db=db, cwd=tmp_path).stdout
    assert "topics, largest first: exchanges per month (no rewards to rank by yet" in said


def test_logs_without_times_and_wrong_calls_say_so(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    log = _log(tmp_path / "chats.jsonl", dated=False)
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    nothing = convoscope("trend", db=db, cwd=tmp_path)
    assert nothing.returncode == 0 and "no clusters on prompt yet" in nothing.stdout
    _clustered(db, tmp_path, log)
    undated = convoscope("trend", db=db, cwd=tmp_path)
    assert undated.returncode == 0, undated.stderr
    assert "has a time: the logs give none" in undated.stdout
    assert _trend(db, tmp_path)["undated"] == 25
    unknown = convoscope("trend", "--cluster", "c999", db=db, cwd=tmp_path)
    assert unknown.returncode == 2 and "no topic 'c999'" in unknown.stderr
    wrong = convoscope("trend", "--by", "year", db=db, cwd=tmp_path)
    assert wrong.returncode == 2 and "invalid choice: 'year'" in wrong.stderr


APP = str(Path(__file__).resolve().parents[1] / "app" / "ui" / "app.py")


def _cluster_page(db: str, cluster_id: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CONVOSCOPE_DB", db)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("screens/cluster.py")
    at.query_params["cluster"] = cluster_id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _trend_charts(at: AppTest) -> list[dict[str, Any]]:
    """The page's charts of a topic over time: bars named "exchanges"."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return [spec for spec in specs if spec["data"] and spec["data"][0].get("name") == "exchanges"]


def test_the_cluster_page_charts_its_topic_over_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl"))
    at = _cluster_page(db, ids["refund"], monkeypatch)
    at.radio(key="trend_period").set_value("week").run()
    (chart,) = _trend_charts(at)
    bars, line = chart["data"]
    assert bars["x"] == ["2026-01-12", "2026-01-19", "2026-01-26", "2026-02-02"]
    assert bars["y"] == [4, 5, 0, 6]
    assert line["y"][0] == pytest.approx(0.015) and line["y"][2] is None
    first_week = [0.0, 0.01, 0.02, 0.03]  # the answers' numbers over 100
    margin = 1.96 * statistics.stdev(first_week) / 2
    assert line["error_y"]["array"][0] == pytest.approx(margin, abs=1e-4)
    assert line["error_y"]["array"][2] is None
    assert any("(1 with no logged time not shown)" in c.value for c in at.caption)


def test_the_cluster_page_says_when_no_exchange_has_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl", dated=False))
    at = _cluster_page(db, ids["poem"], monkeypatch)
    assert not _trend_charts(at)
    assert any(
        c.value.startswith("No exchange of this cluster has a logged time") for c in at.caption
    )


def test_the_overview_names_the_topics_surely_worse_than_the_period_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six weeks of both topics (weeks, picked from the span); refunds are retried in the last
    one, so their reward falls by 0.5 while the poems' rises: only refunds are named."""
    steady = [(week, topic, 4, False) for week in range(5) for topic in ("refund", "poem")]
    plan = [*steady, (5, "refund", 5, True), (5, "poem", 4, False)]
    db = f"duckdb:///{tmp_path / 't.duckdb'}"
    ids = _clustered(db, tmp_path, _log(tmp_path / "chats.jsonl", plan=plan))
    monkeypatch.setenv("CONVOSCOPE_DB", db)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    (warning,) = [w.value for w in at.warning if w.value.startswith("Worse in the")]
    assert warning.startswith("Worse in the week of 2026-02-16 than the week before")
    said = _trend(db, tmp_path)  # the same topics, the same names, through the CLI
    refund, poem = (
        next(t for t in said["clusters"] if t["id"] == ids[w]) for w in ("refund", "poem")
    )
    assert f"{escape_markdown(refund['name'])} ({refund['reward_change']:+.2f})" in warning
    assert escape_markdown(poem["name"]) not in warning and poem["reward_change"] > 0


def test_the_topics_named_worse_survive_the_number_compared() -> None:
    """A fall 2.5 standard errors deep is outside its own 95 % interval, so it would be named
    beside one other topic, but not among 40, where about one would fall that far by chance;
    a fall 4 errors deep is named among 40 too. Topics without an error are never named."""
    from scoring.trend import surely_worse

    def topic(name: str, change: float | None, error: float | None) -> dict[str, Any]:
        return {"id": name, "name": name, "reward_change": change, "reward_change_se": error}

    shallow, deep = topic("shallow", -0.25, 0.1), topic("deep", -0.4, 0.1)
    steady = [topic(f"s{i}", 0.0, 0.1) for i in range(38)]
    assert surely_worse([shallow, topic("s", 0.0, 0.1)]) == [shallow]
    assert surely_worse([shallow, deep, *steady]) == [deep]
    assert surely_worse([topic("one", -0.3, None), topic("none", None, None)]) == []
