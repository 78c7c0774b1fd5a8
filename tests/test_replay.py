"""Replay against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py).

Inputs are logged through the real ingest step; answers come over real HTTP through the `openai`
client; faults are injected by the server, never by patching the code under test.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingest.pipeline import IngestConfig, ingest_paths
from ingest.replay import ReplayConfig, ReplayError, compare, pairs, replay, select_inputs
from storage.engine import open_database
from storage.logs import ExchangeFilter, iter_exchanges
from storage.replay import run_items
from storage.schema import metadata as schema_metadata
from tests.openai_server import Fault, OpenAIServer, answer_for

REPO = Path(__file__).resolve().parents[1]


def question(i: int) -> str:
    return f"Question {i}: what is {i} squared?"


def write_log(path: Path, n: int, *, models: tuple[str, ...] = ("old-a", "old-b")) -> None:
    """n one-turn conversations with a system message, as an OpenAI chat JSONL log."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            record = {
                "id": f"conv-{i}",
                "model": models[i % len(models)],
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": question(i)},
                    {"role": "assistant", "content": str(i * i)},
                ],
            }
            handle.write(json.dumps(record) + "\n")


def logged_db(url: str, tmp_path: Path, n: int) -> Engine:
    log = tmp_path / "chat.jsonl"
    write_log(log, n)
    engine = open_database(url)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    summary = ingest_paths([log], engine=engine, config=config)
    assert summary.stored == n
    return engine


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


def config_for(server: OpenAIServer, **overrides: object) -> ReplayConfig:
    settings: dict[str, object] = {
        "model": "new-model",
        "base_url": server.base_url,
        "concurrency": 4,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.1,
        "timeout_s": 10.0,
        "progress": False,
    }
    settings.update(overrides)
    return ReplayConfig(**settings)  # type: ignore[arg-type]


def replayed(engine: Engine, run_id: str) -> list[dict[str, object]]:
    where = ExchangeFilter(sources=(f"replay:{run_id}",))
    return [row for batch in iter_exchanges(engine, where=where) for row in batch]


def items_by_prompt(engine: Engine, run_id: str) -> dict[str, dict[str, object]]:
    originals = {row["id"]: row["prompt"] for batch in iter_exchanges(engine) for row in batch}
    return {originals[item["exchange_id"]]: item for item in run_items(engine, run_id)}


def test_replay_stores_answers_like_logs(db_url: str, tmp_path: Path, server: OpenAIServer) -> None:
    engine = logged_db(db_url, tmp_path, 12)
    summary = replay(engine, config=config_for(server, params={"temperature": 0.0}))
    assert (summary.items, summary.sent, summary.done, summary.failed) == (12, 12, 12, 0)
    assert summary.status == "done" and summary.requests == 12 and summary.retried == 0

    rows = replayed(engine, summary.run_id)
    assert len(rows) == 12
    originals = {
        row["id"]: row for row in next(iter_exchanges(engine)) if row["model"] != "new-model"
    }
    for row in rows:
        meta = json.loads(row["metadata"])
        original = originals[meta["original_exchange_id"]]
        sent = [*json.loads(row["context"]), {"role": "user", "content": row["prompt"]}]
        assert row["response"] == answer_for(sent)
        assert row["prompt"] == original["prompt"]
        assert json.loads(row["context"]) == json.loads(original["context"])
        assert row["model"] == "new-model" and row["source"] == f"replay:{summary.run_id}"
        assert row["conversation_id"] != original["conversation_id"]
        assert row["instruction"] == original["instruction"] == "Answer in one word."
        assert meta["endpoint"] == server.base_url and meta["latency_s"] > 0
        assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0
        assert row["retried"] is None and row["thumbs"] is None  # no user saw it: unknown
    assert all(body["body"]["temperature"] == 0.0 for body in server.received)
    assert set(server.requests.values()) == {1}
    with engine.connect() as conn:
        conversations = schema_metadata.tables["conversations"]
        query = sa.select(sa.func.count()).where(conversations.c.source.like("replay:%"))
        assert conn.execute(query).scalar_one() == 12

    again = replay(
        engine, config=config_for(server, params={"temperature": 0.0}), run_id=summary.run_id
    )
    assert again.resumed and again.sent == 0 and again.already_done == 12
    assert server.total_requests() == 12
    engine.dispose()


def test_later_turns_are_replayed_with_their_whole_context(
    tmp_path: Path, server: OpenAIServer
) -> None:
    """Later turns store their context as a reference to the turn before; the request must
    still carry every earlier message."""
    log = tmp_path / "multi.jsonl"
    with log.open("w", encoding="utf-8") as handle:
        for i in range(3):
            messages = [{"role": "system", "content": "Answer in one word."}]
            for turn in range(3):
                messages += [
                    {"role": "user", "content": f"conversation {i}, turn {turn}?"},
                    {"role": "assistant", "content": f"answer {i}.{turn}"},
                ]
            handle.write(json.dumps({"id": f"conv-{i}", "messages": messages}) + "\n")
    engine = open_database(f"duckdb:///{tmp_path / 'multi.duckdb'}")
    ingest_paths(
        [log], engine=engine, config=IngestConfig(progress=False, rejects_path=tmp_path / "r")
    )
    summary = replay(engine, config=config_for(server))
    assert (summary.items, summary.done) == (9, 9)
    sent = {body["prompt"]: body["body"]["messages"] for body in server.received}
    for batch in iter_exchanges(engine, where=ExchangeFilter(sources=(str(log),))):
        for row in batch:
            whole = [*json.loads(row["context"]), {"role": "user", "content": row["prompt"]}]
            assert sent[row["prompt"]] == whole
    assert len(sent["conversation 2, turn 2?"]) == 1 + 2 * 2 + 1
    engine.dispose()


def test_instruction_override_is_the_system_message(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 4)
    override = "You are a patient maths tutor. Explain each step."
    summary = replay(engine, config=config_for(server, instruction=override))
    assert summary.done == 4
    for request in server.received:
        messages = request["body"]["messages"]
        assert messages[0] == {"role": "system", "content": override}
        assert [m["role"] for m in messages] == ["system", "user"]
    for row in replayed(engine, summary.run_id):
        assert row["instruction"] == override
        assert json.loads(row["context"])[0]["content"] == override
        sent = [{"role": "system", "content": override}, {"role": "user", "content": row["prompt"]}]
        assert row["response"] == answer_for(sent)
    engine.dispose()


def test_429_waits_for_retry_after_or_backs_off(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 4)
    server.add_fault(Fault(prompt=question(1), status=429, retry_after="1", times=1))
    server.add_fault(Fault(prompt=question(2), status=429, times=2))  # no Retry-After
    summary = replay(engine, config=config_for(server))
    assert (summary.done, summary.failed, summary.retried) == (4, 0, 3)
    items = items_by_prompt(engine, summary.run_id)
    assert items[question(1)]["attempts"] == 2 and items[question(2)]["attempts"] == 3
    assert items[question(0)]["attempts"] == 1
    arrivals = [r["at"] for r in server.received if r["prompt"] == question(1)]
    assert arrivals[1] - arrivals[0] >= 1.0  # the server asked for one second
    engine.dispose()


def test_server_errors_until_max_attempts_leave_a_failure_record_then_resume(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 5)
    always = Fault(prompt=question(0), status=500)
    server.add_fault(always)
    server.add_fault(Fault(prompt=question(1), status=503, times=2))
    config = config_for(server, max_attempts=3)
    summary = replay(engine, config=config)
    assert (summary.done, summary.failed, summary.status, summary.pending) == (
        4,
        1,
        "incomplete",
        1,
    )
    items = items_by_prompt(engine, summary.run_id)
    failed = items[question(0)]
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert "InternalServerError 500" in str(failed["error"])
    assert failed["response_exchange_id"] is None
    assert items[question(1)]["status"] == "done" and items[question(1)]["attempts"] == 3
    assert server.requests[question(0)] == 3

    server.faults.remove(always)  # the endpoint recovers; the failed input is sent again
    resumed = replay(engine, config=config, run_id=summary.run_id)
    assert (resumed.sent, resumed.done, resumed.status) == (1, 1, "done")
    assert items_by_prompt(engine, summary.run_id)[question(0)]["attempts"] == 4
    assert server.requests[question(0)] == 4 and server.requests[question(2)] == 1
    assert len(replayed(engine, summary.run_id)) == 5
    engine.dispose()


def test_malformed_bodies_are_retried(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 3)
    server.add_fault(Fault(prompt=question(2), malformed=True, times=2))
    summary = replay(engine, config=config_for(server))
    assert (summary.done, summary.retried) == (3, 2)
    assert items_by_prompt(engine, summary.run_id)[question(2)]["attempts"] == 3
    engine.dispose()


def test_timeouts_are_retried_then_recorded(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 3)
    server.add_fault(Fault(prompt=question(0), delay_s=1.5, times=1))
    server.add_fault(Fault(prompt=question(1), delay_s=1.5))
    summary = replay(engine, config=config_for(server, timeout_s=0.4, max_attempts=2))
    assert (summary.done, summary.failed) == (2, 1)
    items = items_by_prompt(engine, summary.run_id)
    assert items[question(0)]["status"] == "done" and items[question(0)]["attempts"] == 2
    assert items[question(1)]["status"] == "failed"
    assert "timed out" in str(items[question(1)]["error"])
    engine.dispose()


def test_rate_limit_spaces_requests(duckdb_url: str, tmp_path: Path, server: OpenAIServer) -> None:
    engine = logged_db(duckdb_url, tmp_path, 8)
    summary = replay(engine, config=config_for(server, concurrency=8, rate_limit=10.0))
    assert summary.done == 8
    arrivals = sorted(r["at"] for r in server.received)
    assert arrivals[-1] - arrivals[0] >= 0.9 * 7 / 10.0  # 8 starts, 0.1 s apart at least
    engine.dispose()


def test_api_key_is_sent_but_never_stored_or_logged(
    duckdb_url: str,
    tmp_path: Path,
    server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    secret = "sk-test-4f1c9e7d2b8a6053"
    monkeypatch.setenv("CONVOSCOPE_TEST_KEY", secret)
    engine = logged_db(duckdb_url, tmp_path, 3)
    # A 401 whose message quotes the credentials, as some gateways do: not retryable.
    server.add_fault(Fault(prompt=question(0), status=401, echo_auth=True))
    caplog.set_level(logging.DEBUG)
    config = config_for(server, api_key_env="CONVOSCOPE_TEST_KEY", progress=True)
    summary = replay(engine, config=config)
    assert (summary.done, summary.failed) == (2, 1)
    assert {r["authorization"] for r in server.received} == {f"Bearer {secret}"}
    failed = items_by_prompt(engine, summary.run_id)[question(0)]
    assert failed["attempts"] == 1 and "***" in str(failed["error"])

    with engine.connect() as conn:
        dump = [
            str(row)
            for table in schema_metadata.sorted_tables
            for row in conn.execute(sa.select(table))
        ]
    assert dump and not any(secret in row for row in dump)
    assert not any(secret in record.getMessage() for record in caplog.records)
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    engine.dispose()


_CHILD = """
import sys
from ingest.replay import ReplayConfig, replay
from storage.engine import open_database

engine = open_database(sys.argv[1])
config = ReplayConfig(model="new-model", base_url=sys.argv[2], concurrency=4, progress=False)
replay(engine, config=config, run_id=sys.argv[3])
"""


def test_sigkill_then_resume_sends_no_completed_input_twice(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    n = 40
    engine = logged_db(duckdb_url, tmp_path, n)
    engine.dispose()  # DuckDB: one writer process at a time, and the child is that writer
    server.delay_s = 0.2
    run_id = "killed-run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, duckdb_url, server.base_url, run_id],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while server.total_answered() < 12 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()

    engine = open_database(duckdb_url)
    before = items_by_prompt(engine, run_id)
    done_before = {prompt for prompt, item in before.items() if item["status"] == "done"}
    assert 0 < len(done_before) < n, "the kill must land mid-run"
    assert len(replayed(engine, run_id)) == len(done_before)
    sent_before = Counter(server.requests)

    server.delay_s = 0.0
    # Killed: its lease is still fresh, so the resume takes the run over (`--take-over`).
    summary = replay(engine, config=config_for(server), run_id=run_id, take_over=True)
    assert summary.resumed and summary.sent == n - len(done_before)
    assert summary.already_done == len(done_before) and summary.status == "done"

    # Committed before the kill: never sent again. Sent but not committed (in flight, or
    # answered and waiting for its commit): sent once more. Never sent: sent once.
    for i in range(n):
        expected = 2 if sent_before[question(i)] and question(i) not in done_before else 1
        assert server.requests[question(i)] == expected, question(i)
    assert all(sent_before[prompt] == 1 for prompt in done_before)
    answers = Counter(
        json.loads(row["metadata"])["original_exchange_id"] for row in replayed(engine, run_id)
    )
    items = run_items(engine, run_id)
    assert set(answers) == {item["exchange_id"] for item in items} and set(answers.values()) == {1}
    assert all(item["status"] == "done" for item in items)
    engine.dispose()


def test_selection_filters_ids_samples_and_dedupes(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 20)
    base = config_for(server)
    everything = select_inputs(engine, None, config=base)
    assert len(everything) == 20
    old_a = select_inputs(engine, ExchangeFilter(models=("old-a",)), config=base)
    assert len(old_a) == 10
    assert select_inputs(engine, everything[3:5], config=base) == everything[3:5]
    with pytest.raises(ReplayError, match="not found"):
        select_inputs(engine, ["0" * 32], config=base)

    sample = select_inputs(engine, None, config=config_for(server, sample=5, seed=7))
    assert len(sample) == 5 and set(sample) <= set(everything)
    assert sample == select_inputs(engine, None, config=config_for(server, sample=5, seed=7))
    assert sample != select_inputs(engine, None, config=config_for(server, sample=5, seed=8))

    # The same input logged twice (another file, another model) is sent once.
    write_log(tmp_path / "again.jsonl", 20, models=("old-c",))
    ingest_paths(
        [tmp_path / "again.jsonl"],
        engine=engine,
        config=IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl"),
    )
    assert len(select_inputs(engine, None, config=base)) == 20
    assert len(select_inputs(engine, None, config=config_for(server, dedupe=False))) == 40

    # A replay's answers are not inputs of later replays unless their run is named.
    summary = replay(engine, config=config_for(server, sample=3))
    assert len(select_inputs(engine, None, config=base)) == 20
    mine = ExchangeFilter(sources=(f"replay:{summary.run_id}",))
    assert len(select_inputs(engine, mine, config=base)) == 3

    said = "started with model 'new-model', not 'other': resume it with what it was started"
    with pytest.raises(ReplayError, match=re.escape(said)):
        replay(engine, config=config_for(server, model="other"), run_id=summary.run_id)
    engine.dispose()


def test_compare_reports_reward_diff_overall_and_per_cluster(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    engine = logged_db(duckdb_url, tmp_path, 12)
    server.add_fault(Fault(prompt=question(11), status=400))
    summary = replay(engine, config=config_for(server))
    items = run_items(engine, summary.run_id)
    done = [item for item in items if item["status"] == "done"]
    assert len(done) == 11

    # Originals score i; new answers gain 1 on even-numbered inputs and lose 0.5 on odd ones.
    scores: dict[str, float] = {}
    cluster_of: dict[str, str] = {}
    for i, item in enumerate(done):
        scores[item["exchange_id"]] = float(i)
        scores[item["response_exchange_id"]] = i + (1.0 if i % 2 == 0 else -0.5)
        cluster_of[item["exchange_id"]] = "lone" if i == 0 else "even" if i % 2 == 0 else "odd"

    report = compare(engine, summary.run_id, scores=scores, cluster_of=cluster_of)
    assert report.counts == {"pending": 0, "done": 11, "failed": 1} and report.pairs == 11
    assert report.overall is not None and report.overall.n == 11
    assert report.overall.mean_diff == pytest.approx((6 * 1.0 - 5 * 0.5) / 11)
    assert report.overall.ci_low < report.overall.mean_diff < report.overall.ci_high
    assert report.overall.wins == 6 and report.overall.losses == 5
    even, odd = report.per_cluster["even"], report.per_cluster["odd"]
    assert (even.n, even.mean_diff, even.win_rate, even.ci_low) == (5, 1.0, 1.0, 1.0)
    # One pair bounds nothing: its interval was the pair's own difference, read as certain.
    lone = report.per_cluster["lone"]
    assert (lone.n, lone.ci_low, lone.ci_high) == (1, None, None)
    from app.commands import describe

    clustering = {"on": "prompt", "run_id": "r1"}  # what `replay report` adds
    said = describe("replay", {**report.as_dict(), "judges": {}, "clustering": clustering})
    assert "lone" in said and "(no CI from one pair)" in said
    assert "per cluster (clusters of the latest clustering on prompt, run r1):" in said
    assert (odd.n, odd.mean_diff, odd.win_rate) == (5, -0.5, 0.0)
    assert report.prompt_tokens > 0 and report.mean_latency_s is not None
    assert json.loads(json.dumps(report.as_dict()))["per_cluster"]["odd"]["losses"] == 5

    side_by_side = pairs(engine, summary.run_id)
    assert len(side_by_side) == 11
    for pair in side_by_side:
        assert pair["original_response"] == str(int(pair["prompt"].split()[1].rstrip(":")) ** 2)
        assert pair["new_response"].startswith("answer ") and pair["original_model"] != "new-model"

    unscored = compare(engine, summary.run_id)
    assert unscored.overall is None and unscored.per_cluster == {}
    engine.dispose()


def test_a_base_url_query_string_goes_on_every_request_and_is_never_stored_or_shown(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Azure-style endpoints take `?api-version=` (and some gateways `?api-key=`): the client
    appended `chat/completions` after the query string (every request a 404), and the 404's
    message, which quoted the URL, was stored and printed with the key in it."""
    engine = logged_db(duckdb_url, tmp_path, 3)
    secret = "sk-query-7c1e0b9d"
    server.add_fault(Fault(prompt=question(0), status=400, echo_path=True))
    url = f"{server.base_url}?api-version=2024-02-01&api-key={secret}"
    summary = replay(engine, config=config_for(server, base_url=url))
    assert (summary.done, summary.failed) == (2, 1)
    assert {(r["path"], r["query"]) for r in server.received} == {
        ("/v1/chat/completions", f"api-version=2024-02-01&api-key={secret}")
    }
    error = str(items_by_prompt(engine, summary.run_id)[question(0)]["error"])
    assert "BadRequestError 400" in error and "api-key=***" in error
    assert summary.base_url == server.base_url
    with engine.connect() as conn:
        dump = [
            str(row)
            for table in schema_metadata.sorted_tables
            for row in conn.execute(sa.select(table))
        ]
    assert dump and not any(secret in row for row in dump)
    out, err = capfd.readouterr()
    assert secret not in out + err
    engine.dispose()


def test_odd_token_counts_are_stored_as_unknown(db_url: str, tmp_path: Path) -> None:
    """The body is not validated: a count that is not a sane int failed the whole batch's
    commit (an ExceptionGroup traceback, the answers already received lost)."""
    engine = logged_db(db_url, tmp_path, 3)
    odd = [
        Fault(prompt=question(0), usage={"prompt_tokens": "lots", "completion_tokens": True}),
        Fault(prompt=question(1), usage={"prompt_tokens": 10**30, "completion_tokens": -1}),
    ]
    with OpenAIServer(faults=odd) as server:
        summary = replay(engine, config=config_for(server))
    assert (summary.done, summary.failed) == (3, 0)
    items = items_by_prompt(engine, summary.run_id)
    for i in (0, 1):
        assert (items[question(i)]["prompt_tokens"], items[question(i)]["completion_tokens"]) == (
            None,
            None,
        )
    assert items[question(2)]["prompt_tokens"] > 0
    assert compare(engine, summary.run_id).prompt_tokens == items[question(2)]["prompt_tokens"]
    engine.dispose()


def test_a_body_whose_choices_is_not_a_list_is_malformed(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    """`"choices": {"a": 1}` raised KeyError: 0 out of the replay, a traceback."""
    engine = logged_db(duckdb_url, tmp_path, 3)
    body = {"id": "chatcmpl-x", "object": "chat.completion", "choices": {"a": 1}}
    server.add_fault(Fault(prompt=question(0), body=body, times=2))
    server.add_fault(Fault(prompt=question(1), body=body))
    summary = replay(engine, config=config_for(server, max_attempts=3))
    assert (summary.done, summary.failed, summary.retried) == (2, 1, 4)
    items = items_by_prompt(engine, summary.run_id)
    assert items[question(0)]["status"] == "done" and items[question(0)]["attempts"] == 3
    assert "MalformedResponse" in str(items[question(1)]["error"])
    engine.dispose()


def test_the_timeout_caps_a_whole_attempt_not_each_read(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    """A server trickling its reply a byte every 0.2 s never tripped a 0.5 s read timeout."""
    engine = logged_db(duckdb_url, tmp_path, 2)
    server.add_fault(Fault(prompt=question(0), trickle_s=0.2, times=1))
    server.add_fault(Fault(prompt=question(1), trickle_s=0.2))
    started = time.monotonic()
    summary = replay(engine, config=config_for(server, timeout_s=0.5, max_attempts=2))
    assert time.monotonic() - started < 3.5  # trickled to the end: 4 s an attempt
    assert (summary.done, summary.failed) == (1, 1)
    items = items_by_prompt(engine, summary.run_id)
    assert items[question(0)]["attempts"] == 2
    assert "no whole reply within 0.5 s" in str(items[question(1)]["error"])
    engine.dispose()


def test_a_connection_failure_says_why(duckdb_url: str, tmp_path: Path) -> None:
    """openai's "Connection error." alone hid the refused port behind it."""
    engine = logged_db(duckdb_url, tmp_path, 1)
    config = ReplayConfig(
        model="m", base_url="http://127.0.0.1:1/v1", max_attempts=1, progress=False
    )
    summary = replay(engine, config=config)
    assert summary.failed == 1
    error = str(run_items(engine, summary.run_id)[0]["error"])
    assert error.startswith("APIConnectionError: Connection error. (ConnectError: ")
    engine.dispose()


def test_cluster_ids_never_select_earlier_replays_answers(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer
) -> None:
    """After re-clustering, a cluster holds replays' answers too: as inputs they would be
    replayed as if they were logged traffic."""
    engine = logged_db(duckdb_url, tmp_path, 4)
    first = replay(engine, config=config_for(server))
    everything = [row["id"] for batch in iter_exchanges(engine) for row in batch]
    assert len(everything) == 8  # originals and their replayed answers, as a cluster lists them
    config = config_for(server, dedupe=False)  # an answer's request is its original's
    originals = select_inputs(engine, None, config=config)
    assert sorted(select_inputs(engine, everything, config=config)) == sorted(originals)
    answers = [row["id"] for row in replayed(engine, first.run_id)]
    with pytest.raises(ReplayError, match=r"matches no saved input .*source=replay:RUN"):
        replay(engine, config=config_for(server), select=answers)
    engine.dispose()


def test_the_report_compares_only_inputs_that_had_an_original_answer(
    duckdb_url: str, tmp_path: Path, server: OpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved input was logged without an answer: its "original reward" was the reward of
    an empty response, so the new answers beat nothing, the difference and win rate mixed in
    those wins, and the instruction version was recorded as beating the original answers."""
    from app.cli import main
    from storage.scores import store_scores

    engine = logged_db(duckdb_url, tmp_path, 4)
    saved = tmp_path / "inputs.csv"
    saved.write_text("prompt\n" + "".join(f"Saved question {i}?\n" for i in range(3)))
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    assert ingest_paths([saved], engine=engine, config=config).stored == 3
    run_id = replay(engine, config=config_for(server)).run_id
    alone = replay(
        engine, config=config_for(server), select=ExchangeFilter(sources=(str(saved),))
    ).run_id
    rewards: dict[str, float] = {}
    for pair in pairs(engine, run_id):  # new answers lose to logged ones, "win" over nothing
        logged = bool(pair["original_response"])
        rewards |= {pair["original_id"]: 0.5 if logged else -3.0, pair["new_id"]: 0.0}
    store_scores(engine, "reward:test", rewards)

    report = compare(engine, run_id, scores=rewards)
    assert report.overall is not None and report.overall.n == 4
    assert report.overall.mean_diff == -0.5 and report.overall.wins == 0
    assert report.pairs == 7 and report.without_original == 3
    engine.dispose()
    assert main(["--db", duckdb_url, "replay", "report", alone]) == 0
    said = capsys.readouterr().out
    assert "not scored yet" not in said
    assert "3 saved inputs without an original answer: no reward to compare" in said


def test_an_empty_answer_fails_as_such_and_is_never_stored(db_url: str, tmp_path: Path) -> None:
    """A 200 whose completion says "" (or only blanks) was retried as a malformed body until
    the attempts ran out, then failed as "MalformedResponse", read as a broken endpoint. It is
    the model's answer: a failure named "empty answer" at once, and no exchange is stored
    with it (an empty response is a saved input waiting for replay)."""
    silent = {question(1): "", question(2): " \n"}

    def responder(messages: list[dict[str, object]]) -> str:
        prompt = str(messages[-1]["content"])
        return silent.get(prompt, answer_for(messages))  # type: ignore[arg-type]

    engine = logged_db(db_url, tmp_path, 4)
    with OpenAIServer(responder=responder) as server:
        summary = replay(engine, config=config_for(server, max_attempts=3))
        assert server.requests[question(1)] == server.requests[question(2)] == 1
    assert (summary.done, summary.failed, summary.retried, summary.pending) == (2, 2, 0, 2)
    items = items_by_prompt(engine, summary.run_id)
    for prompt in silent:
        assert items[prompt]["status"] == "failed" and items[prompt]["attempts"] == 1
        said = str(items[prompt]["error"])
        assert said == "empty answer: the endpoint answered with no text (finish_reason 'stop')"
    assert sorted(row["prompt"] for row in replayed(engine, summary.run_id)) == [
        question(0),
        question(3),
    ]
    engine.dispose()
