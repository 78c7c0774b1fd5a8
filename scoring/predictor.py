"""Expert win predictor: P(expert m wins | prompt), matrix-factorisation style (as in RouteLLM).

score(m | x) = θ_m · (W x) + b_m, with x the prompt's (unit) embedding — extended, when the
prompts' texts are given, by a few standardised prompt features (length, the kind of task
asked: `scoring.features.prompt_features`), which a normalised embedding does not carry and
which say most about where the reference expert is easy to beat — W a projection shared by
all experts, θ_m and b_m per expert; P(a beats b | x) = σ(s_a − s_b). It learns from
battles (two experts, one prompt, a judged winner; ties count half, graded outcomes allowed)
and from single-expert logs (one expert served the prompt and behaviour says good or bad:
P(good) = σ(s_m + c), with c a learned offset standing in for the unseen alternative).

Fitting is done in two stages because the factorised objective is non-convex and overfits a
few hundred prompts: first a convex hierarchical logistic model, v_m = u + δ_m on the full
embedding with δ_m pulled towards 0 (the mean expert) by a prior worth a few battles — more
for an expert that nearly always wins or loses (each of its battles says little about which
prompts suit it), less for a contested one (so the strong experts keep the profiles routing
needs); then W = the top-k right singular vectors of the stacked v_m and θ_m = W v_m. A new
expert with few battles therefore stays near the mean expert's prompt profile while its
strength b_m follows its own results (its global BT strength); an expert never seen scores as
the mean expert.
Everything saves as plain arrays plus JSON, so a gateway can apply it without this tool.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scoring.bradley_terry import battle_outcomes
from scoring.features import PROMPT_ONLY_FEATURES, prompt_features, standardise


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """Capacity and regularisation; defaults tuned to generalise across prompts and experts."""

    dim: int = 32  # projection width k
    # Prior precisions, in battles' worth (MAP: penalties and summed loss share one scale).
    # Pull of each expert's vector towards the mean expert's, for the most contested expert;
    # scaled up for lopsided ones by `prior_info_power` below. A single pull for all (power
    # 0) must be ~10 battles' worth to keep experts that nearly always lose from fitting noise
    # in 400 dimensions (AlpacaEval: AUC 0.57 at 1, 0.69 at 10), which also flattens the
    # strong experts' profiles and leaves routing no better than the best single expert.
    # 1 with power 2 (inner folds): within-model AUC 0.686 vs 0.681, routing +1.6 points
    # over the best single expert vs +0.2.
    prior_theta: float = 1.0
    prior_bias: float = 1.0  # pull of b_m towards the mean strength
    prior_scale: float = 50.0  # size of the mean expert's vector (seen by single-expert logs)
    max_iter: int = 300  # L-BFGS iterations
    single_weight: float = 1.0  # weight of a single-expert log row relative to a battle
    # Size of the standardised prompt features next to the unit embedding; 0 = embedding only.
    text_scale: float = 0.2
    # Per-expert prior: prior_theta × (I_max / I_m)^power, with I_m = p_m (1 − p_m) the
    # information per battle of an expert winning a share p_m of its battles. An expert that
    # nearly always loses learns little about *which* prompts it wins from each battle, so its
    # prompt profile is pulled harder to the mean; a contested expert keeps more of its own,
    # which is what routing among the strong experts needs. 0 = the same pull for all
    # (how models saved before this field were fitted: they load with it).
    # Power 3 with text_scale 0.2 was chosen by nested cross-validation on AlpacaEval (inner
    # folds of each outer fold's training prompts picked it in 4 of 5 outer folds, against
    # powers 2–3, prior_theta 1–2 and text_scale 0.2–0.3): outer within-model AUC 0.705
    # against 0.697 for power 2 with text_scale 0.3, routing the same (0.728), and 0.720
    # against 0.707 on 7 experts it saw 20 battles of.
    prior_info_power: float = 3.0
    # Single-expert rows fitted at most: beyond this a seeded sample, each expert keeping all
    # its rows up to an equal quota (a rare expert keeps all of them). A few thousand
    # parameters need nowhere near this many rows, and every L-BFGS step reads all of them:
    # without a cap, 1M logged exchanges cost minutes per fit and gigabytes of gradients.
    max_single_rows: int = 200_000


@dataclass(frozen=True, slots=True)
class ExpertScore:
    """One expert's standing for one prompt."""

    model: str
    score: float
    win_probability: float  # against the reference (the mean expert unless told otherwise)


class WinPredictor:
    """Fit on battles and single-expert logs; score experts for any prompt embedding."""

    def __init__(self, config: PredictorConfig = PredictorConfig()) -> None:
        self.config = config
        self.experts: list[str] = []
        self.projection = np.zeros((0, 0), dtype=np.float32)  # W: (k, d)
        self.theta = np.zeros((0, 0), dtype=np.float32)  # (M, k)
        self.bias = np.zeros(0, dtype=np.float32)  # (M,)
        self.single_offset = 0.0
        self.battle_counts = np.zeros(0, dtype=np.int64)
        # Standardisation of the prompt features; empty when trained on embeddings alone.
        self.text_mean = np.zeros(0, dtype=np.float32)
        self.text_std = np.zeros(0, dtype=np.float32)

    @property
    def uses_texts(self) -> bool:
        """Whether the model was trained with prompt features (and scores best given texts)."""
        return len(self.text_mean) > 0

    def inputs(
        self,
        prompts: np.ndarray,
        texts: list[str] | None = None,
        *,
        features: np.ndarray | None = None,
    ) -> np.ndarray:
        """The model's input rows: the embedding, then the scaled, standardised prompt features.

        Without texts, a model trained with them uses the features' training mean (their part
        of the score is then the average prompt's): callers should pass texts when they have
        them. `features`: `prompt_features(texts)` when the caller computed them already (the
        regexes over long prompts cost more than the model).
        """
        x = np.asarray(prompts, dtype=np.float32)
        if not self.uses_texts:
            return x
        if features is None and texts is not None:
            features = prompt_features(texts)
        if features is None:
            extra = np.zeros((len(x), len(self.text_mean)), dtype=np.float32)
        else:
            extra = standardise(features, self.text_mean, self.text_std)
        return np.hstack([x, self.config.text_scale * extra], dtype=np.float32)

    def fit(
        self,
        prompts: np.ndarray,
        battles: pd.DataFrame | None = None,
        singles: pd.DataFrame | None = None,
        texts: list[str] | None = None,
        *,
        features: np.ndarray | None = None,
    ) -> WinPredictor:
        """Learn from prompt embeddings (n, d) and rows that point into them.

        `battles`: `prompt_index`, `model_a`, `model_b`, `winner` (a/b/tie) or `outcome`
        (P(a wins)). `singles`: `prompt_index`, `model`, `label` in [0, 1] (NaN rows are
        skipped: an unknown label is not a bad one), optional `weight`; more than
        `max_single_rows` are sampled. `texts`: the n prompts' texts, for the prompt features
        (left out, or `text_scale` 0: embeddings alone); `features`: `prompt_features(texts)`
        when the caller has them.
        """
        cfg = self.config
        self.text_mean = np.zeros(0, dtype=np.float32)
        self.text_std = np.zeros(0, dtype=np.float32)
        if cfg.text_scale <= 0:
            features = None
        elif features is None and texts is not None:
            features = prompt_features(texts)
        if features is not None:
            features = np.asarray(features, dtype=np.float32)
            self.text_mean = features.mean(axis=0)
            self.text_std = features.std(axis=0) + 1e-6
        battles = battles if battles is not None else _empty_battles()
        singles = singles if singles is not None else _empty_singles()
        singles = _capped(singles[singles["label"].notna()], cfg.max_single_rows)
        # Only the prompts some row points at are read: re-index them to a compact block.
        used = np.unique(
            np.concatenate(
                [
                    battles["prompt_index"].to_numpy(dtype=np.int64),
                    singles["prompt_index"].to_numpy(dtype=np.int64),
                ]
            )
        )
        battles = battles.assign(prompt_index=np.searchsorted(used, battles["prompt_index"]))
        singles = singles.assign(prompt_index=np.searchsorted(used, singles["prompt_index"]))
        prompts = self.inputs(
            _rows_of(np.asarray(prompts), used),
            features=None if features is None else features[used],
        )
        self.experts = sorted(
            set(battles["model_a"]) | set(battles["model_b"]) | set(singles["model"])
        )
        if not self.experts:
            raise ValueError("no battles and no labelled single-expert rows to learn from")
        index = {m: i for i, m in enumerate(self.experts)}
        n_models, dim_in = len(self.experts), prompts.shape[1]

        x = torch.as_tensor(prompts)  # never written to: shared, not copied
        ba = torch.as_tensor(battles["model_a"].map(index).to_numpy(dtype=np.int64).copy())
        bb = torch.as_tensor(battles["model_b"].map(index).to_numpy(dtype=np.int64).copy())
        bp = torch.as_tensor(battles["prompt_index"].to_numpy(dtype=np.int64).copy())
        by = torch.as_tensor(battle_outcomes(battles).astype(np.float32))
        sm = torch.as_tensor(singles["model"].map(index).to_numpy(dtype=np.int64).copy())
        sp = torch.as_tensor(singles["prompt_index"].to_numpy(dtype=np.int64).copy())
        sy = torch.as_tensor(singles["label"].to_numpy(dtype=np.float32))
        sw = torch.as_tensor(
            singles["weight"].to_numpy(dtype=np.float32)
            if "weight" in singles.columns
            else np.ones(len(singles), dtype=np.float32)
        )
        counts = np.bincount(ba.numpy(), minlength=n_models) + np.bincount(
            bb.numpy(), minlength=n_models
        )
        counts = counts + np.bincount(sm.numpy(), minlength=n_models)
        pull = torch.as_tensor(
            cfg.prior_theta * _information_scale(ba, bb, by, sm, sy, n_models, cfg.prior_info_power)
        )

        # Convex stage: per-expert vectors v_m = u + δ_m on the full embedding, δ_m pulled to 0
        # (towards the mean expert) by `pull` (prior_theta battles' worth, scaled by how
        # lopsided each expert's record is); u only matters for
        # single-expert rows, since it cancels in every battle.
        u = torch.zeros(dim_in, requires_grad=True)
        delta = torch.zeros(n_models, dim_in, requires_grad=True)
        bias = torch.zeros(n_models, requires_grad=True)
        offset = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS(
            [u, delta, bias, offset],
            lr=1.0,
            max_iter=cfg.max_iter,
            history_size=20,
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )
        n_rows = max(len(battles) + cfg.single_weight * float(sw.sum()), 1.0)
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def closure() -> torch.Tensor:
            opt.zero_grad()
            v = u + delta
            s_all = x @ v.T  # (n_prompts, M)
            loss = torch.zeros(())
            if len(battles):
                d = s_all[bp, ba] - s_all[bp, bb] + bias[ba] - bias[bb]
                loss = loss + bce(d, by, reduction="sum")
            if len(singles):
                z = s_all[sp, sm] + bias[sm] + offset
                loss = loss + cfg.single_weight * bce(z, sy, weight=sw, reduction="sum")
            loss = loss + (pull[:, None] * delta**2).sum() + cfg.prior_scale * (u**2).sum()
            loss = loss + cfg.prior_bias * ((bias - bias.mean()) ** 2).sum()
            loss = loss / n_rows
            loss.backward()
            return loss

        opt.step(closure)

        # Factorisation stage: W = the top-k right singular vectors of V, θ_m = W v_m, so
        # θ_m · (W x) reproduces v_m · x up to the discarded directions.
        v = (u + delta).detach().numpy().astype(np.float64)
        _, _, vt = np.linalg.svd(v, full_matrices=False)
        k = min(cfg.dim, vt.shape[0])
        self.projection = vt[:k].astype(np.float32)
        self.theta = (v @ vt[:k].T).astype(np.float32)
        b = bias.detach().numpy()
        self.bias = (b - b.mean()).astype(np.float32)  # only differences matter
        self.single_offset = float(offset.detach()) + float(b.mean())
        self.battle_counts = counts.astype(np.int64)
        return self

    def scores(
        self,
        prompts: np.ndarray,
        experts: list[str] | None = None,
        texts: list[str] | None = None,
    ) -> np.ndarray:
        """score(m | x) for each prompt (rows) and expert (columns); unknown experts get the
        mean expert's parameters (the prior). `texts`: the prompts' texts (see `inputs`)."""
        return self.scores_of_inputs(self.inputs(prompts, texts), experts)

    def scores_of_inputs(self, rows: np.ndarray, experts: list[str] | None = None) -> np.ndarray:
        """`scores` from the model's input rows (`inputs`), for callers scoring the same prompts
        several times."""
        experts = self.experts if experts is None else experts
        theta, bias = self.parameters(experts)
        return (rows @ self.projection.T) @ theta.T + bias

    def win_probability(
        self,
        prompts: np.ndarray,
        expert: str,
        opponent: str | None = None,
        texts: list[str] | None = None,
    ) -> np.ndarray:
        """P(expert beats opponent | prompt); opponent None = the mean expert."""
        s = self.scores(prompts, [expert], texts)[:, 0]
        if opponent is None:
            ref = self._mean_score(prompts, texts)
        else:
            ref = self.scores(prompts, [opponent], texts)[:, 0]
        return _sigmoid(s - ref)

    def rank(
        self, prompt: np.ndarray, experts: list[str] | None = None, text: str | None = None
    ) -> list[ExpertScore]:
        """Experts for one prompt embedding (and text), best first, with P(beats the mean
        expert)."""
        x = np.asarray(prompt, dtype=np.float32).reshape(1, -1)
        texts = None if text is None else [text]
        experts = self.experts if experts is None else experts
        s = self.scores(x, experts, texts)[0]
        p = _sigmoid(s - self._mean_score(x, texts)[0])
        order = np.argsort(-s)
        return [ExpertScore(experts[i], float(s[i]), float(p[i])) for i in order]

    def _mean_score(self, prompts: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        z = self.inputs(prompts, texts) @ self.projection.T
        return z @ self.theta.mean(0) + self.bias.mean()

    def parameters(self, experts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(θ, b) for these experts; an unknown expert gets the mean expert's (the prior)."""
        index = {m: i for i, m in enumerate(self.experts)}
        prior_theta, prior_bias = self.theta.mean(0), self.bias.mean()
        theta = np.stack([self.theta[index[m]] if m in index else prior_theta for m in experts])
        bias = np.array([self.bias[index[m]] if m in index else prior_bias for m in experts])
        return theta.astype(np.float32), bias.astype(np.float32)

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable parameters (lists of floats)."""
        return {
            "kind": "convoscope.win_predictor",
            "version": 2,
            "config": asdict(self.config),
            "prompt_features": list(PROMPT_ONLY_FEATURES) if self.uses_texts else [],
            "text_mean": self.text_mean.tolist(),
            "text_std": self.text_std.tolist(),
            "experts": list(self.experts),
            "projection": self.projection.tolist(),
            "theta": self.theta.tolist(),
            "bias": self.bias.tolist(),
            "single_offset": self.single_offset,
            "battle_counts": self.battle_counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> WinPredictor:
        """Inverse of `to_dict` (version 1, before prompt features, loads too)."""
        model = cls(PredictorConfig(**{"prior_info_power": 0.0, **data["config"]}))
        model.text_mean = np.asarray(data.get("text_mean", []), dtype=np.float32)
        model.text_std = np.asarray(data.get("text_std", []), dtype=np.float32)
        model.experts = list(data["experts"])
        model.projection = np.asarray(data["projection"], dtype=np.float32)
        model.theta = np.asarray(data["theta"], dtype=np.float32).reshape(len(model.experts), -1)
        model.bias = np.asarray(data["bias"], dtype=np.float32)
        model.single_offset = float(data["single_offset"])
        model.battle_counts = np.asarray(data["battle_counts"], dtype=np.int64)
        return model

    def save(self, directory: str | Path) -> Path:
        """Arrays as .npy plus a JSON header: readable from any language with numpy-like IO."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "projection.npy", self.projection)
        np.save(path / "theta.npy", self.theta)
        np.save(path / "bias.npy", self.bias)
        header = {
            k: v for k, v in self.to_dict().items() if k not in {"projection", "theta", "bias"}
        }
        (path / "predictor.json").write_text(json.dumps(header, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> WinPredictor:
        """Inverse of `save`."""
        path = Path(directory)
        header = json.loads((path / "predictor.json").read_text(encoding="utf-8"))
        header["projection"] = np.load(path / "projection.npy")
        header["theta"] = np.load(path / "theta.npy")
        header["bias"] = np.load(path / "bias.npy")
        return cls.from_dict(header)


def _information_scale(
    ba: torch.Tensor,
    bb: torch.Tensor,
    by: torch.Tensor,
    sm: torch.Tensor,
    sy: torch.Tensor,
    n_models: int,
    power: float,
) -> np.ndarray:
    """(I_max / I_m)^power per expert, I_m = p_m (1 − p_m) of its smoothed win share p_m.

    Ones when `power` is 0. Win shares come from battles (either side) and single-expert
    labels (unweighted), add-one smoothed so an expert with few rows sits near even odds (a
    mild pull) until its record says otherwise.
    """
    if power == 0:
        return np.ones(n_models, dtype=np.float32)
    won = np.bincount(ba.numpy(), by.numpy(), n_models) + np.bincount(
        bb.numpy(), 1.0 - by.numpy(), n_models
    )
    won = won + np.bincount(sm.numpy(), sy.numpy(), n_models)
    n = np.bincount(ba.numpy(), minlength=n_models) + np.bincount(bb.numpy(), minlength=n_models)
    n = n + np.bincount(sm.numpy(), minlength=n_models)
    p = (won + 1.0) / (n + 2.0)
    info = p * (1.0 - p)
    return ((info.max() / info) ** power).astype(np.float32)


def _capped(singles: pd.DataFrame, cap: int) -> pd.DataFrame:
    """At most `cap` rows: every expert keeps min(its rows, q), q the largest equal quota that
    fits, sampled with a fixed seed so a re-run fits the same rows."""
    if len(singles) <= cap:
        return singles
    counts = singles["model"].value_counts().sort_values()
    quota, left = 0, cap
    for i, n in enumerate(counts.to_numpy()):
        share = left // (len(counts) - i)
        if n > share:
            quota = share
            break
        left -= n
    else:
        return singles
    rng = np.random.default_rng(0)
    keep = [
        rows if len(rows) <= quota else rng.choice(rows, size=quota, replace=False)
        for rows in (np.flatnonzero(singles["model"].to_numpy() == m) for m in counts.index)
    ]
    return singles.iloc[np.sort(np.concatenate(keep))]


def _rows_of(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`matrix[rows]` for sorted, distinct row indices; the matrix itself when they are all
    of its rows, as when every exchange is used: a copy of 1M prompt vectors is 1.5 GB."""
    return matrix if len(rows) == len(matrix) else matrix[rows]


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _empty_battles() -> pd.DataFrame:
    return pd.DataFrame({"prompt_index": [], "model_a": [], "model_b": [], "winner": []})


def _empty_singles() -> pd.DataFrame:
    return pd.DataFrame({"prompt_index": [], "model": [], "label": []})
