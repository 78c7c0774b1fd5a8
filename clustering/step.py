"""The cluster and assign steps: stored vectors → topics and parent groups in storage.

`cluster_exchanges` fits topics on every embedded exchange, matches them to the previous run
so ids (and the names, notes and tags people gave) carry over, and stores the run whole.
`assign_new` puts exchanges that arrived since into the latest run's clusters without a refit.
Stable ids are strings: `t<n>` for topics, `g<n>` for their parent groups.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from clustering.llm_names import LLMNamer
from clustering.matching import UNASSIGNED, ClusterMatch, match_clusters
from clustering.stages import Clusterer, Reducer
from clustering.topics import ClusterConfig, TopicModel, assign, fit_topics, unit_rows
from ingest.embed import load_embedder
from ingest.embed_step import EmbedConfig, EmbeddedText, embed_exchanges, exchange_texts
from storage.clusters import (
    add_assignments,
    cluster_ids_used,
    latest_run,
    load_assignments,
    load_clusters,
    require_run,
    save_cluster_run,
)
from storage.logs import table_counts, utcnow
from storage.vectors import load_vectors

TOPIC, GROUP = "t", "g"


class NoTopicFound(ValueError):
    """Every fitted row came out an outlier: nothing to store, the previous run is kept."""


@dataclass(frozen=True, slots=True)
class ClusterStepConfig:
    """What to cluster (`on`, which embedder) and how (`topics`)."""

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    topics: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    run_id: str
    on: str
    embedder: str
    rows: int
    clusters: int
    parents: int
    unassigned_share: float
    events: dict[str, int]  # how many clusters were kept, split, merged, new, gone

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_exchanges(
    engine: Engine,
    *,
    config: ClusterStepConfig,
    reducer: Reducer | None = None,
    clusterer: Clusterer | None = None,
    namer: LLMNamer | None = None,
) -> ClusterSummary:
    """Fit topics on all embedded exchanges and store them as a new run with stable ids."""
    stored = table_counts(engine)["exchanges"]
    if stored < 3:
        raise ValueError(f"only {stored} exchanges are stored: ingest more to cluster them")
    items = list(exchange_texts(engine, on=config.embed.on))
    embedded = embed_exchanges(engine, config=config.embed, items=items)  # no-op when cached
    ids = [item.exchange_id for item in items]
    texts = [item.text for item in items]
    vectors = load_vectors(engine, embedded.model, [item.text_hash for item in items])
    model = fit_topics(vectors, texts, config=config.topics, reducer=reducer, clusterer=clusterer)
    if model.n_clusters == 0:  # nothing to store or match; keep the previous run as it is
        fitted = len(model.fitted_rows)
        # 2 is the least topic size HDBSCAN takes (and the CLI's): no lower to go from there.
        lower = "lower --min-cluster-size" if model.min_cluster_size > 2 else ""
        if fitted < len(ids):
            advice = " or ".join(filter(None, [lower, "raise --sample-size"]))
        else:
            kmeans = (
                "choose the number of topics for so small a log: "
                f"--clusterer kmeans --k {max(2, min(10, fitted // 3))}"
            )
            advice = f"{lower}, or {kmeans}" if lower else kmeans
        raise NoTopicFound(
            f"no topic found: every row is an outlier with --min-cluster-size "
            f"{model.min_cluster_size} on {fitted} fitted rows; {advice}"
        )

    previous = latest_run(engine, on_field=config.embed.on)
    topic_match, group_match = _match_previous(engine, previous, model, ids, embedded.model)
    topic_id = {label: f"{TOPIC}{stable}" for label, stable in topic_match.ids.items()}
    group_id = {label: f"{GROUP}{stable}" for label, stable in group_match.ids.items()}
    llm_names = namer.name_topics(model, texts) if namer else {}

    run_id = uuid.uuid4().hex
    run_row = {
        "id": run_id,
        "created_at": utcnow(),
        "on_field": config.embed.on,
        "embedder": embedded.model,
        "params": json.dumps(asdict(config.topics)),
        "n_rows": len(ids),
        "n_clusters": model.n_clusters,
        "unassigned_share": model.unassigned_share,
        "events": json.dumps(
            {
                "topics": [_event(e, TOPIC) for e in topic_match.events],
                "groups": [_event(e, GROUP) for e in group_match.events],
            }
        ),
    }
    cluster_rows = _topic_rows(run_id, model, ids, topic_id, group_id, llm_names)
    cluster_rows += _group_rows(run_id, model, group_id)
    assignment_rows = [
        {
            "run_id": run_id,
            "exchange_id": exchange_id,
            "cluster_id": topic_id[int(label)] if label >= 0 else None,
            "distance": float(model.distances[i]) if np.isfinite(model.distances[i]) else None,
            "x": float(model.layout[i, 0]) if model.layout is not None else None,
            "y": float(model.layout[i, 1]) if model.layout is not None else None,
        }
        for i, (exchange_id, label) in enumerate(zip(ids, model.labels, strict=True))
    ]
    save_cluster_run(engine, run_row, cluster_rows, assignment_rows)
    return ClusterSummary(
        run_id=run_id,
        on=config.embed.on,
        embedder=embedded.model,
        rows=len(ids),
        clusters=model.n_clusters,
        parents=len(model.parent_names),
        unassigned_share=model.unassigned_share,
        events=_event_counts(topic_match),
    )


def assign_new(engine: Engine, *, config: ClusterStepConfig) -> dict[str, Any]:
    """Assign exchanges that have no row in the latest run to its clusters, without a refit."""
    run = latest_run(engine, on_field=config.embed.on)
    if run is None:
        raise ValueError("no clustering yet: run `convoscope cluster` first")
    assigned = load_assignments(engine, run["id"])
    items: list[EmbeddedText] = []
    clustered: list[tuple[str, str | None]] = []  # (text hash, topic) of each assigned row
    for item in exchange_texts(engine, on=config.embed.on):
        if item.exchange_id in assigned:
            clustered.append((item.text_hash, assigned[item.exchange_id]))
        else:
            items.append(item)
    if not items:
        return {"run_id": run["id"], "assigned": 0, "unassigned": 0}
    # The embedder is checked against the run's before it embeds anything: another one's
    # vectors cannot be placed among these centroids, and embedding them all took minutes.
    embed = config.embed
    embedder = load_embedder(
        embed.model, device=embed.device, fast=embed.fast, batch_size=embed.batch_size
    )
    if embedder.name != run["embedder"]:
        raise ValueError(
            f"the latest clustering used {run['embedder']!r} vectors but --model/--fast give "
            f"{embedder.name!r}: use the same embedder, or re-cluster"
        )
    embed_exchanges(engine, config=embed, embedder=embedder, items=items)  # the new ones only
    topics = [c for c in load_clusters(engine, run["id"]) if c["level"] == 0]
    if not topics:  # `prune` removed the run while this embedded: say so, not np.stack's error
        require_run(engine, run["id"], stored="new assignments", again="assign")
    centroids = np.stack([np.frombuffer(c["centroid"], dtype="<f4") for c in topics])
    radii = np.array([c["radius"] for c in topics], dtype=np.float32)
    vectors = load_vectors(engine, embedder.name, [i.text_hash for i in items])
    labels, distances = assign(vectors, centroids, radii)
    _as_earlier_copies(clustered, items, topics, labels, distances, vectors, centroids)
    rows = [
        {
            "run_id": run["id"],
            "exchange_id": item.exchange_id,
            "cluster_id": topics[label]["id"] if label >= 0 else None,
            "distance": float(distance),
            # New rows sit at their cluster's place on the map (no refit of the layout).
            "x": topics[label]["x"] if label >= 0 else None,
            "y": topics[label]["y"] if label >= 0 else None,
        }
        for item, label, distance in zip(items, labels, distances, strict=True)
    ]
    added = add_assignments(engine, rows)
    return {
        "run_id": run["id"],
        "assigned": int(np.sum(labels >= 0)),
        "unassigned": int(np.sum(labels < 0)),
        "stored": added,
    }


def _as_earlier_copies(
    clustered: Sequence[tuple[str, str | None]],
    items: Sequence[EmbeddedText],
    topics: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    distances: np.ndarray,
    vectors: np.ndarray,
    centroids: np.ndarray,
) -> None:
    """Give a new exchange whose text the run holds already the topic its copies have (most
    of them, a topic before none), in place, as the fit gives every copy of a text one topic.
    The nearest centroid can differ from the clusterer's verdict on the stored copy: a new
    'Hello' stayed unassigned while the clustered one was in a topic. `clustered` holds the
    run's rows as (text hash, topic), not their texts: `embed` holds every text already."""
    wanted = {item.text_hash for item in items}
    votes: dict[str, Counter[str | None]] = {}
    for text_hash, cluster_id in clustered:
        if text_hash in wanted:
            votes.setdefault(text_hash, Counter())[cluster_id] += 1
    position = {topic["id"]: k for k, topic in enumerate(topics)}
    for n, item in enumerate(items):
        counts = votes.get(item.text_hash)
        if not counts:
            continue
        cluster_id = max(counts, key=lambda c: (counts[c], c is not None, c or ""))
        labels[n] = position.get(cluster_id, -1) if cluster_id is not None else -1
        if labels[n] >= 0:
            distances[n] = 1.0 - float(unit_rows(vectors[n : n + 1])[0] @ centroids[labels[n]])


def _match_previous(
    engine: Engine,
    previous: Mapping[str, Any] | None,
    model: TopicModel,
    ids: Sequence[str],
    embedder: str,
) -> tuple[ClusterMatch, ClusterMatch]:
    """Stable ids for this fit's topics and groups, continuing the previous run's: by shared
    members, then by centroid when both runs' vectors come from the same `embedder`."""
    topic_members = _members(model.labels, ids)
    group_labels = np.where(model.labels >= 0, model.parents[np.maximum(model.labels, 0)], -1)
    group_members = _members(group_labels, ids)
    new_topics = dict(enumerate(model.centroids))
    new_groups = dict(enumerate(_group_centroids(model)))
    old_topics: dict[int, np.ndarray] = {}
    old_groups: dict[int, np.ndarray] = {}
    old_topic_members: dict[int, set[Hashable]] = {}
    old_group_members: dict[int, set[Hashable]] = {}
    if previous is not None:
        clusters = load_clusters(engine, previous["id"])
        parent_of = {c["id"]: c["parent_id"] for c in clusters}
        for c in clusters:
            stable = int(c["id"][1:])
            centroid = np.frombuffer(c["centroid"], dtype="<f4")
            (old_topics if c["level"] == 0 else old_groups)[stable] = centroid
        for exchange_id, cluster_id in load_assignments(engine, previous["id"]).items():
            if cluster_id is None:
                old_topic_members.setdefault(UNASSIGNED, set()).add(exchange_id)
                continue
            old_topic_members.setdefault(int(cluster_id[1:]), set()).add(exchange_id)
            parent = parent_of.get(cluster_id)
            if parent is not None:
                old_group_members.setdefault(int(parent[1:]), set()).add(exchange_id)
    # A fresh cluster takes an id no run has used, of this `on` field or another: names, notes
    # and tags are kept by id, and must not land on an unrelated topic.
    used = cluster_ids_used(engine)
    same_space = previous is None or previous["embedder"] == embedder
    topics = match_clusters(
        old_topics,
        old_topic_members,
        new_topics,
        topic_members,
        next_id=_fresh(used, TOPIC),
        compare_centroids=same_space,
    )
    groups = match_clusters(
        old_groups,
        old_group_members,
        new_groups,
        group_members,
        next_id=_fresh(used, GROUP),
        compare_centroids=same_space,
    )
    return topics, groups


def _fresh(used: set[str], prefix: str) -> int:
    numbers = [
        int(i[len(prefix) :]) for i in used if i.startswith(prefix) and i[len(prefix) :].isdigit()
    ]
    return max(numbers, default=-1) + 1


def _members(labels: np.ndarray, ids: Sequence[str]) -> dict[int, set[Hashable]]:
    members: dict[int, set[Hashable]] = {}
    for exchange_id, label in zip(ids, labels, strict=True):
        members.setdefault(int(label), set()).add(exchange_id)
    return members


def _group_centroids(model: TopicModel) -> np.ndarray:
    """Size-weighted mean of each parent group's topic centroids, unit length."""
    n_groups = len(model.parent_names)
    dim = model.centroids.shape[1] if model.n_clusters else 0
    sums = np.zeros((n_groups, dim), dtype=np.float64)
    np.add.at(sums, model.parents, model.centroids * model.sizes[:, None])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms == 0, 1, norms)).astype(np.float32)


def _topic_rows(
    run_id: str,
    model: TopicModel,
    ids: Sequence[str],
    topic_id: Mapping[int, str],
    group_id: Mapping[int, str],
    llm_names: Mapping[int, str],
) -> list[dict[str, Any]]:
    total = max(len(ids), 1)
    rows = []
    for c in range(model.n_clusters):
        x, y = _map_position(model, model.labels == c)
        rows.append(
            {
                "run_id": run_id,
                "id": topic_id[c],
                "parent_id": group_id[int(model.parents[c])],
                "level": 0,
                "auto_name": llm_names.get(c) or model.names[c],
                "keywords": json.dumps(list(model.keywords[c])),
                "size": int(model.sizes[c]),
                "share": float(model.sizes[c]) / total,
                "centroid": np.asarray(model.centroids[c], dtype="<f4").tobytes(),
                "representatives": json.dumps([ids[i] for i in model.representatives[c]]),
                "radius": float(model.radii[c]),
                "x": x,
                "y": y,
            }
        )
    return rows


def _group_rows(
    run_id: str, model: TopicModel, group_id: Mapping[int, str]
) -> list[dict[str, Any]]:
    centroids = _group_centroids(model)
    total = max(len(model.labels), 1)
    rows = []
    for g in range(len(model.parent_names)):
        topics = np.flatnonzero(model.parents == g)
        in_group = np.isin(model.labels, topics)
        size = int(model.sizes[topics].sum())
        x, y = _map_position(model, in_group)
        rows.append(
            {
                "run_id": run_id,
                "id": group_id[g],
                "parent_id": None,
                "level": 1,
                "auto_name": model.parent_names[g],
                "keywords": json.dumps(list(model.parent_keywords[g])),
                "size": size,
                "share": size / total,
                "centroid": centroids[g].astype("<f4").tobytes(),
                "representatives": "[]",
                "radius": None,
                "x": x,
                "y": y,
            }
        )
    return rows


def _map_position(model: TopicModel, mask: np.ndarray) -> tuple[float | None, float | None]:
    if model.layout is None or not mask.any():
        return None, None
    x, y = model.layout[mask].mean(axis=0)
    return float(x), float(y)


def _event(event: Any, prefix: str) -> dict[str, Any]:
    return {
        "kind": event.kind,
        "old": [f"{prefix}{i}" for i in event.old],
        "new": [f"{prefix}{i}" for i in event.new],
    }


def _event_counts(match: ClusterMatch) -> dict[str, int]:
    counts = {"kept": 0, "split": 0, "merged": 0, "new": 0, "gone": 0}
    for event in match.events:
        counts[event.kind] += 1
    return counts
