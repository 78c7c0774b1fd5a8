"""`embed`, `cluster`, `assign`, `clusters`, `rename` and `tag`: the topics of the stored
exchanges and what people say about them."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from app.commands.common import (
    UserError,
    check_input_file,
    embed_config,
    no_clustering,
    warn,
    warn_skipped,
)
from storage.engine import open_database
from storage.logs import table_counts

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
    from clustering.step import ClusterStepConfig


def embed(args: argparse.Namespace) -> dict[str, Any]:
    from ingest.embed import EmbedderError
    from ingest.embed_step import embed_exchanges

    if args.from_file is not None:
        return _import_vectors(args)
    if args.name is not None:
        raise UserError("--name names vectors imported with --from FILE")
    engine = open_database(args.db, existing=True)
    try:
        return embed_exchanges(engine, config=embed_config(args)).as_dict()
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def _import_vectors(args: argparse.Namespace) -> dict[str, Any]:
    """`embed --from FILE --name NAME`: vectors made elsewhere, stored as `imported:NAME`."""
    from ingest.embed_import import import_vectors

    options = ("model", "fast", "device", "batch_size")
    given = getattr(args, "options_given", frozenset())
    unread = [f"--{o.replace('_', '-')}" for o in options if o in given]
    if unread:
        raise UserError(
            f"--from imports vectors made elsewhere, so {', '.join(unread)} would go unused "
            "(`--on` says which text of each exchange an `exchange_id` row's vector is for)"
        )
    if not args.name:
        raise UserError(
            "--from FILE needs --name NAME: the vectors are stored as imported:NAME, which "
            "`cluster --model imported:NAME` reads"
        )
    path = args.from_file
    check_input_file(path, "vectors")
    engine = open_database(args.db, existing=True)
    try:
        summary = import_vectors(engine, path, name=args.name, on=args.on)
    except ValueError as error:
        raise UserError(str(error)) from None
    finally:
        engine.dispose()
    bad = [
        f"{r['source']}:{r['line']}: {r['field'] or 'row'}: {r['reason']}" for r in summary.rejects
    ]
    warn_skipped(bad, "bad rows (--json lists each)")
    if summary.read and not (summary.stored or summary.already_stored):
        raise UserError(f"{path}: no row could be imported ({summary.rejected} rejected)")
    return summary.as_dict()


def cluster_stages(args: argparse.Namespace) -> tuple[ClusterStepConfig, dict[str, Any]]:
    """The clustering config and the stages (reducer, clusterer) the flags ask for."""
    from clustering.stages import PassThrough, kmeans_clusterer, pca_reducer
    from clustering.step import ClusterStepConfig
    from clustering.topics import ClusterConfig

    if args.clusterer == "kmeans" and not args.k:
        raise UserError("--clusterer kmeans needs --k (the number of clusters)")
    if args.clusterer == "hdbscan" and args.k:
        raise UserError("--k applies to --clusterer kmeans only")
    if args.clusterer == "kmeans" and args.min_cluster_size is not None:
        warn("--min-cluster-size is ignored with --clusterer kmeans: --k sets the topics")
    topics = ClusterConfig(
        min_cluster_size=args.min_cluster_size,
        sample_size=args.sample_size,
        reassign_outliers=not args.no_reassign,
        n_parents=args.parents,
        seed=args.seed,
    )
    reducers = {"pca": pca_reducer(topics.n_components, seed=args.seed), "none": PassThrough()}
    stages = {
        "reducer": reducers.get(args.reducer),  # None = UMAP, the default
        "clusterer": kmeans_clusterer(args.k, seed=args.seed)
        if args.clusterer == "kmeans"
        else None,  # None = HDBSCAN, the default
    }
    return ClusterStepConfig(embed=embed_config(args), topics=topics), stages


def cluster(args: argparse.Namespace) -> dict[str, Any]:
    from clustering.step import cluster_exchanges
    from ingest.embed import EmbedderError

    config, stages = cluster_stages(args)
    engine = open_database(args.db, existing=True)
    try:
        namer = _llm_namer(args, engine)  # refused, as options the rows cannot satisfy are,
        check_fit_size(args, table_counts(engine)["exchanges"])  # before minutes of embedding
        summary = cluster_exchanges(engine, config=config, namer=namer, **stages)
        return summary.as_dict()
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def check_fit_size(args: argparse.Namespace, stored: int) -> None:
    """Refuse options that the rows to fit (every stored exchange, or --sample-size of them)
    cannot satisfy: they failed in numpy, UMAP or scikit-learn after all the embedding, in
    messages that named no option. UMAP and PCA reduce to `n_components` dimensions, so they
    need as many rows; k-means needs a row per cluster; any clusterer needs 2 rows. Fewer
    than 3 stored, the clustering step says so itself."""
    from clustering.topics import ClusterConfig

    if stored < 3:
        return
    fitted = min(stored, args.sample_size)
    dims = ClusterConfig.n_components
    needs = [("clustering", 2, "")]  # what needs rows, how many, the fix when fewer are stored
    if args.reducer != "none":
        reducer = f"--reducer {args.reducer} (it reduces to {dims} dimensions)"
        needs.append((reducer, dims, "ingest more, or use --reducer none"))
    if args.clusterer == "kmeans":
        needs.append((f"--k {args.k} (a row per cluster)", args.k, f"lower --k ({stored} at most)"))
    for what, need, fix in needs:
        if fitted >= need:
            continue
        if stored < need:
            have = f"only {stored} exchanges are stored: {fix}"
        else:
            have = (
                f"--sample-size {args.sample_size} leaves {fitted} of the {stored} stored: "
                f"raise --sample-size to {need} or more"
            )
        raise UserError(f"{what} needs at least {need} rows to fit, and {have}")


def _llm_namer(args: argparse.Namespace, engine: Engine) -> Any:
    """An LLM namer only when the user asked for one: log text never leaves otherwise."""
    if not args.llm_names:
        if args.llm_base_url or args.llm_api_key_env:  # else read as asked for, silently not
            given = "--llm-base-url" if args.llm_base_url else "--llm-api-key-env"
            raise UserError(f"{given} is for --llm-names MODEL, which names the chat model")
        return None
    if not args.llm_base_url:
        raise UserError("--llm-names needs --llm-base-url (any OpenAI-compatible endpoint)")

    from clustering.llm_names import LLMNamer, openai_client
    from storage.cache import StoredCache

    # A variable named on purpose must hold the key (as for replay): otherwise every topic
    # fails to be named, after the whole clustering.
    if args.llm_api_key_env and not os.environ.get(args.llm_api_key_env):
        raise UserError(
            f"--llm-api-key-env {args.llm_api_key_env}: that variable is not set (or empty)"
        )
    key = os.environ.get(args.llm_api_key_env or "OPENAI_API_KEY")
    client = openai_client(args.llm_base_url, api_key=key)
    return LLMNamer(client, args.llm_names, cache=StoredCache(engine))


def assign(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from clustering.step import ClusterStepConfig, assign_new
    from ingest.embed import EmbedderError
    from ingest.embed_fast import split_embedder_name
    from storage.clusters import latest_run

    engine = open_database(args.db, existing=True)
    try:
        run = latest_run(engine, on_field=args.on)
        if run is None:  # "run `cluster`" made prompt topics
            raise UserError(f"nothing to assign new exchanges to: {no_clustering(engine, args.on)}")
        embed = embed_config(args)
        if not {"model", "fast"} & getattr(args, "options_given", frozenset()):
            # The clustering's own embedder: after `cluster --fast`, `--model DIR` or imported
            # vectors, a plain `assign` (what `status` and the UI advise) refused MiniLM's.
            model, fast = split_embedder_name(run["embedder"])
            embed = replace(embed, model=model, fast=fast)
        return assign_new(engine, config=ClusterStepConfig(embed=embed))
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def clusters(args: argparse.Namespace) -> dict[str, Any]:
    """The latest run's clusters, topics then groups, each weakest first when scored, else
    largest first. A group's weakest topics carry their current names (a rename after
    scoring shows), which the stored report, keyed by id, cannot."""
    from storage.clusters import latest_run, load_clusters
    from storage.reports import load_cluster_reports, stale_reports

    engine = open_database(args.db, read_only=True)  # reads only: beside other readers
    try:
        run = latest_run(engine, on_field=args.on)
        if run is None:
            return {
                "run_id": None,
                "on": args.on,
                "clusters": [],
                "hint": no_clustering(engine, args.on),
            }
        rows = load_clusters(engine, run["id"])
        reports = load_cluster_reports(engine, run["id"], level=None)
        stale = stale_reports(engine, run["id"])
    finally:
        engine.dispose()
    names = {row["id"]: row["name"] for row in rows}
    listed = []
    for row in rows:
        if args.level is not None and row["level"] != args.level:
            continue
        report = reports.get(row["id"], {})
        if "weakest_topics" in report:
            report = {
                **report,
                "weakest_topics": [
                    {**t, "name": names.get(t["id"], t["id"])} for t in report["weakest_topics"]
                ],
            }
        listed.append(
            {
                "id": row["id"],
                "parent": row["parent_id"],
                "level": row["level"],
                "name": row["name"],
                "auto_name": row["auto_name"],
                "keywords": row["keywords"],
                "size": row["size"],
                "share": row["share"],
                "tags": row["tags"],
                # The report's own count: after `assign` and `score reward apply` it covers
                # exchanges the clustering never counted in `size`.
                "scored_n": report.get("n"),
                "scored_share": report.get("share"),
                **{k: v for k, v in report.items() if k not in {"n", "share"}},
            }
        )
    listed.sort(key=_weakest_first)
    if stale:
        warn(stale)
    return {
        "run_id": run["id"],
        "on": run["on_field"],
        "embedder": run["embedder"],
        "rows": run["n_rows"],
        "unassigned_share": run["unassigned_share"],
        "clusters": listed,
        "warnings": [stale] if stale else [],
    }


def _weakest_first(cluster: dict[str, Any]) -> tuple[Any, ...]:
    """Topics then groups, each by weakness; equal weakness (0 for every cluster not below
    the overall mean, often half of them) goes lowest mean reward first, as in the UI, not
    largest first; unscored clusters come last, largest first."""
    weakness, reward = cluster.get("weakness"), cluster.get("reward_mean")
    return (
        cluster["level"],
        weakness is None,
        -(weakness or 0.0),
        reward is None,
        reward if reward is not None else 0.0,
        -cluster["size"],
    )


def rename(args: argparse.Namespace) -> dict[str, Any]:
    """Store a person's name for a cluster and report the name it now goes by: a blank name
    is stored as none, which restores the automatic one."""
    from storage.clusters import annotate_cluster

    engine = open_database(args.db, existing=True)
    try:
        cluster = _require_cluster(engine, args.cluster_id)
        stored = annotate_cluster(engine, args.cluster_id, name=args.name)
    finally:
        engine.dispose()
    return {
        "cluster_id": args.cluster_id,
        "name": stored["name"],
        "auto_name": cluster["auto_name"],
    }


def tag(args: argparse.Namespace) -> dict[str, Any]:
    from storage.clusters import add_tag, load_tags, remove_tag

    engine = open_database(args.db, existing=True)
    try:
        _require_cluster(engine, args.cluster_id)
        added = None
        if not args.remove:
            added = add_tag(engine, "cluster", args.cluster_id, args.tag)
        elif not remove_tag(engine, "cluster", args.cluster_id, args.tag):
            carried = load_tags(engine, "cluster").get(args.cluster_id, [])
            raise UserError(
                f"cluster {args.cluster_id} has no tag {args.tag!r} "
                f"({'its tags: ' + ', '.join(carried) if carried else 'it has none'})"
            )
    finally:
        engine.dispose()
    result = {"cluster_id": args.cluster_id, "tag": args.tag, "removed": args.remove}
    return result | ({} if added is None else {"already_tagged": not added})


def _require_cluster(engine: Engine, cluster_id: str) -> dict[str, Any]:
    """The cluster, which must be in the latest clustering of some `on` field (ids are unique
    across them)."""
    from storage.clusters import latest_runs, load_clusters

    for run in latest_runs(engine):
        for cluster in load_clusters(engine, run["id"]):
            if cluster["id"] == cluster_id:
                return cluster
    raise UserError(f"no cluster {cluster_id!r} in the latest clustering (see `clusters`)")
