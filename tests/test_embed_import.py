"""`embed --from FILE --name NAME`: vectors made elsewhere, clustered as computed ones are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.embed_step import exchange_texts
from storage.clusters import latest_run, load_assignments
from storage.engine import open_database
from storage.vectors import load_vectors
from tests.test_ingest_pipeline import convoscope_here as convoscope
from tests.test_ui_apptest import _app

TOPICS = ("refund", "password", "recipe")
DIM = 16


def _chats(path: Path, n: int, start: int = 0) -> Path:
    """`n` one-turn chats, each about one of TOPICS in turn (the topic word ends the prompt)."""
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} about {TOPICS[i % 3]}"},
                {"role": "assistant", "content": f"Answer {i}."},
            ],
            "model": "bot",
        }
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _vector(prompt: str, rng: np.random.Generator, noise: float = 0.2) -> list[float]:
    """A vector near its topic's own axis (scaled: the import makes it unit length)."""
    axis = np.zeros(DIM)
    axis[TOPICS.index(prompt.split()[-1])] = 5.0
    return (axis + rng.normal(0, noise, DIM)).tolist()


def _exported(db: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / "exchanges.jsonl"
    exported = convoscope("export", "--out", str(out), "--format", "jsonl", db=db, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_imported_vectors_are_clustered_and_assigned_without_a_model(
    db_url: str, tmp_path: Path
) -> None:
    """The ids of an export, embedded elsewhere, come back as vectors: bad rows are rejected by
    line and field, the good ones stored once, unit length, and `cluster` and `assign` read
    them as `imported:NAME`. A new exchange without one is an error that says what to do."""
    ingested = convoscope(
        "ingest", str(_chats(tmp_path / "chats.jsonl", 45)), db=db_url, cwd=tmp_path
    )
    assert ingested.returncode == 0, ingested.stderr
    rows = _exported(db_url, tmp_path)
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"exchange_id": r["id"], "vector": _vector(r["prompt"], rng)}) for r in rows
    ]
    first = rows[0]["id"]
    bad = [  # (row, field, reason): how each bad row is rejected
        ({"exchange_id": "nope", "vector": [1.0] * DIM}, "exchange_id", "no stored exchange"),
        ({"exchange_id": first, "vector": [1.0] * 3}, "vector", f"3 numbers; .+ have {DIM}"),
        ({"exchange_id": first, "vector": [0] * DIM}, "vector", "all zeros"),
        ({"exchange_id": first, "vector": ["a"] * DIM}, "vector", "numbers only"),
        ({"exchange_id": first, "vector": [float("nan")] * DIM}, "vector", "NaN"),
        ({"vector": [1.0] * DIM}, "exchange_id", "missing"),
        ("{broken", None, "invalid JSON"),
    ]  # fmt: skip
    lines += [row if isinstance(row, str) else json.dumps(row) for row, _, _ in bad]
    vectors = tmp_path / "vectors.jsonl"
    vectors.write_text("\n".join(lines) + "\n")

    imported = convoscope(
        "embed", "--from", str(vectors), "--name", "mine", "--json", db=db_url, cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert (summary["model"], summary["stored"], summary["dim"]) == ("imported:mine", 45, DIM)
    assert (summary["read"], summary["rejected"], summary["already_stored"]) == (52, 7, 0)
    for reject, (line, (_, field, reason)) in zip(
        summary["rejects"], enumerate(bad, 46), strict=True
    ):
        assert (reject["source"], reject["line"]) == (str(vectors), line)
        assert reject["field"] == field and re.search(reason, reject["reason"]), reject
    assert f"skipped {vectors}:46: exchange_id: no stored exchange has this id" in imported.stderr

    engine = open_database(db_url)
    hashes = [item.text_hash for item in exchange_texts(engine, on="prompt")]
    norms = np.linalg.norm(load_vectors(engine, "imported:mine", hashes), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-6)
    engine.dispose()
    again = convoscope(
        "embed", "--from", str(vectors), "--name", "mine", "--json", db=db_url, cwd=tmp_path
    )
    assert (json.loads(again.stdout)["stored"], json.loads(again.stdout)["already_stored"]) == (
        0,
        45,
    )

    clustered = convoscope(
        "cluster", "--model", "imported:mine", "--reducer", "pca", "--clusterer", "kmeans",
        "--k", "3", "--json", db=db_url, cwd=tmp_path,
    )  # fmt: skip
    assert clustered.returncode == 0, clustered.stderr
    assert json.loads(clustered.stdout)["clusters"] == 3
    engine = open_database(db_url)
    run = latest_run(engine)
    assert run["embedder"] == "imported:mine"
    topic_of = load_assignments(engine, run["id"])
    engine.dispose()
    words = {r["prompt"].split()[-1]: set() for r in rows}
    for r in rows:
        words[r["prompt"].split()[-1]].add(topic_of[r["id"]])
    assert sorted(len(topics) for topics in words.values()) == [1, 1, 1]  # each word one topic
    assert len(set().union(*words.values())) == 3

    # New logs: `assign` needs their vectors, and says so; a Parquet file of texts brings them.
    more = _chats(tmp_path / "more.jsonl", 3, start=100)
    assert convoscope("ingest", str(more), db=db_url, cwd=tmp_path).returncode == 0
    refused = convoscope("assign", db=db_url, cwd=tmp_path)  # the clustering's embedder
    assert refused.returncode == 2
    assert "3 texts have no 'imported:mine' vector" in refused.stderr
    assert "convoscope embed --from FILE --name mine" in refused.stderr
    texts = [f"Question {i} about {TOPICS[i % 3]}" for i in range(100, 103)]
    on_axis = [_vector(t, rng, noise=0.0) for t in texts]  # well inside its topic
    table = pa.table({"text": texts, "vector": on_axis})
    pq.write_table(table, tmp_path / "more.parquet")
    brought = convoscope(
        "embed", "--from", str(tmp_path / "more.parquet"), "--name", "mine", "--json",
        db=db_url, cwd=tmp_path,
    )  # fmt: skip
    assert brought.returncode == 0, brought.stderr
    assert json.loads(brought.stdout)["stored"] == 3
    holed = pa.table({"text": texts[:2], "vector": [on_axis[0], None]})  # a cell left empty
    pq.write_table(holed, tmp_path / "holed.parquet")
    read = convoscope(
        "embed", "--from", str(tmp_path / "holed.parquet"), "--name", "mine", "--json",
        db=db_url, cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads(read.stdout)
    assert (summary["already_stored"], summary["rejected"]) == (1, 1)
    assert (summary["rejects"][0]["line"], summary["rejects"][0]["field"]) == (2, "vector")
    assigned = convoscope("assign", "--json", db=db_url, cwd=tmp_path)
    assert assigned.returncode == 0, assigned.stderr
    assert json.loads(assigned.stdout)["assigned"] == 3
    engine = open_database(db_url)
    topic_of = load_assignments(engine, run["id"])
    engine.dispose()
    new = {r["id"]: r["prompt"] for r in _exported(db_url, tmp_path) if r["prompt"] in texts}
    for exchange_id, prompt in new.items():
        assert topic_of[exchange_id] in words[prompt.split()[-1]]  # its topic's, not another's


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "vectors.jsonl"], "--from FILE needs --name NAME"),
        (["--name", "mine"], "--name names vectors imported with --from FILE"),
        (["--from", "vectors.jsonl", "--name", "mine", "--model", "x"], "--model would go unused"),
        (["--from", "nowhere.jsonl", "--name", "mine"], "no such file: nowhere.jsonl"),
        (["--from", "vectors.npy", "--name", "mine"], "binary file"),
        (["--from", "empty.jsonl", "--name", "mine"], "empty file"),
        (["--from", "vectors.jsonl", "--name", " "], "--name must be one line"),
        (["--from", "wrong.jsonl", "--name", "mine"], "no row could be imported (2 rejected)"),
    ],
)
def test_an_import_it_cannot_use_is_refused_saying_why(
    tmp_path: Path, args: list[str], message: str
) -> None:
    db = f"duckdb:///{tmp_path / 'db.duckdb'}"
    assert (
        convoscope("ingest", str(_chats(tmp_path / "c.jsonl", 3)), db=db, cwd=tmp_path).returncode
        == 0
    )
    (tmp_path / "vectors.jsonl").write_text(json.dumps({"text": "x", "vector": [1, 2]}) + "\n")
    np.save(tmp_path / "vectors.npy", np.ones((3, 4), dtype=np.float32))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "wrong.jsonl").write_text('{"text": "x"}\n{"exchange_id": "nope", "vector": [1]}\n')
    refused = convoscope("embed", *args, db=db, cwd=tmp_path)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_imported_vectors_cannot_be_made_fast_nor_searched_by_meaning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--fast` distils a model, and the UI's search by meaning embeds the query: imported
    vectors have no model for either, which is said rather than failing inside them."""
    db = f"duckdb:///{tmp_path / 'db.duckdb'}"
    assert (
        convoscope("ingest", str(_chats(tmp_path / "c.jsonl", 30)), db=db, cwd=tmp_path).returncode
        == 0
    )
    rng = np.random.default_rng(1)
    rows = _exported(db, tmp_path)
    lines = [
        json.dumps({"exchange_id": r["id"], "vector": _vector(r["prompt"], rng)}) for r in rows
    ]
    (tmp_path / "v.jsonl").write_text("\n".join(lines))
    assert (
        convoscope("embed", "--from", "v.jsonl", "--name", "mine", db=db, cwd=tmp_path).returncode
        == 0
    )
    fast = convoscope("cluster", "--model", "imported:mine", "--fast", db=db, cwd=tmp_path)
    assert fast.returncode == 2 and "--fast distils a model" in fast.stderr
    clustered = convoscope(
        "cluster", "--model", "imported:mine", "--reducer", "pca", "--clusterer", "kmeans",
        "--k", "3", db=db, cwd=tmp_path,
    )  # fmt: skip
    assert clustered.returncode == 0, clustered.stderr

    at = _app(db, monkeypatch, "screens/search.py")
    at.text_input(key="search_query").input("refund please").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("were imported (imported:mine)" in info.value for info in at.info)
    at.get("button_group")[0].set_value("Words").run()
    at.text_input(key="search_query").input("refund").run()
    assert len(at.dataframe[0].value) == 10  # every prompt about refunds
