"""The score step: behaviour labels → reward model → per-exchange rewards → cluster reports.

1. Labels are mined from stored signals (`scoring.labels`) and battle outcomes.
2. The reward model (scoring.reward_step: by default a head on stored prompt and response
   embeddings, or a fine-tuned transformer) is trained on 80 % of conversations and judged
   on the rest (engagement AUC, battle pairwise accuracy); it scores every exchange, and is
   stored with its config and metrics.
3. The expert win predictor learns P(expert wins | prompt) from battles and single-expert
   logs; it is stored too, and `route` uses it.
4. Every cluster of the latest run gets a report: reward mean with a bootstrap CI, behaviour
   rates, a Bradley–Terry leaderboard of its battles and the predictor's estimate, a routing
   suggestion and its weakness.
   Every parent group gets one too, from its exchanges (not its topics' means), ranked the
   same way, with its weakest topics, so a broad area that goes badly shows up as one line.
Re-running replaces the reports and adds a new model version; nothing earlier is lost. What
one run made is stored at its end, in one transaction (`storage.reports.save_scored`), so a
stopped `score` leaves the previous one's results whole.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from ingest.embed_step import EmbedConfig
from scoring.bradley_terry import BTConfig, leaderboard, predicted_battles
from scoring.features import prompt_features
from scoring.labels import LabelConfig, joint_labels, rating_scale_warning, source_flag
from scoring.predictor import PredictorConfig, WinPredictor
from scoring.reward_head import STRUCTURAL_HEAD, HeadConfig
from scoring.reward_lexical import LexicalConfig
from scoring.reward_model import FineTuneConfig
from scoring.reward_step import (
    DEFAULT_MODE,
    TrainedReward,
    by_exchange,
    embedded_hashes,
    exchange_embeddings,
    reward_members,
    stored_rewards,
    train_ensemble,
    train_finetuned,
    train_head,
    train_lexical,
    use_external,
)
from scoring.routing import (
    ClusterRoute,
    RoutingConfig,
    cluster_routes,
    prompt_centroids,
    routing_table,
)
from scoring.weakness import ClusterWeakness, WeaknessConfig, rank_clusters
from storage.clusters import latest_run, load_assignments, load_clusters
from storage.logs import iter_exchanges, load_battles
from storage.models import NewModel, latest_model, model_ids
from storage.reports import SCORER_KEY, load_cluster_reports, save_scored
from storage.vectors import load_vectors

WEAKEST_TOPICS = 3  # a group report names this many of its weakest topics
# Prompts of a topic (a seeded sample) the predictor scores for its leaderboard's estimate:
# plenty for the few battles drawn from them, and a 100K-row topic costs no more than this.
ESTIMATE_PROMPTS = 256
_NO_GROUP = ""  # stands for "no parent group" (never a cluster id) while groups are ranked

SIGNAL_COLUMNS = (
    "id",
    "conversation_id",
    "model",
    "source",
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
    head: HeadConfig = STRUCTURAL_HEAD
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    leaderboard: BTConfig = field(default_factory=lambda: BTConfig(n_bootstrap=100))
    # Battles' worth of the win predictor's estimate per expert in each leaderboard (0 = the
    # judged battles alone): as many as a ranked expert needs, so a topic without battles
    # still ranks its experts, and a few dozen judged battles outweigh the estimate.
    predicted_battles: int = 10
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    holdout_share: float = 0.2
    seed: int = 0
    # Reward members, joined by + (scoring.reward_step.reward_members): head (on the answers'
    # structure), lexical (word n-grams), finetune (the transformer); ensemble = all three.
    mode: str = DEFAULT_MODE
    lexical: LexicalConfig = field(default_factory=LexicalConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    reward_model_dir: str | None = None  # a user's own sequence-classification reward model
    costs: dict[str, float] | None = None  # per expert (any unit): enables the cheapest choice
    route_cheapest: bool = False  # the routing table picks the cheapest within tolerance


@dataclass(frozen=True, slots=True)
class _Routed:
    """The per-cluster routes of one clustering and its clusters' prompt centroids."""

    run_id: str
    routes: list[ClusterRoute]
    centroids: dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class ReportCounts:
    """How many reports a step wrote: one per topic, one per parent group."""

    topics: int = 0
    groups: int = 0

    def as_dict(self) -> dict[str, int]:
        """The summary's keys (`clusters` counts topics, as it always has)."""
        return {"clusters": self.topics, "groups": self.groups}


@dataclass(frozen=True, slots=True)
class _RunReports:
    """Reports of one clustering run (cluster id → payload), made but not stored yet; no run
    when there was nothing clustered to report on."""

    run_id: str | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: ReportCounts = ReportCounts()


def score_all(engine: Engine, *, config: ScoreConfig) -> dict[str, Any]:
    """Train, apply and report; returns label counts, model ids and held-out metrics."""
    frame = _exchange_frame(engine)
    if frame.empty:
        raise ValueError("no exchanges stored: ingest some first")
    battles = pd.DataFrame(load_battles(engine))
    frame = _with_battle_outcomes(frame, battles)
    labels = joint_labels(frame, config.labels)
    prompt_hashes, encoder = embedded_hashes(engine, list(frame["id"]), config.embed, "prompt")
    trained = train_reward(engine, frame, labels.frame, battles, config)
    reward = trained[-1]
    warnings = [w for w in (rating_scale_warning(frame, config.labels),) if w]
    result: dict[str, Any] = {
        "exchanges": len(frame),
        "labels": labels.counts,
        "mode": "external" if config.reward_model_dir else config.mode,
        "reward_model": reward.model_id,
        "reward_metrics": reward.metrics,
        "warnings": warnings,
    }
    # The prompts' features, computed once: the predictor and every cluster's routing read them.
    prompt_feats = prompt_features(frame["prompt"].fillna(""))
    # Nothing past here reads a text, and nothing before read a prompt's vector: at 100K
    # exchanges the texts and the vectors held together cost 200 MB of the peak.
    frame = frame.drop(columns=["prompt", "response"])
    prompts = load_vectors(engine, encoder, prompt_hashes)
    del prompt_hashes
    predictor = _predictor(
        frame, prompts, prompt_feats, labels.frame["label"].to_numpy(), battles, config
    )
    if predictor is not None:
        unknown = sorted(set(config.costs or ()) - set(predictor.experts))
        if unknown:  # a typo would otherwise leave that expert silently without a cost
            warnings.append(
                f"--costs names experts the predictor does not know: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(predictor.experts))})"
            )
    reports, routed = _cluster_reports(
        engine,
        frame,
        _Rewards(reward.scores, f"reward:{reward.model_id}"),
        prompts,
        prompt_feats,
        predictor,
        battles,
        config,
    )
    later = [] if predictor is None else _predictor_records(predictor, routed, encoder, config)
    # One transaction: a `score` stopped anywhere leaves the previous one's results whole.
    models = [*(t.record for t in trained), *later]
    save_scored(engine, reports.run_id, reports.reports, models=models)
    if later:
        result["predictor"] = later[0].id
    return {**result, **reports.counts.as_dict()}


def train_reward(
    engine: Engine,
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> list[TrainedReward]:
    """The reward model `config` asks for, trained (or loaded) and applied to every row of
    `frame`, not stored yet: the last is the one that scores, after the members of its
    ensemble. Responses are embedded only for a head whose feature set reads them."""
    if config.reward_model_dir:
        return [use_external(engine, frame, labels, battles, config.reward_model_dir)]
    return _train_members(engine, frame, labels, battles, config)


def _train_members(
    engine: Engine,
    frame: pd.DataFrame,
    labels: pd.DataFrame,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> list[TrainedReward]:
    """The members `--mode` names, each trained on the same split, then their ensemble when
    there are several (last: the one `apply` and the reports use)."""
    holdout = _holdout(frame, battles, config.holdout_share, config.seed)
    members: list[TrainedReward] = []
    for name in reward_members(config.mode):
        if name == "head":
            trained = train_head(
                frame,
                lambda: exchange_embeddings(engine, list(frame["id"]), config.embed),
                labels,
                battles,
                holdout,
                config=config.head,
                label_config=config.labels,
            )
        elif name == "lexical":
            trained = train_lexical(
                frame, labels, battles, holdout, config=config.lexical, label_config=config.labels
            )
        else:
            trained = train_finetuned(
                engine,
                frame,
                labels,
                battles,
                holdout,
                config=config.finetune,
                label_config=config.labels,
            )
        members.append(trained)
    if len(members) == 1:
        return members
    ensemble = train_ensemble(members, frame, labels, battles, holdout, label_config=config.labels)
    return [*members, ensemble]


def train_reward_only(engine: Engine, *, config: ScoreConfig) -> dict[str, Any]:
    """`convoscope score reward train`: labels → reward model → every exchange scored."""
    frame = _exchange_frame(engine)
    if frame.empty:
        raise ValueError("no exchanges stored: ingest some first")
    battles = pd.DataFrame(load_battles(engine))
    labels = joint_labels(_with_battle_outcomes(frame, battles), config.labels)
    trained = train_reward(engine, frame, labels.frame, battles, config)
    reward = trained[-1]
    rewards = _Rewards(reward.scores, f"reward:{reward.model_id}")
    reports = _refreshed_reports(engine, frame, rewards, battles, config)
    save_scored(engine, reports.run_id, reports.reports, models=[t.record for t in trained])
    return {
        "exchanges": len(frame),
        "labels": labels.counts,
        "mode": "external" if config.reward_model_dir else config.mode,
        "reward_model": reward.model_id,
        "reward_metrics": reward.metrics,
        "warnings": [w for w in (rating_scale_warning(frame, config.labels),) if w],
        **reports.counts.as_dict(),
    }


def apply_reward(
    engine: Engine, *, config: ScoreConfig, model_id: str | None = None
) -> dict[str, Any]:
    """`convoscope score reward apply`: a stored reward model (the newest by default) scores
    every exchange again, and the cluster reports are re-ranked by those scores (mean, CI,
    weakness and its reason; routing and leaderboards do not depend on rewards and are kept
    as `score` made them).

    The scores and the reports are stored as one: stored one after the other, an apply
    stopped between them left the cluster table ranked by the previous model beside the new
    one's rewards."""
    frame = _exchange_frame(engine)
    if frame.empty:
        raise ValueError("no exchanges stored: ingest some first")
    stored, scores = stored_rewards(engine, frame, model_id=model_id, embed=config.embed)
    rewards = _Rewards(scores, f"reward:{stored['id']}")
    battles = pd.DataFrame(load_battles(engine))
    reports = _refreshed_reports(engine, frame, rewards, battles, config)
    given = {rewards.scorer: by_exchange(frame, scores)}
    save_scored(engine, reports.run_id, reports.reports, scores=given)
    return {
        "reward_model": stored["id"],
        "kind": stored["kind"],
        "exchanges": len(frame),
        "scorer": rewards.scorer,
        "mean_reward": float(np.mean(scores)),
        **reports.counts.as_dict(),
    }


def _refreshed_reports(
    engine: Engine,
    frame: pd.DataFrame,
    rewards: _Rewards,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> _RunReports:
    """The latest run's reports re-ranked by rewards in hand (one per row of `frame`), not
    stored yet; groups are re-ranked too, so their figures never lag their topics'."""
    run = latest_run(engine, on_field=config.on)
    if run is None or frame.empty:
        return _RunReports()
    assignment = load_assignments(engine, run["id"])
    data = _cluster_data(frame, rewards.values, assignment)
    if data.empty:
        return _RunReports()
    before = load_cluster_reports(engine, run["id"], level=None)
    ranked = rank_clusters(data, config=WeaknessConfig())
    parent_of = _parents(engine, run["id"])
    battle_topic, battle_group = _battle_places(battles, assignment, parent_of)
    reports = {}
    for w in ranked:
        kept = before.get(w.cluster_id) or {
            "leaderboard": _leaderboard_of(battles[battle_topic == w.cluster_id], config),
            "routing": None,
        }
        reports[w.cluster_id] = {**kept, **_reward_figures(w)}
    groups = group_reports(data, parent_of, ranked)
    for group_id, figures in groups.items():
        kept = before.get(group_id) or {
            "leaderboard": _leaderboard_of(battles[battle_group == group_id], config)
        }
        reports[group_id] = {**kept, **figures}
    counts = ReportCounts(topics=len(ranked), groups=len(groups))
    return _RunReports(run["id"], _stamped(reports, rewards.scorer), counts)


def _cluster_data(
    frame: pd.DataFrame, rewards: np.ndarray, assignment: dict[str, str | None]
) -> pd.DataFrame:
    """The assigned exchanges' behaviour signals, model, cluster and reward, indexed by their
    row positions in `frame`."""
    cluster_of = frame["id"].map(assignment).to_numpy()
    rows = np.flatnonzero(pd.notna(cluster_of))
    columns = ["retried", "edited", "ended_conversation", "model", "conversation_id"]
    data = frame.iloc[rows][columns].set_axis(rows)
    for flag in ("retried", "edited"):  # as the labels read them: per source
        data[flag] = source_flag(frame, flag).to_numpy()[rows]
    data["cluster_id"] = cluster_of[rows]
    data["reward"] = rewards[rows]
    return data


def group_reports(
    data: pd.DataFrame,
    parent_of: Mapping[str, str | None],
    topics: Sequence[ClusterWeakness],
) -> dict[str, dict[str, Any]]:
    """Each parent group's reward figures, weakness and weakest topics (group id → payload).

    The group's exchanges are ranked by `rank_clusters` exactly as topics are, over the same
    rows: the CI is bootstrapped over the group's exchanges (a mean of topic means would
    weigh a 20-row topic like a 2,000-row one), and shares, the overall mean and the overall
    rates are over all assigned exchanges, so a group's weakness is on the topics' scale.
    `data` is `_cluster_data`'s frame (topic ids in `cluster_id`), `parent_of` maps topic →
    group, and `topics` is the topics' ranking, weakest first."""
    if data.empty:
        return {}
    grouped = data.assign(
        cluster_id=data["cluster_id"].map(lambda t: parent_of.get(t) or _NO_GROUP)
    )
    children: dict[str, list[ClusterWeakness]] = {}
    for topic in topics:  # already weakest first
        parent = parent_of.get(topic.cluster_id)
        if parent:
            children.setdefault(parent, []).append(topic)
    reports = {}
    for w in rank_clusters(grouped, config=WeaknessConfig()):  # the topics' settings
        if w.cluster_id == _NO_GROUP:
            continue
        mine = children.get(w.cluster_id, [])
        reports[w.cluster_id] = {
            **_reward_figures(w),
            "topics": len(mine),
            "weakest_topics": [
                {
                    "id": t.cluster_id,
                    "n": t.n,
                    "reward_mean": t.mean_reward,
                    "weakness": t.weakness,
                }
                for t in mine[:WEAKEST_TOPICS]
            ],
            "routing": None,  # routes are chosen per topic; a group has none of its own
        }
    return reports


def _parents(engine: Engine, run_id: str) -> dict[str, str | None]:
    """topic id → its parent group's id, for one run."""
    return {c["id"]: c["parent_id"] for c in load_clusters(engine, run_id) if c["level"] == 0}


@dataclass(frozen=True, slots=True)
class _Rewards:
    """Reward scores, one per row of the frame beside them, and the scorer that wrote them."""

    values: np.ndarray
    scorer: str  # `reward:<model id>`, as stored with the scores


def _stamped(reports: dict[str, dict[str, Any]], scorer: str) -> dict[str, dict[str, Any]]:
    """Every report marked with the scorer its reward figures come from: a `score` stopped
    between storing a new model's scores and rewriting the reports leaves reports that the
    newest scores no longer back, and `clusters` and the UI tell by this mark (`SCORER_KEY`).
    """
    return {cluster_id: {**report, SCORER_KEY: scorer} for cluster_id, report in reports.items()}


def _reward_figures(w: ClusterWeakness) -> dict[str, Any]:
    """The part of a cluster report that follows from its rewards and behaviour signals."""
    return {
        "n": w.n,
        "conversations": w.conversations,
        "share": w.traffic_share,
        "reward_mean": w.mean_reward,
        "reward_ci": [w.reward_lower, w.reward_upper],
        "retry_rate": w.retry_rate,
        "edit_rate": w.edit_rate,
        "end_rate": w.end_rate,
        "weakness": w.weakness,
        "reason": w.reason,
    }


def _exchange_frame(engine: Engine) -> pd.DataFrame:
    """Every exchange's signals and texts, gathered column by column as batches arrive: a
    list of every row's dict before the frame held 12 keys a row (+350 MB at 100K)."""
    columns: dict[str, list[Any]] = {name: [] for name in SIGNAL_COLUMNS}
    for batch in iter_exchanges(engine, columns=SIGNAL_COLUMNS):
        for name, values in columns.items():
            values.extend(row[name] for row in batch)
    return pd.DataFrame(columns)


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


def _holdout(frame: pd.DataFrame, battles: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """A boolean mask holding out whole conversations, so no conversation leaks across, with
    a battle's two answers on one side. Each answer of a battles file is a conversation of its
    own: held out one by one, a battle fell on both sides and counted on neither (of 301
    battles, 13 were held out whole and a third were lost to training and measure alike).
    A single conversation (or battles all linked into one) cannot be split: it was held out
    whole, and training on nothing failed with "no training row has a known signal" of rows
    that had them; it is trained on whole, with no held-out measure."""
    groups = _battle_linked(frame, battles)
    unique = groups.unique()
    if len(unique) < 2:
        return np.zeros(len(frame), dtype=bool)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, int(len(unique) * share)), replace=False))
    return groups.isin(held).to_numpy()


def _battle_linked(frame: pd.DataFrame, battles: pd.DataFrame) -> pd.Series:
    """Each row's conversation, or for an answer in battles, one conversation standing for
    every conversation linked to it through battles: the answers to one prompt are linked
    through the answer they were all judged against, so a prompt's battles stay together."""
    conversation = frame["conversation_id"]
    if battles.empty:
        return conversation
    root: dict[str, str] = {}

    def find(node: str) -> str:
        while root.get(node, node) != node:
            root[node] = root.get(root[node], root[node])  # halve the path
            node = root[node]
        return node

    of = dict(zip(frame["id"], conversation, strict=True))
    for a, b in zip(battles["exchange_a"], battles["exchange_b"], strict=True):
        if a in of and b in of:
            first, second = find(of[a]), find(of[b])
            if first != second:
                root[second] = first
    return conversation.map(find) if root else conversation


def _predictor(
    frame: pd.DataFrame,
    prompts: np.ndarray,
    prompt_feats: np.ndarray,
    label: np.ndarray,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> WinPredictor | None:
    """Fit the expert win predictor, or None when the logs name fewer than two experts or
    none of them has a battle or a labelled answer (replays' answers of a log that names no
    model: no user saw them)."""
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
    if battle_rows.empty and singles["label"].isna().all():
        return None
    return WinPredictor(config.predictor).fit(
        prompts, battles=battle_rows, singles=singles, features=prompt_feats
    )


def _cluster_reports(
    engine: Engine,
    frame: pd.DataFrame,
    rewards: _Rewards,
    prompts: np.ndarray,
    prompt_feats: np.ndarray,
    predictor: WinPredictor | None,
    battles: pd.DataFrame,
    config: ScoreConfig,
) -> tuple[_RunReports, _Routed | None]:
    """One report per topic and one per parent group of the latest run (stored together, so
    re-scoring replaces both), and the topics' routes (None without a predictor or a
    clustered topic)."""
    run = latest_run(engine, on_field=config.on)
    if run is None:
        return _RunReports(), None
    assignment = load_assignments(engine, run["id"])
    data = _cluster_data(frame, rewards.values, assignment)
    if data.empty:
        return _RunReports(), None
    weakness = {w.cluster_id: w for w in rank_clusters(data, config=WeaknessConfig())}
    routes = {} if predictor is None else _routes(predictor, prompts, prompt_feats, data, config)
    reports: dict[str, dict[str, Any]] = {}
    parent_of = _parents(engine, run["id"])
    groups = group_reports(data, parent_of, list(weakness.values()))
    group_of = data["cluster_id"].map(lambda t: parent_of.get(t) or _NO_GROUP)
    battle_topic, battle_group = _battle_places(battles, assignment, parent_of)
    for group_id, figures in groups.items():
        rows = data.index[group_of == group_id]
        estimate = _estimate(predictor, prompts, prompt_feats, rows, config)
        figures["leaderboard"] = _leaderboard_of(
            battles[battle_group == group_id], config, estimate
        )
        reports[group_id] = figures
    for cluster_id, w in weakness.items():
        route = routes.get(cluster_id)
        mine = data["cluster_id"] == cluster_id
        served = data.loc[mine, "model"].value_counts(normalize=True)
        estimate = _estimate(predictor, prompts, prompt_feats, data.index[mine], config)
        reports[cluster_id] = {
            **_reward_figures(w),
            "leaderboard": _leaderboard_of(battles[battle_topic == cluster_id], config, estimate),
            "routing": None
            if route is None
            else {
                "best_expert": route.best_expert,
                "predicted_win_rate": route.best_win_rate,
                "served_by": {str(k): float(v) for k, v in served.items() if k},
                "gain": route.gain,
                "cheapest_within_tolerance": route.cheapest_expert,
                "cheapest_win_rate": route.cheapest_win_rate,
                "cheapest_cost": route.cheapest_cost,
            },
        }
    counts = ReportCounts(topics=len(weakness), groups=len(groups))
    stamped = _RunReports(run["id"], _stamped(reports, rewards.scorer), counts)
    if not routes:
        return stamped, None
    members = {
        str(cid): topic.index.to_numpy()
        for cid, topic in data.groupby(data["cluster_id"].astype(str), sort=True)
    }
    routed = _Routed(run["id"], list(routes.values()), prompt_centroids(prompts, members))
    return stamped, routed


def _predictor_records(
    predictor: WinPredictor,
    routed: _Routed | None,
    encoder: str,
    config: ScoreConfig,
) -> list[NewModel]:
    """The win predictor and its routing table, to store as one whether or not a clustering
    gave the table per-cluster choices. `encoder` embedded the predictor's inputs.

    Apart, `route --export` could write an older predictor's table while `route TEXT` ranked
    with the new one: after `score --on response` with no response clustering (only tables
    with per-cluster choices were stored), or a `score` stopped between the two."""
    stored = NewModel(
        "win_predictor",
        files={"predictor.json": json.dumps(predictor.to_dict()).encode()},
        config={"predictor": asdict(config.predictor), "encoder": encoder},
        metrics={"experts": len(predictor.experts)},
    )
    table = routing_table(
        predictor,
        [] if routed is None else routed.routes,
        {} if routed is None else routed.centroids,
        encoder=encoder,
        config=config.routing,
        use_cheapest=config.route_cheapest,
    )
    run_id = None if routed is None else routed.run_id
    routing = NewModel(
        "routing_table",
        files={"routing_table.json": json.dumps(table).encode()},
        config={"run_id": run_id, "on": config.on, "predictor_id": stored.id},
        metrics={"clusters": len(table["clusters"])},
        run_id=run_id,
    )
    return [stored, routing]


def _routes(
    predictor: WinPredictor,
    prompts: np.ndarray,
    prompt_feats: np.ndarray,
    data: pd.DataFrame,
    config: ScoreConfig,
) -> dict[str, ClusterRoute]:
    """Each topic's route (topic id → route, in id order), one topic's prompt vectors taken
    at a time: the rows of every assigned prompt at once were a copy of nearly all the
    vectors (+1.35 GB of the peak at 1M exchanges). Each topic's route is computed from its
    own rows alone, so it is the same either way."""
    routes = {}
    for _, topic in data.groupby(data["cluster_id"].astype(str), sort=True):
        rows = topic.index.to_numpy()
        (route,) = cluster_routes(
            predictor,
            prompts[rows],
            topic["cluster_id"].to_numpy(),
            served_by=topic["model"].fillna("").to_numpy(),
            costs=config.costs,
            config=config.routing,
            features=prompt_feats[rows],
        )
        routes[route.cluster_id] = route
    return routes


def _estimate(
    predictor: WinPredictor | None,
    prompts: np.ndarray,
    prompt_feats: np.ndarray,
    rows: pd.Index,
    config: ScoreConfig,
) -> pd.DataFrame | None:
    """The predictor's estimate for the leaderboard of the exchanges at `rows` (positions in
    `prompts`): `predicted_battles` on a seeded sample of their prompts, or None without a
    predictor."""
    if predictor is None or not config.predicted_battles or not len(rows):
        return None
    picked = rows.to_numpy()
    if len(picked) > ESTIMATE_PROMPTS:
        rng = np.random.default_rng(config.seed)
        picked = np.sort(rng.choice(picked, ESTIMATE_PROMPTS, replace=False))
    inputs = predictor.inputs(prompts[picked], features=prompt_feats[picked])
    return predicted_battles(
        predictor.experts,
        predictor.scores_of_inputs(inputs),
        per_expert=config.predicted_battles,
        seed=config.seed,
    )


def _battle_places(
    battles: pd.DataFrame, assignment: dict[str, str | None], parent_of: Mapping[str, str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Each battle's topic (its prompt's) and that topic's group, found once for all of a
    run's leaderboards rather than again for each (topics × battles lookups)."""
    if battles.empty:
        return np.array([], dtype=object), np.array([], dtype=object)
    topic = battles["exchange_a"].map(assignment)
    return topic.to_numpy(), topic.map(lambda t: parent_of.get(t)).to_numpy()


def _leaderboard_of(
    mine: pd.DataFrame, config: ScoreConfig, estimate: pd.DataFrame | None = None
) -> list[dict[str, Any]]:
    """The leaderboard rows of a topic's or group's judged battles and the predictor's
    estimate (empty below the minimum). `battles` and `win_rate` are the judged battles';
    `predicted_battles`, how many of the estimate's each expert's rating also rests on.

    A battle with an answer that names no model (a judge's verdict on a replay of a log
    that names none) ranks no expert against another, nor does one of an expert against
    itself (a judge's verdict on a replay by the same model with a new instruction): it
    counted as two of that expert's battles with one win, so its battles and win rate
    were off. Both are left out, as the UI's leaderboard leaves them out."""
    if len(mine):
        mine = mine[mine["model_a"].notna() & mine["model_b"].notna()]
        mine = mine[mine["model_a"] != mine["model_b"]]
    parts = [
        frame[[c for c in ("model_a", "model_b", "winner", "outcome", "predicted") if c in frame]]
        for frame in (mine, estimate)
        if frame is not None and len(frame)
    ]
    if sum(len(part) for part in parts) < config.leaderboard.min_battles:
        return []
    board = leaderboard(pd.concat(parts, ignore_index=True), config=config.leaderboard)
    return [
        {
            "model": r.model,
            "elo": r.rating,
            "ci": [r.lower, r.upper],
            "battles": r.battles,
            "predicted_battles": r.predicted,
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
    """The newest routing table, with `clustering_run_id`: the clustering its per-cluster
    choices were made for, so that a table left behind by a re-clustering can be told;
    `clustering_on`: the field `score` ranked (`--on`), so that once `prune` removed that
    clustering the one that replaced it can still be named; and `predictor_id`: the win
    predictor it was made with. The last two are None for tables stored before they were
    kept."""
    stored = latest_model(engine, "routing_table")
    if stored is None and latest_model(engine, "win_predictor") is None:
        raise ValueError(
            "no routing table: there is no win predictor to route with; `convoscope score` "
            "fits one on logs or battles that name 2 or more models"
        )
    if stored is None:  # a predictor stored before every predictor got its table
        raise ValueError(
            "no routing table yet: run `convoscope score` (after `convoscope cluster`, for "
            "per-cluster choices)"
        )
    table = json.load(io.BytesIO(stored["files"]["routing_table.json"]))
    config = stored["config"]
    return {
        **table,
        "clustering_run_id": config.get("run_id"),
        "clustering_on": config.get("on"),
        "predictor_id": config.get("predictor_id"),
    }


def newer_predictor(engine: Engine) -> str | None:
    """The id of a win predictor stored after the newest routing table, which `route TEXT`
    ranks with and the table does not reflect (stored by a release that saved the two apart,
    or before every predictor got a table), or None when the table is current."""
    newest = model_ids(engine, ["win_predictor", "routing_table"])
    predictors = model_ids(engine, "win_predictor")
    return newest[0] if newest and predictors and newest[0] == predictors[0] else None
