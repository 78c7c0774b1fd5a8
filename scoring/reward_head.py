"""The cheap reward model: a small neural head on feature rows of (prompt, response).

What the head reads is the caller's choice. `convoscope score` gives it the structural
features of `scoring.features.text_features` (length, layout, refusals, answers cut off,
degenerate output) with `STRUCTURAL_HEAD`: on AlpacaEval battles (GPT-4-turbo as judge) they
beat every mix with the 128-token MiniLM embeddings tried (pairwise accuracy 0.87–0.89 against
0.83–0.86 with the embeddings: the embedding of a truncated answer says little about its
quality and lets a wide head memorise the training prompts), and on ShareGPT's engagement
labels too (held-out AUC 0.712 against 0.665). `head_features` builds the rows of heads from
earlier releases: the prompt and response embeddings, their element-wise product (how well the
response fits the prompt), then the text features. The head is trained at once on the joint
behaviour target (pointwise, weighted cross-entropy) and on battles (pairwise Bradley–Terry
loss on the score difference), so one score serves both; it trains in seconds on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scoring.features import standardise


@dataclass(frozen=True, slots=True)
class HeadConfig:
    """Size and training of the head."""

    hidden: int = 64  # 0 = a linear head
    dropout: float = 0.2
    weight_decay: float = 1e-3
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 1024
    pair_weight: float = 1.0  # battles' loss relative to the pointwise loss
    seed: int = 0


# For the few dozen structural features: a narrow head trained longer, with light dropout: on
# inner AlpacaEval folds (never the test fold) the head without it overfits the training
# prompts (pairwise accuracy 0.880; 0.888 at dropout 0.1, 0.884 at 0.2, 0.883 at 0.3).
STRUCTURAL_HEAD = HeadConfig(hidden=32, dropout=0.1, epochs=30, lr=1e-2)


@dataclass(frozen=True, slots=True)
class Pairs:
    """Battles as row indices into the same arrays: P(row a beats row b) = outcome."""

    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray  # 1 = a won, 0 = b won, 0.5 = tie (soft values allowed)


def labelled_rows(
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    pairs: Pairs | None,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows to fit pointwise, labels, weights) for a reward model's `fit`: a row counts when
    its label is known and its weight positive; weights default to 1. Every reward model
    refuses the same way when there is neither a labelled row nor a pair to learn from."""
    if labels is None:
        lab = wt = np.zeros(0, dtype=dtype)
    else:
        lab = np.asarray(labels, dtype=dtype)
        wt = np.ones_like(lab) if weights is None else np.asarray(weights, dtype=dtype)
    point = np.flatnonzero(~np.isnan(lab) & (wt > 0))
    if len(point) == 0 and (pairs is None or len(pairs.a) == 0):
        raise ValueError(
            "nothing to train on: no training row has a known signal with a weight above 0, "
            "and there are no judged battles to learn from pairwise (--alpha-battle 0 leaves "
            "them out)"
        )
    return point, lab, wt


def simple_features(response_chars: np.ndarray, prompt_chars: np.ndarray) -> np.ndarray:
    """Length features: log response length, log prompt length, and their difference."""
    r = np.log1p(np.asarray(response_chars, dtype=np.float32))
    p = np.log1p(np.asarray(prompt_chars, dtype=np.float32))
    return np.stack([r, p, r - p], axis=1)


def head_features(
    prompt_emb: np.ndarray, response_emb: np.ndarray, extra: np.ndarray
) -> np.ndarray:
    """The head's input row for each exchange."""
    p = np.asarray(prompt_emb, dtype=np.float32)
    r = np.asarray(response_emb, dtype=np.float32)
    return np.hstack([p, r, p * r, np.asarray(extra, dtype=np.float32)])


class RewardHead:
    """fit / score on feature rows from `head_features`; save and load as arrays plus JSON."""

    def __init__(self, config: HeadConfig = HeadConfig()) -> None:
        self.config = config
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.net: torch.nn.Module | None = None

    def _build(self, n_in: int) -> torch.nn.Module:
        cfg = self.config
        if cfg.hidden <= 0:
            return torch.nn.Sequential(torch.nn.Dropout(cfg.dropout), torch.nn.Linear(n_in, 1))
        return torch.nn.Sequential(
            torch.nn.Dropout(cfg.dropout),
            torch.nn.Linear(n_in, cfg.hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(cfg.dropout),
            torch.nn.Linear(cfg.hidden, 1),
        )

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        pairs: Pairs | None = None,
    ) -> RewardHead:
        """Train on pointwise labels in [0, 1] (NaN = unlabelled, skipped) and/or pairs."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        feats = np.asarray(features, dtype=np.float32)
        self.mean = feats.mean(axis=0)
        self.std = feats.std(axis=0) + 1e-6
        x = torch.as_tensor(standardise(feats, self.mean, self.std))
        self.net = self._build(x.shape[1])
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        point_idx, lab, wt = labelled_rows(labels, weights, pairs)
        y_point = torch.as_tensor(np.nan_to_num(lab))
        w_point = torch.as_tensor(wt)
        n_pairs = 0 if pairs is None else len(pairs.a)
        if n_pairs:
            pa = torch.as_tensor(np.array(pairs.a, dtype=np.int64))
            pb = torch.as_tensor(np.array(pairs.b, dtype=np.int64))
            py = torch.as_tensor(np.array(pairs.outcome, dtype=np.float32))

        steps = max(1, int(np.ceil(max(len(point_idx), n_pairs) / cfg.batch_size)))
        self.net.train()
        for _ in range(cfg.epochs):
            p_order = rng.permutation(point_idx)
            q_order = rng.permutation(n_pairs)
            for s in range(steps):
                opt.zero_grad()
                loss = torch.zeros(())
                chunk = p_order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                if len(chunk):
                    i = torch.as_tensor(chunk)
                    out = self.net(x[i]).squeeze(1)
                    loss = loss + bce(out, y_point[i], weight=w_point[i])
                q = q_order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                if len(q):
                    j = torch.as_tensor(q)
                    d = self.net(x[pa[j]]).squeeze(1) - self.net(x[pb[j]]).squeeze(1)
                    loss = loss + cfg.pair_weight * bce(d, py[j])
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Reward logits: higher is better; σ(score) is P(good) on the joint target's scale."""
        if self.net is None or self.mean is None or self.std is None:
            raise RuntimeError("the head is not trained: call fit() or load() first")
        x = standardise(np.asarray(features, dtype=np.float32), self.mean, self.std)
        with torch.no_grad():
            return self.net(torch.as_tensor(x)).squeeze(1).numpy().astype(np.float64)

    def save(self, directory: str | Path) -> Path:
        """Weights as .npz of plain arrays, config and input scaling alongside as JSON."""
        if self.net is None or self.mean is None or self.std is None:
            raise RuntimeError("the head is not trained")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {k: v.detach().numpy() for k, v in self.net.state_dict().items()}
        np.savez(path / "head.npz", mean=self.mean, std=self.std, **arrays)
        meta = {"kind": "convoscope.reward_head", "version": 1, "config": asdict(self.config)}
        (path / "head.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RewardHead:
        """Inverse of `save`."""
        path = Path(directory)
        meta = json.loads((path / "head.json").read_text(encoding="utf-8"))
        head = cls(HeadConfig(**meta["config"]))
        data = np.load(path / "head.npz")
        head.mean, head.std = data["mean"], data["std"]
        head.net = head._build(len(head.mean))
        state = {k: torch.as_tensor(data[k]) for k in head.net.state_dict()}
        head.net.load_state_dict(state)
        head.net.eval()
        return head
