"""The score step: behaviour labels → reward model → per-exchange rewards → cluster reports.

1. Labels are mined from stored signals (`scoring.labels`) and battle outcomes.
2. The reward model (the cheap mode: a head on stored prompt and response embeddings) is
   trained on 80 % of conversations and judged on the rest (engagement AUC, battle pairwise
   accuracy); it scores every exchange, and is stored with its config and metrics.
3. The expert win predictor learns P(expert wins | prompt) from battles and single-expert
   logs; it is stored too, and `route` uses it.
4. Every cluster of the latest run gets a report: reward mean with a bootstrap CI, behaviour
   rates, a Bradley–Terry leaderboard of its battles, a routing suggestion and its weakness.
Re-running replaces the reports and adds a new model version; nothing earlier is lost.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from ingest.embed_step import EmbedConfig, embed_exchanges, exchange_texts
from scoring.bradley_terry import BTConfig, leaderboard
from scoring.labels import LabelConfig, joint_labels
from scoring.predictor import PredictorConfig, WinPredictor
from scoring.reward_head import HeadConfig, Pairs, RewardHead, head_features, simple_features
from scoring.routing import RoutingConfig, cluster_routes, routing_table
from scoring.weakness import WeaknessConfig, rank_clusters
from storage.clusters import latest_run, load_assignments, load_clusters
from storage.logs import iter_exchanges, load_battles
from storage.models import latest_model, save_model
from storage.reports import save_cluster_reports
from storage.scores import store_scores
from storage.vectors import load_vectors

SIGNAL_COLUMNS = (
    "id",
    "conversation_id",
    "model",
    "prompt",
    "response",
    "retried",
    "edited",
    "rating",
    "thumbs",
    "user_turns_after",
    "ended_conversation",
)


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    on: str = "prompt"  # which clustering's clusters get reports
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    leaderboard: BTConfig = field(default_factory=lambda: BTConfig(n_bootstrap=100))
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    holdout_share: float = 0.2
    seed: int = 0
    reward_model_dir: str | None = None  # a user's own sequence-classification reward model


def score_all(engine: Engine, *, config: ScoreConfig) -> dict[str, Any]:
    """Train, apply and report; returns label counts, model ids and held-out metrics."""
    frame = _exchange_frame(engine)
    if frame.empty:
        raise ValueError("no exchanges stored: ingest some first")
    battles = pd.DataFrame(load_battles(engine))
    frame = _with_battle_outcomes(frame, battles)
    labels = joint_labels(frame, config.labels)
    prompts, responses, encoder = _embeddings(engine, frame, config.embed)
    features = head_features(
        prompts,
        responses,
        simple_features(
            frame["response"].str.len().to_numpy(), frame["prompt"].str.len().to_numpy()
        ),
    )
    holdout = _holdout(frame["conversation_id"], config.holdout_share, config.seed)
    if config.reward_model_dir:
        reward_id, rewards, reward_metrics = _own_reward(
            engine, frame, labels.frame, battles, config
        )
    else:
        reward_id, rewards, reward_metrics = _reward(
            engine, frame, features, labels.frame, battles, holdout, config, encoder
        )
    result: dict[str, Any] = {
        "exchanges": len(frame),
        "labels": labels.counts,
        "reward_model": reward_id,
        "reward_metrics": reward_metrics,
    }
    predictor = _predictor(frame, prompts, labels.frame["label"].to_numpy(), battles, config)
    if predictor is not None:
        result["predictor"] = save_model(
            engine,
            "win_predictor",
            files={"predictor.json": json.dumps(predictor.to_dict()).encode()},
            config={"predictor": asdict(config.predictor), "encoder": encoder},
            metrics={"experts": len(predictor.experts)},
        )
    result["clusters"] = _cluster_reports(
        engine, frame, rewards, prompts, predictor, battles, config
    )
    return result


def _exchange_frame(engine: Engine) -> pd.DataFrame:
    rows = [r for batch in iter_exchanges(engine, columns=SIGNAL_COLUMNS) for r in batch]
    return pd.DataFrame(rows, columns=list(SIGNAL_COLUMNS))


def _with_battle_outcomes(frame: pd.DataFrame, battles: pd.DataFrame) -> pd.DataFrame:
    """Add `battle_wins`/`battle_count` per exchange (ties count half) for the labels."""
    wins: dict[str, float] = {}
    count: dict[str, int] = {}
    for row in battles.itertuples() if not battles.empty else ():
        for exchange, won in (
            (row.exchange_a, row.winner == "a"),
            (row.exchange_b, row.winner == "b"),
        ):
            wins[exchange] = wins.get(exchange, 0.0) + (0.5 if row.winner == "tie" else float(won))
            count[exchange] = count.get(exchange, 0) + 1
    frame = frame.copy()
    frame["battle_wins"] = frame["id"].map(wins)
    frame["battle_count"] = frame["id"].map(count)
    return frame


def _embeddings(
    engine: Engine, frame: pd.DataFrame, embed: EmbedConfig
) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompt and response vectors of every exchange, in `frame` order (embedding what is new)."""
    matrices = []
    name = ""
    for on in ("prompt", "response"):
        config = EmbedConfig(**{**asdict(embed), "on": on})
        name = embed_exchanges(engine, config=config).model
        by_id = {item.exchange_id: item.text_hash for item in exchange_texts(engine, on=on)}
        matrices.append(load_vectors(engine, name, [by_id[i] for i in frame["id"]]))
    return matrices[0], matrices[1], name


def _holdout(groups: pd.Series, share: float, seed: int) -> np.ndarray:
    """A boolean mask holding out whole conversations, so no conversation leaks across."""
    unique = groups.unique()
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, int(len(unique) * share)), replace=False))
    return groups.isin(held).to_numpy()


def _battle_pairs(frame: pd.DataFrame, battles: pd.DataFrame, keep: np.ndarray) -> Pairs | None:
    if battles.empty:
        return None
    index = {exchange_id: i for i, exchange_id in enumerate(frame["id"])}
    decided = battles[battles["winner"].isin(["a", "b", "tie"])]
    a = decided["exchange_a"].map(index).to_numpy()
    b = decided["exchange_b"].map(index).to_numpy()
    mask = keep[a] & keep[b]
    if not mask.any():
        return None
    outcome = decided["winner"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy()
    return Pairs(a=a[mask], b=b[mask], outcome=outcome[mask])


def _reward(
    engine: Engine,
    frame: pd.DataFrame,
    features: np.ndarray,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    holdout: np.ndarray,
    config: ScoreConfig,
    encoder: str,
) -> tuple[str, np.ndarray, dict[str, Any]]:
    """Train the reward head on the training conversations, measure it on the held-out ones."""
    label = labels["label"].to_numpy(dtype=float)
    weight = labels["weight"].to_numpy(dtype=float)
    train_labels = np.where(holdout, np.nan, label)
    head = RewardHead(config.head).fit(
        features, labels=train_labels, weights=weight, pairs=_battle_pairs(frame, battles, ~holdout)
    )
    scores = head.score(features)
    metrics = _reward_metrics(scores, label, holdout, _battle_pairs(frame, battles, holdout))
    with tempfile.TemporaryDirectory() as tmp:
        head.save(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    model_id = save_model(
        engine,
        "reward_head",
        files=files,
        config={"head": asdict(config.head), "labels": asdict(config.labels), "encoder": encoder},
        metrics=metrics,
        data_fingerprint=str(len(frame)),
    )
    store_scores(engine, f"reward:{model_id}", dict(zip(frame["id"], scores.tolist(), strict=True)))
    return model_id, scores, metrics


def _own_reward(
    engine: Engine,
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> tuple[str, np.ndarray, dict[str, Any]]:
    """Score every exchange with the user's own reward model; measure it on all labels."""
    from scoring.reward_model import SequenceClassifierReward

    assert config.reward_model_dir is not None
    model = SequenceClassifierReward(config.reward_model_dir)
    scores = model.score(list(frame["prompt"]), list(frame["response"]))
    everything = np.ones(len(frame), dtype=bool)
    metrics = _reward_metrics(
        scores,
        labels["label"].to_numpy(dtype=float),
        everything,
        _battle_pairs(frame, battles, everything),
    )
    model_id = save_model(
        engine,
        "reward_external",
        files={"source.txt": config.reward_model_dir.encode()},
        config={"directory": config.reward_model_dir},
        metrics=metrics,
    )
    store_scores(engine, f"reward:{model_id}", dict(zip(frame["id"], scores.tolist(), strict=True)))
    return model_id, scores, metrics


def score_texts(
    engine: Engine, prompts: list[str], responses: list[str], *, reward_model_dir: str | None = None
) -> tuple[np.ndarray, str]:
    """Rewards for (prompt, response) pairs from a file: the stored head, or a user's model."""
    if reward_model_dir:
        from scoring.reward_model import SequenceClassifierReward

        return SequenceClassifierReward(reward_model_dir).score(
            prompts, responses
        ), reward_model_dir
    stored = latest_model(engine, "reward_head")
    if stored is None:
        raise ValueError("no reward model yet: run `convoscope score` (or pass --reward-model DIR)")
    from ingest.embed import load_embedder

    encoder = stored["config"].get("encoder", "all-MiniLM-L6-v2")
    embedder = load_embedder(None if encoder == "all-MiniLM-L6-v2" else encoder)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in stored["files"].items():
            (Path(tmp) / name).write_bytes(data)
        head = RewardHead.load(tmp)
    extra = simple_features(
        np.array([len(r) for r in responses]), np.array([len(p) for p in prompts])
    )
    features = head_features(embedder.embed(prompts), embedder.embed(responses), extra)
    return head.score(features), stored["id"]


def _reward_metrics(
    scores: np.ndarray, label: np.ndarray, holdout: np.ndarray, pairs: Pairs | None
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    metrics: dict[str, Any] = {"held_out_exchanges": int(holdout.sum())}
    known = holdout & ~np.isnan(label)
    binary = label[known] >= 0.5
    if known.any() and 0 < binary.sum() < len(binary):
        metrics["engagement_auc"] = float(roc_auc_score(binary, scores[known]))
    if pairs is not None:
        decided = pairs.outcome != 0.5
        if decided.any():
            a_better = scores[pairs.a[decided]] > scores[pairs.b[decided]]
            metrics["battle_pairwise_accuracy"] = float(
                np.mean(a_better == (pairs.outcome[decided] == 1.0))
            )
            metrics["held_out_battles"] = int(decided.sum())
    return metrics


def _predictor(
    frame: pd.DataFrame,
    prompts: np.ndarray,
    label: np.ndarray,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> WinPredictor | None:
    """Fit the expert win predictor, or None when the logs name fewer than two experts."""
    if frame["model"].dropna().nunique() < 2:
        return None
    index = {exchange_id: i for i, exchange_id in enumerate(frame["id"])}
    battle_rows = pd.DataFrame(columns=["prompt_index", "model_a", "model_b", "winner"])
    if not battles.empty:
        battle_rows = pd.DataFrame(
            {
                "prompt_index": battles["exchange_a"].map(index),
                "model_a": battles["model_a"],
                "model_b": battles["model_b"],
                "winner": battles["winner"],
            }
        ).dropna(subset=["model_a", "model_b"])
    in_battle = (
        set(battles["exchange_a"]) | set(battles["exchange_b"]) if not battles.empty else set()
    )
    single = frame["model"].notna() & ~frame["id"].isin(in_battle)
    singles = pd.DataFrame(
        {
            "prompt_index": np.flatnonzero(single.to_numpy()),
            "model": frame.loc[single, "model"].to_numpy(),
            "label": label[single.to_numpy()],
        }
    )
    return WinPredictor(config.predictor).fit(prompts, battles=battle_rows, singles=singles)


def _cluster_reports(
    engine: Engine,
    frame: pd.DataFrame,
    rewards: np.ndarray,
    prompts: np.ndarray,
    predictor: WinPredictor | None,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> int:
    """Write one report per topic of the latest run; returns how many were written."""
    run = latest_run(engine, on_field=config.on)
    if run is None:
        return 0
    assignment = load_assignments(engine, run["id"])
    cluster_of = frame["id"].map(assignment)
    assigned = cluster_of.notna().to_numpy()
    data = frame.loc[assigned, ["retried", "edited", "ended_conversation", "model"]].copy()
    data["cluster_id"] = cluster_of[assigned].to_numpy()
    data["reward"] = rewards[assigned]
    if data.empty:
        return 0
    weakness = {w.cluster_id: w for w in rank_clusters(data, config=WeaknessConfig())}
    routes = {}
    if predictor is not None:
        routed = cluster_routes(
            predictor,
            prompts[assigned],
            data["cluster_id"].to_numpy(),
            served_by=data["model"].fillna("").to_numpy(),
            config=config.routing,
        )
        routes = {r.cluster_id: r for r in routed}
    reports: dict[str, dict[str, Any]] = {}
    for cluster_id, w in weakness.items():
        route = routes.get(cluster_id)
        served = data.loc[data["cluster_id"] == cluster_id, "model"].value_counts(normalize=True)
        reports[cluster_id] = {
            "n": w.n,
            "share": w.traffic_share,
            "reward_mean": w.mean_reward,
            "reward_ci": [w.reward_lower, w.reward_upper],
            "retry_rate": w.retry_rate,
            "edit_rate": w.edit_rate,
            "end_rate": w.end_rate,
            "weakness": w.weakness,
            "reason": w.reason,
            "leaderboard": _cluster_leaderboard(battles, assignment, cluster_id, config),
            "routing": None
            if route is None
            else {
                "best_expert": route.best_expert,
                "predicted_win_rate": route.best_win_rate,
                "served_by": {str(k): float(v) for k, v in served.items() if k},
                "gain": route.gain,
                "cheapest_within_tolerance": route.cheapest_expert,
            },
        }
    save_cluster_reports(engine, run["id"], reports)
    if predictor is not None and routes:
        topics = {c["id"]: c for c in load_clusters(engine, run["id"]) if c["level"] == 0}
        centroids = {
            cid: np.frombuffer(topics[cid]["centroid"], dtype="<f4")
            for cid in routes
            if cid in topics
        }
        table = routing_table(
            predictor,
            list(routes.values()),
            centroids,
            encoder=run["embedder"],
            config=config.routing,
        )
        save_model(
            engine,
            "routing_table",
            files={"routing_table.json": json.dumps(table).encode()},
            config={"run_id": run["id"]},
            metrics={"clusters": len(routes)},
        )
    return len(reports)


def _cluster_leaderboard(
    battles: pd.DataFrame, assignment: dict[str, str | None], cluster_id: str, config: ScoreConfig
) -> list[dict[str, Any]]:
    """Bradley–Terry on the battles whose prompt falls in the cluster (empty below the minimum)."""
    if battles.empty:
        return []
    mine = battles[battles["exchange_a"].map(assignment) == cluster_id]
    if len(mine) < config.leaderboard.min_battles:
        return []
    board = leaderboard(mine, config=config.leaderboard)
    return [
        {
            "model": r.model,
            "elo": r.rating,
            "ci": [r.lower, r.upper],
            "battles": r.battles,
            "rank": r.rank,
            "tied_with": list(r.tied_with),
            "win_rate": r.wins / r.battles if r.battles else None,
        }
        for r in board.ratings
    ]


def load_predictor(engine: Engine) -> tuple[WinPredictor, str]:
    """The newest stored win predictor and the embedder its prompts must be encoded with."""
    stored = latest_model(engine, "win_predictor")
    if stored is None:
        raise ValueError("no win predictor yet: run `convoscope score` on logs naming 2+ models")
    data = json.loads(stored["files"]["predictor.json"])
    return WinPredictor.from_dict(data), stored["config"]["encoder"]


def load_routing_table(engine: Engine) -> dict[str, Any]:
    stored = latest_model(engine, "routing_table")
    if stored is None:
        raise ValueError("no routing table yet: run `convoscope cluster` then `convoscope score`")
    return json.load(io.BytesIO(stored["files"]["routing_table.json"]))
