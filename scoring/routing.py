"""Routing suggestions per cluster, and a routing table a gateway can apply without this tool.

For each cluster: every candidate expert's predicted win rate (mean over the cluster's prompts
of P(expert beats the reference), the reference being a named expert or, by default, the mean
expert), the best expert, the gain over the experts that actually served the cluster (weighted
by their traffic), and — given a cost per expert — the cheapest expert whose win rate is within
a tolerance of the best. The exported table holds the encoder's name, the projection W, θ_m,
b_m and each cluster's centroid and choice: a gateway embeds the prompt with the same encoder
and either takes argmax_m θ_m·(W x) + b_m, or the choice of the nearest centroid. When the
predictor uses prompt features, x is the embedding followed by those features, standardised
with the table's mean and std (a feature that never varied in training reads 0, every value is
clipped to ±6) and scaled; a gateway that cannot compute them passes zeros
there (the average prompt), which loses some accuracy but nothing else. The table says how
each feature is computed (`prompt_feature_definitions`: a formula, or a regex).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from scoring.features import (
    CLIP_STDS,
    CONSTANT_STD,
    PROMPT_FEATURE_DEFINITIONS,
    PROMPT_ONLY_FEATURES,
    prompt_features,
    standardise,
)
from scoring.predictor import WinPredictor

TABLE_KIND = "convoscope.routing_table"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Which experts may serve, against whom win rates are read, how much quality to trade."""

    reference: str | None = None  # None = the mean expert
    tolerance: float = 0.02  # win-rate points the cheapest choice may give up
    candidates: tuple[str, ...] | None = None  # None = every expert the predictor knows


@dataclass(frozen=True, slots=True)
class ClusterRoute:
    """The routing suggestion for one cluster."""

    cluster_id: str
    n_prompts: int
    best_expert: str
    best_win_rate: float
    served_win_rate: float | None  # traffic-weighted, over the experts that served it
    gain: float | None  # best_win_rate − served_win_rate
    cheapest_expert: str | None  # within `tolerance` of the best, given costs
    cheapest_win_rate: float | None
    cheapest_cost: float | None
    win_rates: dict[str, float] = field(default_factory=dict)


def win_rate_matrix(
    predictor: WinPredictor,
    prompts: np.ndarray,
    experts: list[str],
    reference: str | None = None,
    texts: list[str] | None = None,
) -> np.ndarray:
    """P(expert beats reference | prompt): rows are prompts, columns are `experts`."""
    return _win_rates(predictor, predictor.inputs(prompts, texts), experts, reference)


def _win_rates(
    predictor: WinPredictor, rows: np.ndarray, experts: list[str], reference: str | None
) -> np.ndarray:
    """`win_rate_matrix` from the predictor's input rows."""
    s = predictor.scores_of_inputs(rows, experts)
    if reference is None:
        ref = predictor.scores_of_inputs(rows).mean(axis=1)
    else:
        ref = predictor.scores_of_inputs(rows, [reference])[:, 0]
    return 1.0 / (1.0 + np.exp(-(s - ref[:, None])))


def route_prompts(
    predictor: WinPredictor,
    prompts: np.ndarray,
    candidates: list[str] | None = None,
    texts: list[str] | None = None,
) -> list[str]:
    """The expert with the highest score for each prompt (from its embedding and text only)."""
    experts = list(candidates) if candidates else predictor.experts
    return [experts[i] for i in predictor.scores(prompts, experts, texts).argmax(axis=1)]


def cluster_routes(
    predictor: WinPredictor,
    prompts: np.ndarray,
    cluster_ids: np.ndarray,
    served_by: np.ndarray | None = None,
    *,
    costs: dict[str, float] | None = None,
    config: RoutingConfig = RoutingConfig(),
    texts: list[str] | None = None,
    features: np.ndarray | None = None,
) -> list[ClusterRoute]:
    """One suggestion per cluster from its prompts' embeddings and texts (and who served each
    row). `features`: `prompt_features(texts)` when the caller has them."""
    experts = list(config.candidates) if config.candidates else list(predictor.experts)
    cluster_ids = np.asarray(cluster_ids).astype(str)
    if features is None and texts is not None and predictor.uses_texts:
        features = prompt_features(texts)  # once, not per cluster (they cost more than scoring)
    routes = []
    for cid in sorted(set(cluster_ids)):
        rows = np.flatnonzero(cluster_ids == cid)
        inputs = predictor.inputs(
            prompts[rows], features=None if features is None else features[rows]
        )
        wr = _win_rates(predictor, inputs, experts, config.reference)
        rates = wr.mean(axis=0)
        best = int(rates.argmax())
        served_rate = None
        if served_by is not None:
            served = np.asarray(served_by, dtype=object)[rows]
            # A row that names no model ("", None, NaN) tells nothing of what served it: an
            # unknown name would be read as the mean expert, an invented "gain" over 0.5.
            known = [i for i, m in enumerate(served) if isinstance(m, str) and m]
            if known:
                models = sorted({served[i] for i in known})
                own = _win_rates(predictor, inputs[known], models, config.reference)
                col = {m: j for j, m in enumerate(models)}
                served_rate = float(np.mean([own[k, col[served[i]]] for k, i in enumerate(known)]))
        cheapest, cheapest_rate, cheapest_cost = None, None, None
        if costs:
            ok = [
                j
                for j, m in enumerate(experts)
                if m in costs and rates[j] >= rates[best] - config.tolerance
            ]
            if ok:
                j = min(ok, key=lambda j: (costs[experts[j]], -rates[j]))
                cheapest, cheapest_rate = experts[j], float(rates[j])
                cheapest_cost = float(costs[experts[j]])
        routes.append(
            ClusterRoute(
                cluster_id=cid,
                n_prompts=len(rows),
                best_expert=experts[best],
                best_win_rate=float(rates[best]),
                served_win_rate=served_rate,
                gain=None if served_rate is None else float(rates[best] - served_rate),
                cheapest_expert=cheapest,
                cheapest_win_rate=cheapest_rate,
                cheapest_cost=cheapest_cost,
                win_rates={m: float(r) for m, r in zip(experts, rates, strict=True)},
            )
        )
    return routes


def prompt_centroids(
    prompts: np.ndarray, members: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each cluster's mean unit prompt vector (`members`: cluster id → its rows of `prompts`),
    in the space of the vectors given: the routing table's encoder's, the predictor's. The
    clustering's own centroids may be another encoder's (`cluster --fast`, then `score`): a
    table naming one encoder with 256-number centroids and a projection for 384 numbers
    fitted no gateway's embedding either way. One cluster's rows are copied at a time."""
    centroids = {}
    for cluster_id, rows in members.items():
        vectors = prompts[rows].astype(np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        centroids[cluster_id] = vectors.mean(axis=0)
    return centroids


def routing_table(
    predictor: WinPredictor,
    routes: list[ClusterRoute],
    centroids: dict[str, np.ndarray],
    *,
    encoder: str,
    config: RoutingConfig = RoutingConfig(),
    use_cheapest: bool = False,
) -> dict:
    """A JSON-serialisable table: everything a gateway needs, in plain lists and strings."""
    experts = list(config.candidates) if config.candidates else list(predictor.experts)
    theta, bias = predictor.parameters(experts)
    clusters = []
    for r in routes:
        choice = r.cheapest_expert if use_cheapest and r.cheapest_expert else r.best_expert
        clusters.append(
            {
                "cluster_id": r.cluster_id,
                "centroid": np.asarray(centroids[r.cluster_id], dtype=float).tolist(),
                "expert": choice,
                "route": asdict(r),
            }
        )
    return {
        "kind": TABLE_KIND,
        "version": 2,
        "encoder": {"name": encoder, "normalize": True},
        "rule": (
            "x = encoder(prompt), unit length, then (if prompt_features) text_scale × "
            f"(features − text_mean) / text_std, 0 where text_std < {CONSTANT_STD:g}, clipped to "
            f"±{CLIP_STDS:g}, or zeros; per-prompt: argmax_m "
            "theta[m]·(projection x) + bias[m]; per-cluster: the expert of the centroid with "
            "the highest cosine to the embedding"
        ),
        "prompt_features": list(PROMPT_ONLY_FEATURES) if predictor.uses_texts else [],
        "prompt_feature_definitions": (
            {name: PROMPT_FEATURE_DEFINITIONS[name] for name in PROMPT_ONLY_FEATURES}
            if predictor.uses_texts
            else {}
        ),
        "text_mean": predictor.text_mean.astype(float).tolist(),
        "text_std": predictor.text_std.astype(float).tolist(),
        "text_scale": predictor.config.text_scale,
        "experts": experts,
        "projection": predictor.projection.astype(float).tolist(),
        "theta": theta.astype(float).tolist(),
        "bias": bias.astype(float).tolist(),
        "reference": config.reference,
        "tolerance": config.tolerance,
        "clusters": clusters,
    }


def apply_routing_table(
    table: dict,
    embedding: np.ndarray,
    *,
    per_cluster: bool = False,
    features: np.ndarray | None = None,
) -> str:
    """What a gateway does with the table (numpy only): the expert for one prompt embedding.

    `features`: the prompt's raw `prompt_features` row when the table names some (None =
    the average prompt's, zeros after standardising).
    """
    if table.get("kind") != TABLE_KIND:
        raise ValueError("not a convoscope routing table")
    x = np.asarray(embedding, dtype=float)
    x = x / (np.linalg.norm(x) or 1.0)
    if per_cluster:
        cents = np.asarray([c["centroid"] for c in table["clusters"]], dtype=float)
        cents = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        return table["clusters"][int((cents @ x).argmax())]["expert"]
    if table.get("prompt_features"):
        mean = np.asarray(table["text_mean"], dtype=float)
        extra = np.zeros_like(mean)
        if features is not None:
            row = np.asarray(features, dtype=float)[None, :]
            extra = standardise(row, mean, np.asarray(table["text_std"]))[0]
        x = np.concatenate([x, table["text_scale"] * extra])
    z = np.asarray(table["projection"], dtype=float) @ x
    s = np.asarray(table["theta"], dtype=float) @ z + np.asarray(table["bias"], dtype=float)
    return table["experts"][int(s.argmax())]
