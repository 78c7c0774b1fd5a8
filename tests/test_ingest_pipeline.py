"""The ingest step end to end, through the real CLI, on real files and real databases."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.engine import open_database
from storage.logs import iter_exchanges, table_counts
from storage.schema import ingest_runs

REPO = Path(__file__).resolve().parents[1]


def convoscope(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "--db", db, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def convoscope_here(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`convoscope`, run by the same `main` in this process, for tests of many commands: a
    subprocess pays 3-5 s of imports per command and compiles UMAP's numba code again for
    every `cluster` (13 s each), where this process compiles it once."""
    from app.cli import main

    out, err = io.StringIO(), io.StringIO()
    started = Path.cwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(["--db", db, *args])
            except SystemExit as exit:  # argparse refusing an argument
                code = int(exit.code or 0)
    finally:
        os.chdir(started)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def openai_line(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{4 * i}."},
            ],
            "model": f"expert-{i % 3}",
            "id": f"conv-{i}",
        }
    )


def write_openai_jsonl(path: Path, n: int, *, bad_lines: dict[int, bytes] | None = None) -> None:
    bad_lines = bad_lines or {}
    with path.open("wb") as handle:
        for i in range(n):
            handle.write(bad_lines.get(i, openai_line(i).encode()) + b"\n")


def test_ingest_reports_stores_and_is_idempotent(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 50)
    first = convoscope_here("ingest", str(log), "--json", db=db_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["read"], summary["stored"], summary["duplicates"]) == (100, 100, 0)
    assert summary["rejected"] == 0 and summary["rejects_file"] is None

    again = json.loads(
        convoscope_here("ingest", str(log), "--json", db=db_url, cwd=tmp_path).stdout
    )
    assert (again["stored"], again["duplicates"]) == (0, 100)
    engine = open_database(db_url)
    assert table_counts(engine) == {"conversations": 50, "exchanges": 100, "battles": 0}
    with engine.connect() as conn:
        runs = conn.execute(sa.select(ingest_runs.c.format, ingest_runs.c.stored)).all()
    assert sorted(runs) == [("openai", 0), ("openai", 100)]  # the detected format, per run
    rows = [r for batch in iter_exchanges(engine) for r in batch]
    engine.dispose()
    second_turn = next(r for r in rows if r["external_id"] == "conv-7" and r["turn_index"] == 4)
    assert json.loads(second_turn["context"])[1] == {"role": "user", "content": "What is 7 + 7?"}
    assert second_turn["prompt"] == "And doubled?"
    assert second_turn["ended_conversation"] is True
    assert second_turn["user_turns_after"] == 0
    assert second_turn["retried"] is None  # unknown, not False


def test_identical_conversations_without_an_id_are_each_stored(db_url: str, tmp_path: Path) -> None:
    """Many users sending "hi" and getting "Hello!" are many conversations, not one: each copy
    in a file is stored, the first under the id it always had, and re-reading adds nothing."""
    from ingest.pipeline import IngestConfig, ingest_paths
    from ingest.records import Conversation, Message

    hi = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hi!"}]}
    named = json.loads(openai_line(1))  # a source id: the same id and content is one record
    log = tmp_path / "chat.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (hi, named, hi, named, hi)))
    engine = open_database(db_url)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")

    def ingest(path: Path) -> tuple[int, int]:
        summary = ingest_paths([path], engine=engine, config=config)
        return summary.stored, summary.duplicates

    assert ingest(log) == (3 + 2, 2)  # three "hi" exchanges, conv-1's two (its copy is one)
    assert table_counts(engine)["conversations"] == 4
    assert ingest(log) == (0, 3 + 4)  # nothing new: the copies are numbered the same way
    with log.open("a") as handle:
        handle.write(json.dumps(hi) + "\n")
    assert ingest(log) == (1, 3 + 4)  # only the fourth copy is new
    # Copies are counted per file: another file's one "hi" is the first copy, stored already.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(hi) + "\n")
    assert ingest(other) == (0, 1)

    # The first copy keeps the id every earlier version gave it.
    first = Conversation(
        messages=(Message(role="user", content="hi"), Message(role="assistant", content="Hi!")),
        source=str(log),
        line=1,
    ).id
    with engine.connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM conversations")).scalars().all()
        rows = conn.execute(sa.text("SELECT conversation_id, prompt FROM exchanges")).all()
    engine.dispose()
    assert len(ids) == len(set(ids)) == 5  # four "hi" chats and conv-1
    hi_chats = [conversation for conversation, prompt in rows if prompt == "hi"]
    assert len(hi_chats) == len(set(hi_chats)) == 4 and first in hi_chats


def test_identical_votes_are_each_stored_and_a_battle_id_is_one_battle(
    db_url: str, tmp_path: Path
) -> None:
    """Two users judging the same two answers alike are two votes for Bradley-Terry, not one;
    a line repeated with the same battle_id is the same vote; re-reading adds nothing."""
    from ingest.pipeline import IngestConfig, ingest_paths

    vote = {
        "prompt": "Name a colour.",
        "model_a": "m1",
        "response_a": "Blue.",
        "model_b": "m2",
        "response_b": "Red is a colour.",
        "winner": "model_b",
    }
    lines = [vote, vote, {**vote, "battle_id": "v1"}, {**vote, "battle_id": "v2"}]
    lines.append({**vote, "battle_id": "v1"})  # the same vote logged twice
    log = tmp_path / "votes.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    engine = open_database(db_url)
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    first = ingest_paths([log], engine=engine, config=config)
    again = ingest_paths([log], engine=engine, config=config)
    counts = table_counts(engine)
    engine.dispose()
    assert first.battles_stored == 4 and again.battles_stored == 0
    assert counts["battles"] == 4 and counts["exchanges"] == 2  # the two answers, once each


def _tricky_conversations() -> list[dict]:
    """Conversations whose contexts are not simply "every turn before": a greeting before the
    first user message, a system message mid-way, a regenerated response, two answers to one
    prompt, two user messages in a row, non-ASCII text, and one long chat (deep references)."""

    def msg(role: str, content: str, **signals: object) -> dict:
        return {"role": role, "content": content, **signals}

    tricky = [
        msg("assistant", "Bonjour ! Comment puis-je aider ?"),
        msg("user", "Écris un haïku."),
        msg("assistant", "Vieil étang…", regenerated=True),
        msg("assistant", "Une grenouille plonge."),
        msg("system", "Réponds en anglais."),
        msg("user", "Translate it."),
        msg("assistant", "An old pond."),
        msg("assistant", "A frog jumps in."),
        msg("user", "Shorter."),
        msg("user", "Much shorter."),
        msg("assistant", "Pond. Frog. Splash."),
        msg("user", "Thanks 🙂"),
        msg("assistant", "You're welcome."),
    ]
    long_chat = []
    for turn in range(40):
        answer = msg("assistant", f'done {turn} "ok"', model=("even", "odd")[turn % 2])
        long_chat += [msg("user", f"step {turn}?"), answer]
    return [
        {"id": "tricky", "model": "m", "messages": tricky},
        {"id": "long", "model": "m", "messages": long_chat},
    ]


def test_contexts_are_stored_once_and_read_whole(db_url: str, tmp_path: Path) -> None:
    from ingest.exchanges import split_conversation
    from ingest.readers import ReadOptions, read_file
    from ingest.records import Conversation
    from storage.logs import ExchangeFilter
    from storage.replay import exchanges_by_id
    from storage.scores import store_scores
    from storage.views import ViewFilter, export_rows

    log = tmp_path / "tricky.jsonl"
    log.write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in _tricky_conversations())
    )
    result = convoscope_here("ingest", str(log), "--json", db=db_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The contexts the split gives, encoded as every context was before references existed.
    expected = {}
    for record in read_file(log, format=None, options=ReadOptions(source=str(log))):
        assert isinstance(record, Conversation)
        for part in split_conversation(record):
            messages = [{"role": m.role, "content": m.content} for m in part.context]
            expected[part.id] = json.dumps(messages, ensure_ascii=False)
    assert len(expected) == 6 + 40

    engine = open_database(db_url)
    rows = [r for batch in iter_exchanges(engine) for r in batch]
    assert {r["id"]: r["context"] for r in rows} == expected
    assert "context_parent" not in rows[0]  # references never leave storage
    again = exchanges_by_id(engine, list(expected))
    assert {i: r["context"] for i, r in again.items()} == expected
    # Small batches: a parent in the batch before, or (filtered) out of the stream, read on
    # the side; only the columns asked for come back.
    small = iter_exchanges(engine, columns=("id", "context"), batch_size=3)
    assert {r["id"]: r["context"] for batch in small for r in batch} == expected
    odd = [
        r
        for batch in iter_exchanges(
            engine, where=ExchangeFilter(models=("odd",)), columns=("id", "context"), batch_size=3
        )
        for r in batch
    ]
    assert len(odd) == 20 and set(odd[0]) == {"id", "context"}
    assert {r["id"]: r["context"] for r in odd} == {r["id"]: expected[r["id"]] for r in odd}
    # Exports stream too, and look up scores beside the stream: every row comes back.
    store_scores(engine, "reward_test", {i: float(n) for n, i in enumerate(expected)})
    exported_rows = [r for b in export_rows(engine, None, ViewFilter(), batch_size=4) for r in b]
    assert {r["id"]: (r["context"], r["score:reward_test"]) for r in exported_rows} == {
        i: (c, float(n)) for n, (i, c) in enumerate(expected.items())
    }
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT context, context_parent FROM exchanges")).all()
    engine.dispose()
    # Stored: each turn refers to the one it continues, so the 40-turn chat stores no context
    # text at all (whole contexts: 1,560 messages). The other chat's first two answers have
    # no earlier answer to refer to (they keep the greeting); the two answers to "Translate
    # it." keep the system message that came after their parent; "Much shorter." keeps the
    # second answer before it and "Shorter.", which nothing answered.
    assert sum(parent is not None for _, parent in stored) == 4 + 39
    assert sum(len(json.loads(context)) for context, _ in stored) == 1 + 1 + 1 + 1 + 2
    assert max(len(context) for context, _ in stored) < 200

    out = tmp_path / "out.jsonl"
    exported = convoscope_here(
        "export", "--out", str(out), "--format", "jsonl", db=db_url, cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"]: r["context"] for r in records} == {
        i: json.loads(c) for i, c in expected.items()
    }


def test_bad_records_are_rejected_with_file_line_and_reason(tmp_path: Path) -> None:
    log = tmp_path / "mixed.jsonl"
    bad = {
        2: b'{"messages": [{"role": "user", "content": "unterminated',
        4: b'{"messages": "not a list"}',
        6: b'{"messages": [{"role": "assistant", "content": "no question"}]}',
        8: b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
    }
    write_openai_jsonl(log, 10, bad_lines=bad)
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    rejects = tmp_path / "rejects.jsonl"
    result = convoscope_here(
        "ingest", str(log), "--json", "--rejects", str(rejects), db=db, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rejected"] == 4
    assert summary["stored"] == 12  # the 6 good conversations around them, two answers each
    assert summary["rejects_file"] == str(rejects)
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in lines] == [3, 5, 7, 9]
    assert all(r["file"] == str(log) and r["reason"] for r in lines)
    assert "utf-8" in lines[3]["reason"].lower()


def test_empty_and_binary_files_are_reported_not_fatal(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    good = tmp_path / "good.jsonl"
    write_openai_jsonl(good, 3)
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    result = convoscope_here(
        "ingest",
        str(empty),
        str(binary),
        str(good),
        "--json",
        "--format",
        "openai",
        db=db,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["stored"] == 6
    assert summary["rejected"] == 2


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = convoscope_here("ingest", str(tmp_path / "nope.jsonl"), db=":memory:", cwd=tmp_path)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_a_folder_stands_for_the_log_files_below_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "2026-12" / ".cache").mkdir(parents=True)
    write_openai_jsonl(logs / "a.jsonl", 2)
    with gzip.open(logs / "2026-12" / "b.jsonl.gz", "wt") as handle:
        handle.write(openai_line(10) + "\n")
    write_openai_jsonl(logs / "2026-12" / ".cache" / "hidden.jsonl", 4)  # left out
    (logs / "notes.txt").write_text("not a log")  # left out: not named like one
    (logs / "convoscope-rejects-20261205-120000.jsonl").write_text('{"file": "x"}\n')
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"

    result = convoscope_here("ingest", str(logs), "--json", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["files"], summary["stored"], summary["rejected"]) == (2, 6, 0)
    engine = open_database(db)
    with engine.connect() as conn:
        paths = conn.execute(sa.select(ingest_runs.c.path).order_by(ingest_runs.c.path)).scalars()
        assert [Path(p).name for p in paths] == ["b.jsonl.gz", "a.jsonl"]
    engine.dispose()

    (logs / "bad.jsonl").write_text("not json\n")  # its reject goes to the folder's own file
    for _ in range(2):  # the second run found that file among the logs, and refused it
        own = ("ingest", str(logs), "--rejects", str(logs / "rejects.jsonl"), "--json")
        result = convoscope_here(*own, db=db, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["files"] == 3
    assert len((logs / "rejects.jsonl").read_text().splitlines()) == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    result = convoscope_here("ingest", str(empty), db=db, cwd=tmp_path)
    assert result.returncode == 2
    assert "no log files in folder" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_mid_ingest_then_rerun_completes_without_duplicates(tmp_path: Path) -> None:
    log = tmp_path / "big.jsonl.gz"
    n = 60_000
    with gzip.open(log, "wt") as handle:
        for i in range(n):
            handle.write(openai_line(i) + "\n")
    db = f"duckdb:///{tmp_path / 'kill.duckdb'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--db", db, "ingest", str(log), "--batch-size", "500"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    files = [tmp_path / "kill.duckdb", tmp_path / "kill.duckdb.wal"]
    deadline = time.monotonic() + 120
    # Kill once some batches are committed (the database has grown), well before the end.
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(f.stat().st_size for f in files if f.exists()) > 3_000_000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed: make the file bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    engine = open_database(db)
    partial = table_counts(engine)["exchanges"]
    engine.dispose()
    assert 0 < partial < 2 * n

    rerun = convoscope_here("ingest", str(log), "--json", db=db, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["stored"] == 2 * n - partial
    assert summary["duplicates"] == partial
    engine = open_database(db)
    with engine.connect() as conn:
        distinct = conn.execute(sa.text("SELECT COUNT(DISTINCT id) FROM exchanges")).scalar_one()
    assert table_counts(engine)["exchanges"] == distinct == 2 * n
    engine.dispose()


def test_export_round_trips_ids_and_signals(tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 6)
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    assert convoscope_here("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    import pandas as pd

    for fmt, name in [("csv", "out.csv"), ("parquet", "out.parquet"), ("jsonl", "out.jsonl")]:
        result = convoscope_here(
            "export",
            "--out",
            str(tmp_path / name),
            "--format",
            fmt,
            "--model",
            "expert-1",
            "--json",
            db=db,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["rows"] == 4
        frame = {
            "csv": pd.read_csv,
            "parquet": pd.read_parquet,
            "jsonl": lambda p: pd.read_json(p, lines=True),
        }[fmt](tmp_path / name)
        assert set(frame["model"]) == {"expert-1"}
        assert set(frame["external_id"]) == {"conv-1", "conv-4"}
        assert {"conversation_id", "turn_index", "retried", "ended_conversation"} <= set(frame)

    result = convoscope_here(
        "export", "--out", str(tmp_path / "ft.jsonl"), "--format", "openai", db=db, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert len(records) == 12
    roles = [m["role"] for m in records[1]["messages"]]
    assert roles[0] == "system" and roles[-2:] == ["user", "assistant"]


def test_demo_runs_the_whole_job_on_a_sharegpt_sample(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'demo.duckdb'}"
    result = convoscope("demo", "--sample", "60", "--no-ui", "--json", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ingest"]["conversations"] == 60
    assert summary["stored_in_db"]["conversations"] == 60
    exchanges = summary["stored_in_db"]["exchanges"]
    assert exchanges >= 60
    assert summary["embed"]["exchanges"] == exchanges
    assert summary["cluster"]["rows"] == exchanges and summary["cluster"]["clusters"] >= 2
    assert summary["score"]["exchanges"] == exchanges
    assert summary["score"]["labels"]["length"]["known"] > 0  # structural labels were mined
    # The sample's answers to empty user messages are left out, and said so, as `run` says.
    assert summary["ingest"]["empty_prompts"] > 0
    assert "exchanges left out: the user message each answers has no text" in result.stderr


def test_more_text_than_duckdbs_memory_cap_reads_back_whole_and_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB sorts in memory and fails past its cap instead of spilling to disk, so reading
    back a log holding more text than the cap (`convoscope embed` after ingesting 100K
    ShareGPT-sized exchanges) failed. Large streams are sorted a range of conversations at a
    time: every row comes back, in (conversation, turn) order, contexts whole."""
    from ingest.pipeline import IngestConfig, ingest_paths

    monkeypatch.setenv("CONVOSCOPE_DUCKDB_MEMORY", "96MB")  # the default cap, scaled down
    log = tmp_path / "long.jsonl"
    with log.open("w") as handle:
        for i in range(20_000):  # 40K exchanges, about 150 MB of text to sort
            messages = [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i} " + "a" * 3000},
                {"role": "user", "content": f"follow-up {i}"},
                {"role": "assistant", "content": f"more {i} " + "b" * 3000},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    engine = open_database(f"duckdb:///{tmp_path / 'long.duckdb'}")
    config = IngestConfig(
        progress=False, rejects_path=tmp_path / "rejects.jsonl", batch_size=1000
    )  # small batches: the ingest itself fits under the cap
    assert ingest_paths([log], engine=engine, config=config).stored == 40_000
    keys, follow_ups = [], 0
    columns = ("conversation_id", "turn_index", "context", "prompt")
    for batch in iter_exchanges(engine, columns=columns):
        for row in batch:
            keys.append((row["conversation_id"], row["turn_index"]))
            if row["prompt"].startswith("follow-up"):
                i = row["prompt"].split()[1]
                context = json.loads(row["context"])
                assert len(context) == 2 and context[0]["content"] == f"question {i}"
                assert context[1]["content"] == f"answer {i} " + "a" * 3000
                follow_ups += 1
    engine.dispose()
    assert len(keys) == 40_000 and keys == sorted(keys) and follow_ups == 20_000


def test_an_ingest_whose_indexes_outgrow_duckdbs_memory_cap_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB keeps the primary-key index entries written since its last checkpoint in memory,
    beyond its cap's reach. A flat 512 MB cap failed a 4M-exchange ingest at 3.4M (the commit
    failed, then the database was invalidated); the same happens here at a 16 MB cap with
    100K exchanges unless the cap grows with the indexes (storage.engine)."""
    from ingest.pipeline import IngestConfig, ingest_paths

    monkeypatch.setenv("CONVOSCOPE_DUCKDB_MEMORY", "16MB")
    log = tmp_path / "many.jsonl"
    with log.open("w") as handle:
        for i in range(100_000):
            messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    engine = open_database(f"duckdb:///{tmp_path / 'many.duckdb'}")
    config = IngestConfig(progress=False, rejects_path=tmp_path / "rejects.jsonl")
    assert ingest_paths([log], engine=engine, config=config).stored == 100_000
    assert table_counts(engine)["exchanges"] == 100_000
    engine.dispose()


def test_cut_damaged_and_too_deep_files_keep_what_is_readable(tmp_path: Path) -> None:
    lines = [openai_line(i) + "\n" for i in range(40)]
    whole = gzip.compress("".join(lines).encode(), mtime=0)
    cut = tmp_path / "cut.jsonl.gz"  # smaller than a sniff: read whole, it raised at once
    cut.write_bytes(whole[:-12])
    damaged = tmp_path / "damaged.jsonl.gz"
    broken = bytearray(whole)
    broken[60] ^= 0xFF  # zlib.error, which is no OSError: it ended the run with a traceback
    damaged.write_bytes(bytes(broken))
    deep = tmp_path / "deep.jsonl"  # json's RecursionError ended the run too
    nested = "[" * 1100 + "]" * 1100
    first, middle, last = (openai_line(i) for i in (100, 101, 102))
    deep.write_text(f'{first}\n{middle[:-1]}, "extra": {nested}}}\n{last}\n')
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    result = convoscope_here(
        "ingest", str(cut), str(damaged), str(deep), "--json", db=db, cwd=tmp_path
    )
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    (cut_report,) = [t for t in summary["truncated"] if t["source"] == str(cut)]
    assert 30 <= cut_report["records_kept"] < 40  # the whole lines before the cut
    rejects = [json.loads(line) for line in Path(summary["rejects_file"]).read_text().splitlines()]
    assert {"file": str(deep), "line": 2} in [
        {"file": r["file"], "line": r["line"]} for r in rejects
    ]
    assert "nested too deeply" in next(r["reason"] for r in rejects if r["file"] == str(deep))
    assert not any(r["file"] == str(cut) for r in rejects)
    engine = open_database(db)
    prompts = {row["prompt"] for batch in iter_exchanges(engine) for row in batch}
    engine.dispose()
    assert {"What is 100 + 100?", "What is 102 + 102?"} <= prompts  # around deep.jsonl's line 2
    assert "What is 101 + 101?" not in prompts
    assert summary["stored"] == 2 * (cut_report["records_kept"] + 2)  # damaged.jsonl.gz: none
