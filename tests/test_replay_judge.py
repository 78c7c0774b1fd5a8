"""The pairwise LLM judge of a replay, against a real loopback OpenAI-style server acting as judge.

The judge server answers like a judge that prefers replayed answers (they start with "answer "):
it reads which of "Answer A" / "Answer B" is the replayed one, so the test sees whether the
randomised presentation order is mapped back correctly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from app.cli import main
from ingest.replay import replay
from scoring.judge import (
    JudgeConfig,
    JudgeError,
    judge_replay,
    judge_results,
    parse_verdict,
)
from storage.engine import open_database
from storage.logs import ExchangeFilter, load_battles, utcnow
from storage.replay import (
    Lease,
    LeaseLost,
    claim_judge_run,
    claim_run,
    get_judge_run,
    load_verdicts,
    release_run,
    store_verdicts,
)
from tests.openai_server import Fault, OpenAIServer, last_user_message
from tests.test_ingest_pipeline import REPO
from tests.test_ingest_pipeline import convoscope_here as convoscope  # in-process: faster
from tests.test_replay import config_for, logged_db, question

_ANSWERS = re.compile(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nCompare", re.DOTALL)


def prefers_replayed(messages: list[dict[str, Any]]) -> str:
    """A judge's reply that picks whichever shown answer came from the replay."""
    first, _second = _ANSWERS.search(last_user_message(messages)).groups()  # type: ignore[union-attr]
    return f"The replayed one is better.\nVerdict: {'A' if first.startswith('answer ') else 'B'}"


def shown_first_was_new(request: dict[str, Any]) -> bool:
    first, _ = _ANSWERS.search(request["prompt"]).groups()  # type: ignore[union-attr]
    return first.startswith("answer ")


def judge_config(server: OpenAIServer, **overrides: object) -> JudgeConfig:
    settings: dict[str, object] = {
        "model": "judge-model",
        "base_url": server.base_url,
        "concurrency": 4,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.1,
        "timeout_s": 10.0,
        "progress": False,
    }
    settings.update(overrides)
    return JudgeConfig(**settings)  # type: ignore[arg-type]


def replayed_db(url: str, tmp_path: Path, n: int) -> tuple[Engine, str]:
    engine = logged_db(url, tmp_path, n)
    with OpenAIServer() as server:
        summary = replay(engine, config=config_for(server))
    assert summary.done == n
    return engine, summary.run_id


def test_judge_maps_randomised_order_back_and_is_idempotent(db_url: str, tmp_path: Path) -> None:
    engine, run_id = replayed_db(db_url, tmp_path, 24)
    with OpenAIServer(responder=prefers_replayed) as judge:
        summary = judge_replay(engine, run_id, config=judge_config(judge))
        assert (summary.judged, summary.failed, summary.sent) == (24, 0, 24)
        # Both presentation orders were used, and the judge saw the instruction-free pair.
        orders = [shown_first_was_new(r) for r in judge.received]
        assert 0 < sum(orders) < len(orders)
        assert all(r["body"]["temperature"] == 0 for r in judge.received)

        # Whatever the order shown, the stored winner is the new answer (exchange_b).
        verdicts = load_verdicts(engine, f"judge:{run_id}")
        assert len(verdicts) == 24 and {v["winner"] for v in verdicts} == {"b"}
        overall, _ = judge_results(engine, run_id)
        assert overall is not None and (overall.n, overall.new_wins) == (24, 24)
        assert overall.win_rate == 1.0

        # A re-run sends nothing: every pair already has this judge's verdict.
        again = judge_replay(engine, run_id, config=judge_config(judge))
        assert (again.sent, again.already_judged, again.requests) == (0, 24, 0)
        assert judge.total_requests() == 24
    # Verdicts are battles: the leaderboards learn from them like from any judged battle.
    battles = load_battles(engine)
    assert len(battles) == 24 and {b["model_b"] for b in battles} == {"new-model"}
    engine.dispose()


def test_judge_retries_faults_and_rejudges_unparseable_replies(db_url: str, tmp_path: Path) -> None:
    engine, run_id = replayed_db(db_url, tmp_path, 8)
    faults = [Fault(status=429, retry_after="0", times=3), Fault(status=500, times=2)]
    replies = iter(["I cannot decide."] * 2)

    def flaky(messages: list[dict[str, Any]]) -> str:
        return next(replies, None) or prefers_replayed(messages)

    with OpenAIServer(faults=faults, responder=flaky) as judge:
        summary = judge_replay(
            engine, run_id, config=judge_config(judge, concurrency=1, max_attempts=6)
        )
        assert summary.retried == 5
        assert (summary.judged, summary.failed) == (6, 2)
        assert "Verdict" in summary.errors[0]
        # The two without a verdict are judged on the next run, and only they.
        again = judge_replay(engine, run_id, config=judge_config(judge))
        assert (again.sent, again.judged, again.failed) == (2, 2, 0)
    assert len(load_verdicts(engine, f"judge:{run_id}")) == 8
    engine.dispose()


def test_judge_of_an_unknown_or_unanswered_run_is_a_clear_error(tmp_path: Path) -> None:
    engine = logged_db(f"duckdb:///{tmp_path / 'j.duckdb'}", tmp_path, 2)
    with pytest.raises(JudgeError, match="no replay run"):
        judge_replay(engine, "nope", config=JudgeConfig(model="j", base_url="http://127.0.0.1:9"))
    engine.dispose()


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Both fine.\nVerdict: A", "a"),
        ("verdict: b", "b"),
        ("**Verdict:** [[tie]]", "tie"),
        ("Verdict: A... on reflection, Verdict: B", "b"),
        ("B", "b"),
        ("Answer A is better", None),
        # Each of these was misread (a tie as A, A/B as A) or not read at all.
        ("Both are equally good.\nVerdict: a tie", "tie"),
        ("Verdict: A tie", "tie"),
        ("Verdict: draw", "tie"),
        ("**Verdict**: B", "b"),
        ("Verdict: Answer B", "b"),
        ("Verdict: **Answer A**", "a"),
        ('Verdict: "A"', "a"),
        ("Verdict: \u201cB\u201d.", "b"),
        ("VERDICT \u2014 A", "a"),
        ("Verdict - B", "b"),
        ("Final verdict is: B", "b"),
        ("Verdict: B is better than A", "b"),
        ("verdict: A/B", None),
        ("Verdict: A or B, hard to say", None),
        ("Verdict: A\nOn reflection, verdict: A / B", None),
        ("Verdict: Awesome work by both", None),
        ("My verdict follows.\nVerdict: B", "b"),
        ('"tie".', "tie"),
    ],
)
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_judge_from_the_cli_and_in_the_report(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'cli.duckdb'}"
    engine, run_id = replayed_db(db, tmp_path, 6)
    engine.dispose()
    with OpenAIServer(responder=prefers_replayed) as judge:
        result = convoscope(
            "replay", "judge", run_id, "--model", "judge-model", "--base-url", judge.base_url,
            "--json", db=db, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["judged"] == 6 and summary["result"]["win_rate"] == 1.0

    report = convoscope("replay", "report", run_id, db=db, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "judge judge-model: the new answer wins 100%" in report.stdout
    missing = convoscope("replay", "judge", run_id, db=db, cwd=tmp_path)
    assert missing.returncode == 2 and "--model" in missing.stderr

    # A judge nobody answers: exit 2 with the summary, as a replay nobody answers does.
    args = ("--model", "other-judge", "--base-url", "http://127.0.0.1:1/v1", "--max-attempts", "1")
    failed = convoscope("replay", "judge", run_id, *args, "--json", db=db, cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1].endswith("none of the 6 pairs sent was judged")
    assert json.loads(failed.stdout)["failed"] == 6


def prefers_original(messages: list[dict[str, Any]]) -> str:
    """A judge's reply that picks whichever shown answer was the logged one."""
    return prefers_replayed(messages).translate(str.maketrans("AB", "BA"))


def test_the_report_gives_each_judge_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two judges' verdicts on the same pairs were pooled: 12 "judged pairs" out of 6, and a
    confidence interval as if they were independent."""
    db = f"duckdb:///{tmp_path / 'two.duckdb'}"
    engine, run_id = replayed_db(db, tmp_path, 6)
    for model, responder in (("judge-1", prefers_replayed), ("judge-2", prefers_original)):
        with OpenAIServer(responder=responder) as judge:
            assert judge_replay(engine, run_id, config=judge_config(judge, model=model)).judged == 6
    engine.dispose()

    assert main(["--db", db, "replay", "report", run_id, "--json"]) == 0
    judges = json.loads(capsys.readouterr().out)["judges"]
    assert sorted(judges) == ["judge-1", "judge-2"]
    one, two = judges["judge-1"]["overall"], judges["judge-2"]["overall"]
    assert (one["n"], one["win_rate"], two["n"], two["win_rate"]) == (6, 1.0, 6, 0.0)
    assert main(["--db", db, "replay", "report", run_id]) == 0
    said = capsys.readouterr().out
    assert "judge judge-1: the new answer wins 100% (95% CI 61%-100%) of 6 judged pairs" in said
    assert "judge judge-2: the new answer wins 0% (95% CI 0%-39%) of 6 judged pairs" in said


def test_an_interrupted_judge_keeps_its_verdicts_and_says_how_to_finish(tmp_path: Path) -> None:
    """Verdicts were committed 32 at a time and the last flush skipped on Ctrl-C: every
    verdict received since the last commit was lost, paid for and not stored."""
    db = f"duckdb:///{tmp_path / 'judge.duckdb'}"
    engine, run_id = replayed_db(db, tmp_path, 6)
    engine.dispose()  # DuckDB: the judging process is the one writer
    held = Fault(prompt=question(0), delay_s=900)  # one pair the judge never answers in time
    with OpenAIServer(responder=prefers_replayed, faults=[held]) as judge:
        args = ("replay", "judge", run_id, "--model", "judge-model", "--base-url", judge.base_url)
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--db", db, *args, "--timeout", "900"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while judge.total_answered() < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the replies read and parsed: verdicts waiting for their commit
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    finish = f"replay judge {run_id} --model judge-model --base-url {judge.base_url}`"
    assert re.search(rf"finish with `convoscope --db \S+ {re.escape(finish)}", err), err
    engine = open_database(db)
    assert len(load_verdicts(engine, f"judge:{run_id}")) == 5
    engine.dispose()


def test_saved_inputs_without_an_original_answer_are_not_judged(
    duckdb_url: str, tmp_path: Path
) -> None:
    """A saved input (a prompt logged without its answer: a CSV with no response column) has
    no original answer. The judge was sent an empty "Answer" beside the new one and the new
    answer "won" against nothing, paid for and counted in the win rate."""
    from ingest.pipeline import IngestConfig, ingest_paths

    engine = logged_db(duckdb_url, tmp_path, 4)  # four logged exchanges with their answers
    saved = tmp_path / "inputs.csv"
    saved.write_text("prompt\n" + "".join(f"Saved question {i}?\n" for i in range(3)))
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    assert ingest_paths([saved], engine=engine, config=config).stored == 3
    with OpenAIServer() as server:
        run_id = replay(engine, config=config_for(server)).run_id
    with OpenAIServer(responder=prefers_replayed) as judge:
        summary = judge_replay(engine, run_id, config=judge_config(judge))
        prompts = sorted(r["prompt"] for r in judge.received)
    assert [p.split("\n")[1] for p in prompts] == [question(i) for i in range(4)]
    assert (summary.sent, summary.judged, summary.without_original) == (4, 4, 3)
    assert len(load_verdicts(engine, f"judge:{run_id}")) == 4

    only_saved = tmp_path / "only-saved.csv"  # a run of saved inputs alone: nothing to judge
    only_saved.write_text("prompt\nAnother saved question?\n")
    ingest_paths([only_saved], engine=engine, config=config)
    with OpenAIServer() as server:
        source = ExchangeFilter(sources=(str(only_saved),))
        alone = replay(engine, config=config_for(server), select=source).run_id
    with OpenAIServer(responder=prefers_replayed) as judge:
        with pytest.raises(JudgeError, match="no original answer"):
            judge_replay(engine, alone, config=judge_config(judge))
        assert judge.total_requests() == 0
    engine.dispose()


def test_a_judges_interval_on_a_few_pairs_is_never_certain(duckdb_url: str, tmp_path: Path) -> None:
    """The interval was the normal one, mean ± 1.96 standard errors: when every verdict went
    one way its width was 0, and the report read "wins 100% (95% CI 100%-100%)" on one pair,
    or on three, a certainty no handful of verdicts gives a release decision."""
    engine, run_id = replayed_db(duckdb_url, tmp_path, 3)
    with OpenAIServer(responder=prefers_replayed) as judge:
        assert judge_replay(engine, run_id, config=judge_config(judge, sample=1)).judged == 1
        one, _ = judge_results(engine, run_id)
        assert judge_replay(engine, run_id, config=judge_config(judge)).judged == 2
        three, _ = judge_results(engine, run_id)
    engine.dispose()
    assert one is not None and three is not None
    assert (one.n, one.win_rate, three.n, three.win_rate) == (1, 1.0, 3, 1.0)
    assert one.ci_high == three.ci_high == 1.0
    assert one.ci_low < three.ci_low < 0.5  # Wilson's: 0.21 on one pair, 0.44 on three
    assert one.ci_low == pytest.approx(0.2065, abs=1e-3)
    assert three.ci_low == pytest.approx(0.4385, abs=1e-3)


def test_one_process_judges_a_run_with_a_judge_at_a_time(db_url: str, tmp_path: Path) -> None:
    """The lease on judging a run with one judge, as a replay's on its run: a second claim is
    refused while it holds, another judge of the same run is not, and a holder taken over
    stores no verdict more (its late verdicts would have been paid for twice)."""
    engine, run_id = replayed_db(db_url, tmp_path, 2)
    first, second, other = (
        Lease(run_id=run_id, owner=owner, seconds=60.0, judge=judge)
        for owner, judge in (("first", "judge-1"), ("second", "judge-1"), ("other", "judge-2"))
    )
    assert claim_judge_run(engine, first) is None
    holder = claim_judge_run(engine, second)
    assert holder is not None and (holder["owner"], holder["status"]) == ("first", "running")
    assert claim_judge_run(engine, other) is None  # another judge: its own verdicts, at once
    assert claim_run(engine, Lease(run_id=run_id, owner="resume", seconds=60.0)) is None

    assert claim_judge_run(engine, second, take_over=True) is None
    verdict = {"id": "v1", "exchange_a": "a", "exchange_b": "b", "winner": "b"}
    verdict |= {"judge": "judge-1", "source": f"judge:{run_id}", "ingested_at": utcnow()}
    with pytest.raises(LeaseLost):
        store_verdicts(engine, [verdict], lease=first)
    assert load_verdicts(engine, f"judge:{run_id}") == []
    store_verdicts(engine, [verdict], lease=second)
    assert len(load_verdicts(engine, f"judge:{run_id}")) == 1
    with pytest.raises(LeaseLost):
        release_run(engine, first, "done")
    release_run(engine, second, "done")
    assert get_judge_run(engine, run_id, "judge-1")["status"] == "done"  # type: ignore[index]
    engine.dispose()


def _judging(db: str, cwd: Path, run_id: str, *args: str) -> subprocess.Popen[str]:
    """`convoscope --db DB replay judge RUN --model judge-model ARGS` in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--db", db, "replay", "judge", run_id,
         "--model", "judge-model", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _once_sent(server: OpenAIServer, sent: int) -> None:
    """Wait until `sent` requests reached `server` (the judging process holds the run)."""
    deadline = time.monotonic() + 120
    while server.total_requests() < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.total_requests() == sent


def test_judging_a_run_another_process_judges_is_refused_until_taken_over(
    db_url: str, tmp_path: Path
) -> None:
    """Two `replay judge RUN --model J` at once each sent every pair without a verdict from
    J, so each pair was paid for twice. A second process now leaves a live judge run alone,
    saying how to take it over; a killed process's judge run is taken with --take-over."""
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: no second one can judge")
    engine, run_id = replayed_db(db_url, tmp_path, 3)
    engine.dispose()
    with OpenAIServer(delay_s=900) as held, OpenAIServer(responder=prefers_replayed) as fast:
        first = _judging(db_url, tmp_path, run_id, "--base-url", held.base_url, "--timeout", "900")
        try:
            _once_sent(held, 3)
            again = ("replay", "judge", run_id, "--model", "judge-model")
            again += ("--base-url", fast.base_url)
            second = convoscope(*again, db=db_url, cwd=tmp_path)
            assert second.returncode == 2, second.stderr
            said = f"run {run_id} is being judged by judge-model in another process since "
            assert said in second.stderr and "--take-over`" in second.stderr, second.stderr
            assert fast.total_requests() == 0 and held.total_requests() == 3
        finally:
            first.kill()
            first.communicate(timeout=60)
        # Killed: its lease has not lapsed, so the run stays refused until taken over.
        assert convoscope(*again, db=db_url, cwd=tmp_path).returncode == 2
        taken = convoscope(*again, "--take-over", "--json", db=db_url, cwd=tmp_path)
        assert taken.returncode == 0, taken.stderr
        assert json.loads(taken.stdout)["judged"] == 3 == fast.total_requests()
        assert json.loads(taken.stdout)["status"] == "done"
    engine = open_database(db_url)
    assert len(load_verdicts(engine, f"judge:{run_id}")) == 3
    engine.dispose()


_KILLED_JUDGE = """
import sys
from scoring.judge import JudgeConfig, judge_replay
from storage.engine import open_database

config = JudgeConfig(model="judge-model", base_url=sys.argv[2], lease_s=1.0, timeout_s=900)
judge_replay(open_database(sys.argv[1]), sys.argv[3], config=config)
"""


def test_a_killed_judge_run_is_incomplete_and_judged_again_once_its_lease_lapses(
    db_url: str, tmp_path: Path
) -> None:
    """A judge run had no record: one at work and one killed looked alike. The report now
    says which judge runs are running, and a killed one is incomplete once its lease lapses
    (a second here, a minute by default); then a plain re-run judges its pairs."""
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: the report waits for it")
    engine, run_id = replayed_db(db_url, tmp_path, 2)
    engine.dispose()
    report = ("replay", "report", run_id, "--json")
    with OpenAIServer(delay_s=900) as held, OpenAIServer(responder=prefers_replayed) as fast:
        first = subprocess.Popen(
            [sys.executable, "-c", _KILLED_JUDGE, db_url, held.base_url, run_id],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            _once_sent(held, 2)
            live = convoscope(*report, db=db_url, cwd=tmp_path)
            assert json.loads(live.stdout)["judge_runs"] == {"judge-model": "running"}
        finally:
            first.kill()
            first.wait(timeout=60)
        time.sleep(1.5)  # the lease lapses
        killed = convoscope(*report, db=db_url, cwd=tmp_path)
        assert json.loads(killed.stdout)["judge_runs"] == {"judge-model": "incomplete"}
        said = convoscope("replay", "report", run_id, db=db_url, cwd=tmp_path).stdout
        assert "judge judge-model: incomplete" in said
        again = ("replay", "judge", run_id, "--model", "judge-model", "--base-url", fast.base_url)
        judged = convoscope(*again, "--json", db=db_url, cwd=tmp_path)
        assert judged.returncode == 0, judged.stderr
        assert json.loads(judged.stdout)["judged"] == 2 == fast.total_requests()
    done = convoscope(*report, db=db_url, cwd=tmp_path)
    assert json.loads(done.stdout)["judge_runs"] == {"judge-model": "done"}


def test_a_live_judge_taken_over_stops_and_stores_nothing_more(db_url: str, tmp_path: Path) -> None:
    """--take-over of a judging process that was alive after all: it finds its lease gone at
    its next renewal (the heartbeat, before its slow replies come) and stops, saying so; it
    went on judging, and reported success, beside the process that took over."""
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: no second one can judge")
    engine, run_id = replayed_db(db_url, tmp_path, 2)
    engine.dispose()
    slow_judge = OpenAIServer(delay_s=20, responder=prefers_original)
    with slow_judge as slow, OpenAIServer(responder=prefers_replayed) as fast:
        first = _judging(db_url, tmp_path, run_id, "--base-url", slow.base_url)
        _once_sent(slow, 2)
        again = ("replay", "judge", run_id, "--model", "judge-model")
        taken = convoscope(
            *again, "--base-url", fast.base_url, "--take-over", db=db_url, cwd=tmp_path
        )
        assert taken.returncode == 0, taken.stderr
        _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert f"judging run {run_id} with judge-model was taken over by another process" in err
    engine = open_database(db_url)
    # The process that took over judged for the new answers; the slow one, against them.
    assert [v["winner"] for v in load_verdicts(engine, f"judge:{run_id}")] == ["b", "b"]
    engine.dispose()
