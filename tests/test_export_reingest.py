"""An export (JSONL, CSV or Parquet) ingests back as the exchanges it holds, under their
original ids: through the real CLI, between real DuckDB and SQLite files."""

from __future__ import annotations

import csv
import importlib.metadata
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from ingest.detect import detect_format
from storage.engine import open_database
from storage.logs import iter_exchanges
from storage.schema import conversations, ingest_runs
from tests.test_ingest_pipeline import convoscope_here

T0 = 1_767_268_800  # 2026-01-01 12:00 UTC


def _chat_log(path: Path) -> None:
    """Multi-turn OpenAI chats with every logged signal, a tool call and a saved input."""
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    records: list[dict[str, Any]] = [
        {
            "id": "conv-1",
            "model": "bot-1",
            "instruction": "sp-42",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?", "created_at": T0},
                {"role": "assistant", "content": "5.", "created_at": T0 + 5, "retried": True},
                {"role": "assistant", "content": "4.", "created_at": T0 + 9, "rating": 4},
                {"role": "user", "content": "And doubled?", "created_at": T0 + 70},
                {
                    "role": "assistant",
                    "content": "8.",
                    "created_at": T0 + 75,
                    "edited": True,
                    "thumbs": "down",
                    "deleted": False,
                },
                {"role": "user", "content": '=HYPERLINK("x")', "created_at": T0 + 90},
                # Another model's answer: an export of bot-1's holds part of this chat.
                {
                    "role": "assistant",
                    "content": "Plain text.",
                    "created_at": T0 + 95,
                    "model": "bot-2",
                },
            ],
        },
        {
            "id": "conv-2",
            "model": "bot-2",
            "thumbs_up": False,
            "feedback": "Too slow to answer.",  # conversation-level free text
            "user_id": "u-17",  # a key no field holds: the conversation's metadata
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                {"role": "assistant", "content": "Rain, sadly."},
            ],
        },
        {"id": "conv-3", "model": "bot-1", "messages": [{"role": "user", "content": "Saved?"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _stored(db: str) -> dict[str, dict[str, Any]]:
    """Every stored exchange by id, contexts whole, less the time it was ingested."""
    engine = open_database(db)
    try:
        rows = [row for batch in iter_exchanges(engine) for row in batch]
    finally:
        engine.dispose()
    for row in rows:
        del row["ingested_at"]
    return {row["id"]: row for row in rows}


def _conversations(db: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    """Every stored conversation's external id, free-text feedback and metadata, by id."""
    engine = open_database(db)
    query = sa.select(
        conversations.c.id,
        conversations.c.external_id,
        conversations.c.feedback_text,
        conversations.c.metadata,
    )
    try:
        with engine.connect() as conn:
            return {cid: tuple(values) for cid, *values in conn.execute(query)}
    finally:
        engine.dispose()


def _ingest(db: str, path: Path, cwd: Path, *extra: str) -> dict[str, Any]:
    result = convoscope_here("ingest", str(path), "--json", *extra, db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _export(db: str, out: Path, cwd: Path) -> list[dict[str, Any]]:
    result = convoscope_here("export", "--out", str(out), "--format", "jsonl", db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_jsonl_export_ingests_back_under_the_same_ids(tmp_path: Path) -> None:
    log = tmp_path / "chats.jsonl"
    _chat_log(log)
    a = f"duckdb:///{tmp_path / 'a.duckdb'}"
    b = f"sqlite:///{tmp_path / 'b.sqlite'}"
    first = _ingest(a, log, tmp_path)
    originals = _stored(a)
    assert first["stored"] == len(originals) == 6

    exported = _export(a, tmp_path / "export.jsonl", tmp_path)
    assert len(exported) == 6
    tool_answer = next(r for r in exported if r["response"] == "Rain, sadly.")
    assert tool_answer["metadata"]["tool_steps"][1]["content"] == "rain"
    assert tool_answer["conversation_external_id"] == "conv-2"
    assert tool_answer["feedback_text"] == "Too slow to answer."
    assert tool_answer["conversation_metadata"] == {"user_id": "u-17"}

    # Into the database it came from: every row is already there.
    again = _ingest(a, tmp_path / "export.jsonl", tmp_path)
    assert (again["read"], again["stored"], again["duplicates"], again["rejected"]) == (6, 0, 6, 0)
    assert _stored(a) == originals

    # Into a fresh database (another engine): the same exchanges, field by field.
    fresh = _ingest(b, tmp_path / "export.jsonl", tmp_path)
    assert (fresh["stored"], fresh["rejected"]) == (6, 0)
    copies = _stored(b)
    assert copies.keys() == originals.keys()
    for exchange_id, original in originals.items():
        assert copies[exchange_id] == original, exchange_id
    # The conversations' own fields came back too: no exchange column holds them.
    assert _conversations(b) == _conversations(a)
    conv_2 = ("conv-2", "Too slow to answer.", json.dumps({"user_id": "u-17"}))
    assert conv_2 in _conversations(b).values()
    signals = {r["response"]: r for r in originals.values()}
    assert signals["5."]["retried"] is True and signals["4."]["rating"] == 4
    assert signals["8."]["edited"] is True and signals["8."]["thumbs"] == -1
    assert signals["4."]["seconds_to_next_user_message"] == 61
    assert signals["Rain, sadly."]["thumbs"] == -1
    assert signals[""]["prompt"] == "Saved?"  # the saved input came back too
    engine = open_database(b)
    with engine.connect() as conn:
        assert conn.execute(sa.select(ingest_runs.c.format)).scalar_one() == "convoscope"
    engine.dispose()

    # And its export is the first one, byte for byte.
    assert _export(b, tmp_path / "again.jsonl", tmp_path) == exported


def test_a_tampered_export_row_is_rejected_with_its_line_and_the_others_stored(
    tmp_path: Path,
) -> None:
    log = tmp_path / "chats.jsonl"
    _chat_log(log)
    a = f"duckdb:///{tmp_path / 'a.duckdb'}"
    _ingest(a, log, tmp_path)
    originals = _stored(a)
    rows = _export(a, tmp_path / "export.jsonl", tmp_path)

    rows[1]["prompt"] = "Something else"  # line 2: edited text under the original id
    rows[2]["turn_index"] = "three"  # line 3: a wrong type
    # Where the rows landed in the other database does not travel, and costs no reject.
    rows[3].update(cluster_id="t3", tags=["billing"], reward=0.5, **{"score:reward:x": 0.1})
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")

    b = f"duckdb:///{tmp_path / 'b.duckdb'}"
    rejects = tmp_path / "rejects.jsonl"
    summary = _ingest(b, tampered, tmp_path, "--rejects", str(rejects), "--format", "convoscope")
    assert (summary["stored"], summary["rejected"]) == (4, 3)
    found = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["file"], r["line"], r["field"]) for r in found] == [
        (str(tampered), 2, "id"),
        (str(tampered), 3, "turn_index"),
        (str(tampered), 7, None),  # not JSON at all: the usual reject
    ]
    copies = _stored(b)
    kept = {rows[i]["id"] for i in (0, 3, 4, 5)}
    assert copies.keys() == kept
    assert all(copies[i] == originals[i] for i in kept)


def test_the_ui_jsonl_export_carries_metadata_and_ingests_back_whole(tmp_path: Path) -> None:
    """The Export page writes through app.ui.exporting: its JSONL rows carry the stored metadata
    (a tool call's steps here), so the rows ingest back field by field, metadata included."""
    from app.ui.exporting import export_bytes, export_to_path
    from storage.views import ViewFilter

    log = tmp_path / "chats.jsonl"
    _chat_log(log)
    a = f"duckdb:///{tmp_path / 'a.duckdb'}"
    _ingest(a, log, tmp_path)
    originals = _stored(a)
    engine = open_database(a)
    try:
        out = tmp_path / "ui.jsonl"
        assert export_to_path(engine, None, ViewFilter(), out, format="jsonl") == 6
        download = export_bytes(engine, None, ViewFilter(), format="jsonl")
    finally:
        engine.dispose()
    assert download == out.read_bytes()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tool_answer = next(r for r in rows if r["response"] == "Rain, sadly.")
    assert tool_answer["metadata"]["tool_steps"][1]["content"] == "rain"

    b = f"sqlite:///{tmp_path / 'b.sqlite'}"
    fresh = _ingest(b, out, tmp_path)
    assert (fresh["stored"], fresh["rejected"]) == (6, 0)
    assert _stored(b) == originals
    assert _conversations(b) == _conversations(a)


# --- CSV and Parquet exports: the same columns, read back the same way ---


def _exported_table(tmp_path: Path, suffix: str) -> tuple[str, dict[str, dict[str, Any]], Path]:
    """The chat log ingested into a.duckdb, its stored rows, and its whole export as `suffix`
    (csv or parquet)."""
    log = tmp_path / "chats.jsonl"
    _chat_log(log)
    a = f"duckdb:///{tmp_path / 'a.duckdb'}"
    _ingest(a, log, tmp_path)
    export = tmp_path / f"export.{suffix}"
    _export_table(a, export, tmp_path)
    return a, _stored(a), export


def _export_table(db: str, out: Path, cwd: Path, *extra: str) -> None:
    """`convoscope export` to `out`, in the format its name gives (csv or parquet)."""
    result = convoscope_here("export", "--out", str(out), *extra, db=db, cwd=cwd)
    assert result.returncode == 0, result.stderr


def _read_table(path: Path) -> list[dict[str, Any]]:
    """A CSV export's rows as text cells, a Parquet export's with their types."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _as_exported(rows: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, Any]]:
    """Stored exchanges as an export in `suffix` carries them: a CSV export leaves their
    metadata out (JSONL and Parquet carry it)."""
    if suffix != "csv":
        return rows
    return {i: {k: v for k, v in row.items() if k != "metadata"} for i, row in rows.items()}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_csv_or_parquet_export_ingests_back_under_the_same_ids(
    tmp_path: Path, suffix: str
) -> None:
    """Read as a log, the rows became new conversations: re-ingested into the database they
    came from they were stored again (the data doubled), and a filtered export's last turn
    was read as the one the user left after."""
    a, originals, export = _exported_table(tmp_path, suffix)

    # Into the database it came from: every row is already there.
    again = _ingest(a, export, tmp_path)
    assert (again["read"], again["stored"], again["duplicates"], again["rejected"]) == (6, 0, 6, 0)
    assert _stored(a) == originals
    assert detect_format(export) == "convoscope"

    # Into a fresh database: the same ids and the same fields, NULL signals still NULL.
    b = f"duckdb:///{tmp_path / 'b.duckdb'}"
    fresh = _ingest(b, export, tmp_path)
    assert (fresh["stored"], fresh["rejected"]) == (6, 0)
    copies = _stored(b)
    assert _as_exported(copies, suffix) == _as_exported(originals, suffix)  # Parquet: whole
    last = next(r for r in copies.values() if r["response"] == "Plain text.")
    assert (last["ended_conversation"], last["seconds_to_next_user_message"]) == (True, None)
    assert last["rating"] is None and last["retried"] is None
    kept = 3 if suffix == "parquet" else 2  # the conversation's metadata, in Parquet only
    conversation_fields = {i: v[:kept] for i, v in _conversations(a).items()}
    assert {i: v[:kept] for i, v in _conversations(b).items()} == conversation_fields
    engine = open_database(b)
    with engine.connect() as conn:
        assert conn.execute(sa.select(ingest_runs.c.format)).scalar_one() == "convoscope"
    engine.dispose()

    # A filtered export holds part of a chat: its signals are the ones logged, not read again
    # from the rows it holds ("8." is bot-1's last answer, and the user went on after it).
    part = tmp_path / f"bot-1.{suffix}"
    _export_table(a, part, tmp_path, "--model", "bot-1")
    c = f"duckdb:///{tmp_path / 'c.duckdb'}"
    assert _ingest(c, part, tmp_path)["stored"] == 4
    wanted = {i: r for i, r in originals.items() if r["model"] == "bot-1"}
    assert _as_exported(_stored(c), suffix) == _as_exported(wanted, suffix)
    eight = next(r for r in _stored(c).values() if r["response"] == "8.")
    assert (eight["ended_conversation"], eight["user_turns_after"]) == (False, 1)

    # --format csv/parquet still reads the file as a log, for whoever means that.
    d = f"duckdb:///{tmp_path / 'd.duckdb'}"
    as_log = _ingest(d, export, tmp_path, "--format", suffix)
    assert as_log["stored"] > 0 and _stored(d).keys().isdisjoint(originals)


def test_a_parquet_export_says_where_it_came_from(tmp_path: Path) -> None:
    """The filters, clustering, reward scorer, time and version that made a Parquet export
    ride in its schema's key-value metadata, which readers other than convoscope keep too;
    its rows still ingest back (above). A CSV has no place for them and says nothing."""
    log = tmp_path / "chats.jsonl"
    _chat_log(log)
    a = f"duckdb:///{tmp_path / 'a.duckdb'}"
    _ingest(a, log, tmp_path)
    export = tmp_path / "bot-1.parquet"
    _export_table(a, export, tmp_path, "--model", "bot-1")
    about = json.loads(pq.read_schema(export).metadata[b"convoscope"])
    assert about["convoscope_version"] == importlib.metadata.version("convoscope")
    assert about["filters"]["models"] == ["bot-1"] and about["filters"]["min_reward"] is None
    assert about["clustering_run_id"] is None and about["reward_scorer"] is None  # not yet
    exported_at = datetime.fromisoformat(about["exported_at"])
    assert abs((datetime.now(UTC) - exported_at).total_seconds()) < 600
    assert pq.read_table(export).num_rows == 4


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_tampered_csv_or_parquet_export_row_is_rejected_with_its_line(
    tmp_path: Path, suffix: str
) -> None:
    _, originals, export = _exported_table(tmp_path, suffix)
    rows = _read_table(export)
    rows[1]["prompt"] = "Something else"  # edited text under the original id
    rows[2]["context"] = "[{oops"  # not JSON
    _write_table(export, rows)

    b = f"duckdb:///{tmp_path / 'b.duckdb'}"
    rejects = tmp_path / "rejects.jsonl"
    summary = _ingest(b, export, tmp_path, "--rejects", str(rejects))
    assert (summary["stored"], summary["rejected"]) == (4, 2)
    found = [json.loads(line) for line in rejects.read_text().splitlines()]
    first = 2 if suffix == "csv" else 1  # the CSV line after the header, the Parquet row
    assert [(r["file"], r["line"], r["field"]) for r in found] == [
        (str(export), first + 1, "id"),
        (str(export), first + 2, "context"),
    ]
    kept = {rows[i]["id"] for i in (0, 3, 4, 5)}
    assert _as_exported(_stored(b), suffix) == _as_exported(
        {i: r for i, r in originals.items() if i in kept}, suffix
    )


def test_an_ordinary_csv_is_still_read_as_a_log(tmp_path: Path) -> None:
    """A table is an export only when its header has the export's columns: a log whose columns
    are mapped is read as before, and one passed as --format convoscope is refused whole."""
    plain = tmp_path / "qa.csv"
    plain.write_text(
        "conversation_id,turn_index,question,answer,bot\n"
        "c1,0,What is DNS?,Domain Name System.,m1\n"
        "c1,1,And HTTP?,A protocol.,m1\n"
    )
    assert detect_format(plain) == "csv"
    db = f"duckdb:///{tmp_path / 'a.duckdb'}"
    mapping = ("--map", "prompt=question,response=answer,model=bot")
    summary = _ingest(db, plain, tmp_path, *mapping)
    assert (summary["stored"], summary["conversations"], summary["rejected"]) == (2, 1, 0)
    second = next(r for r in _stored(db).values() if r["prompt"] == "And HTTP?")
    assert second["ended_conversation"] is True and second["turn_index"] == 3

    forced = convoscope_here("ingest", str(plain), "--format", "convoscope", db=db, cwd=tmp_path)
    assert forced.returncode == 2  # no file could be read
    assert "not a convoscope export" in forced.stderr and "pass --format csv" in forced.stderr
