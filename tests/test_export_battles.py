"""`export --format battles` writes the judged battles as the battles JSONL that ingest reads,
and they ingest back under their own ids: through the real CLI, on a slice of the shared
AlpacaEval battles, between real DuckDB and SQLite files."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.engine import open_database
from storage.logs import store_batch, utcnow
from storage.schema import battles, exchanges
from tests.test_export_reingest import _stored
from tests.test_ingest_pipeline import convoscope_here

GEMMA = "FuseChat-Gemma-2-9B-Instruct"  # model_b of the file's first 805 lines
LLAMA = "FuseChat-Llama-3.2-1B-Instruct"  # model_b of the next 805
BASELINE = "gpt4_1106_preview"  # model_a of every line


def _slice(shared: Path, out: Path, start: int, n: int) -> None:
    with gzip.open(shared, "rt", encoding="utf-8") as f:
        out.write_text("".join(islice(f, start, start + n)))


def _votes(out: Path) -> None:
    """Six copies of one verdict: four without an id (ids numbered by `repeat_id`) and two
    with ids of their own, one of them logged twice (the same copy)."""
    vote = {
        "prompt": "Name a colour.",
        "model_a": "m1",
        "response_a": "Blue.",
        "model_b": "m2",
        "response_b": "Red is a colour.",
        "winner": "model_b",
        "judge": "people",
    }
    lines = [vote] * 4 + [{**vote, "battle_id": "v1"}, {**vote, "battle_id": "v2"}]
    lines.append({**vote, "battle_id": "v1"})
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A DuckDB file holding 30 battles of each of two models (two files) and 6 repeated votes."""
    from tests.conftest import shared_data_file  # `shared_file` is function-scoped

    shared = shared_data_file("alpacaeval_battles_dev.jsonl.gz")
    folder = tmp_path_factory.mktemp("battles")
    _slice(shared, folder / "gemma.jsonl", 0, 30)
    _slice(shared, folder / "llama.jsonl", 805, 30)
    _votes(folder / "votes.jsonl")
    db = f"duckdb:///{folder / 'source.duckdb'}"
    paths = [str(folder / name) for name in ("gemma.jsonl", "llama.jsonl", "votes.jsonl")]
    result = convoscope_here("ingest", *paths, "--json", db=db, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["battles_stored"] == 66
    return db, folder


def _run(db: str, cwd: Path, *args: str) -> dict[str, Any]:
    result = convoscope_here(*args, "--json", db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _export(db: str, out: Path, cwd: Path, *filters: str) -> dict[str, Any]:
    return _run(db, cwd, "export", "--format", "battles", "--out", str(out), *filters)


def _lines(path: Path) -> list[dict[str, Any]]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _stored_battles(db: str) -> dict[str, dict[str, Any]]:
    """Every stored battle by id with its two answers, less where and when it was ingested."""
    a, b = exchanges.alias("a"), exchanges.alias("b")
    answer = ("conversation_id", "turn_index", "context", "prompt", "response", "model")
    query = sa.select(
        battles.c.id,
        battles.c.exchange_a,
        battles.c.exchange_b,
        battles.c.winner,
        battles.c.judge,
        battles.c.judge_preference,
        battles.c.external_id,
        battles.c.metadata,
        *(a.c[name].label(f"{name}_a") for name in answer),
        *(b.c[name].label(f"{name}_b") for name in answer),
    ).select_from(
        battles.join(a, a.c.id == battles.c.exchange_a).join(b, b.c.id == battles.c.exchange_b)
    )
    engine = open_database(db)
    try:
        with engine.connect() as conn:
            return {row["id"]: dict(row) for row in conn.execute(query).mappings()}
    finally:
        engine.dispose()


def _stored_exchanges(db: str) -> dict[str, dict[str, Any]]:
    """Every stored exchange by id, less where and when it was ingested."""
    rows = _stored(db)
    for row in rows.values():
        del row["source"]
    return rows


def _sources(db: str) -> set[str]:
    engine = open_database(db)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(battles.c.source).distinct()).scalars())
    finally:
        engine.dispose()


def test_a_battles_export_ingests_back_under_the_same_ids(
    source_db: tuple[str, Path], tmp_path: Path
) -> None:
    db, _ = source_db
    originals = _stored_battles(db)
    answers = _stored_exchanges(db)
    assert len(originals) == 66 and len(answers) == 60 + 30 + 2  # the baseline answers once

    out = tmp_path / "battles.jsonl.gz"
    summary = _export(db, out, tmp_path)
    assert summary == {
        "path": str(out),
        "format": "battles",
        "rows": 66,
        "not_round_trip": 0,
        "not_round_trip_reasons": {},
    }
    lines = _lines(out)
    assert len(lines) == 66
    first = next(r for r in lines if r["battle_id"] == f"{GEMMA}:0")
    assert first["prompt"].startswith("What are the names of some famous actors")
    assert (first["model_a"], first["model_b"], first["winner"]) == (BASELINE, GEMMA, "model_b")
    assert first["judge"] == "weighted_alpaca_eval_gpt4_turbo"
    assert first["judge_preference"] == 1.732832  # as in the file, every digit
    assert (first["prompt_id"], first["source_dataset"]) == (0, "helpful_base")  # metadata

    # Into the database it came from (a copy): nothing new.
    copy = tmp_path / "source-copy.duckdb"
    shutil.copy(db.removeprefix("duckdb:///"), copy)
    again = _run(f"duckdb:///{copy}", tmp_path, "ingest", str(out))
    assert (again["battles"], again["battles_stored"], again["stored"]) == (66, 0, 0)
    assert (again["rejected"], again["duplicates"]) == (0, 132)
    assert _stored_battles(f"duckdb:///{copy}") == originals

    # Into fresh databases of both kinds: the same battles and answers, field by field.
    for fresh in (f"sqlite:///{tmp_path / 'fresh.sqlite'}", f"duckdb:///{tmp_path / 'f.duckdb'}"):
        stored = _run(fresh, tmp_path, "ingest", str(out))
        assert (stored["battles_stored"], stored["stored"], stored["rejected"]) == (66, 92, 0)
        copies = _stored_battles(fresh)
        assert copies.keys() == originals.keys()
        for battle_id, original in originals.items():
            assert copies[battle_id] == original, battle_id
        assert _stored_exchanges(fresh) == answers
        assert _sources(fresh) == {str(out)}  # the file they were read from, as any ingest

    # And the copy's export is the first one, line for line.
    _export(fresh, tmp_path / "again.jsonl", tmp_path)
    assert _lines(tmp_path / "again.jsonl") == lines


def test_the_model_filter_keeps_battles_where_either_answer_is_that_model(
    source_db: tuple[str, Path], tmp_path: Path
) -> None:
    db, _ = source_db
    llama = _export(db, tmp_path / "llama.jsonl", tmp_path, "--model", LLAMA)
    lines = _lines(tmp_path / "llama.jsonl")
    assert llama["rows"] == len(lines) == 30
    assert {r["model_b"] for r in lines} == {LLAMA}

    both = _export(db, tmp_path / "both.jsonl", tmp_path, "--model", LLAMA, "--model", "m1")
    assert both["rows"] == 30 + 6
    baseline = _export(db, tmp_path / "baseline.jsonl", tmp_path, "--model", BASELINE)
    assert baseline["rows"] == 60  # model_a of every AlpacaEval battle
    assert {r["model_b"] for r in _lines(tmp_path / "baseline.jsonl")} == {GEMMA, LLAMA}

    # The filtered file ingests back as just those battles, under their own ids.
    fresh = f"sqlite:///{tmp_path / 'llama.sqlite'}"
    _run(fresh, tmp_path, "ingest", str(tmp_path / "llama.jsonl"))
    originals = _stored_battles(db)
    copies = _stored_battles(fresh)
    assert len(copies) == 30
    assert all(copies[i] == originals[i] for i in copies)


def test_the_source_filter_and_a_filter_matching_nothing(
    source_db: tuple[str, Path], tmp_path: Path
) -> None:
    db, folder = source_db
    gemma = _export(db, tmp_path / "gemma.jsonl", tmp_path, "--source", "gemma.jsonl")
    assert gemma["rows"] == 30
    assert {r["model_b"] for r in _lines(tmp_path / "gemma.jsonl")} == {GEMMA}
    votes = _export(db, tmp_path / "votes.jsonl", tmp_path, "--source", str(folder / "votes.jsonl"))
    assert (votes["rows"], votes["not_round_trip"]) == (6, 0)

    result = convoscope_here(
        "export", "--format", "battles", "--out", str(tmp_path / "none.jsonl"),
        "--model", "no-such-model", db=db, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "no rows exported to" in result.stdout
    assert "--model no-such-model is the model of no battle's answer" in result.stderr
    assert "nothing was written" in result.stderr and not (tmp_path / "none.jsonl").exists()
    result = convoscope_here(
        "export", "--format", "battles", "--out", str(tmp_path / "gemma.jsonl"),
        "--model", "no-such-model", db=db, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "already there is left as it was" in result.stderr
    assert len(_lines(tmp_path / "gemma.jsonl")) == 30  # a filter typed wrong wipes nothing


def test_a_verdict_on_answers_from_a_conversation_is_written_and_said_not_to_round_trip(
    tmp_path: Path,
) -> None:
    """A replay judge's verdicts link answers stored from conversations (ids from their
    conversation, earlier turns as context), which the battles format cannot carry."""
    chat = {
        "id": "conv-1",
        "model": "bot-1",
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": "8."},
        ],
    }
    other = {**chat, "id": "conv-2", "model": "bot-2"}
    other["messages"] = [*chat["messages"][:3], {"role": "assistant", "content": "Eight."}]
    log = tmp_path / "chats.jsonl"
    log.write_text(json.dumps(chat) + "\n" + json.dumps(other) + "\n")
    db = f"duckdb:///{tmp_path / 'chats.duckdb'}"
    _run(db, tmp_path, "ingest", str(log))
    answers = _stored_exchanges(db)
    doubled = {r["response"]: r["id"] for r in answers.values() if r["prompt"] == "And doubled?"}
    engine = open_database(db)
    verdict = {
        "id": "9" * 32,
        "exchange_a": doubled["8."],
        "exchange_b": doubled["Eight."],
        "winner": "tie",
        "judge": "judge-model",
        "judge_preference": None,
        "source": "judge:run-1",
        "external_id": None,
        "metadata": json.dumps({"shown_first": "new"}),
        "ingested_at": utcnow(),
    }
    store_batch(engine, conversation_rows=(), exchange_rows=(), battle_rows=[verdict])
    engine.dispose()

    out = tmp_path / "judged.jsonl"
    result = convoscope_here(
        "export", "--format", "battles", "--out", str(out), "--json", db=db, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["not_round_trip"]) == (1, 1)
    [reason] = summary["not_round_trip_reasons"]
    assert "not stored from a battles line" in reason
    assert "1 of 1 battles will not ingest back under their own ids" in result.stderr
    assert verdict["id"] in result.stderr
    [line] = _lines(out)
    assert (line["prompt"], line["response_a"], line["response_b"]) == (
        "And doubled?",
        "8.",
        "Eight.",
    )
    assert (line["winner"], line["judge"], line["shown_first"]) == ("tie", "judge-model", "new")

    # As said: it ingests as a verdict on two new one-turn answers, under other ids.
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    _run(fresh, tmp_path, "ingest", str(out))
    [copy] = _stored_battles(fresh).values()
    assert copy["id"] != verdict["id"] and copy["exchange_a"] != verdict["exchange_a"]
    assert (copy["winner"], copy["prompt_a"], copy["response_b"]) == (
        "tie",
        "And doubled?",
        "Eight.",
    )


def test_a_battles_export_says_what_is_wrong(source_db: tuple[str, Path], tmp_path: Path) -> None:
    db, _ = source_db
    out = tmp_path / "out.jsonl"

    def fails(*args: str, db: str = db) -> str:
        result = convoscope_here("export", "--format", "battles", *args, db=db, cwd=tmp_path)
        assert result.returncode == 2, result.stdout
        assert "Traceback" not in result.stderr
        return result.stderr

    assert "--tag, --min-reward select exchanges" in fails(
        "--out", str(out), "--tag", "x", "--min-reward", "0"
    )
    assert "a battles export is JSONL" in fails("--out", str(tmp_path / "out.csv"))
    assert "is a folder" in fails("--out", str(tmp_path))

    log = tmp_path / "chat.jsonl"
    log.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    chats = f"sqlite:///{tmp_path / 'chats.sqlite'}"
    _run(chats, tmp_path, "ingest", str(log))
    message = fails("--out", str(out), db=chats)
    assert "holds no battles" in message and "convoscope ingest battles.jsonl" in message
    assert not out.exists()
