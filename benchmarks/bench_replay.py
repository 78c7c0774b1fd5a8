"""Replay throughput against a loopback OpenAI-compatible server, beside a bare `openai` loop.

For each concurrency the same inputs go out twice, in the same run: once through a bare
`AsyncOpenAI` loop (a semaphore around `chat.completions.create`, nothing stored) and once
through `ingest.replay.replay` (selection, run bookkeeping, retries, rate limiter, answers
committed to the database as they finish). The difference per request is what the tool costs.
The server (tests/openai_server.py) runs in its own process, so it does not share the client's
GIL, and answers after a fixed delay.

    python benchmarks/bench_replay.py [--quick] [--requests N] [--repeat K] [--delay S]
                                      [--db duckdb|sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.pipeline import IngestConfig, ingest_paths  # noqa: E402
from ingest.replay import ReplayConfig, replay  # noqa: E402
from storage.engine import open_database  # noqa: E402


def prompt(i: int) -> str:
    return f"Benchmark question {i}: summarise the number {i} in one sentence."


def write_log(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": prompt(i)},
                {"role": "assistant", "content": f"{i} is a number."},
            ]
            handle.write(json.dumps({"id": f"b{i}", "model": "old", "messages": messages}) + "\n")


async def bare_loop(base_url: str, n: int, concurrency: int) -> float:
    """Seconds for n requests through AsyncOpenAI alone, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0) as client:

        async def one(i: int) -> None:
            async with gate:
                messages = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": prompt(i)},
                ]
                completion = await client.chat.completions.create(model="new", messages=messages)
                assert completion.choices[0].message.content

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="replay throughput vs a bare openai loop")
    parser.add_argument("--quick", action="store_true", help="100 requests, concurrency 1 and 8")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--delay", type=float, default=0.01, help="server reply delay (s)")
    parser.add_argument("--db", choices=("duckdb", "sqlite"), default="duckdb")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best counts")
    args = parser.parse_args()
    n = 100 if args.quick else args.requests
    repeat = 1 if args.quick else args.repeat
    levels = (1, 8) if args.quick else (1, 8, 32, 128)

    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "openai_server.py"), "--delay", str(args.delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "inputs.jsonl"
            write_log(log, n)
            suffix = "duckdb" if args.db == "duckdb" else "sqlite"
            engine = open_database(str(Path(tmp) / f"bench.{suffix}"))
            ingest_paths(
                [log],
                engine=engine,
                config=IngestConfig(progress=False, rejects_path=Path(tmp) / "rejects.jsonl"),
            )
            asyncio.run(bare_loop(base_url, 8, 8))  # warm up the server and the client
            rows = []
            for concurrency in levels:
                config = ReplayConfig(
                    model="new", base_url=base_url, concurrency=concurrency, progress=False
                )
                bare, tool = [], []
                for _ in range(repeat):  # interleaved, best of each: the host may be busy
                    bare.append(asyncio.run(bare_loop(base_url, n, concurrency)))
                    started = time.perf_counter()
                    summary = replay(engine, config=config)  # a new run each time
                    tool.append(time.perf_counter() - started)
                    assert summary.done == n, summary
                rows.append((concurrency, min(bare), min(tool)))
                print(f"# concurrency {concurrency}: done", file=sys.stderr, flush=True)
            engine.dispose()
    finally:
        server.terminate()  # it serves until SIGTERM
        server.wait(timeout=10)

    print(
        f"\nreplay throughput: {n} requests per row (best of {repeat}), server delay "
        f"{args.delay * 1000:.0f} ms, answers stored in {args.db}, {os.cpu_count()} CPUs; "
        "baseline: a bare openai.AsyncOpenAI loop in the same run\n"
    )
    header = (
        f"{'concurrency':>11} | {'bare req/s':>10} | {'replay req/s':>12} | "
        f"{'replay/bare':>11} | {'overhead ms/req':>15}"
    )
    print(header)
    print("-" * len(header))
    for concurrency, bare, tool in rows:
        print(
            f"{concurrency:>11} | {n / bare:>10.1f} | {n / tool:>12.1f} | "
            f"{bare / tool:>11.2f} | {(tool - bare) / n * 1000:>15.2f}"
        )


if __name__ == "__main__":
    main()
