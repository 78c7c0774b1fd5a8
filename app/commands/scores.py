"""`score`, `reward` and `route`: reward models, the expert win predictor, and the routing
they suggest."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
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
from app.line_files import LineRecord, NotLineDelimited, read_line_file
from ingest.battles import parse_winner
from storage.engine import open_database

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
    from ingest.embed import Embedder


def score(args: argparse.Namespace) -> dict[str, Any]:
    """`score` (everything), `score reward train` or `score reward apply`."""
    from dataclasses import replace

    from ingest.embed import EmbedderError, resolve_device
    from scoring.labels import SIGNALS, LabelConfig
    from scoring.reward_head import STRUCTURAL_HEAD
    from scoring.reward_model import FineTuneConfig
    from scoring.reward_step import reward_members
    from scoring.routing import RoutingConfig
    from scoring.step import ScoreConfig, apply_reward, score_all, train_reward_only
    from storage.clusters import latest_run

    if args.what not in ([], ["reward", "train"], ["reward", "apply"]):
        raise UserError("use `score`, `score reward train` or `score reward apply`")
    if args.model_id and args.what != ["reward", "apply"]:  # it was silently ignored
        raise UserError(
            "--model-id picks the stored model `score reward apply` uses; `score` and "
            "`score reward train` train a new one"
        )
    _refuse_unread_options(args)
    try:
        members = reward_members(args.mode)
    except ValueError as error:
        raise UserError(str(error)) from None
    _refuse_unread_member_options(args, members)
    try:  # fine-tuning asked for `cuda` on a machine without one failed in torch's `.to()`
        resolve_device(args.device)  # with a traceback, after the other members were stored
    except EmbedderError as error:
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
    if "cost_tolerance" in getattr(args, "options_given", ()) and not costs:  # else unused
        raise UserError(
            "--cost-tolerance would go unused without --costs FILE: it is how far the "
            "cheapest expert's win rate may fall behind the best's"
        )
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
        embed=replace(embed_config(args), progress=True),
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
            return apply_reward(engine, config=config, model_id=args.model_id)
        if args.what == ["reward", "train"]:
            result = train_reward_only(engine, config=config)
        else:
            result = score_all(engine, config=config)
            if latest_run(engine, on_field=args.on) is None:  # what to cluster, said exactly
                result["no_clustering"] = no_clustering(engine, args.on)
    except EmbedderError as error:  # --model, or the embedder a stored head was trained on
        raise UserError(str(error)) from error
    finally:
        engine.dispose()
    for message in result.get("warnings", []):
        warn(message)
    return result


# `score`'s options that only training a reward model reads, and those that only the
# routing and leaderboards of a whole `score` read (dest → flag).
_TRAINING_OPTIONS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "mode",
        "steps",
        "max_length",
        "finetune_batch_size",
        "epochs",
        "reward_model",
        "alpha_retry",
        "alpha_edit",
        "alpha_length",
        "alpha_rating",
        "alpha_thumbs",
        "alpha_battle",
        "ended_within",
        "continued_at_least",
        "rating_scale",
    )
}
_ROUTING_OPTIONS = {
    name: "--" + name.replace("_", "-")
    for name in ("costs", "cost_tolerance", "route_cheapest", "predicted_battles")
}


def _refuse_unread_options(args: argparse.Namespace) -> None:
    """`score reward apply` scores with a stored model and `score reward train` leaves
    routing and leaderboards as `score` made them: an option either would not read was
    silently unused (`score reward apply --reward-model DIR` applied the stored model, and
    `score reward train --costs F` chose no cheaper expert), so it is refused, naming it."""
    given = getattr(args, "options_given", frozenset())
    routing = [flag for name, flag in _ROUTING_OPTIONS.items() if name in given]
    if args.what == ["reward", "apply"]:
        training = [flag for name, flag in _TRAINING_OPTIONS.items() if name in given]
        if training or routing:
            raise UserError(
                f"`score reward apply` scores with a stored reward model (--model-id), so "
                f"{', '.join(training + routing)} would go unused: train with "
                "`convoscope score` or `score reward train` (--reward-model DIR scores with "
                "your own model there)"
            )
        embedder = [
            flag for name, flag in (("model", "--model"), ("fast", "--fast")) if name in given
        ]
        if embedder:  # the stored model's own embedder is loaded whatever is asked
            raise UserError(
                f"`score reward apply` reads with the embedder the stored model was trained "
                f"on, so {', '.join(embedder)} would go unused"
            )
    elif args.what == ["reward", "train"] and routing:
        raise UserError(
            f"`score reward train` leaves routing and leaderboards as `score` made them, so "
            f"{', '.join(routing)} would go unused: give them to `convoscope score`"
        )
    elif args.what == ["reward", "train"]:
        embedder = [
            flag
            for name, flag in (
                ("model", "--model"),
                ("fast", "--fast"),
                ("batch_size", "--batch-size"),
            )
            if name in given
        ]
        if embedder:  # the reward members read texts; only `score`'s win predictor embeds
            raise UserError(
                f"`score reward train` embeds nothing (the reward models read the texts), so "
                f"{', '.join(embedder)} would go unused: give them to `convoscope score`"
            )


# The options of one reward member each (dest → flag).
_FINETUNE_OPTIONS = {
    "steps": "--steps",
    "max_length": "--max-length",
    "finetune_batch_size": "--finetune-batch-size",
}
_HEAD_OPTIONS = {"epochs": "--epochs"}


def _refuse_unread_member_options(args: argparse.Namespace, members: tuple[str, ...]) -> None:
    """Options of reward members that will not be trained were silently unused: `--mode head
    --steps 1600` fine-tuned nothing, and `--reward-model DIR --mode ensemble` scored with DIR
    alone. Refused, naming them."""
    given = getattr(args, "options_given", frozenset())
    if args.reward_model:
        options = {"mode": "--mode", **_FINETUNE_OPTIONS, **_HEAD_OPTIONS}
        unread = [flag for name, flag in options.items() if name in given]
        if unread:
            raise UserError(
                f"--reward-model scores with your own model and trains none, so "
                f"{', '.join(unread)} would go unused"
            )
        return
    for member, options, doing in (
        ("finetune", _FINETUNE_OPTIONS, "fine-tunes no model"),
        ("head", _HEAD_OPTIONS, "trains no head"),
    ):
        unread = [flag for name, flag in options.items() if name in given]
        if unread and member not in members:
            raise UserError(
                f"--mode {args.mode} {doing}, so {', '.join(unread)} would go unused "
                f"(add {member} to --mode, e.g. --mode {args.mode}+{member})"
            )


def _expert_costs(path: Path) -> dict[str, float]:
    """`--costs FILE`: a JSON object of expert name → cost (per request, per token: any unit,
    only the order matters). A BOM (a Windows editor's) is no part of the JSON: it was
    refused as "not JSON"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
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
    check_input_file(path, "lines to read")
    try:
        records, rejects = read_line_file(path, fields, **shapes)
    except NotLineDelimited as error:
        raise UserError(str(error)) from None
    warn_skipped(rejects, "bad lines")
    if not records:
        first = f" (first: {rejects[0]})" if rejects else ""
        expected = f"JSONL objects with {', '.join(fields)}"
        if shapes.get("alternative"):
            expected += f" (or {', '.join(shapes['alternative'])})"
        raise UserError(f"{path}: no usable line; expected {expected}{first}")
    return records, [r.as_dict() for r in rejects]


def route(args: argparse.Namespace) -> dict[str, Any]:
    """Experts ranked for each prompt, by the stored win predictor."""
    from scoring.step import load_predictor

    if args.export:
        if args.text is not None or args.file:  # it wrote the table and routed nothing
            raise UserError("--export writes the routing table and routes no prompt: give it alone")
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
    choices belong to an older clustering (one clustered again since, or removed by `prune`,
    which removes only superseded ones) is written with a warning (its per-prompt rule still
    holds)."""
    from ingest.files import unwritable_reason
    from scoring.step import load_routing_table, newer_predictor
    from storage.clusters import latest_run, newer_run, run_stored

    problem = unwritable_reason(args.export)
    if problem is not None:
        raise UserError(f"--export {args.export} {problem}")
    engine = open_database(args.db, read_only=True)  # reads only: beside other readers
    try:
        table = load_routing_table(engine)
        run_id = table["clustering_run_id"]
        pruned = run_id is not None and not run_stored(engine, run_id)
        on = table["clustering_on"]
        current = latest_run(engine, on) if pruned and on is not None else None
        newer = None if run_id is None else newer_run(engine, run_id)
        stale_predictor = newer_predictor(engine)
        routed = {entry["cluster_id"] for entry in table["clusters"]}
        table["instructions"], left_out = _best_instructions(engine, routed)
    finally:
        engine.dispose()
    if stale_predictor is not None:
        warn(
            f"the routing table was made with an older win predictor than win predictor "
            f"{stale_predictor}, which `convoscope route` ranks with: a gateway applying it would "
            "route otherwise; run `convoscope score` for a table of the current predictor"
        )
    if not table["clusters"]:
        warn(
            "the routing table has no per-cluster choices (nothing was clustered on the field "
            "`score` ranked, --on): it routes each prompt by the predictor alone; run "
            "`convoscope cluster` then `convoscope score` to add them"
        )
    if pruned:  # newer_run cannot name what replaced it: the run is gone; its field is kept
        since = "" if current is None else f" (run {current['id']}, the latest clustering of {on}s)"
        warn(
            f"the routing table's clusters are those of clustering run {run_id}, which "
            "`convoscope prune` removed as superseded (it keeps the newest of each field): the "
            f"exchanges were clustered again since{since}, so its per-cluster choices name "
            "clusters that changed; run `convoscope score` for a table of the current clusters"
        )
    if newer is not None:
        warn(
            f"the routing table's clusters are those of clustering run {run_id}, and the "
            f"exchanges were clustered again since (run {newer['id']}): its per-cluster "
            "choices name clusters that changed; run `convoscope score` for a table of the "
            "current clusters"
        )
    args.export.parent.mkdir(parents=True, exist_ok=True)
    encoder_folder = _ship_static_encoder(table, args.export)
    args.export.write_text(json.dumps(table, indent=2))
    return {
        "path": str(args.export),
        "encoder_folder": None if encoder_folder is None else str(encoder_folder),
        "clusters": len(table["clusters"]),
        "clustering_run_id": run_id,
        "newer_clustering_run_id": (
            newer["id"] if newer is not None else current["id"] if current is not None else None
        ),
        "clustering_run_pruned": pruned,
        "newer_predictor_id": stale_predictor,
        "instructions": len(table["instructions"]),
        "instructions_left_out": left_out,
    }


def _ship_static_encoder(table: dict[str, Any], out: Path) -> Path | None:
    """After `score --fast` the table's encoder is a static model convoscope distilled, which
    a gateway cannot rebuild from its name: its folder is copied beside the table (`rt-encoder`
    for `rt.json`, replaced whole on a new export) and named in `encoder.static_model`,
    relative to the table. Returns that folder, or None for an encoder a name loads."""
    import shutil
    import tempfile

    from ingest.embed import EmbedderError
    from ingest.embed_fast import MAX_TOKENS, split_embedder_name, static_model_dir

    model, fast = split_embedder_name(table["encoder"]["name"])
    if not fast:
        return None
    try:
        source = static_model_dir(model)
    except EmbedderError as error:
        raise UserError(f"cannot copy the table's fast encoder beside it ({error})") from None
    target = out.parent / f"{out.stem}-encoder"
    if target.exists() and not (target / "config.json").exists():
        raise UserError(
            f"{target} exists and is not an encoder folder `route --export` wrote; the table's "
            "fast encoder is copied there: move it, or export to another name"
        )
    staging = Path(tempfile.mkdtemp(prefix=".encoder-", dir=out.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    table["encoder"].update(
        static_model=target.name,
        max_length=MAX_TOKENS,
        loader="model2vec: StaticModel.from_pretrained(static_model).encode(texts, max_length)",
    )
    return target


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


def _best_instructions(
    engine: Engine, routed: set[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Per cluster of `routed` (the table's), the best-scoring instruction version among
    those whose replay beat the original answers to the same inputs, and how many versions
    were left out, by reason.

    A gateway applies what this table carries: a version never scored (no `replay report`
    after `score`), or one that scored below the answers it would replace, is not carried,
    nor one of a cluster the table routes no prompt to (a topic gone since, or another
    field's), which no gateway would reach. A version scored before the original mean was
    stored (schema 0005) counts as unscored until its run is reported again.
    """
    from storage.reports import load_instructions

    best: dict[str, dict[str, Any]] = {}
    left_out = {"not_scored": 0, "not_better_than_original": 0, "cluster_not_in_table": 0}
    for version in load_instructions(engine):
        if version["cluster_id"] not in routed:
            left_out["cluster_not_in_table"] += 1
            continue
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
