"""CSV exports and spreadsheet formulas (CSV injection): log text is untrusted, so a prompt a
spreadsheet would run is said on stderr by default and neutralised with --spreadsheet-safe;
through the real CLI on a real DuckDB file."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from tests.test_ingest_pipeline import convoscope

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
    result = convoscope("ingest", str(log), db=db, cwd=tmp_path)
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
    result = convoscope("export", "--out", str(out), "--json", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "--spreadsheet-safe" in line]
    assert notes == [
        f"convoscope: note: {len(FORMULAS)} cells start with =, +, -, @, a tab or a carriage "
        "return and would run as formulas in a spreadsheet; --spreadsheet-safe prefixes them "
        "with ' (written as stored for pandas and other readers)"
    ]
    assert json.loads(result.stdout)["formula_cells"] == len(FORMULAS)
    assert sorted(row["prompt"] for row in _cells(out)) == sorted(FORMULAS + PLAIN)

    plain = convoscope("export", "--out", str(out), "--model", "plain-bot", db=db, cwd=tmp_path)
    assert plain.returncode == 0 and "note" not in plain.stderr


def test_spreadsheet_safe_prefixes_formula_cells_with_a_quote(tmp_path: Path) -> None:
    db = _database(tmp_path)
    out = tmp_path / "safe.csv.gz"  # a gzipped CSV is a CSV
    result = convoscope("export", "--out", str(out), "--spreadsheet-safe", db=db, cwd=tmp_path)
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
        result = convoscope("export", *args, "--spreadsheet-safe", db=db, cwd=tmp_path)
        assert result.returncode == 2
        chosen = "parquet" if "parquet" in args else "jsonl"
        assert (
            f"convoscope: error: --spreadsheet-safe is for CSV exports only (this export is "
            f"{chosen})" in result.stderr
        )
        assert not (tmp_path / args[1]).exists()
