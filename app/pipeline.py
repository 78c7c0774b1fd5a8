"""The whole job in one call: ingest → embed → cluster → score, each step stored as it ends.

Each step is the same function its own CLI command runs, so a crash in one loses nothing an
earlier step stored, and running the pipeline again redoes only what is missing (ingest and
embedding skip what is stored; clustering and scoring refit on everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from clustering.stages import Clusterer, Reducer
from clustering.step import ClusterStepConfig, cluster_exchanges
from ingest.embed_step import embed_exchanges
from ingest.pipeline import IngestConfig, ingest_paths


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cluster: ClusterStepConfig = field(default_factory=ClusterStepConfig)
    score: bool = True


def run_pipeline(
    engine: Engine,
    paths: Sequence[Path],
    *,
    config: PipelineConfig,
    reducer: Reducer | None = None,
    clusterer: Clusterer | None = None,
) -> dict[str, Any]:
    """Run every step on `paths` and return each step's summary (stages as in
    `cluster_exchanges`: None means UMAP and HDBSCAN)."""
    from scoring.step import ScoreConfig, score_all

    result: dict[str, Any] = {}
    if paths:
        result["ingest"] = ingest_paths(paths, engine=engine, config=config.ingest).as_dict()
    result["embed"] = embed_exchanges(engine, config=config.cluster.embed).as_dict()
    result["cluster"] = cluster_exchanges(
        engine, config=config.cluster, reducer=reducer, clusterer=clusterer
    ).as_dict()
    if config.score:  # the prompts' vectors are the embedder's the run was given, as stored
        embed = config.cluster.embed
        result["score"] = score_all(engine, config=ScoreConfig(on=embed.on, embed=embed))
    return result
