"""What the CLI says when a path, an option or a filter is wrong: one line naming it, exit 2,
nothing on disk lost; and warnings where a command would otherwise succeed silently."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import sqlalchemy as sa

from app.cli import main
from app.ui.launch import free_port
from ingest.files import REJECTS_PREFIX
from storage.engine import open_database
from storage.logs import iter_exchanges, table_counts
from storage.schema import ingest_runs, scores, trained_models
from tests.test_ingest_pipeline import REPO, convoscope, write_openai_jsonl


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each command in the test's own folder: a default rejects file (or database) lands
    there, not in the repository."""
    monkeypatch.chdir(tmp_path)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: exit status, stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse refusing an argument
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_rejects_never_overwrite_an_input_and_append_to_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "bad.jsonl"
    write_openai_jsonl(log, 3, bad_lines={1: b"not json"})
    original = log.read_bytes()
    db = str(tmp_path / "x.duckdb")
    code, _, err = cli(capsys, "--db", db, "ingest", str(log), "--rejects", str(log))
    assert code == 2 and f"--rejects {log} is one of the files to ingest" in err
    assert log.read_bytes() == original

    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"file": "earlier run"}\n')
    for _ in range(2):
        code, _, err = cli(capsys, "--db", db, "ingest", str(log), "--rejects", str(rejects))
        assert code == 0, err
    lines = rejects.read_text().splitlines()
    assert lines[0] == '{"file": "earlier run"}'
    assert [json.loads(line)["line"] for line in lines[1:]] == [2, 2]


def test_a_default_rejects_file_taken_by_another_run_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now()
    taken = [  # another run's rejects, under every name this run could pick for two minutes
        tmp_path / f"{REJECTS_PREFIX}{now + timedelta(seconds=s):%Y%m%d-%H%M%S}.jsonl"
        for s in range(-1, 120)
    ]
    for path in taken:
        path.write_text("another run\n")
    log = tmp_path / "bad.jsonl"
    write_openai_jsonl(log, 2, bad_lines={1: b"not json"})
    code, out, err = cli(capsys, "--db", str(tmp_path / "x.duckdb"), "ingest", str(log), "--json")
    assert code == 0, err
    written = Path(json.loads(out)["rejects_file"])
    assert written.name.startswith(REJECTS_PREFIX) and written.name.endswith("-2.jsonl")
    assert json.loads(written.read_text())["line"] == 2
    assert all(path.read_text() == "another run\n" for path in taken)


def test_files_rejected_whole_are_warnings_and_all_of_them_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "qa.parquet"
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_parquet(table)
    db = str(tmp_path / "x.duckdb")
    typo = ("--map", "prompt=question,respons=answer", "--json")
    code, out, err = cli(capsys, "--db", db, "ingest", str(table), *typo)
    assert code == 2
    assert f"warning: {table}: not ingested: unknown field(s) in the column mapping" in err
    assert "respons" in err and "no file could be read" in err
    assert json.loads(out)["rejected"] == 1  # the summary is still printed
    code, _, err = cli(capsys, "--db", db, "ingest", str(table))  # no mapping: no prompt
    assert code == 2  # the file named once, as every warning names it ("F: not ingested: F: ...")
    assert f"warning: {table}: not ingested: no prompt column" in err and err.count(str(table)) == 1

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 2)
    code, out, err = cli(capsys, "--db", db, "ingest", str(table), str(log), *typo)
    assert code == 0, err
    assert json.loads(out)["stored"] == 4 and "not ingested" in err
    assert f"{log}: --map ignored" in err  # a JSON format names its own fields


def test_paths_that_cannot_be_written_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 2, bad_lines={1: b"not json"})
    folder = tmp_path / "folder"
    folder.mkdir()
    db = str(tmp_path / "x.duckdb")
    code, _, err = cli(capsys, "--db", db, "ingest", str(log), "--rejects", str(folder))
    assert code == 2 and f"--rejects {folder} is a folder" in err
    engine = open_database(db)
    with engine.connect() as conn:  # refused before any run started
        assert conn.execute(sa.select(sa.func.count()).select_from(ingest_runs)).scalar() == 0
    engine.dispose()

    code, _, err = cli(capsys, "--db", db, "ingest", str(log), "--rejects", str(log / "r.jsonl"))
    assert code == 2 and f"{log} is a file, not a folder" in err
    code, _, err = cli(capsys, "--db", str(log / "y.duckdb"), "ingest", str(log))
    assert code == 2 and f"{log}: is a file, not a folder" in err
    code, _, err = cli(capsys, "--db", db, "export", "--out", str(folder))
    assert code == 2 and f"--out {folder} is a folder" in err
    code, _, err = cli(capsys, "--db", db, "export", "--out", str(log / "out.csv"))
    assert code == 2 and f"{log} is a file, not a folder" in err
    assert log.is_file() and not list(folder.iterdir())


def test_a_non_positive_line_limit_is_refused_and_json_is_documented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 1)
    for limit in ["0", "-1"]:
        code, _, err = cli(capsys, "ingest", str(log), "--max-line-mb", limit)
        assert code == 2 and "--max-line-mb: must be more than 0" in err
    code, out, _ = cli(capsys, "ingest", "--help")
    assert code == 0 and "--json" in out and "print a JSON summary on stdout" in out


def _ingested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    log = folder / "qa.jsonl"
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a"},
            ],
            "model": "bot-1",
            "instruction_id": "sp-42",
            "id": f"conv-{i}",
            "rating": 4,
        }
        for i in range(3)
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    db = str(tmp_path / "x.duckdb")
    code, _, err = cli(capsys, "--db", db, "ingest", "in/qa.jsonl")
    assert code == 0, err
    return db, log


def test_openai_export_carries_the_model_and_never_an_instruction_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = _ingested(tmp_path, capsys)
    code, _, err = cli(capsys, "--db", db, "export", "--out", "ft.jsonl", "--format", "openai")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["model"] == "bot-1"
        meta = record["metadata"]
        assert meta["external_id"].startswith("conv-") and meta["rating"] == 4
        assert meta["instruction"] == "sp-42"

    again = str(tmp_path / "again.duckdb")
    code, _, err = cli(capsys, "--db", again, "ingest", "ft.jsonl")
    assert code == 0, err
    engine = open_database(again)
    assert {row["model"] for batch in iter_exchanges(engine) for row in batch} == {"bot-1"}
    engine.dispose()


def test_openai_export_leaves_tool_steps_out_of_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "result"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    saved = {"messages": [{"role": "user", "content": "q3, not answered yet"}]}
    (tmp_path / "tools.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "saved.jsonl").write_text(json.dumps(saved) + "\n")
    db = str(tmp_path / "tools.duckdb")
    assert cli(capsys, "--db", db, "ingest", "tools.jsonl", "saved.jsonl")[0] == 0
    args = ("export", "--out", "ft.jsonl", "--format", "openai", "--json")
    code, out, err = cli(capsys, "--db", db, *args)
    assert code == 0, err
    assert json.loads(out)["without_answer"] == 1  # said, not silently fewer rows
    assert "1 selected exchanges are saved inputs without an answer" in err
    records = [json.loads(line) for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert [[m["content"] for m in r["messages"]] for r in records] == [
        ["q1", "a1"],
        ["q1", "a1", "q2", "a2"],
    ]


def test_export_sources_match_by_path_or_name_and_empty_exports_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, log = _ingested(tmp_path, capsys)  # stored as typed: in/qa.jsonl
    for source in ["in/qa.jsonl", str(log), "qa.jsonl"]:
        code, out, err = cli(capsys, "--db", db, "export", "--out", "o.jsonl", "--source", source)
        assert code == 0 and "wrote 3 rows" in out, (source, err)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the file by its absolute path, from another folder
    code, out, err = cli(capsys, "--db", db, "export", "--out", "o.jsonl", "--source", str(log))
    assert code == 0 and "wrote 3 rows" in out, err
    monkeypatch.chdir(tmp_path)

    filters = {
        ("--source", "nope.jsonl"): "--source nope.jsonl matches no stored source (stored: in/qa",
        ("--cluster", "t99"): "--cluster t99 is not in the latest clustering",
        ("--tag", "nosuch"): "--tag nosuch is on no exchange or cluster",
        ("--min-reward", "0.5"): "--min-reward/--max-reward: no reward scores yet",
    }
    written = (tmp_path / "o.jsonl").read_bytes()
    for args, reason in filters.items():
        code, out, err = cli(capsys, "--db", db, "--json", "export", "--out", "o.jsonl", *args)
        assert code == 2 and json.loads(out)["rows"] == 0
        assert f"warning: no rows exported: {reason}" in err
        assert "nothing was written to o.jsonl; the file already there is left as it" in err
        assert (tmp_path / "o.jsonl").read_bytes() == written  # a typo does not wipe it
    code, out, err = cli(capsys, "--db", db, "export", "--out", "new.csv", "--tag", "nosuch")
    assert code == 2 and "no rows exported to new.csv" in out
    assert not (tmp_path / "new.csv").exists() and not list(tmp_path.glob("*.partial"))

    (tmp_path / "other").mkdir()  # a second qa.jsonl: the bare name no longer says which
    (tmp_path / "other" / "qa.jsonl").write_text(log.read_text().replace("q", "Q"))
    assert cli(capsys, "--db", db, "ingest", "other/qa.jsonl")[0] == 0
    code, _, err = cli(capsys, "--db", db, "export", "--out", "o.jsonl", "--source", "qa.jsonl")
    assert code == 2
    assert "--source qa.jsonl names 2 files (stored: in/qa.jsonl, other/qa.jsonl): give" in err


def test_a_value_starting_with_a_dash_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "export", "--out", "o.csv", "--tag", "-draft")
    assert code == 2 and 'a value starting with "-" is given as --option=-value' in err
    code, _, err = cli(capsys, "tag", "t3", "-draft")
    assert code == 2 and "goes after --: convoscope tag t3 -- -draft" in err
    code, _, err = cli(capsys, "tag", "t3")  # no dash anywhere: no hint
    assert code == 2 and "required: tag" in err and "--:" not in err


def test_a_gz_export_is_gzipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, _ = _ingested(tmp_path, capsys)
    code, _, err = cli(capsys, "--db", db, "export", "--out", "o.csv.gz")
    assert code == 0, err
    with gzip.open(tmp_path / "o.csv.gz", "rt") as handle:
        assert len(pd.read_csv(handle)) == 3
    code, _, err = cli(capsys, "--db", db, "export", "--out", "o.parquet.gz")
    assert code == 2 and "Parquet files are compressed already" in err


def test_export_only_reads_so_it_runs_beside_another_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = _ingested(tmp_path, capsys)
    reader = duckdb.connect(db, read_only=True)  # as the UI holds it
    try:
        result = convoscope("export", "--out", "o.jsonl", db=db, cwd=tmp_path)
    finally:
        reader.close()
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "command",
    [
        ["clusters"],
        ["route", "hi"],
        ["route", "--export", "t.json"],
        ["reward", "--file", "p.jsonl"],
    ],
)
def test_commands_that_only_read_run_beside_another_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """They opened DuckDB for writing, so while an export or the UI read the file they
    failed with "in use by another process ... one writer at a time", with no writer about."""
    db, _ = _ingested(tmp_path, capsys)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hey"}) + "\n")
    reader = duckdb.connect(db, read_only=True)  # as an export or the UI holds it
    try:
        result = convoscope(*command, db=db, cwd=tmp_path)
    finally:
        reader.close()
    assert "in use by another process" not in result.stderr
    assert result.returncode == 0 or "`convoscope score`" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--mode", "head"),  # once silently `--model head`
        ("--js", "clusters"),
        ("clusters", "--lev", "0"),
    ],
)
def test_abbreviated_options_are_refused(
    args: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(capsys, "--db", str(tmp_path / "abbrev.duckdb"), *args)
    assert code == 2 and out == ""
    assert "unrecognized arguments: " + next(a for a in args if a.startswith("--")) in err


def test_a_bad_reward_model_directory_is_named_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    db = str(tmp_path / "reward.duckdb")
    for command in (["score"], ["reward", "--file", str(pairs)]):
        missing = tmp_path / "nonexistent"
        code, _, err = cli(capsys, "--db", db, *command, "--reward-model", str(missing))
        assert code == 2 and f"reward model directory {missing} does not exist" in err
        code, _, err = cli(capsys, "--db", db, *command, "--reward-model", str(empty))
        assert code == 2 and f"{empty} is not a model directory" in err


def test_a_base_model_without_a_scoring_head_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundled MiniLM is a model directory, but not a reward model: transformers would
    give it a random head, and every run would score the same line differently."""
    from scoring.reward_model import default_backbone

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    args = ("reward", "--file", str(pairs), "--reward-model", str(default_backbone()))
    code, out, err = cli(capsys, "--db", str(tmp_path / "r.duckdb"), *args)
    assert code == 2 and out == ""
    assert "has no trained scoring head (classifier.bias, classifier.weight missing)" in err


def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    """`convoscope ... --json | head -1`: the pipe closes before the summary is written; the
    work is done and stored, so no traceback and the command's own exit status."""
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 3)
    command = f"{sys.executable} -m app.cli --db {tmp_path / 'x.duckdb'} ingest {log} --json"
    done = subprocess.run(
        f"{command} | true; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0
    engine = open_database(str(tmp_path / "x.duckdb"))
    assert sum(len(b) for b in iter_exchanges(engine)) == 6  # 3 two-turn chats, stored
    engine.dispose()


def test_an_export_never_writes_over_its_own_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The export is renamed into place at the end: onto the database file (or its journal)
    that would replace the database with the export."""
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 2)
    for name in ("x.duckdb", "x.sqlite"):
        db = tmp_path / name
        code, _, err = cli(capsys, "--db", str(db), "ingest", str(log))
        assert code == 0, err
        before = db.read_bytes()
        for out in (db, db.with_name(db.name + ".wal"), db.with_name(db.name + "-journal")):
            args = ("export", "--out", str(out), "--format", "jsonl")  # a name says no format
            code, _, err = cli(capsys, "--db", str(db), *args)
            assert code == 2 and "is the database being exported" in err, err
        assert db.read_bytes() == before
        engine = open_database(str(db))
        assert sum(len(b) for b in iter_exchanges(engine)) == 4
        engine.dispose()


def test_the_ingest_line_counts_battles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new vote on two stored answers adds a battle and no exchange: the summary says so."""
    vote = {"prompt": "Hi?", "model_a": "m1", "response_a": "Hello.", "model_b": "m2"}
    vote |= {"response_b": "Hi there, how can I help?", "winner": "model_b"}
    votes = tmp_path / "votes.jsonl"
    votes.write_text(json.dumps(vote) + "\n")
    db = str(tmp_path / "x.duckdb")
    code, out, err = cli(capsys, "--db", db, "ingest", str(votes))
    assert code == 0 and "battles: read 1, stored 1, 0 already stored" in out, err
    votes.write_text(json.dumps(vote) + "\n" + json.dumps({**vote, "battle_id": "v2"}) + "\n")
    code, out, err = cli(capsys, "--db", db, "ingest", str(votes))
    assert code == 0, err
    assert "stored 0, 4 already stored" in out and "battles: read 2, stored 1" in out


@pytest.mark.parametrize(
    "command",
    [
        ["clusters"],
        ["route", "how do I reset my password"],
        ["score"],
        ["tag", "t1", "x"],
        ["replay", "--model", "m", "--base-url", "http://127.0.0.1:9/v1"],
        ["replay", "report", "r1"],
        ["reward", "--file", "pairs.jsonl"],
        ["ui", "--no-browser", "--port", "0"],  # 0 is replaced by a free port below
    ],
)
def test_a_step_on_stored_data_never_creates_a_database_from_a_typo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    typo = tmp_path / "convoscpoe.duckdb"
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hey"}) + "\n")
    command = [str(free_port()) if arg == "0" else arg for arg in command]
    code, out, err = cli(capsys, "--db", str(typo), *command)
    assert code == 2 and out == ""
    assert f"no database at {typo}: check --db" in err and not typo.exists()


@pytest.mark.parametrize("prompts", [["how do I reset my password"], ["--file", "prompts.txt"]])
def test_route_export_with_prompts_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prompts: list[str]
) -> None:
    """`route TEXT --export F` (or `--file P --export F`) wrote the table and routed none of
    the prompts, saying nothing of them: refused before the database is read."""
    (tmp_path / "prompts.txt").write_text("how do I reset my password\n")
    table = tmp_path / "table.json"
    code, out, err = cli(
        capsys, "--db", str(tmp_path / "x.duckdb"), "route", *prompts, "--export", str(table)
    )
    assert code == 2 and out == "" and "routes no prompt: give it alone" in err
    assert not table.exists()


@pytest.mark.parametrize("command", [["reward", "--file"], ["route", "--file"]])
def test_a_folder_given_as_the_file_of_lines_is_named_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`reward --file DIR` said "no such file: DIR" of a path that is there."""
    code, _, err = cli(capsys, "--db", str(tmp_path / "x.duckdb"), *command, str(tmp_path))
    assert code == 2 and f"{tmp_path} is a folder: give the file of lines to read" in err


@pytest.mark.parametrize("command", [["reward", "--file"], ["route", "--file"]])
def test_a_pretty_printed_json_document_is_refused_as_no_file_of_lines(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shared_file: Callable[[str], Path],
    command: list[str],
) -> None:
    """`route --file clinc150.json` (an indented JSON document) routed its 94,812 lines after
    the first, `"oos_val": [` and `],` among them, as prompts; `reward --file` rejected every
    line one by one. Neither file holds a record a line: it is refused, saying what to give."""
    document = shared_file("clinc150.json")
    code, out, err = cli(capsys, "--db", str(tmp_path / "x.duckdb"), *command, str(document))
    assert code == 2 and out == ""
    assert f"{document}:1: the file is one JSON document spread over many lines" in err
    assert "jq -c '.[]'" in err


def test_hints_name_what_is_stored_and_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, log = _ingested(tmp_path, capsys)
    code, _, err = cli(capsys, "--db", db, "score", "reward", "apply", "--model-id", "nope")
    assert code == 2 and "no stored reward model 'nope' (none is stored)" in err
    code, _, err = cli(capsys, "--db", db, "route", "--export", "table.json")
    assert code == 2 and "there is no win predictor to route with" in err

    code, _, err = cli(capsys, "--db", db, "ingest", str(log), "--format", "battles")
    assert code == 0  # a forced format that rejects every record says which one fits
    assert "every record was rejected as battles, and the file looks like openai" in err

    monkeypatch.setenv("CONVOSCOPE_DUCKDB_MEMORY", "lots")
    code, _, err = cli(capsys, "--db", db, "clusters")
    assert code == 2 and "$CONVOSCOPE_DUCKDB_MEMORY='lots' is not a size DuckDB takes" in err


def test_a_read_only_open_of_another_applications_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "theirs.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE exchanges (symbol TEXT, rate REAL)")
    code, _, err = cli(capsys, "--db", str(foreign), "export", "--out", "o.csv")
    assert code == 2 and "is not a convoscope database" in err  # not "ingest some first"


@pytest.mark.parametrize(
    ("weights", "said"),
    [
        (["--alpha-battle", "nan"], "argument --alpha-battle: must be a number of at least 0"),
        (["--alpha-retry", "-5"], "argument --alpha-retry: must be a number of at least 0"),
        (
            [f"--alpha-{s}=0" for s in ("retry", "edit", "length", "rating", "thumbs", "battle")],
            "every --alpha-* weight is 0, so no response would get a label",
        ),
    ],
)
def test_label_weights_that_would_empty_the_target_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: list[str], said: str
) -> None:
    """A NaN weight made every label unknown, and the model trained on nothing was stored as
    the newest one and rescored every exchange."""
    db, _ = _ingested(tmp_path, capsys)
    before = _stored_tables(db)
    code, out, err = cli(capsys, "--db", db, "score", "reward", "train", *weights)
    assert code == 2 and out == "" and said in err
    assert _stored_tables(db) == before  # nothing trained, nothing scored


def _stored_tables(db: str) -> dict[str, int]:
    engine = open_database(db)
    try:
        with engine.connect() as conn:
            return {
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for table in (trained_models, scores)
            }
    finally:
        engine.dispose()


def test_a_field_mapped_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "ingest", "x.csv", "--map", "prompt=a,prompt=b")
    assert code == 2 and "--map names prompt twice ('a' and 'b'): keep one" in err


def test_a_table_without_answers_says_its_rows_are_saved_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The answers sat in an unmapped `answer` column: every row was stored with an empty
    response and nothing said, and the run with the right --map stored every row again."""
    table = tmp_path / "faq.csv"
    pd.DataFrame({"question": ["Hours?", "Refunds?"], "answer": ["9-5.", "30 days."]}).to_csv(
        table, index=False
    )
    db = str(tmp_path / "faq.duckdb")
    code, _, err = cli(capsys, "--db", db, "ingest", str(table), "--map", "prompt=question")
    assert code == 0, err
    assert "stored as saved inputs" in err and "--map response=answer" in err
    code, _, err = cli(
        capsys, "--db", db, "ingest", str(table), "--map", "prompt=question,response=answer"
    )
    assert code == 0 and "saved inputs" not in err


def test_an_export_name_that_names_no_format_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`out.xlsx` was written as JSONL under that name, which a spreadsheet failed to open."""
    db, _ = _ingested(tmp_path, capsys)
    for name in ("out.xlsx", "battles.csv"):
        battles = ("--format", "battles") if name.startswith("battles") else ()
        code, out, err = cli(capsys, "--db", db, "export", "--out", name, *battles)
        assert code == 2 and out == "" and not (tmp_path / name).exists()
        said = "names no export format" if not battles else "a battles export is JSONL"
        assert said in err
    code, _, err = cli(capsys, "--db", db, "export", "--out", "out.xlsx", "--format", "csv")
    assert code == 0, err  # the format given: the name is the user's choice


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["demo", "--sample", "0", "--no-ui"], "argument --sample: must be at least 1, got 0"),
        (["cluster", "--clusterer", "kmeans", "--k", "0"], "argument --k: must be at least 2"),
        (["cluster", "--parents", "0"], "argument --parents: must be at least 2, got 0"),
        (["cluster", "--min-cluster-size", "1"], "argument --min-cluster-size: must be at least 2"),
        (["tag", "t1", "  "], "argument tag: a tag cannot be empty"),
        (["score", "--model-id", "m1"], "--model-id picks the stored model `score reward apply`"),
        # numpy and UMAP refused these only after the whole embedding, naming no option
        (["cluster", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["run", "--seed", "99999999999"], "argument --seed: must be less than 2**32"),
        (["replay", "report", "r1", "--seed", "-1"], "argument --seed: must be at least 0"),
        (["embed", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["score", "--batch-size", "-5"], "argument --batch-size: must be at least 1, got -5"),
        (["score", "--predicted-battles", "-1"], "argument --predicted-battles: must be at least"),
        (["assign", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["cluster", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["run", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    ],
)
def test_values_that_cannot_work_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    db = tmp_path / "never.duckdb"
    code, out, err = cli(capsys, "--db", str(db), *args)
    assert code == 2 and out == "" and said in err
    assert not db.exists()


def test_a_log_that_repeats_the_history_on_every_line_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway logging every request's whole history: a 3-turn chat is 3 lines, stored as 3
    conversations whose repeated turns read as where the user left; the user is told."""
    turns = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    lines = []
    for n in range(1, 4):
        messages = [
            {"role": role, "content": text}
            for question, answer in turns[:n]
            for role, text in (("user", question), ("assistant", answer))
        ]
        lines.append(json.dumps({"messages": messages}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": "q1"}]}))  # no answer yet
    (tmp_path / "gateway.jsonl").write_text("\n".join(lines) + "\n")
    db = str(tmp_path / "g.duckdb")
    code, out, err = cli(capsys, "--db", db, "ingest", "gateway.jsonl", "--json")
    assert code == 0, err
    (warning,) = json.loads(out)["warnings"]
    assert warning.startswith("gateway.jsonl: 2 lines (the first at line 2) begin with the whole")
    merged = str(tmp_path / "merged.duckdb")
    code, out, err = cli(capsys, "--db", merged, "ingest", "gateway.jsonl", "--merge-history")
    assert code == 0 and "2 lines continued an earlier line's conversation" in err
    engine = open_database(merged)
    counts = table_counts(engine)
    engine.dispose()
    assert (counts["conversations"], counts["exchanges"]) == (2, 4)  # the chat, the saved input

    (tmp_path / "chats.jsonl").write_text(lines[-2] + "\n")  # the last state alone: no warning
    code, out, err = cli(capsys, "--db", db, "ingest", "chats.jsonl", "--json")
    assert code == 0 and json.loads(out)["warnings"] == [], err


def test_a_tiny_log_gets_advice_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 exchanges: UMAP warned twice that it truncated its neighbours, and the advice was to
    raise --sample-size (already above 8) or lower --min-cluster-size."""
    import warnings

    write_openai_jsonl(tmp_path / "tiny.jsonl", 4)  # two answers a conversation
    db = str(tmp_path / "tiny.duckdb")
    assert cli(capsys, "--db", db, "ingest", "tiny.jsonl")[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(capsys, "--db", db, "cluster")
    assert not [w for w in caught if "n_neighbors" in str(w.message)]
    assert code == 2 and "--sample-size" not in err
    advice = err.split("--clusterer kmeans ")[1].split()
    code, out, err = cli(capsys, "--db", db, "cluster", "--clusterer", "kmeans", *advice)
    assert code == 0 and "8 exchanges → 2 topics" in out, err


@pytest.mark.parametrize(
    ("cost", "shown"),
    [
        ("1e309", "a number too large (read as infinity)"),  # was written out as `Infinity`
        ("1" + "0" * 400, "a number too large (read as infinity)"),
        ("-1e309", "-inf"),
        ("NaN", "nan"),
    ],
)
def test_a_cost_that_is_no_finite_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cost: str, shown: str
) -> None:
    costs = tmp_path / "costs.json"
    costs.write_text(f'{{"expert-a": 1, "expert-b": {cost}}}')
    db = tmp_path / "never.duckdb"
    code, out, err = cli(capsys, "--db", str(db), "score", "--costs", str(costs))
    assert code == 2 and out == "" and not db.exists()
    assert f"{costs}: the cost of 'expert-b' must be a number ≥ 0, not {shown}" in err


def test_a_folder_given_as_the_database_is_called_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_openai_jsonl(tmp_path / "chat.jsonl", 1)
    for command in (["clusters"], ["ingest", "chat.jsonl"]):
        code, out, err = cli(capsys, "--db", str(folder), *command)
        assert code == 2 and out == ""
        assert f"{folder} is a folder, not a database file: give --db" in err
    assert not list(folder.iterdir())


def test_db_after_the_command_name_is_the_same_db(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`convoscope ingest --db logs.duckdb chats.jsonl` is the natural order to type (like
    `--json`, which works on either side); it failed with "unrecognized arguments: --db",
    which named neither the rule nor the fix."""
    write_openai_jsonl(tmp_path / "chat.jsonl", 2)
    db = tmp_path / "after.duckdb"
    code, _, err = cli(capsys, "ingest", "--db", str(db), "chat.jsonl")
    assert code == 0, err
    code, out, err = cli(capsys, "clusters", "--db", str(db), "--json")
    assert code == 0, err
    assert json.loads(out)["clusters"] == []
    assert not (tmp_path / "convoscope.duckdb").exists()
    code, out, err = cli(capsys, "ui", "--db", str(tmp_path / "typo.duckdb"), "--no-browser")
    assert code == 2 and "no database at" in err  # ui takes it too, and checks it first


def test_an_llm_naming_endpoint_that_cannot_work_is_refused_before_clustering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base URL without its scheme, or an API key variable that is not set, clustered
    everything (minutes at scale) and then named no topic ("Connection error.", or the
    endpoint's 401 per topic); replay refuses both before sending anything, as this now does."""
    db, _ = _ingested(tmp_path, capsys)
    code, out, err = cli(
        capsys, "--db", db, "cluster", "--llm-names", "m", "--llm-base-url", "127.0.0.1:8000/v1"
    )
    assert code == 2 and out == ""
    assert "argument --llm-base-url: expected an http(s) URL" in err
    code, out, err = cli(
        capsys,
        "--db", db, "cluster", "--llm-names", "m", "--llm-base-url", "http://127.0.0.1:9/v1",
        "--llm-api-key-env", "CONVOSCOPE_TEST_UNSET_KEY",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert "--llm-api-key-env CONVOSCOPE_TEST_UNSET_KEY: that variable is not set" in err
    # An endpoint without --llm-names read as asking for LLM names, and was silently unused.
    code, out, err = cli(capsys, "--db", db, "cluster", "--llm-base-url", "http://127.0.0.1:9/v1")
    assert code == 2 and out == ""
    assert "--llm-base-url is for --llm-names MODEL" in err


@pytest.mark.parametrize(
    "words",
    [
        ["score", "reward", "--mode", "head", "train"],
        ["score", "reward", "--model-id", "m1", "apply"],
        ["replay", "report", "--json", "r1"],
        ["replay", "judge", "--model", "j", "--base-url", "http://127.0.0.1:9/v1", "r1"],
    ],
)
def test_command_words_may_come_around_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    """`score reward --mode head train` failed with "unrecognized arguments: train", `replay
    report --json RUN` with "unrecognized arguments: RUN": argparse fills the positionals
    before the first option and calls the words after it unknown."""
    typo = tmp_path / "none.duckdb"
    code, out, err = cli(capsys, "--db", str(typo), *words)
    assert code == 2 and out == ""
    assert "unrecognized" not in err and f"no database at {typo}" in err  # parsed, then opened
    strays = (["score", "reward", "--mode", "head", "x"], ["replay", "run", "--sample", "2", "r1"])
    for stray in strays:
        code, _, err = cli(capsys, "--db", str(typo), *stray)
        assert code == 2 and f"unrecognized arguments: {stray[-1]}" in err  # still refused


def test_an_embedder_that_cannot_load_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`score` and `assign` let the embedder's error out as a traceback (`embed` and
    `cluster` already said it in one line)."""
    from clustering.stages import kmeans_clusterer, pca_reducer
    from clustering.step import ClusterStepConfig, cluster_exchanges
    from clustering.topics import ClusterConfig
    from ingest.embed_step import EmbedConfig

    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 12)
    db = str(tmp_path / "x.duckdb")
    assert cli(capsys, "--db", db, "ingest", str(log))[0] == 0
    engine = open_database(db)
    cluster_exchanges(
        engine,
        config=ClusterStepConfig(
            embed=EmbedConfig(fast=True, progress=False), topics=ClusterConfig(layout=False)
        ),
        reducer=pca_reducer(5),
        clusterer=kmeans_clusterer(2),
    )
    engine.dispose()
    write_openai_jsonl(log, 14)  # two new conversations for `assign`
    assert cli(capsys, "--db", db, "ingest", str(log))[0] == 0
    missing = tmp_path / "no-such-model"
    for command in (["score"], ["assign"]):
        code, out, err = cli(capsys, "--db", db, *command, "--model", str(missing))
        assert code == 2 and out == ""
        assert f"embedding model directory {missing} does not exist" in err


@pytest.mark.parametrize("db_file", ["x.sqlite", "x.duckdb"])
def test_a_database_that_cannot_be_written_mid_step_is_one_line(
    tmp_path: Path, db_file: str
) -> None:
    """A full disk (here a file-size limit) failed an ingest with SQLAlchemy's traceback,
    the batch's log text included; what earlier batches stored is kept. DuckDB then refuses
    every statement ("database has been invalidated"), the closing checkpoint's included."""
    import resource
    import signal

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    log = tmp_path / "chat.jsonl"
    words = "a long answer " * 200
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"{i} {words}"},
            ]
        }
        for i in range(1000)
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--db", str(tmp_path / db_file), "ingest", str(log)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=limit_file_size,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the database could not be written" in result.stderr
    assert "a long answer" not in result.stderr
