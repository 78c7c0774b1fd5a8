"""`replay` (with `--resume`, `report` and `judge`): saved inputs sent to a new model, and
its answers compared with the originals."""

from __future__ import annotations

import argparse
import os
import shlex
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine

from app.commands.common import (
    Interrupted,
    NothingDone,
    UserError,
    checked_window,
    clustering_used,
    count,
    no_clustering,
    parse_moment,
    safe_url,
)
from app.export import matching_sources, unmatched_models_and_sources, unmatched_window
from storage.clusters import latest_run
from storage.engine import open_database
from storage.logs import ExchangeFilter
from storage.views import filter_options

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
    from ingest.replay import ReplayConfig


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """Run or resume a replay, report on one (`replay report RUN`) or judge it."""
    from ingest.replay import ReplayError, compare, compare_runs
    from scoring.judge import JudgeError, results_by_judge
    from storage.replay import judge_statuses

    if args.action in ("report", "judge") and not args.run_id:
        raise UserError(
            f"replay {args.action} needs the run id: convoscope replay {args.action} RUN"
        )
    new_run = args.action not in ("report", "judge") and not args.resume
    chosen = [f"--{name}" for name in ("cluster", "tag", "filter", "sample") if getattr(args, name)]
    if args.resume and args.action == "run" and chosen:  # they were silently ignored
        raise UserError(
            f"{', '.join(chosen)} cannot change what a resumed run sends (its pending inputs, "
            f"chosen when it started): leave {'them' if len(chosen) > 1 else 'it'} out, or "
            "start a new run"
        )
    _refuse_unread_on(args)
    _refuse_unread_options(args)
    if args.against and args.action != "report":  # a run or judge would silently ignore it
        raise UserError("--against compares two runs' answers: give it to `replay report RUN`")
    taken = args.action == "judge" or (args.action == "run" and args.resume)
    if args.take_over and not taken:
        raise UserError(
            "--take-over takes a run from a dead process: give it with --resume RUN (or to "
            "`replay judge RUN`)"
        )
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
            run = latest_run(engine, args.on)
            cluster_of = _cluster_of(engine, run)
            scores = _reward_scores(engine)  # every exchange's: read once for both comparisons
            report = compare(engine, args.run_id, scores=scores, cluster_of=cluster_of).as_dict()
            _record_instruction_reward(engine, args.run_id, report)
            report["reward_advice"] = _reward_advice(engine, report)
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
            report["judge_runs"] = judge_statuses(engine, args.run_id)
            report["clustering"] = clustering_used(args.on, run)  # whose clusters per_cluster has
            if args.against:
                report["against"] = compare_runs(
                    engine,
                    args.run_id,
                    args.against,
                    scores=scores,
                    cluster_of=cluster_of,
                ).as_dict()
            return report
        return _run_replay(engine, args)
    except (ReplayError, JudgeError) as error:
        raise UserError(str(error)) from error
    finally:
        engine.dispose()


# The options `replay judge` and `replay report` read besides the run id (and --db, --json);
# another one typed (`replay judge RUN --cluster t3`) went silently unused.
_ACTION_READS = {
    "judge": frozenset(
        {
            "model",
            "base_url",
            "sample",
            "seed",
            "concurrency",
            "rate_limit",
            "timeout",
            "max_attempts",
            "api_key_env",
            "take_over",
        }
    ),
    "report": frozenset({"on", "against"}),
}


def _refuse_unread_options(args: argparse.Namespace) -> None:
    """`replay judge RUN --cluster t3` judged every answer of the run, and `replay report RUN
    --model M` reported as if no model were named: an option the action does not read is
    refused, naming it (the replay itself chose its inputs, instruction and model)."""
    reads = _ACTION_READS.get(args.action)
    if reads is None:
        return
    given = getattr(args, "options_given", frozenset()) - {"db", "json", "on"}  # on: above
    unread = sorted(f"--{name.replace('_', '-')}" for name in given - reads)
    if unread:
        what = {
            "judge": "judges every answer of the run with --model at --base-url",
            "report": "compares the run's answers with the originals",
        }[args.action]
        raise UserError(
            f"`replay {args.action}` {what}, so {', '.join(unread)} would go unused: the run "
            "chose its inputs and instruction when it started; a new selection is a new "
            "`convoscope replay`"
        )


def _refuse_unread_on(args: argparse.Namespace) -> None:
    """`--on` picks the clustering that `--cluster`/`--tag` select from (and that `replay
    report` gives per-cluster figures on): without them it went silently unused, so
    `replay --on response` replayed every saved input. Refused, naming the way out."""
    if "on" not in getattr(args, "options_given", ()) or args.action == "report":
        return
    if args.action == "run" and not args.resume and not (args.cluster or args.tag):
        raise UserError(
            "--on picks the clustering --cluster or --tag select from: without either it "
            "would go unused; add --cluster ID or --tag TAG, or leave --on out"
        )
    if args.action == "judge" or args.resume:
        what = "a judge" if args.action == "judge" else "a resumed run"
        raise UserError(
            f"--on picks the clustering --cluster or --tag select from, which {what} does "
            "not read: leave --on out (`replay report RUN --on FIELD` gives per-cluster "
            "figures on another clustering)"
        )


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
    select, described = _replay_selection(engine, args)
    run_id = args.resume or uuid.uuid4().hex  # known here, so an interrupt can name it
    # An instruction tried on a cluster becomes that cluster's next version, also when the run
    # is interrupted: `--resume` names no cluster, so it could not save it later.
    versioned = bool(config.instruction is not None and args.cluster and not args.resume)
    try:
        summary = run_replay(
            engine,
            config=config,
            select=select,
            run_id=run_id,
            take_over=args.take_over,
            described=described,
        ).as_dict()
    except KeyboardInterrupt:
        if versioned and get_run(engine, run_id) is not None:
            save_instruction(engine, args.cluster, config.instruction, replay_run_id=run_id)
        raise Interrupted(f"finish with `{_resume_command(args, run_id)}`") from None
    summary["resume_command"] = _resume_command(args, run_id) if summary["pending"] else None
    if summary["failed"]:  # why, in the output, not only in the UI
        errors = {i["error"] for i in run_items(engine, summary["run_id"]) if i["error"]}
        summary["errors"] = sorted(errors)[:5]
    if versioned:
        version = save_instruction(
            engine, args.cluster, config.instruction, replay_run_id=summary["run_id"]
        )
        summary["instruction_version"] = version["version"]
    if summary["sent"] and not summary["done"]:
        sent = count(summary["sent"], "input")
        raise NothingDone(f"none of the {sent} sent was answered", summary)
    return summary


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
    nothing, and a decoding error named neither the option nor the file. A byte-order mark
    (Windows Notepad writes one) is not part of the text: it was sent as the system message's
    first character."""
    try:
        text = path.read_text(encoding="utf-8-sig")
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
    return ["convoscope", *(["--db", shlex.quote(safe_url(args.db))] if args.db else [])]


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
        summary = judge_replay(
            engine, args.run_id, config=config, take_over=args.take_over
        ).as_dict()
    except KeyboardInterrupt:  # the verdicts received are stored: re-running judges the rest
        raise Interrupted(f"finish with `{_judge_command(args)}`") from None
    overall, _ = judge_results(engine, args.run_id, judge=args.model)
    summary["result"] = asdict(overall) if overall else None
    if summary["sent"] and not summary["judged"]:  # as replay: a run where nothing worked
        raise NothingDone(f"none of the {count(summary['sent'], 'pair')} sent was judged", summary)
    return summary


def _reward_advice(engine: Engine, report: dict[str, Any]) -> str | None:
    """What gives a report without rewards its rewards; None when it has them, or when every
    answered input is a saved input (nothing to compare with). `score` trains on logged
    feedback and battles: a log of saved inputs alone has neither, and advising it there only
    led to its "nothing to train on"."""
    from scoring.reward_step import REWARD_KINDS
    from storage.logs import holds_feedback
    from storage.models import model_ids

    if report["overall"] is not None or report["pairs"] == report["without_original"] > 0:
        return None
    if not report["pairs"]:
        return "nothing answered yet to score"
    if holds_feedback(engine):
        return "not scored yet (run `convoscope score`)"
    if model_ids(engine, REWARD_KINDS):
        return "not scored yet (run `convoscope score reward apply`: the stored reward model)"
    return (
        "not scored, and `convoscope score` has nothing to train on here (no logged feedback "
        "signal, no judged battle): judge the answers with `convoscope replay judge "
        f"{report['run_id']} --model JUDGE --base-url URL`, whose verdicts it trains on, or "
        "score with your own reward model: `convoscope score --reward-model DIR`"
    )


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


def _filter_window(pairs: list[tuple[str, str]]) -> tuple[datetime | None, datetime | None]:
    """`--filter since=DATE,until=DATE`, as `export --since/--until` reads its dates."""
    bounds: dict[str, datetime] = {}
    for key, value in pairs:
        if key not in ("since", "until"):
            continue
        if key in bounds:
            raise UserError(f"--filter gives {key}= twice: a window has one of each end")
        try:
            bounds[key] = parse_moment(value, end=key == "until")
        except ValueError as error:
            raise UserError(f"--filter {key}=: {error}") from None
    return checked_window(
        bounds.get("since"), bounds.get("until"), ("--filter since=", "--filter until=")
    )


def _replay_selection(
    engine: Engine, args: argparse.Namespace
) -> tuple[ExchangeFilter | list[str], dict[str, Any]]:
    """--cluster / --tag become exchange ids (those --filter matches, when it is given too);
    --filter alone becomes an ExchangeFilter. With it, what the run records of them
    (`ingest.replay.selection_record`): ids alone say nothing of what the run covered."""
    from ingest.replay import filters_of
    from storage.clusters import exchanges_in_clusters
    from storage.logs import iter_exchanges

    unknown = {key for key, _ in args.filter} - {"model", "source", "since", "until"}
    if unknown:
        raise UserError(
            f"--filter takes model=, source=, since= and until=, not {', '.join(sorted(unknown))}"
        )
    since, until = _filter_window(args.filter)
    where = ExchangeFilter(
        models=tuple(dict.fromkeys(value for key, value in args.filter if key == "model")),
        sources=matching_sources(engine, [value for key, value in args.filter if key == "source"]),
        since=since,
        until=until,
    )
    spelled = ("--filter model={}", "--filter source={}")
    options = filter_options(engine)
    unmatched = unmatched_models_and_sources(where, options, *spelled)
    unmatched += unmatched_window(where, options, "--filter since=/until=")
    if unmatched:
        raise UserError(f"nothing to replay: {'; '.join(unmatched)}")
    described: dict[str, Any] = {"filters": filters_of(where)}
    if not (args.cluster or args.tag):
        return where, described
    run = latest_run(engine, args.on)
    if run is None:
        raise UserError(
            f"--cluster/--tag select from a clustering: {no_clustering(engine, args.on)}"
        )
    ids = exchanges_in_clusters(engine, run["id"], cluster_id=args.cluster, tag=args.tag)
    if not ids:
        raise UserError(_why_no_member(engine, run, args.cluster, args.tag))
    if args.filter:  # both apply: the cluster's (or tag's) exchanges that match the filter
        matching = {
            row["id"]
            for batch in iter_exchanges(engine, where=where, columns=("id",))
            for row in batch
        }
        ids = [i for i in ids if i in matching]
        if not ids:
            raise UserError("no exchange matches both --cluster/--tag and --filter")
    return ids, {**described, **_clusters_chosen(engine, run, args.cluster, args.tag)}


def _clusters_chosen(
    engine: Engine, run: dict[str, Any], cluster: str | None, tag: str | None
) -> dict[str, Any]:
    """The cluster asked for (or the clusters tagged so) with the names they have now, and the
    clustering they are of: a run's record of them, kept when they are renamed or reclustered."""
    from storage.clusters import load_clusters

    chosen = [
        {"id": c["id"], "label": c["name"]}
        for c in load_clusters(engine, run["id"])
        if c["id"] == cluster or (tag is not None and tag in c["tags"])
    ]
    return {"clusters": chosen, "tag": tag, "on": run["on_field"], "clustering_run": run["id"]}


def _why_no_member(
    engine: Engine, run: dict[str, Any], cluster: str | None, tag: str | None
) -> str:
    """Why --cluster/--tag select nothing from `run`: most often a mistyped id or tag, which
    "no exchanges match" did not say, or a topic of another --on field's clustering."""
    from storage.clusters import latest_field_of, load_clusters

    on = run["on_field"]
    if cluster and cluster not in {c["id"] for c in load_clusters(engine, run["id"])}:
        elsewhere = latest_field_of(engine, cluster)
        hint = (
            f": it is in the clustering on {elsewhere}, pass --on {elsewhere}" if elsewhere else ""
        )
        return (
            f"no cluster {cluster!r} in the latest clustering on {on} "
            f"(see `convoscope clusters --on {on}`){hint}"
        )
    if tag and not cluster:
        return f"no exchange or cluster of the latest clustering on {on} is tagged {tag!r}"
    return "no exchange matches that --cluster/--tag"


def _reward_scores(engine: Engine) -> dict[str, float] | None:
    from storage.scores import latest_scores

    return latest_scores(engine, prefix="reward:") or None


def _cluster_of(engine: Engine, run: dict[str, Any] | None) -> dict[str, str] | None:
    """exchange id → its topic in `run` (the report's per-cluster figures), None unclustered."""
    from storage.clusters import topic_of

    return None if run is None else topic_of(engine, run["id"])
