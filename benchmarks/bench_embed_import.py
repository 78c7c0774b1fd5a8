"""Importing vectors made elsewhere (`embed --from`), beside a plain read of the same file.

    python benchmarks/bench_embed_import.py            # 100K exchanges, 384-number vectors
    python benchmarks/bench_embed_import.py --quick    # 10K

A fresh DuckDB file gets N one-turn chats; their ids, each with a 384-number vector (MiniLM's
size), are written as JSONL (by `exchange_id`) and as Parquet. Each phase runs in its own
process, so its peak RSS is its own. The baselines are what no import can beat: `json.loads`
of every line of the JSONL, and `pyarrow.parquet.read_table` of the Parquet file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 384


def _prepare(work: Path, exchanges: int) -> None:
    """The database and the two vector files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest.embed_step import exchange_texts
    from ingest.pipeline import IngestConfig, ingest_paths
    from storage.engine import open_database

    log = work / "chats.jsonl"
    with log.open("w") as handle:
        for i in range(exchanges):
            messages = [
                {"role": "user", "content": f"Question {i} about topic {i % 50}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
            handle.write(json.dumps({"messages": messages, "model": "bot"}) + "\n")
    engine = open_database(f"duckdb:///{work / 'bench.duckdb'}")
    config = IngestConfig(progress=False, rejects_path=work / "rejects.jsonl")
    ingest_paths([log], engine=engine, config=config)
    ids = [item.exchange_id for item in exchange_texts(engine, on="prompt")]
    engine.dispose()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    with (work / "vectors.jsonl").open("w") as handle:
        for exchange_id, vector in zip(ids, vectors, strict=True):
            row = {"exchange_id": exchange_id, "vector": [round(float(x), 6) for x in vector]}
            handle.write(json.dumps(row) + "\n")
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    pq.write_table(pa.table({"exchange_id": ids, "vector": column}), work / "vectors.parquet")


def _phase(name: str, work: Path) -> dict[str, float]:
    """One measured phase in this process: seconds, rows and peak RSS."""
    start = time.perf_counter()
    if name == "parse-jsonl":
        with (work / "vectors.jsonl").open() as handle:
            rows = sum(1 for line in handle if json.loads(line))
    elif name == "read-parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(work / "vectors.parquet").num_rows
    else:
        from ingest.embed_import import import_vectors
        from storage.engine import open_database

        engine = open_database(f"duckdb:///{work / 'bench.duckdb'}")
        start = time.perf_counter()  # opening the database is paid once, not per row
        suffix = "jsonl" if name == "import-jsonl" else "parquet"
        summary = import_vectors(engine, work / f"vectors.{suffix}", name=suffix, on="prompt")
        engine.dispose()
        rows = summary.stored
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "rows": rows, "peak_mb": peak}


def _run(*args: str) -> dict[str, float]:
    command = [sys.executable, __file__, *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K exchanges")
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        _prepare(args.work, args.prepare)
        print("{}")
        return
    if args.phase:
        print(json.dumps(_phase(args.phase, args.work)))
        return

    size = 10_000 if args.quick else 100_000
    print(f"{'phase':<28} {'rows':>8} {'seconds':>8} {'rows/s':>9} {'× read':>7} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        _run("--prepare", str(size), "--work", tmp)
        mb = (Path(tmp) / "vectors.jsonl").stat().st_size / 2**20
        print(f"# {size:,} exchanges, {DIM}-number vectors: {mb:.0f} MB of JSONL", file=sys.stderr)
        for baseline, phase, label in (
            ("parse-jsonl", "import-jsonl", "JSONL"),
            ("read-parquet", "import-parquet", "Parquet"),
        ):
            base = _run("--phase", baseline, "--work", tmp)
            for name, r in ((f"{label}: read only", base), (f"{label}: embed --from", None)):
                r = r or _run("--phase", phase, "--work", tmp)
                print(
                    f"{name:<28} {r['rows']:>8.0f} {r['seconds']:>8.2f} "
                    f"{r['rows'] / r['seconds']:>9.0f} {r['seconds'] / base['seconds']:>7.1f} "
                    f"{r['peak_mb']:>8.0f}",
                    flush=True,
                )
    print("read only = json.loads of every line, or pyarrow's read_table: what no import beats;")
    print("embed --from = parsing, checks, unit length and storing, once per exchange")


if __name__ == "__main__":
    main()
