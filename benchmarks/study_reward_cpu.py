"""Study: CPU-only variants of the reward model beside the default head+lexical ensemble.

Measures pairwise accuracy (non-tie battles) on the AlpacaEval dev battles, 5 folds disjoint
by prompt (the same folds as `benchmarks/bench_scoring.py`: fold of prompt = a seeded
permutation mod 5), for the default members (structural head, word 1–2-gram lexical model)
and their standardised sum, beside:

- `char`: the lexical model on character n-grams (`char_wb`, 3–5), same fit and anchors;
- `head5`: the default head trained with five seeds, scores averaged (bagging);
- `trees`: Bradley–Terry gradient boosting on the structural features (Newton steps of
  shallow regression trees on each answer's summed battle gradient: a pointwise score);
- `pairhgb`: HistGradientBoosting on battle feature rows (a − b, a, b; both orders), a
  pairwise-only model, combined with the others at the battle level;
- ensembles of these: equal standardised sums, rank averages (ranks against the training
  answers), and weights chosen on an inner split of the training prompts only (`nested`:
  members retrained on 3 of the 4 training folds, weights picked on the 4th by grid).

Nothing is tuned on a test fold: every hyperparameter is fixed beforehand, weights come from
the inner split. Members' scores are cached under /tmp/convoscope_study (one .npy per member,
fold and split), so a rerun only trains what is missing. Run from the repository root:
`python benchmarks/study_reward_cpu.py [--folds 0,1,2,3,4] [--members ...] [--nested]`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import DATA, answers_table, load_battles

from scoring.reward_head import STRUCTURAL_HEAD, Pairs, RewardHead
from scoring.reward_lexical import LexicalReward

STUDY = Path(os.environ.get("CONVOSCOPE_STUDY_CACHE", "/tmp/convoscope_study"))
ROW_MEMBERS = ("head", "head5", "lexical", "char", "trees")
PAIR_MEMBERS = ("pairhgb",)
WEIGHT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)


def _char_vectorizer(min_df: int, max_features: int) -> object:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=(3, 5),
        min_df=min_df,
        max_features=max_features,
        sublinear_tf=True,
        lowercase=True,
        dtype=np.float32,
    )


class CharLexical(LexicalReward):
    """The lexical model on character 3–5-grams (within word boundaries)."""

    def _new_vectorizer(self, vocabulary: list[str] | None = None, min_df: int = 1) -> object:
        del vocabulary
        return _char_vectorizer(min_df, self.config.max_features)


def fit_trees(
    feats: np.ndarray, pairs: Pairs, rounds: int = 300, lr: float = 0.05, depth: int = 3
) -> np.ndarray:
    """Bradley–Terry boosting: each round a tree fits the answers' Newton step. Row scores."""
    from sklearn.tree import DecisionTreeRegressor

    a, b = np.asarray(pairs.a), np.asarray(pairs.b)
    y = np.asarray(pairs.outcome, dtype=np.float64)
    seen = np.unique(np.concatenate([a, b]))
    n = len(feats)
    s = np.zeros(n)
    for _ in range(rounds):
        p = 1 / (1 + np.exp(-(s[a] - s[b])))
        g = np.bincount(a, p - y, n) - np.bincount(b, p - y, n)
        h = np.bincount(a, p * (1 - p), n) + np.bincount(b, p * (1 - p), n)
        tree = DecisionTreeRegressor(max_depth=depth, min_samples_leaf=100, random_state=0)
        tree.fit(feats[seen], -g[seen] / h[seen], sample_weight=h[seen])
        s += lr * tree.predict(feats)
    return s


def fit_pairhgb(feats: np.ndarray, pairs: Pairs, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """HistGradientBoosting on (a − b, a, b) rows, both orders; antisymmetric logits per battle."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    a, b = np.asarray(pairs.a), np.asarray(pairs.b)
    y = np.asarray(pairs.outcome, dtype=np.float64)

    def rows(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.hstack([feats[i] - feats[j], feats[i], feats[j]])

    x = np.vstack([rows(a, b), rows(b, a)])
    t = np.concatenate([y, 1 - y])  # soft target t: a positive row weighted t, a negative 1 − t
    model = HistGradientBoostingClassifier(
        max_iter=300, learning_rate=0.05, max_depth=4, early_stopping=False, random_state=0
    )
    model.fit(
        np.vstack([x, x]),
        np.concatenate([np.ones(len(t)), np.zeros(len(t))]).astype(int),
        sample_weight=np.concatenate([t, 1 - t]),
    )
    fwd = model.decision_function(rows(ia, ib))
    back = model.decision_function(rows(ib, ia))
    return (fwd - back) / 2


def train_member(
    name: str,
    df: pd.DataFrame,
    rows: pd.DataFrame,
    feats: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    train: np.ndarray,
) -> np.ndarray:
    """One member trained on the `train` battles: row scores, or battle logits (pairhgb)."""
    tr = df[train]
    graded = Pairs(ia[train], ib[train], tr["outcome"].to_numpy())
    winner = Pairs(
        ia[train], ib[train], tr["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy()
    )
    responses = list(rows["response"].fillna(""))
    prompts = list(rows["prompt"])
    if name == "head":
        return RewardHead(STRUCTURAL_HEAD).fit(feats, pairs=graded).score(feats)
    if name == "head5":  # the same head, five seeds, scores averaged
        return np.mean(
            [
                RewardHead(replace(STRUCTURAL_HEAD, seed=seed))
                .fit(feats, pairs=graded)
                .score(feats)
                for seed in range(5)
            ],
            axis=0,
        )
    if name == "trees":
        return fit_trees(feats, graded)
    if name == "pairhgb":
        return fit_pairhgb(feats, graded, ia, ib)
    cls = {"lexical": LexicalReward, "char": CharLexical}[name]
    model = cls()
    model.fit(prompts, responses, pairs=winner, authors=list(rows["model"]))
    return model.score(prompts, responses)


def battle_diffs(
    scores: dict[str, np.ndarray], ia: np.ndarray, ib: np.ndarray, seen: np.ndarray, tr: np.ndarray
) -> dict[str, np.ndarray]:
    """Per battle, each member's standardised score difference (a − b).

    Row members are standardised on the training answers (as the library's ensemble does);
    a pairwise member's logits are scaled to the mean spread of the row members' differences
    over the training battles."""
    out = {}
    for k, s in scores.items():
        if k in PAIR_MEMBERS:
            continue
        z = (s - s[seen].mean()) / s[seen].std()
        out[k] = z[ia] - z[ib]
    spread = float(np.mean([d[tr].std() for d in out.values()])) if out else 1.0
    for k in PAIR_MEMBERS:
        if k in scores:
            g = scores[k]
            out[k] = g / g[tr].std() * spread
    return out


def rank_diffs(
    scores: dict[str, np.ndarray], ia: np.ndarray, ib: np.ndarray, seen: np.ndarray
) -> dict[str, np.ndarray]:
    """Per battle, each row member's difference of ranks among the training answers (0–1)."""
    out = {}
    for k, s in scores.items():
        if k in PAIR_MEMBERS:
            continue
        ref = np.sort(s[seen])
        r = np.searchsorted(ref, s, side="left") + np.searchsorted(ref, s, side="right")
        r = r / (2 * len(ref))
        out[k] = r[ia] - r[ib]
    return out


def accuracy(d: np.ndarray, winner: pd.Series, mask: np.ndarray) -> float:
    keep = mask & (winner != "tie").to_numpy()
    return float(np.mean((d[keep] > 0) == (winner == "a").to_numpy()[keep]))


def pick_weights(
    diffs: dict[str, np.ndarray], members: tuple[str, ...], winner: pd.Series, val: np.ndarray
) -> tuple[dict[str, float], float]:
    """Weights on the grid (first member fixed at 1) that maximise accuracy on `val`."""
    best: tuple[float, dict[str, float]] = (-1.0, {})
    for ws in itertools.product(WEIGHT_GRID, repeat=len(members) - 1):
        w = dict(zip(members, (1.0, *ws), strict=True))
        acc = accuracy(sum(w[m] * diffs[m] for m in members), winner, val)
        if acc > best[0] + 1e-12:
            best = (acc, w)
    return best[1], best[0]


def cached(
    name: str,
    tag: str,
    df: pd.DataFrame,
    rows: pd.DataFrame,
    feats: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    train: np.ndarray,
    times: dict[str, list[float]],
) -> np.ndarray | None:
    file = STUDY / f"{name}_{tag}.npy"
    if file.exists():
        return np.load(file)
    t = time.time()
    s = train_member(name, df, rows, feats, ia, ib, train)
    times.setdefault(name, []).append(time.time() - t)
    np.save(file, s)
    print(f"# {name} {tag}: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
    return s


ENSEMBLES = (
    ("head+lexical (default)", ("head", "lexical")),
    ("head+char", ("head", "char")),
    ("head+lexical+char", ("head", "lexical", "char")),
    ("head+lexical+trees", ("head", "lexical", "trees")),
    ("head+lexical+pairhgb", ("head", "lexical", "pairhgb")),
    ("trees+lexical", ("trees", "lexical")),
    ("head+trees+lexical+char", ("head", "trees", "lexical", "char")),
    ("head5+lexical", ("head5", "lexical")),
    ("head5+lexical+char", ("head5", "lexical", "char")),
    ("head5+lexical+char+trees", ("head5", "lexical", "char", "trees")),
)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--members", default=",".join(ROW_MEMBERS + PAIR_MEMBERS))
    parser.add_argument("--nested", action="store_true", help="inner-split weights too")
    parser.add_argument("--train-only", action="store_true", help="fill the cache, no table")
    args = parser.parse_args()
    folds = [int(k) for k in args.folds.split(",")]
    members = args.members.split(",")
    STUDY.mkdir(parents=True, exist_ok=True)

    df = load_battles(DATA)
    rows, ia, ib = answers_table(df)
    feats_file = STUDY / "feats.npy"
    if feats_file.exists():
        feats = np.load(feats_file)
    else:
        from scoring.features import text_features

        feats = text_features(rows["response"], rows["prompt"])
        np.save(feats_file, feats)
    n_prompts = df["prompt_id"].nunique()
    fold = (np.random.default_rng(0).permutation(n_prompts) % 5)[df["prompt_id"].to_numpy()]
    winner = df["winner"]
    times: dict[str, list[float]] = {}
    results: dict[str, list[float]] = {}

    for k in folds:
        test = fold == k
        splits = [(f"f{k}", ~test, test)]
        if args.nested:
            inner = (k + 1) % 5
            splits.append((f"f{k}_in{inner}", ~test & (fold != inner), fold == inner))
        diffs_by_split = {}
        for tag, train, evaluate in splits:
            scores = {m: cached(m, tag, df, rows, feats, ia, ib, train, times) for m in members}
            seen = np.unique(np.concatenate([ia[train], ib[train]]))
            diffs_by_split[tag] = (battle_diffs(scores, ia, ib, seen, train), evaluate, scores)
        if args.train_only:
            continue
        d, _, scores = diffs_by_split[f"f{k}"]
        acc = results.setdefault
        for m in members:
            acc(m, []).append(accuracy(d[m], winner, test))
        length = rows["response"].str.len().to_numpy().astype(float)
        acc("longer", []).append(accuracy(length[ia] - length[ib], winner, test))
        seen = np.unique(np.concatenate([ia[~test], ib[~test]]))
        rd = rank_diffs(scores, ia, ib, seen)
        for label, ms in ENSEMBLES:
            if not all(m in d for m in ms):
                continue
            acc(label, []).append(accuracy(sum(d[m] for m in ms), winner, test))
            if all(m in rd for m in ms):
                acc(f"{label} [rank]", []).append(accuracy(sum(rd[m] for m in ms), winner, test))
            if args.nested:
                di, val, _ = diffs_by_split[splits[1][0]]
                w, _ = pick_weights(di, ms, winner, val)
                acc(f"{label} [nested w]", []).append(
                    accuracy(sum(w[m] * d[m] for m in ms), winner, test)
                )
                print(f"# fold {k} {label}: weights {w}", file=sys.stderr)

    if args.train_only:
        return
    base = results["head+lexical (default)"]
    print(f"| {'variant':<40} | mean  | vs default | wins | folds |")
    print(f"|{'-' * 42}|-------|------------|------|-------|")
    for label, accs in sorted(results.items(), key=lambda kv: -np.mean(kv[1])):
        wins = sum(a > b for a, b in zip(accs, base, strict=True))
        per = " ".join(f"{a:.3f}" for a in accs)
        print(
            f"| {label:<40} | {np.mean(accs):.4f} | {np.mean(accs) - np.mean(base):+.4f}"
            f"    | {wins}/{len(accs)}  | {per} |"
        )
    print(f"\n# folds {folds}; default mean {np.mean(base):.4f}")
    for name, ts in times.items():
        print(f"# train time {name}: {np.mean(ts):.1f}s per fit ({len(ts)} fits)")


if __name__ == "__main__":
    main()
