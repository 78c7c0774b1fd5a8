"""Reward models trained, stored and applied: `convoscope score reward train|apply`.

Five kinds are stored (storage.models), each with its config, data fingerprint and held-out
metrics, and each writes its scores under `reward:<model id>`:
- `reward_head`: a small neural head on the answers' structure (the cheap default: seconds
  on a CPU; heads stored before also read the prompt and response embeddings);
- `reward_lexical`: a linear model on the answer's word n-grams (`scoring.reward_lexical`:
  seconds on a CPU);
- `reward_finetuned`: the bundled MiniLM fine-tuned on (context + prompt, response) with the
  behaviour labels and a pairwise loss on battles (minutes on a CPU; use a GPU);
- `reward_external`: a user's own sequence-classification directory (nothing trained);
- `reward_ensemble`: two or more of the first three trained on the same split (each also
  stored on its own), their scores standardised on the training rows and summed.
`--mode` names the members: `head`, `lexical`, `finetune`, or several joined by `+`
(`head+lexical`, the default; `ensemble` = all three).
`apply` scores every stored exchange with a stored model, without training: new logs and
replayed answers get rewards comparable with the old ones.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from ingest.embed_fast import split_embedder_name
from ingest.embed_step import EmbedConfig, embed_exchanges, exchange_texts
from scoring.agreement import agreeing_share
from scoring.features import FEATURE_NAMES, text_features
from scoring.labels import LabelConfig
from scoring.reward_head import HeadConfig, Pairs, RewardHead, head_features, simple_features
from scoring.reward_lexical import LexicalConfig, LexicalReward
from scoring.reward_model import FineTuneConfig, join_context
from storage.logs import iter_exchanges
from storage.models import NewModel, latest_model, load_model, model_ids
from storage.vectors import load_vectors

REWARD_KINDS = (
    "reward_head",
    "reward_lexical",
    "reward_finetuned",
    "reward_external",
    "reward_ensemble",
)
# What `--mode` may name, in the order members are trained and summed.
REWARD_MEMBERS = ("head", "lexical", "finetune")
DEFAULT_MODE = "head+lexical"
_MODE_ALIASES = {"ensemble": REWARD_MEMBERS}
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_CONTEXT_CHARS = 500  # of the earlier turns a fine-tuned model reads before the prompt
# What a head reads. "structure:N" (the default): the first N columns of
# scoring.features.text_features (length, layout, refusals, truncation, degenerate output),
# nothing else. Heads from before read the prompt and response embeddings too, beside "text:N"
# (those columns) or "lengths" (three length features): the embeddings lowered the head's
# held-out accuracy on AlpacaEval battles and its engagement AUC on ShareGPT (0.665 against
# 0.712 without them, benchmarks/bench_engagement.py) and embedding every answer was most of
# what a first `score` cost on a CPU. A stored head names its set, and text features are only
# ever appended, so every head keeps scoring with the inputs it was fit on.
HEAD_FEATURES = f"structure:{len(FEATURE_NAMES)}"
# Vectors of the rows' prompts and responses, computed only for a head that reads them.
Vectors = Callable[[], tuple[np.ndarray, np.ndarray]]


class TextScorer(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class SavedModel(Protocol):
    """A trained reward model that writes its files into a directory."""

    def save(self, directory: str | Path) -> Path: ...


@dataclass(frozen=True, slots=True)
class TrainedReward:
    """A reward model just trained (or pointed to), not stored yet: `score` stores it with
    the members of its ensemble and the rest of what it made, as one
    (`storage.reports.save_scored`)."""

    record: NewModel  # its files, config, metrics and scores, as storage takes them
    scores: np.ndarray  # one per row of the frame it was trained on
    metrics: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.record.id


def exchange_vectors(
    engine: Engine, ids: Sequence[str], embed: EmbedConfig, on: str
) -> tuple[np.ndarray, str]:
    """The vectors of these exchanges' `on` texts (prompt or response), in order, embedding
    what is new; and the encoder's name."""
    hashes, name = embedded_hashes(engine, ids, embed, on)
    return load_vectors(engine, name, hashes), name


def embedded_hashes(
    engine: Engine, ids: Sequence[str], embed: EmbedConfig, on: str
) -> tuple[list[str], str]:
    """Embed what is new of these exchanges' `on` texts; the hashes their vectors are stored
    under, in order, and the encoder's name. A step that reads the vectors only later embeds
    first all the same, so a missing encoder fails it before anything is stored."""
    config = EmbedConfig(**{**asdict(embed), "on": on})
    items = list(exchange_texts(engine, on=on))
    name = embed_exchanges(engine, config=config, items=items).model
    by_id = {item.exchange_id: item.text_hash for item in items}
    del items
    return [by_id[i] for i in ids], name


def exchange_embeddings(
    engine: Engine, ids: Sequence[str], embed: EmbedConfig
) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompt and response vectors of these exchanges, in order (embedding what is new), for
    the heads of earlier releases that read them; the other steps ask for prompts alone
    (`exchange_vectors`): embedding every answer costs more than all the rest of a `score`."""
    prompts, _ = exchange_vectors(engine, ids, embed, "prompt")
    responses, name = exchange_vectors(engine, ids, embed, "response")
    return prompts, responses, name


def reward_members(mode: str) -> tuple[str, ...]:
    """The members a `--mode` names (`head`, `head+lexical`, `ensemble`...), in training
    order; a clear error for anything else."""
    names = _MODE_ALIASES.get(mode) or tuple(part.strip() for part in mode.split("+"))
    unknown = [name for name in names if name not in REWARD_MEMBERS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"unknown reward mode {mode!r}: use {', '.join(REWARD_MEMBERS)}, several joined "
            "by + (e.g. head+lexical), or ensemble (all three)"
        )
    return tuple(name for name in REWARD_MEMBERS if name in names)


def embed_config_for(encoder: str, embed: EmbedConfig | None = None) -> EmbedConfig:
    """`embed` (device, batch size...) with the embedder a stored model was trained on: the
    fast variant of a model for a name `score --fast` stored (`...+model2vec-256`), which was
    looked up as a model of that name and failed."""
    base, fast = split_embedder_name(encoder)
    model = None if base == DEFAULT_ENCODER else base
    return EmbedConfig(**{**asdict(embed or EmbedConfig()), "model": model, "fast": fast})


def head_inputs(frame: pd.DataFrame, features: str, vectors: Vectors) -> np.ndarray:
    """The reward head's features for the frame's rows (training and applying alike);
    `vectors` is called only for the older sets that prefix the embeddings."""
    kind, _, columns = features.partition(":")
    if kind in ("structure", "text") and columns.isdigit() and int(columns) <= len(FEATURE_NAMES):
        extra = text_features(frame["response"], frame["prompt"])[:, : int(columns)]
        if kind == "structure":
            return extra
    elif features == "lengths":
        extra = simple_features(
            frame["response"].fillna("").str.len().to_numpy(),
            frame["prompt"].fillna("").str.len().to_numpy(),
        )
    else:
        raise ValueError(f"unknown head features {features!r}: this head needs a newer convoscope")
    return head_features(*vectors(), extra)


def training_pairs(
    frame: pd.DataFrame, battles: pd.DataFrame, holdout: np.ndarray, label_config: LabelConfig
) -> Pairs | None:
    """The battles a reward model learns from pairwise, between training rows; none with
    `alpha_battle` 0, which asks that judged battles not shape the reward (they still measure
    it on the held-out rows). It left them out of the joint target only, and the pairwise
    loss went on learning the judge's preferences."""
    return battle_pairs(frame, battles, ~holdout) if label_config.alpha_battle > 0 else None


def battle_pairs(frame: pd.DataFrame, battles: pd.DataFrame, keep: np.ndarray) -> Pairs | None:
    """The battles between two kept rows of the frame, as row indices."""
    if battles.empty:
        return None
    index = {exchange_id: i for i, exchange_id in enumerate(frame["id"])}
    decided = battles[battles["winner"].isin(["a", "b", "tie"])]
    a = decided["exchange_a"].map(index)
    b = decided["exchange_b"].map(index)
    present = (a.notna() & b.notna()).to_numpy()
    a_idx = a.to_numpy()[present].astype(int)
    b_idx = b.to_numpy()[present].astype(int)
    mask = keep[a_idx] & keep[b_idx]
    if not mask.any():
        return None
    outcome = decided["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy()[present]
    return Pairs(a=a_idx[mask], b=b_idx[mask], outcome=outcome[mask])


def train_head(
    frame: pd.DataFrame,
    embedded: Callable[[], tuple[np.ndarray, np.ndarray, str]],
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    *,
    config: HeadConfig,
    label_config: LabelConfig,
    features_kind: str = HEAD_FEATURES,
) -> TrainedReward:
    """Train the head on the training conversations, measure it on the held-out ones.

    `embedded` gives (prompt vectors, response vectors, encoder name) in frame order; it is
    called only for a feature set that reads them."""
    encoders: list[str] = []  # the encoder's name, when the feature set reads embeddings

    def vectors() -> tuple[np.ndarray, np.ndarray]:
        prompts, responses, encoder = embedded()
        encoders.append(encoder)
        return prompts, responses

    features = head_inputs(frame, features_kind, vectors)
    label = labels["label"].to_numpy(dtype=float)
    weight = labels["weight"].to_numpy(dtype=float)
    train_pairs = training_pairs(frame, battles, holdout, label_config)
    head = RewardHead(config).fit(
        features, labels=np.where(holdout, np.nan, label), weights=weight, pairs=train_pairs
    )
    scores = head.score(features)
    metrics = reward_metrics(scores, label, holdout, battle_pairs(frame, battles, holdout))
    config_record = {
        "head": asdict(config),
        "labels": asdict(label_config),
        "encoder": encoders[0] if encoders else None,
        "features": features_kind,
    }
    fingerprint = training_fingerprint(frame["id"], label, weight, holdout, train_pairs)
    return _version("reward_head", head, config_record, metrics, frame, scores, fingerprint)


def train_finetuned(
    engine: Engine,
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    *,
    config: FineTuneConfig,
    label_config: LabelConfig,
) -> TrainedReward:
    """Fine-tune the transformer reward model on the training conversations and battles."""
    from scoring.reward_model import TransformerReward

    record = {"finetune": asdict(config), "labels": asdict(label_config)}
    prompts = model_prompts(engine, frame)
    model = TransformerReward(config)
    pairs = training_pairs(frame, battles, holdout, label_config)
    return _train_text_reward(
        "reward_finetuned", model, record, prompts, frame, labels, battles, holdout, pairs
    )


def train_lexical(
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    *,
    config: LexicalConfig,
    label_config: LabelConfig,
) -> TrainedReward:
    """Fit the n-gram model on the training conversations and battles."""
    record = {"lexical": asdict(config), "labels": asdict(label_config)}
    prompts = frame["prompt"].fillna("").tolist()
    model = LexicalReward(config)
    pairs = training_pairs(frame, battles, holdout, label_config)
    return _train_text_reward(
        "reward_lexical", model, record, prompts, frame, labels, battles, holdout, pairs
    )


class TextReward(TextScorer, SavedModel, Protocol):
    """A reward model trained on texts (the fine-tuned transformer, the n-gram model)."""

    def fit(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        labels: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        pairs: Pairs | None = None,
        authors: Sequence[str | None] | None = None,
    ) -> TextReward:
        """Train; `authors` (each response's expert) is for models that can use it."""
        ...


def _train_text_reward(
    kind: str,
    model: TextReward,
    config_record: dict[str, Any],
    prompts: list[str],
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    train_pairs: Pairs | None,
) -> TrainedReward:
    """Fit a text reward model on the training rows' labels and `train_pairs`, measure it on
    the held-out rows and battles, and store it as a new version of `kind` with its scores."""
    label = labels["label"].to_numpy(dtype=float)
    weight = labels["weight"].to_numpy(dtype=float)
    responses = frame["response"].fillna("").tolist()
    model.fit(
        prompts,
        responses,
        labels=np.where(holdout, np.nan, label),
        weights=weight,
        pairs=train_pairs,
        authors=frame["model"].tolist(),
    )
    scores = model.score(prompts, responses)
    metrics = reward_metrics(scores, label, holdout, battle_pairs(frame, battles, holdout))
    fingerprint = training_fingerprint(frame["id"], label, weight, holdout, train_pairs)
    return _version(kind, model, config_record, metrics, frame, scores, fingerprint)


@dataclass(frozen=True, slots=True)
class Ensemble:
    """Member models by id, each with the mean and spread of its scores on the training rows.

    The sum of standardised scores needs no weights to fit: on AlpacaEval battles the members
    err on different answers, and their plain sum beats each (held-out prompts: the head on
    structure with the n-gram model 0.894 over 5 folds, against 0.886 and 0.881 alone; with
    the fine-tuned MiniLM, GPU, 512 tokens, 0.883 and 0.909 on two folds, against 0.876 and
    0.896 for the head and 0.865 and 0.887 for the fine-tuned model alone)."""

    members: tuple[tuple[str, float, float], ...]  # (model id, mean, std)

    @classmethod
    def of(cls, trained: Sequence[TrainedReward], train: np.ndarray) -> Ensemble:
        return cls(
            tuple(
                (m.model_id, float(m.scores[train].mean()), float(m.scores[train].std() + 1e-9))
                for m in trained
            )
        )

    def combine(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        """The sum of the members' standardised scores, members in order."""
        return np.sum(
            [(s - mean) / std for s, (_, mean, std) in zip(scores, self.members, strict=True)],
            axis=0,
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory)
        (path / "ensemble.json").write_text(
            json.dumps({"kind": "convoscope.reward_ensemble", "members": self.members}),
            encoding="utf-8",
        )
        return path

    @classmethod
    def load(cls, stored: dict[str, Any]) -> Ensemble:
        meta = json.loads(stored["files"]["ensemble.json"])
        return cls(tuple((str(i), float(m), float(s)) for i, m, s in meta["members"]))


def train_ensemble(
    members: Sequence[TrainedReward],
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    *,
    label_config: LabelConfig,
) -> TrainedReward:
    """The ensemble of models just trained on the same split, to be stored after them (the
    newest model, so `apply` and the reports use it)."""
    ensemble = Ensemble.of(members, ~holdout)
    scores = ensemble.combine([m.scores for m in members])
    label = labels["label"].to_numpy(dtype=float)
    weight = labels["weight"].to_numpy(dtype=float)
    metrics = reward_metrics(scores, label, holdout, battle_pairs(frame, battles, holdout))
    metrics["members"] = {m.model_id: m.metrics for m in members}
    config_record = {"members": [m.model_id for m in members], "labels": asdict(label_config)}
    fingerprint = training_fingerprint(
        frame["id"], label, weight, holdout, training_pairs(frame, battles, holdout, label_config)
    )
    return _version("reward_ensemble", ensemble, config_record, metrics, frame, scores, fingerprint)


def training_fingerprint(
    ids: Sequence[str],
    label: np.ndarray,
    weight: np.ndarray,
    holdout: np.ndarray,
    pairs: Pairs | None,
) -> str:
    """sha256 of what a reward model learnt from: the exchanges, their joint labels and
    weights, the held-out split and the training battles. Two versions with the same
    fingerprint saw the same data; any new log, label or battle changes it."""
    digest = hashlib.sha256("\n".join(ids).encode())
    for array in (label, weight, holdout):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    if pairs is not None:
        for array in (pairs.a, pairs.b, pairs.outcome):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _version(
    kind: str,
    model: SavedModel,
    config: dict[str, Any],
    metrics: dict[str, Any],
    frame: pd.DataFrame,
    scores: np.ndarray,
    fingerprint: str,
) -> TrainedReward:
    """A trained model as a new version to store: its files, config, held-out metrics and the
    fingerprint of its training data, with the scores it gave every exchange."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        files = {
            str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()
        }
    record = NewModel(kind, files, config, metrics, fingerprint, by_exchange(frame, scores))
    return TrainedReward(record, scores, metrics)


def use_external(
    engine: Engine,
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    directory: str,
) -> TrainedReward:
    """Score every exchange with the user's own reward model; measure it on all labels.

    The directory is stored as an absolute path: `score reward apply` and `reward --file`
    load it again, maybe from another folder, where a relative one names nothing."""
    from scoring.reward_model import SequenceClassifierReward

    directory = str(Path(directory).expanduser().resolve())
    scores = SequenceClassifierReward(directory).score(
        list(frame["prompt"]), list(frame["response"].fillna(""))
    )
    everything = np.ones(len(frame), dtype=bool)
    metrics = reward_metrics(
        scores,
        labels["label"].to_numpy(dtype=float),
        everything,
        battle_pairs(frame, battles, everything),
    )
    record = NewModel(
        "reward_external",
        files={"source.txt": directory.encode()},
        config={"directory": directory},
        metrics=metrics,
        scores=by_exchange(frame, scores),
    )
    return TrainedReward(record, scores, metrics)


def stored_rewards(
    engine: Engine,
    frame: pd.DataFrame,
    *,
    model_id: str | None = None,
    embed: EmbedConfig | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """A stored reward model (the newest by default) and its rewards for the frame's stored
    exchanges (`id`, `prompt`, `response`), one per row, not stored: `score reward apply`
    stores them together with the reports they re-rank (`scoring.step.apply_reward`)."""
    stored = _stored_reward(engine, model_id)
    texts = frame[["id", "prompt", "response"]].assign(response=frame["response"].fillna(""))
    scores = _model_scores(engine, stored, lambda one: _stored_scores(engine, one, texts, embed))
    return stored, scores


def _model_scores(
    engine: Engine, stored: dict[str, Any], score_one: Callable[[dict[str, Any]], np.ndarray]
) -> np.ndarray:
    """A stored model's rewards from `score_one`; an ensemble's from its stored members."""
    if stored["kind"] != "reward_ensemble":
        return score_one(stored)
    ensemble = Ensemble.load(stored)
    return ensemble.combine(
        [score_one(_stored_reward(engine, member)) for member, _, _ in ensemble.members]
    )


def _stored_scores(
    engine: Engine, stored: dict[str, Any], frame: pd.DataFrame, embed: EmbedConfig | None
) -> np.ndarray:
    """One stored (non-ensemble) model's rewards for the frame's stored exchanges."""
    if stored["kind"] == "reward_head":

        def vectors() -> tuple[np.ndarray, np.ndarray]:
            config = embed_config_for(stored["config"].get("encoder") or DEFAULT_ENCODER, embed)
            prompts, responses, _ = exchange_embeddings(engine, list(frame["id"]), config)
            return prompts, responses

        return _head(stored).score(head_inputs(frame, _head_features(stored), vectors))
    texts = model_prompts(engine, frame) if stored["kind"] == "reward_finetuned" else None
    prompts = texts or frame["prompt"].fillna("").tolist()
    return _text_scorer(stored).score(prompts, list(frame["response"]))


def score_texts(
    engine: Engine | None,
    prompts: list[str],
    responses: list[str],
    *,
    reward_model_dir: str | None = None,
) -> tuple[np.ndarray, str]:
    """Rewards for (prompt, response) pairs from a file: the newest stored reward model (of
    any kind), or a user's model directory (no database needed: `engine` may be None).

    Each distinct pair is scored once and its reward given to every copy: scored at two
    places of a batch, the same pair came out some 1e-7 apart (float32 batch arithmetic), so
    a battle of two identical answers preferred one of them rather than a tie."""
    given = list(zip(prompts, responses, strict=True))
    unique = list(dict.fromkeys(given))
    prompts, responses = [p for p, _ in unique], [r for _, r in unique]
    if reward_model_dir:
        from scoring.reward_model import SequenceClassifierReward

        scorer = SequenceClassifierReward(reward_model_dir)
        scores, model = np.asarray(scorer.score(prompts, responses)), reward_model_dir
    elif engine is None:
        raise ValueError("scoring with a stored reward model needs its database")
    else:
        stored = _stored_reward(engine, None)
        scores = _model_scores(engine, stored, lambda one: _file_scores(one, prompts, responses))
        model = stored["id"]
    at = {pair: i for i, pair in enumerate(unique)}
    return scores[[at[pair] for pair in given]], model


def _file_scores(stored: dict[str, Any], prompts: list[str], responses: list[str]) -> np.ndarray:
    """One stored (non-ensemble) model's rewards for texts that are not stored."""
    if stored["kind"] != "reward_head":
        return _text_scorer(stored).score(prompts, responses)
    from ingest.embed import load_embedder

    def vectors() -> tuple[np.ndarray, np.ndarray]:
        config = embed_config_for(stored["config"].get("encoder") or DEFAULT_ENCODER)
        embedder = load_embedder(config.model, fast=config.fast)
        return embedder.embed(prompts), embedder.embed(responses)

    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    return _head(stored).score(head_inputs(frame, _head_features(stored), vectors))


def model_prompts(engine: Engine, frame: pd.DataFrame) -> list[str]:
    """What a text reward model reads as the prompt: the end of the earlier turns, then it."""
    tails: dict[str, str] = {}
    wanted = set(frame["id"])
    for batch in iter_exchanges(engine, columns=("id", "context")):
        for row in batch:
            if row["id"] in wanted and row["context"] and row["context"] != "[]":
                turns = json.loads(row["context"])
                text = "\n".join(f"{m['role']}: {m['content']}" for m in turns)
                tails[row["id"]] = text[-_CONTEXT_CHARS:]
    return [
        join_context(tails.get(i), p) for i, p in zip(frame["id"], frame["prompt"], strict=True)
    ]


def reward_metrics(
    scores: np.ndarray, label: np.ndarray, holdout: np.ndarray, pairs: Pairs | None
) -> dict[str, Any]:
    """Held-out engagement AUC and pairwise battle accuracy."""
    from sklearn.metrics import roc_auc_score

    metrics: dict[str, Any] = {"held_out_exchanges": int(holdout.sum())}
    known = holdout & ~np.isnan(label)
    binary = label[known] >= 0.5
    if known.any() and 0 < binary.sum() < len(binary):
        metrics["engagement_auc"] = float(roc_auc_score(binary, scores[known]))
        metrics["held_out_labels"] = int(known.sum())  # how far to trust the AUC
    if pairs is not None:
        decided = pairs.outcome != 0.5
        if decided.any():
            gap = scores[pairs.a[decided]] - scores[pairs.b[decided]]
            a_won = pairs.outcome[decided] == 1.0
            metrics["battle_pairwise_accuracy"] = agreeing_share(gap, a_won)
            metrics["held_out_battles"] = int(decided.sum())
    return metrics


def _stored_reward(engine: Engine, model_id: str | None) -> dict[str, Any]:
    stored = (
        latest_model(engine, REWARD_KINDS) if model_id is None else load_model(engine, model_id)
    )
    if stored is None and model_id is not None:
        ids = model_ids(engine, REWARD_KINDS)
        listed = f"stored, newest first: {', '.join(ids[:5])}" if ids else "none is stored"
        raise ValueError(f"no stored reward model {model_id!r} ({listed})")
    if stored is None:
        raise ValueError("no reward model yet: run `convoscope score` (or pass --reward-model DIR)")
    if stored["kind"] not in REWARD_KINDS:
        raise ValueError(f"model {model_id} is a {stored['kind']}, not a reward model")
    return stored


def _head_features(stored: dict[str, Any]) -> str:
    return stored["config"].get("features", "lengths")


def _head(stored: dict[str, Any]) -> RewardHead:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in stored["files"].items():
            (Path(tmp) / name).write_bytes(data)
        return RewardHead.load(tmp)


def _text_scorer(stored: dict[str, Any]) -> TextScorer:
    """A fine-tuned or lexical model unpacked from the database, or the user's directory it
    names."""
    from scoring.reward_model import SequenceClassifierReward, TransformerReward

    if stored["kind"] == "reward_external":
        return SequenceClassifierReward(stored["config"]["directory"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in stored["files"].items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if stored["kind"] == "reward_lexical":
            return LexicalReward.load(tmp)
        return TransformerReward.load(tmp)


def by_exchange(frame: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    """A model's scores by exchange id, as storage takes them."""
    return dict(zip(frame["id"], scores.tolist(), strict=True))
