"""The ingest step end to end, through the real CLI, on real files and real databases."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    first = convoscope("ingest", str(log), "--json", db=db_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["read"], summary["stored"], summary["duplicates"]) == (100, 100, 0)
    assert summary["rejected"] == 0 and summary["rejects_file"] is None

    again = json.loads(convoscope("ingest", str(log), "--json", db=db_url, cwd=tmp_path).stdout)
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
    result = convoscope(
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
    result = convoscope(
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
    result = convoscope("ingest", str(tmp_path / "nope.jsonl"), db=":memory:", cwd=tmp_path)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


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

    rerun = convoscope("ingest", str(log), "--json", db=db, cwd=tmp_path)
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
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    import pandas as pd

    for fmt, name in [("csv", "out.csv"), ("parquet", "out.parquet"), ("jsonl", "out.jsonl")]:
        result = convoscope(
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

    result = convoscope(
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
