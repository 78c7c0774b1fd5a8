"""CSV exports and spreadsheet formulas (CSV injection): log text is untrusted, so a prompt a
spreadsheet would run is said on stderr by default and neutralised with --spreadsheet-safe;
through the real CLI on a real DuckDB file."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from tests.test_ingest_pipeline import convoscope_here

# Prompts a spreadsheet would run as a formula (OWASP's list: = + - @ tab CR), and safe ones.
FORMULAS = [
    '=HYPERLINK("http://evil.example","click")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
]
PLAIN = ["What is 2 + 2?", "a = b, right?"]


def _database(tmp_path: Path) -> str:
    """One single-turn chat per prompt: answers are safe text, one is rated thumbs down."""
    records = [
        {
            "id": f"c{i}",
            "model": "risky-bot" if prompt in FORMULAS else "plain-bot",
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"answer {i}", "thumbs": "down"},
            ],
        }
        for i, prompt in enumerate(FORMULAS + PLAIN)
    ]
    log = tmp_path / "chats.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    result = convoscope_here("ingest", str(log), db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return db


def _cells(path: Path) -> list[dict[str, str]]:
    """The CSV's rows as the csv module reads them (no type guessing), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_default_csv_export_is_as_stored_and_counts_formula_cells(tmp_path: Path) -> None:
    db = _database(tmp_path)
    out = tmp_path / "out.csv"
    result = convoscope_here("export", "--out", str(out), "--json", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "--spreadsheet-safe" in line]
    assert notes == [
        f"convoscope: note: {len(FORMULAS)} cells start with =, +, -, @, a tab or a carriage "
        "return and would run as formulas in a spreadsheet; --spreadsheet-safe prefixes them "
        "with ' (written as stored for pandas and other readers)"
    ]
    assert json.loads(result.stdout)["formula_cells"] == len(FORMULAS)
    assert sorted(row["prompt"] for row in _cells(out)) == sorted(FORMULAS + PLAIN)

    plain = convoscope_here(
        "export", "--out", str(out), "--model", "plain-bot", db=db, cwd=tmp_path
    )
    assert plain.returncode == 0 and "note" not in plain.stderr


def test_spreadsheet_safe_prefixes_formula_cells_with_a_quote(tmp_path: Path) -> None:
    db = _database(tmp_path)
    out = tmp_path / "safe.csv.gz"  # a gzipped CSV is a CSV
    result = convoscope_here("export", "--out", str(out), "--spreadsheet-safe", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note" not in result.stderr
    rows = _cells(out)
    assert sorted(row["prompt"] for row in rows) == sorted(
        [f"'{prompt}" for prompt in FORMULAS] + PLAIN
    )
    assert {row["thumbs"] for row in rows} == {"-1"}  # a number, not a formula: as stored
    assert all(row["response"].startswith("answer ") for row in rows)


def test_spreadsheet_safe_is_refused_for_other_formats(tmp_path: Path) -> None:
    db = _database(tmp_path)
    for args in (["--out", "o.jsonl"], ["--out", "o.csv", "--format", "parquet"]):
        result = convoscope_here("export", *args, "--spreadsheet-safe", db=db, cwd=tmp_path)
        assert result.returncode == 2
        chosen = "parquet" if "parquet" in args else "jsonl"
        assert (
            f"convoscope: error: --spreadsheet-safe is for CSV exports only (this export is "
            f"{chosen})" in result.stderr
        )
        assert not (tmp_path / args[1]).exists()


def test_a_spreadsheet_safe_csv_ingests_back_as_stored(tmp_path: Path) -> None:
    """The quotes --spreadsheet-safe adds come off again on ingest: the file says it is safe
    in a column of its own, and a cell that was stored starting with a quote and a formula
    gets one more quote, so exactly one comes off. Quoted prompts were rejected as edited,
    and a quoted system prompt was stored with its quote."""
    quoted = ["'=quoted as stored", "''+twice"]  # texts that start with quotes of their own
    records = [
        {
            "id": f"q{i}",
            "model": "@bot" if i % 2 else "plain-bot",
            "messages": [
                {"role": "system", "content": f"=SYSTEM({i})"},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"-{i} as an answer"},
            ],
        }
        for i, prompt in enumerate(FORMULAS + quoted + PLAIN)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    db, other = (f"duckdb:///{tmp_path / name}" for name in ("a.duckdb", "b.duckdb"))
    assert convoscope_here("ingest", "chats.jsonl", db=db, cwd=tmp_path).returncode == 0
    safe = convoscope_here("export", "--out", "safe.csv", "--spreadsheet-safe", db=db, cwd=tmp_path)
    assert safe.returncode == 0, safe.stderr
    cells = _cells(tmp_path / "safe.csv")
    assert {row["spreadsheet_safe"] for row in cells} == {"true"}
    assert {"'" + q for q in quoted} <= {row["prompt"] for row in cells}

    for target, stored in ((db, 0), (other, len(records))):
        back = convoscope_here("ingest", "safe.csv", "--json", db=target, cwd=tmp_path)
        assert back.returncode == 0, back.stderr
        summary = json.loads(back.stdout)
        assert (summary["stored"], summary["rejected"]) == (stored, 0), back.stderr
    exported = {}
    for name, target in (("a", db), ("b", other)):
        out = f"{name}.jsonl"
        assert convoscope_here("export", "--out", out, db=target, cwd=tmp_path).returncode == 0
        rows = [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
        fields = ("id", "prompt", "response", "model", "instruction", "context")
        exported[name] = {tuple(json.dumps(row[f]) for f in fields) for row in rows}
        assert not any("spreadsheet_safe" in (row["metadata"] or {}) for row in rows)
    assert exported["a"] == exported["b"]
    assert len(exported["b"]) == len(records)
