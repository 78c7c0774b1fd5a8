"""A real convoscope database for the UI's tests and benchmark, written through storage.

It holds what every stage would have stored: conversations and exchanges (one exchange per
conversation, several models, signals), judged battles, a cluster run with topics, parent
groups, 2-D layout and representatives, reward scores and cluster reports shaped like
scoring's. Texts follow a topic template, so clusters are about something. One exchange of
the weakest cluster carries a script tag, Markdown/HTML injection, bare URLs and a bidi
override, and that cluster's automatic name carries an HTML tag, so tests can check they are
shown as text; so does the first group's name. The groups' reports are computed by scoring's
own `group_reports` from the stored rewards and signals.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from scoring.step import group_reports
from scoring.weakness import rank_clusters
from storage.clusters import save_cluster_run
from storage.engine import open_database
from storage.logs import store_batch
from storage.reports import SCORER_KEY, save_scored
from storage.scores import store_scores

MODELS = ("gpt-4o-mini", "llama-3-8b", "mistral-7b", "pygmalion-6b")
SCORER = "reward:test0001"
# The weakest exchange's conversation also carries feedback with markup, shown in its drill-down.
XSS_FEEDBACK = 'Useless :( <img src=x onerror="alert(4)"> **never again**'
# It starts with bare URLs and an address (GFM would autolink them) and ends with a bidi
# override: "\u202eevil\u202c" displays as "live" unless the controls are shown.
XSS_PROMPT = (
    "![img](http://evil.example/x.png) www.evil.example a@evil.example "
    "<script>alert(1)</script> **bold** [click me](javascript:alert(2)) "
    '<img src=x onerror="alert(3)"> :red[red] $x^2$ # heading \u202eevil\u202c'
)


def shown(text: str) -> str:
    """`text` as the UI shows it: the fixture's bidi controls spelled out."""
    return text.replace("\u202e", "\\u202e").replace("\u202c", "\\u202c")


XSS_PROMPT_SHOWN = shown(XSS_PROMPT)
XSS_NAME = "<b>refund</b> <img src=x onerror=alert(4)>"
XSS_GROUP = "<b>help desk</b> <img src=x> [go](http://evil.example/) alert(5) **loud**"
TOPICS = (
    (
        "refund",
        ["refund", "flight", "cancelled"],
        "How do I get a refund for my cancelled flight {i}?",
    ),
    ("python", ["python", "error", "list"], "Why does my Python list code raise an error {i}?"),
    ("recipes", ["recipe", "dinner", "vegan"], "Give me a quick vegan dinner recipe number {i}"),
    ("poems", ["poem", "sonnet", "love"], "Write a short love sonnet about the sea, take {i}"),
    ("math", ["math", "equation", "solve"], "Solve the equation 3x + {i} = 12 step by step"),
    ("travel", ["travel", "paris", "itinerary"], "Plan a three day Paris itinerary, version {i}"),
    ("fitness", ["workout", "running", "plan"], "Make me a running workout plan for week {i}"),
    ("roleplay", ["dragon", "knight", "story"], "Continue the story of the knight and dragon {i}"),
)


@dataclass(frozen=True, slots=True)
class BuiltDatabase:
    url: str
    run_id: str
    weakest_id: str
    cluster_ids: tuple[str, ...]
    group_ids: tuple[str, ...]
    xss_exchange_id: str
    n_exchanges: int


def build(
    url: str,
    *,
    n_exchanges: int = 400,
    n_clusters: int = 8,
    n_battles: int = 200,
    seed: int = 0,
    batch: int = 20_000,
) -> BuiltDatabase:
    """Write a complete small database at `url` (DuckDB, SQLite or PostgreSQL)."""
    rng = np.random.default_rng(seed)
    engine = open_database(url)
    start = datetime(2026, 1, 1)
    cluster_ids = [uuid.uuid4().hex for _ in range(n_clusters)]
    parent_ids = [uuid.uuid4().hex for _ in range(2)]
    run_id = uuid.uuid4().hex
    # Cluster 0 is the weakest: low reward, many retries.
    weakness = np.linspace(0.9, 0.1, n_clusters)
    quality = 1.0 - weakness
    labels = rng.integers(0, n_clusters, n_exchanges)
    labels[: n_clusters * 3] = np.repeat(np.arange(n_clusters), 3)  # every cluster non-empty
    unassigned = rng.random(n_exchanges) < 0.05
    unassigned[: n_clusters * 3] = False
    centres = rng.normal(0, 6, (n_clusters, 2))
    ids = [uuid.uuid4().hex for _ in range(n_exchanges)]
    conv_ids = [uuid.uuid4().hex for _ in range(n_exchanges)]
    models = rng.choice(MODELS, n_exchanges)
    created = [
        start + timedelta(minutes=int(m)) for m in rng.integers(0, 60 * 24 * 60, n_exchanges)
    ]
    rewards = np.clip(quality[labels] + rng.normal(0, 0.15, n_exchanges), 0, 1)
    retried = rng.random(n_exchanges) < weakness[labels] * 0.6
    ended = rng.random(n_exchanges) < weakness[labels] * 0.4
    xss_index = 0  # labels[0] == 0: the weakest cluster
    rewards[xss_index] = -0.5  # its worst exchange
    now = datetime(2026, 3, 1)
    edited: list[bool] = []

    for lo in range(0, n_exchanges, batch):
        hi = min(lo + batch, n_exchanges)
        conversations, exchanges = [], []
        for i in range(lo, hi):
            topic = TOPICS[labels[i] % len(TOPICS)]
            prompt = XSS_PROMPT if i == xss_index else topic[2].format(i=i)
            created_at = created[i]
            edited.append(bool(rng.random() < 0.1))  # drawn where the row used to draw it
            conversations.append(
                {
                    "id": conv_ids[i],
                    "external_id": f"conv-{i}",
                    "source": "fixture.jsonl",
                    "created_at": created_at,
                    "n_messages": 2,
                    "thumbs": None,
                    "rating": None,
                    "feedback_text": XSS_FEEDBACK if i == xss_index else None,
                    "metadata": None,
                    "ingested_at": now,
                }
            )
            exchanges.append(
                {
                    "id": ids[i],
                    "conversation_id": conv_ids[i],
                    "turn_index": 1,
                    "context": json.dumps(
                        [{"role": "system", "content": "You are a helpful assistant."}]
                    ),
                    "prompt": prompt,
                    "response": f"Here is an answer about {topic[0]} ({i}). <b>not bold</b>",
                    "model": str(models[i]),
                    "instruction": None,
                    "created_at": created_at,
                    "source": "fixture.jsonl",
                    "external_id": f"ex-{i}",
                    "retried": bool(retried[i]),
                    "edited": edited[-1],
                    "deleted": False,
                    "rating": None,
                    "thumbs": None,
                    "user_turns_after": int(rng.integers(0, 6)),
                    "ended_conversation": bool(ended[i]),
                    "seconds_to_next_user_message": None,
                    "metadata": None,
                    "ingested_at": now,
                }
            )
        store_batch(engine, conversation_rows=conversations, exchange_rows=exchanges)

    battles = []
    for k in range(min(n_battles, n_exchanges // 2)):
        a, b = 2 * k, 2 * k + 1
        if models[a] == models[b]:
            continue
        strength = {m: j for j, m in enumerate(MODELS)}
        p_a = 1 / (1 + np.exp(strength[models[b]] - strength[models[a]]))
        battles.append(
            {
                "id": uuid.uuid4().hex,
                "exchange_a": ids[a],
                "exchange_b": ids[b],
                "winner": "a" if rng.random() < p_a else "b",
                "judge": "fixture",
                "judge_preference": None,
                "source": "fixture-battles.jsonl",
                "external_id": None,
                "metadata": None,
                "ingested_at": now,
            }
        )
    store_batch(engine, conversation_rows=[], exchange_rows=[], battle_rows=battles)

    sizes = np.bincount(labels[~unassigned], minlength=n_clusters)
    total = int(sizes.sum())
    cluster_rows = []
    for c, cid in enumerate(cluster_ids):
        topic = TOPICS[c % len(TOPICS)]
        members = [ids[i] for i in np.flatnonzero((labels == c) & ~unassigned)[:5]]
        cluster_rows.append(
            {
                "run_id": run_id,
                "id": cid,
                "parent_id": parent_ids[c % 2],
                "level": 0,
                "auto_name": XSS_NAME if c == 0 else f"{topic[0]} {c}",
                "keywords": json.dumps([*topic[1], "<i>kw</i>"] if c == 0 else topic[1]),
                "size": int(sizes[c]),
                "share": float(sizes[c] / total),
                "centroid": None,
                "representatives": json.dumps(members),
            }
        )
    for p, pid in enumerate(parent_ids):
        size = int(sizes[p::2].sum())
        cluster_rows.append(
            {
                "run_id": run_id,
                "id": pid,
                "parent_id": None,
                "level": 1,
                "auto_name": XSS_GROUP if p == 0 else f"group {p}",
                "keywords": json.dumps([]),
                "size": size,
                "share": size / total,
                "centroid": None,
                "representatives": None,
            }
        )
    xy = centres[labels] + rng.normal(0, 1.0, (n_exchanges, 2))
    assignment_rows = [
        {
            "run_id": run_id,
            "exchange_id": ids[i],
            "cluster_id": None if unassigned[i] else cluster_ids[labels[i]],
            "distance": float(rng.random()),
            "x": float(xy[i, 0]),
            "y": float(xy[i, 1]),
        }
        for i in range(n_exchanges)
    ]
    save_cluster_run(
        engine,
        {
            "id": run_id,
            "created_at": now,
            "on_field": "prompt",
            "embedder": "all-MiniLM-L6-v2",
            "params": "{}",
            "n_rows": n_exchanges,
            "n_clusters": n_clusters,
            "unassigned_share": float(unassigned.mean()),
            "events": None,
        },
        cluster_rows,
        assignment_rows,
    )
    store_scores(engine, SCORER, dict(zip(ids, rewards.tolist(), strict=True)))
    reports = _reports(
        rng, cluster_ids, labels, unassigned, rewards, retried, ended, weakness, models
    )
    assigned = ~unassigned
    signals = pd.DataFrame(
        {
            "cluster_id": np.array(cluster_ids)[labels[assigned]],
            "reward": rewards[assigned],
            "retried": retried[assigned],
            "edited": np.array(edited)[assigned],
            "ended_conversation": ended[assigned],
        }
    )
    parent_of = {cid: parent_ids[c % 2] for c, cid in enumerate(cluster_ids)}
    reports |= group_reports(signals, parent_of, rank_clusters(signals))
    # Marked with the scorer they came from, as `score` marks them.
    save_scored(engine, run_id, {k: {**r, SCORER_KEY: SCORER} for k, r in reports.items()})
    engine.dispose()
    return BuiltDatabase(
        url=url,
        run_id=run_id,
        weakest_id=cluster_ids[0],
        cluster_ids=tuple(cluster_ids),
        group_ids=tuple(parent_ids),
        xss_exchange_id=ids[xss_index],
        n_exchanges=n_exchanges,
    )


def _reports(
    rng: np.random.Generator,
    cluster_ids: list[str],
    labels: np.ndarray,
    unassigned: np.ndarray,
    rewards: np.ndarray,
    retried: np.ndarray,
    ended: np.ndarray,
    weakness: np.ndarray,
    models: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Reports shaped like scoring's: reward with CI, rates, leaderboard, routing, weakness."""
    reports = {}
    total = int((~unassigned).sum())
    for c, cid in enumerate(cluster_ids):
        member = (labels == c) & ~unassigned
        r = rewards[member]
        board = []
        elos = sorted(
            ((m, 1000 + 60 * j + float(rng.normal(0, 30))) for j, m in enumerate(MODELS)),
            key=lambda kv: -kv[1],
        )
        for rank, (m, elo) in enumerate(elos, start=1):
            board.append(
                {
                    "model": m,
                    "elo": elo,
                    "ci": [elo - 40, elo + 40],
                    "battles": 25,
                    "predicted_battles": 10,
                    "rank": rank,
                    "tied_with": [],
                }
            )
        served = {m: float(np.mean(models[member] == m)) for m in MODELS}
        reports[cid] = {
            "n": int(member.sum()),
            "share": float(member.sum() / total),
            "reward_mean": float(r.mean()),
            "reward_ci": [float(r.mean() - 0.05), float(r.mean() + 0.05)],
            "retry_rate": float(retried[member].mean()),
            "edit_rate": 0.1,
            "end_rate": float(ended[member].mean()),
            "leaderboard": board,
            "routing": {
                "best_expert": board[0]["model"],
                "predicted_win_rate": 0.62,
                "served_by": served,
                "gain": float(0.05 + 0.1 * weakness[c]),
                "cheapest_within_tolerance": board[1]["model"],
                "cheapest_win_rate": 0.61,
                "cheapest_cost": 0.5,
            },
            "weakness": float(weakness[c]),
            "reason": "low reward and many retries" if c == 0 else "some retries",
        }
    return reports
