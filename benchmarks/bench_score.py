"""How the cluster and score steps grow from 10K to 1M exchanges, beside ingest of the same log.

    python benchmarks/bench_score.py            # 10K, 100K and 1M exchanges
    python benchmarks/bench_score.py --quick    # 10K and 100K

Each size runs in its own process (its peak RSS is its own) on a fresh DuckDB file: ingest a
synthetic multi-turn OpenAI chat log (seven experts, answers of varied length and layout),
store a vector for every prompt, cluster (PCA + k-means: the step's own code, with the
stages that scale), then `score` with its defaults (structural labels, head+lexical reward,
expert win predictor, cluster reports), then `score reward apply` (the stored model scores
every exchange again and the reports are re-ranked). The vectors come from a stand-in
embedder stored under the default encoder's name, because embedding 1M texts on a CPU takes
hours and `bench_embed.py` measures that; every step then finds them cached, as after
`convoscope embed`.
Ingest of the same file is the baseline each step is set beside.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_TOPICS = ("refund", "password", "python", "recipe", "travel", "poem", "tax", "sql")
_LAYOUTS = (
    "Sure. {t} is simple: do the first thing, then the second.",
    "Here are the steps for {t}:\n1. Start.\n2. Go on.\n3. Finish.\n\nAnything else?",
    "```\n# {t}\nprint('hello')\n```\nThat code covers {t}.",
    "I'm sorry, I can't help with {t}.",
    "| {t} | value |\n|---|---|\n| a | 1 |\n| b | 2 |",
)


def _write_log(path: Path, exchanges: int) -> None:
    """Conversations of one to three turns; signals come from their structure."""
    rng = np.random.default_rng(0)
    written = 0
    with path.open("w") as handle:
        i = 0
        while written < exchanges:
            turns = int(min(rng.integers(1, 4), exchanges - written))
            topic = _TOPICS[i % len(_TOPICS)]
            messages = []
            for turn in range(turns):
                layout = _LAYOUTS[int(rng.integers(len(_LAYOUTS)))]
                filler = " More detail." * int(rng.integers(0, 40))
                messages += [
                    {"role": "user", "content": f"Question {i}.{turn} about {topic}?"},
                    {"role": "assistant", "content": layout.format(t=topic) + filler},
                ]
            record = {"messages": messages, "model": f"expert-{i % 7}"}
            handle.write(json.dumps(record) + "\n")
            written += turns
            i += 1


class _StandInEmbedder:
    """Unit vectors from a seeded generator, under the default encoder's name (see above)."""

    dim = 384

    def __init__(self, name: str) -> None:
        self.name = name
        self._rng = np.random.default_rng(0)

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        vectors = self._rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _prepare(exchanges: int, work: Path) -> dict[str, float]:
    """Ingest, vectors and clustering on a fresh database: seconds per step and peak RSS."""
    from clustering.stages import kmeans_clusterer, pca_reducer
    from clustering.step import ClusterStepConfig, cluster_exchanges
    from clustering.topics import ClusterConfig
    from ingest.embed import load_embedder
    from ingest.embed_step import EmbedConfig, embed_exchanges
    from ingest.pipeline import IngestConfig, ingest_paths
    from storage.engine import open_database

    log = work / "chat.jsonl"
    _write_log(log, exchanges)
    engine = open_database(f"duckdb:///{work / 'bench.duckdb'}")
    embed = EmbedConfig(device="cpu", progress=False)
    name = load_embedder(None, device="cpu").name
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    config = IngestConfig(progress=False, rejects_path=work / "rejects.jsonl")
    stored = ingest_paths([log], engine=engine, config=config).stored
    seconds["ingest"] = time.perf_counter() - start
    log.unlink()

    start = time.perf_counter()
    embed_exchanges(engine, config=embed, embedder=_StandInEmbedder(name))
    seconds["vectors"] = time.perf_counter() - start

    start = time.perf_counter()
    cluster_config = ClusterStepConfig(embed=embed, topics=ClusterConfig(layout=False))
    cluster_exchanges(
        engine, config=cluster_config, reducer=pca_reducer(10), clusterer=kmeans_clusterer(40)
    )
    seconds["cluster"] = time.perf_counter() - start
    engine.dispose()
    return {"exchanges": stored, "prepare_peak_mb": _peak_mb(), **seconds}


def _step(name: str, work: Path) -> dict[str, float]:
    """`score` with its defaults, or `score reward apply` with the model `score` stored, on the
    prepared database, in a process of its own."""
    from ingest.embed_step import EmbedConfig
    from scoring.step import ScoreConfig, apply_reward, score_all
    from storage.engine import open_database

    run = {"score": score_all, "apply": apply_reward}[name]
    engine = open_database(f"duckdb:///{work / 'bench.duckdb'}")
    start = time.perf_counter()
    run(engine, config=ScoreConfig(embed=EmbedConfig(device="cpu", progress=False)))
    seconds = time.perf_counter() - start
    engine.dispose()
    return {name: seconds, f"{name}_peak_mb": _peak_mb()}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(*args: str) -> dict[str, float]:
    command = [sys.executable, __file__, *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K and 100K exchanges, no 1M")
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("score", "apply"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(_prepare(args.prepare, args.work)))
        return
    if args.step:
        print(json.dumps(_step(args.step, args.work)))
        return

    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    print(
        f"{'exchanges':>9} {'ingest s':>9} {'vectors s':>9} {'cluster s':>9} {'× ingest':>8} "
        f"{'score s':>8} {'× ingest':>8} {'score/10K':>9} {'apply s':>8} {'peak MB':>8} "
        f"{'score MB':>8} {'apply MB':>8}"
    )
    per_10k: float | None = None
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            r = _run("--prepare", str(size), "--work", tmp)
            print(f"# {size:,}: ingested, embedded, clustered", file=sys.stderr, flush=True)
            r |= _run("--step", "score", "--work", tmp)
            r |= _run("--step", "apply", "--work", tmp)
        unit = r["score"] / (r["exchanges"] / 10_000)
        per_10k = per_10k or unit
        print(
            f"{r['exchanges']:>9.0f} {r['ingest']:>9.1f} {r['vectors']:>9.1f} "
            f"{r['cluster']:>9.1f} {r['cluster'] / r['ingest']:>8.2f} {r['score']:>8.1f} "
            f"{r['score'] / r['ingest']:>8.2f} {unit / per_10k:>9.2f} {r['apply']:>8.1f} "
            f"{r['prepare_peak_mb']:>8.0f} {r['score_peak_mb']:>8.0f} {r['apply_peak_mb']:>8.0f}",
            flush=True,
        )
    print("score/10K = score seconds per 10K exchanges over the smallest size's (1 = linear);")
    print("peak MB = ingest, vectors and cluster in one process; score MB = score in its own;")
    print("apply = `score reward apply` with the model `score` stored, in a process of its own")


if __name__ == "__main__":
    main()
