"""The `convoscope` command line: parse arguments, call one pipeline step, report.

Results go to stdout (a JSON object with `--json`, a short human summary otherwise); progress
and errors go to stderr, so `--json` output can always be piped. Errors a user can fix exit
with status 2 and a one-line message; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from app import commands
from ingest.readers import FORMATS as INGEST_FORMATS
from storage.clusters import DEFAULT_ON, ON_FIELDS
from storage.engine import StorageError, explain_failure
from storage.views import PERIODS

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _pairs(text: str, option: str, shape: str) -> list[tuple[str, str]]:
    """`a=1,b=2` → [("a", "1"), ("b", "2")]; the error names the option and its shape."""
    pairs = []
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{option} expects {shape} pairs, got {pair!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _parse_mapping(text: str) -> dict[str, str]:
    """`prompt=question,response=answer` → {"prompt": "question", "response": "answer"}; a
    field named twice is refused (the last one silently won)."""
    mapping: dict[str, str] = {}
    for key, value in _pairs(text, "--map", "field=column"):
        if key in mapping:
            raise argparse.ArgumentTypeError(
                f"--map names {key} twice ({mapping[key]!r} and {value!r}): keep one"
            )
        mapping[key] = value
    return mapping


def _parse_filter(text: str) -> list[tuple[str, str]]:
    """`model=a,model=b,source=f` → every pair, so a repeated key selects either value."""
    return _pairs(text, "--filter", "key=value")


def _positive_float(text: str) -> float:
    """A size limit: zero or less would reject every line."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _weight(text: str) -> float:
    """A label weight: NaN or a negative weight would silently empty or invert the target."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def _rating_scale(text: str) -> tuple[float, float]:
    """MIN:MAX of logged ratings: a 1-10 log read on the default 1-5 scale made every rating of
    5 or more fully good."""
    low, _, high = text.partition(":")
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX such as 1:10, got {text!r}") from None
    if not (all(math.isfinite(b) for b in bounds) and bounds[0] < bounds[1]):
        raise argparse.ArgumentTypeError(f"MIN must be below MAX, both numbers, got {text}")
    return bounds


def _moment(text: str, *, end: bool) -> datetime:
    """`--since`/`--until`: `commands.parse_moment`, its error as argparse's."""
    try:
        return commands.parse_moment(text, end=end)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _whole_number(minimum: int) -> Callable[[str], int]:
    """A count of at least `minimum`, refused while parsing: `--sample 0` ran a demo to "only
    0 exchanges are stored", `--k 0` said "needs --k", `--min-cluster-size 1` showed HDBSCAN's
    own message, which names no option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


_positive_int = _whole_number(1)
_at_least_two = _whole_number(2)  # clusters, groups, a topic's members
_non_negative = _whole_number(0)


def _seed(text: str) -> int:
    """A random seed numpy takes (0 to 2**32 - 1): `--seed -1` failed in UMAP only after the
    whole embedding, in an error that did not name the option."""
    value = _non_negative(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be less than 2**32 (4294967296), got {text}")
    return value


def _tag(text: str) -> str:
    """A tag as typed, without surrounding spaces (" billing" and "billing" are one tag)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a tag cannot be empty")
    return text.strip()


def _http_url(text: str) -> str:
    """An endpoint's base URL: anything else would fail every input, each after its retries."""
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(
            f"expected an http(s) URL such as http://127.0.0.1:8000/v1, got {text!r}"
        )
    return text


def _port(text: str) -> int:
    """A TCP port: Streamlit would otherwise fail late, after the UI seemed to start."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, saying how to give a value that starts with "-" (a tag named `-draft`),
    which argparse reads as an unknown option and reports as a missing value."""

    _tokens: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._tokens = list(sys.argv[1:] if args is None else args)
        parsed, extra = super().parse_known_args(args, namespace)
        # The options typed, by dest (a subcommand's parser adds its own): a default value
        # cannot tell an option left out from one given, and a command refuses one it would
        # not read rather than leave it silently unused.
        actions = self._option_string_actions
        typed = {
            actions[t.partition("=")[0]].dest
            for t in self._tokens
            if t.partition("=")[0] in actions
        }
        parsed.options_given = getattr(parsed, "options_given", frozenset()) | typed
        return parsed, extra

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):
            message += ' (a value starting with "-" is given as --option=-value)'
        elif any(_value_like(t) and t not in self._option_string_actions for t in self._tokens):
            message += ' (a value starting with "-" goes after --: convoscope tag t3 -- -draft)'
        super().error(message)


def _value_like(token: str) -> bool:
    """`-draft` may be a value; `--bogus` is an option typed wrong; `-1` argparse already
    takes as a value (hinting at `--` for it would hide the real error, a negative limit)."""
    return token.startswith("-") and not token.startswith("--") and not _is_number(token)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convoscope",
        allow_abbrev=False,  # a prefix guess turns a typo like `--mode` into `--model`
        description="See what your chat models are asked and how well they answer.",
    )
    db_help = (
        "database URL or file (default: $CONVOSCOPE_DB, else ./convoscope.duckdb); "
        "duckdb:///path, sqlite:///path and postgresql://… all work"
    )
    parser.add_argument("--db", help=db_help)
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=partial(_Parser, allow_abbrev=False),
    )

    # Each subcommand also accepts --db and --json after its name (`ingest --db x.duckdb` is
    # the order people type); SUPPRESS keeps the global value when they are not given there.
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    common = argparse.ArgumentParser(add_help=False, parents=[database])
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print a JSON summary on stdout",
    )

    # Commands that select exchanges by their logged time, as the UI's Dates filter does.
    dates = argparse.ArgumentParser(add_help=False)
    dates.add_argument(
        "--since",
        type=partial(_moment, end=False),
        metavar="DATE",
        help="only exchanges logged on or after this day (or ISO date-time; UTC)",
    )
    dates.add_argument(
        "--until",
        type=partial(_moment, end=True),
        metavar="DATE",
        help="only exchanges logged up to the end of this day (or before this ISO date-time)",
    )

    # Commands that act on "the latest clustering" take the newest run of this field
    # (storage.clusters.latest_run), the same default everywhere.
    clustering = argparse.ArgumentParser(add_help=False)
    clustering.add_argument(
        "--on",
        choices=ON_FIELDS,
        default=DEFAULT_ON,
        help=f"use the latest clustering of this field, made by `cluster --on F` "
        f"(default: {DEFAULT_ON})",
    )

    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument(
        "--format",
        choices=list(INGEST_FORMATS),
        help="skip auto-detection (convoscope: a file `convoscope export` wrote, JSONL, CSV or "
        "Parquet; csv or parquet reads such a file as a log, under new ids)",
    )
    reading.add_argument(
        "--map",
        type=_parse_mapping,
        default={},
        help="CSV/Parquet columns for canonical fields, e.g. prompt=question,response=answer",
    )
    reading.add_argument(
        "--rejects",
        type=Path,
        help="where bad records go, appended to an existing file "
        "(default: a new ./convoscope-rejects-*.jsonl)",
    )
    reading.add_argument(
        "--max-line-mb",
        type=_positive_float,
        default=8.0,
        help="longer lines (or JSON array items) are rejected (default 8)",
    )

    reading.add_argument(
        "--merge-history",
        action="store_true",
        help="OpenAI chat logs that repeat a chat's history with every request (a gateway's): "
        "store each chat once, in its last state, not once per request",
    )

    ingest = sub.add_parser(
        "ingest", parents=[common, reading], help="read log files into the database"
    )
    ingest.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="a log file, or a folder of them"
    )
    ingest.add_argument("--batch-size", type=int, default=10_000, help=argparse.SUPPRESS)
    ingest.set_defaults(handler=commands.ingest)

    export = sub.add_parser(
        "export",
        parents=[common, clustering, dates],
        help="write exchanges (or judged battles) to a file",
    )
    export.add_argument("--out", type=Path, required=True, help="output file")
    export.add_argument(
        "--format",
        choices=["csv", "parquet", "jsonl", "openai", "battles"],
        help="default: from the file name, else jsonl; battles: the judged battles as the "
        "battles JSONL that ingest reads back (takes --model and --source only)",
    )
    export.add_argument(
        "--model",
        action="append",
        default=[],
        help="only this model (repeat; battles: either answer's)",
    )
    export.add_argument("--source", action="append", default=[], help="only this source file")
    export.add_argument(
        "--cluster", action="append", default=[], help="only this cluster or parent (repeat)"
    )
    export.add_argument("--tag", action="append", default=[], help="only rows tagged so (repeat)")
    export.add_argument("--min-reward", type=float, help="only rows scored at least this")
    export.add_argument("--max-reward", type=float, help="only rows scored at most this")
    export.add_argument(
        "--spreadsheet-safe",
        action="store_true",
        help="CSV only: prefix cells a spreadsheet would run as formulas (=, +, -, @, tab, CR) "
        "with ' (default: cells as stored, for pandas)",
    )
    export.set_defaults(handler=commands.export)

    embedding = argparse.ArgumentParser(add_help=False)
    embedding.add_argument(
        "--model", help="sentence-transformers model name or directory (default: all-MiniLM-L6-v2)"
    )
    embedding.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    embedding.add_argument(
        "--on",
        choices=ON_FIELDS,
        default=DEFAULT_ON,
        help="what text stands for an exchange (default: prompt with a slice of context)",
    )
    embedding.add_argument(
        "--fast", action="store_true", help="static (model2vec) embeddings: much faster on CPU"
    )
    embedding.add_argument(
        "--batch-size", type=_positive_int, default=64, help="texts per model call"
    )

    embed = sub.add_parser("embed", parents=[common, embedding], help="embed stored exchanges")
    embed.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE",
        help="import vectors made elsewhere (JSONL or Parquet rows of exchange_id or text, "
        "and vector) instead of embedding",
    )
    embed.add_argument(
        "--name", help="with --from: what to call them (cluster with --model imported:NAME)"
    )
    embed.set_defaults(handler=commands.embed)

    topics = argparse.ArgumentParser(add_help=False)
    topics.add_argument(
        "--min-cluster-size",
        type=_at_least_two,
        help="smallest topic (default: half the square root of the rows fitted, at least 10)",
    )
    topics.add_argument(
        "--sample-size",
        type=_positive_int,
        default=50_000,
        help="rows to fit on; the rest are assigned (default: 50000)",
    )
    topics.add_argument(
        "--reducer", choices=["umap", "pca", "none"], default="umap", help="dimension reduction"
    )
    topics.add_argument(
        "--clusterer", choices=["hdbscan", "kmeans"], default="hdbscan", help="clustering"
    )
    topics.add_argument("--k", type=_at_least_two, help="number of clusters for --clusterer kmeans")
    topics.add_argument(
        "--no-reassign",
        action="store_true",
        help="leave outliers unassigned (default: join the nearest cluster when close enough)",
    )
    topics.add_argument(
        "--parents", type=_at_least_two, help="number of parent groups (default: auto)"
    )
    topics.add_argument("--seed", type=_seed, default=42)

    cluster = sub.add_parser(
        "cluster",
        parents=[common, embedding, topics],
        help="cluster embedded exchanges into topics",
    )
    cluster.add_argument(
        "--llm-names",
        metavar="MODEL",
        help="name clusters with this chat model (sends cluster examples to --llm-base-url)",
    )
    cluster.add_argument(
        "--llm-base-url", type=_http_url, help="OpenAI-compatible endpoint for --llm-names"
    )
    cluster.add_argument(
        "--llm-api-key-env",
        help="variable holding the API key, which must be set (default OPENAI_API_KEY, "
        "optional: a local server takes any key)",
    )
    cluster.set_defaults(handler=commands.cluster)

    assign = sub.add_parser(
        "assign",
        parents=[common, embedding],
        help="put new exchanges into the latest clusters without a refit",
    )
    assign.set_defaults(handler=commands.assign)

    listing = sub.add_parser(
        "clusters", parents=[common, clustering], help="list clusters, weakest first"
    )
    listing.add_argument("--level", type=int, choices=[0, 1], help="0 = topics, 1 = groups")
    listing.set_defaults(handler=commands.clusters)

    trend = sub.add_parser(
        "trend",
        parents=[common, clustering, dates],
        help="topics over time (per day, week or month of the logs' times), most worsened first",
    )
    trend.add_argument(
        "--by", choices=PERIODS, help="the period (default: by the span of the logs' times)"
    )
    trend.add_argument("--cluster", metavar="ID", help="only this topic")
    trend.add_argument(
        "--model", action="append", help="only exchanges this model served (repeat for more)"
    )
    trend.set_defaults(handler=commands.trend)

    rename = sub.add_parser("rename", parents=[common], help="give a cluster a name of your own")
    rename.add_argument("cluster_id")
    rename.add_argument("name", help="the new name; an empty string restores the automatic one")
    rename.set_defaults(handler=commands.rename)

    tag = sub.add_parser("tag", parents=[common], help="tag a cluster (or untag with --remove)")
    tag.add_argument("cluster_id")
    tag.add_argument("tag", type=_tag)
    tag.add_argument("--remove", action="store_true")
    tag.set_defaults(handler=commands.tag)

    score = sub.add_parser(
        "score",
        parents=[common, embedding],
        help="train the reward model and win predictor, score exchanges, rank clusters",
        description="`convoscope score` does everything; `score reward train` only trains the "
        "reward model and scores every exchange with it; `score reward apply [--model-id ID]` "
        "scores every exchange with a stored reward model, without training.",
    )
    score.add_argument(
        "what", nargs="*", metavar="reward train|apply", help="only the reward model step"
    )
    score.add_argument(
        "--mode",
        default="head+lexical",
        help="reward members, joined by +: head (the answer's structure: length, layout, "
        "refusals; seconds), lexical (the answer's word n-grams, seconds), finetune (the "
        "bundled MiniLM: minutes, use a GPU); several are trained on one split and their "
        "standardised scores summed; ensemble = all three, the most accurate "
        "(default: head+lexical)",
    )
    score.add_argument(
        "--steps", type=int, default=300, help="fine-tuning steps (modes with finetune)"
    )
    score.add_argument(
        "--max-length", type=int, default=128, help="tokens the fine-tuned model reads (≤ 512)"
    )
    score.add_argument(
        "--finetune-batch-size",
        type=int,
        default=16,
        help="texts per fine-tuning step (--batch-size is the embedder's)",
    )
    score.add_argument("--model-id", help="the stored reward model `score reward apply` uses")
    score.add_argument("--alpha-retry", type=_weight, default=1.0, help="weight of retries")
    score.add_argument("--alpha-edit", type=_weight, default=1.0, help="weight of edits")
    score.add_argument(
        "--alpha-length", type=_weight, default=1.0, help="weight of leaving / continuing"
    )
    score.add_argument("--alpha-rating", type=_weight, default=1.0, help="weight of star ratings")
    score.add_argument("--alpha-thumbs", type=_weight, default=1.0, help="weight of thumbs")
    score.add_argument("--alpha-battle", type=_weight, default=1.0, help="weight of judged battles")
    score.add_argument(
        "--ended-within",
        type=_positive_int,
        default=1,
        metavar="K",
        help="an answer with fewer than K user turns after it is one the user left (bad); "
        "default 1: the last answer",
    )
    score.add_argument(
        "--continued-at-least",
        type=_positive_int,
        default=3,
        metavar="N",
        help="an answer with N or more user turns after it, not retried, is good (default 3)",
    )
    score.add_argument(
        "--rating-scale",
        type=_rating_scale,
        default=(1.0, 5.0),
        metavar="MIN:MAX",
        help="the range of logged star ratings, mapped to 0-1 (default 1:5)",
    )
    score.add_argument(
        "--epochs", type=int, help="reward head training epochs (default: the head's, 30)"
    )
    score.add_argument(
        "--reward-model",
        metavar="DIR",
        help="score with your own sequence-classification reward model instead of training",
    )
    score.add_argument(
        "--costs",
        type=Path,
        metavar="FILE",
        help='cost per expert, a JSON object {"model": cost}: each cluster then also names the '
        "cheapest expert within --cost-tolerance of the best",
    )
    score.add_argument(
        "--cost-tolerance",
        type=float,
        default=0.02,
        help="predicted win rate the cheapest choice may give up (default 0.02)",
    )
    score.add_argument(
        "--route-cheapest",
        action="store_true",
        help="the exported routing table sends each cluster to that cheapest expert",
    )
    score.add_argument(
        "--predicted-battles",
        type=_non_negative,
        default=10,
        metavar="N",
        help="battles' worth of the win predictor's estimate per expert in each cluster's "
        "leaderboard, beside its judged battles (default 10; 0 = judged battles only)",
    )
    score.set_defaults(handler=commands.score)

    reward = sub.add_parser(
        "reward",
        parents=[common],
        help="score (prompt, response) pairs or judged battles from a JSONL file",
    )
    reward.add_argument(
        "--file",
        type=Path,
        required=True,
        help='JSONL lines {"prompt", "response"}, or battles {"prompt", "response_a", '
        '"response_b"[, "winner", "model_a", "model_b"]}: with winners, the agreement with the '
        "judge beside 'the longer answer wins'",
    )
    reward.add_argument("--reward-model", metavar="DIR", help="your own reward model directory")
    reward.set_defaults(handler=commands.reward)

    route = sub.add_parser(
        "route", parents=[common], help="rank experts for a prompt (or export the routing table)"
    )
    route.add_argument("text", nargs="?", help="the prompt to route")
    route.add_argument("--file", type=Path, help="one prompt per line (or JSONL with `prompt`)")
    route.add_argument("--export", type=Path, help="write the routing table JSON here")
    route.set_defaults(handler=commands.route)

    replay = sub.add_parser(
        "replay",
        parents=[common, clustering],
        help="send saved inputs to an OpenAI-compatible endpoint (or: replay report|judge RUN)",
        description="`convoscope replay --model M --base-url URL [selection]` runs or resumes a "
        "replay; `convoscope replay report RUN` compares its answers with the originals; "
        "`convoscope replay judge RUN --model JUDGE --base-url URL` asks a chat model which "
        "answer is better (order randomised) and adds its verdicts to the report. "
        "The API key is read from $OPENAI_API_KEY (or --api-key-env) and never stored.",
    )
    replay.add_argument("action", nargs="?", choices=["run", "report", "judge"], default="run")
    replay.add_argument("run_id", nargs="?", metavar="RUN", help="the run to report on or judge")
    replay.add_argument("--model", help="model name the endpoint serves (for judge: the judge)")
    replay.add_argument("--base-url", type=_http_url, help="e.g. http://127.0.0.1:8000/v1")
    replay.add_argument("--cluster", help="only exchanges in this cluster (latest clustering)")
    replay.add_argument("--tag", help="only exchanges tagged so, or in clusters tagged so")
    replay.add_argument(
        "--filter",
        type=_parse_filter,
        action="extend",
        default=[],
        help="model=NAME,source=FILE,since=DATE,until=DATE; a model or source given again "
        "(here or in another --filter) adds values: model=a,model=b replays both; dates as "
        "export's --since/--until; with --cluster/--tag, narrows their exchanges",
    )
    replay.add_argument(
        "--sample", type=_positive_int, help="replay (or judge) a deterministic sample of N inputs"
    )
    replay.add_argument("--seed", type=_seed, default=0)
    replay.add_argument(
        "--instruction", type=Path, help="file whose text becomes the system message"
    )
    # Left out, these take the resumed run's values, else the defaults their help names.
    replay.add_argument("--concurrency", type=_positive_int, help="requests at once (default 8)")
    replay.add_argument(
        "--rate-limit", type=_positive_float, help="requests per second at most (default: no cap)"
    )
    replay.add_argument(
        "--timeout",
        type=_positive_float,
        help="seconds per attempt, the whole reply (60; judge: 120)",
    )
    replay.add_argument("--max-attempts", type=_positive_int, help="tries per input (default 5)")
    replay.add_argument(
        "--api-key-env",
        help="variable holding the API key, which must be set (default OPENAI_API_KEY)",
    )
    replay.add_argument(
        "--resume",
        metavar="RUN",
        help="finish an interrupted run, with its model, endpoint, instruction and options "
        "unless given",
    )
    replay.add_argument(
        "--against",
        metavar="RUN",
        help="replay report: also compare the run's answers with another run's, on the inputs "
        "both answered (two instructions or two models on one cluster)",
    )
    replay.add_argument(
        "--take-over",
        action="store_true",
        help="with --resume (or replay judge): take the run from the process that drives it "
        "(or judges it with that judge), without waiting for its lease to lapse (only when "
        "that process is dead: a live one stops, but its requests in flight were sent)",
    )
    replay.set_defaults(handler=commands.replay)

    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="remove stored models, score rows and clusterings nothing reads any more",
        description="Remove stored artefacts (reward models, win predictors, routing tables) "
        "and the reward scores of the models removed, keeping the newest --keep of each kind, "
        "the model of the latest scores, the models the latest clusterings' reports name and "
        "an ensemble's members; and superseded clustering runs with their clusters, "
        "assignments and reports, keeping the newest --keep of each --on field (every command "
        "reads the latest; names, notes and tags are kept by cluster id, and a removed run's "
        "ids are never given to a new topic). One transaction; a second prune removes "
        "nothing. SQLite is vacuumed after; a DuckDB file keeps most of its size (copy it to a "
        "new file to shrink it: see the README's Prune); PostgreSQL reuses the space (VACUUM "
        "FULL returns it to the system).",
    )
    prune.add_argument(
        "--keep",
        type=_positive_int,
        default=commands.DEFAULT_KEEP,
        help="newest versions of each kind, and clusterings of each field, to keep "
        f"(default {commands.DEFAULT_KEEP})",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    prune.set_defaults(handler=commands.prune)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="what the database holds and the commands that would bring it up to date",
        description="Counts of what is stored (logs, vectors, the latest clustering of each "
        "field, reward scores, replays), what each step has not covered yet (exchanges no "
        "clustering placed, exchanges with no reward, stale cluster reports) and the commands "
        "to run next. Reads counts only, never the logs' text; never creates a database.",
    )
    status.set_defaults(handler=commands.status)

    run = sub.add_parser(
        "run",
        parents=[common, reading, embedding, topics],
        help="ingest → embed → cluster → score in one command",
        description="The whole job: ingest PATH... (none: what is stored), embed what is new, "
        "cluster, train the reward model and score every cluster. Each step stores its result "
        "as it ends, so a re-run redoes only what is missing.",
    )
    run.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    run.add_argument("--no-score", action="store_true", help="stop after clustering")
    run.set_defaults(handler=commands.run)

    ui = sub.add_parser("ui", parents=[database], help="open the Streamlit UI on the database")
    ui.add_argument("--port", type=_port, default=8501)
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: this machine only; the app has no login)",
    )
    ui.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    ui.set_defaults(handler=commands.ui)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the whole job on a ShareGPT sample (ingest → score), then open the UI",
    )
    demo.add_argument(
        "--sample", type=_positive_int, default=800, help="conversations to take (default 800)"
    )
    demo.add_argument("--full", action="store_true", help="take every whole conversation")
    demo.add_argument(
        "--no-ui", action="store_true", help="stop after scoring instead of opening the UI"
    )
    demo.add_argument("--port", type=_port, default=8501, help="port for the UI")
    demo.set_defaults(handler=commands.demo)
    return parser


def _take_late_words(args: argparse.Namespace, extra: list[str]) -> bool:
    """Give a command the words typed after its options: argparse fills positionals before
    the first option only, so `score reward --mode head train` and `replay report --json RUN`
    came back as unrecognized arguments. False when the words are no such words."""
    if args.command == "score" and set(extra) <= {"reward", "train", "apply"}:
        args.what = [*args.what, *extra]
        return True
    if args.command != "replay" or args.action not in ("report", "judge") or args.run_id:
        return False  # a replay to run takes no word: one there is a mistake, refused
    if len(extra) == 1 and not extra[0].startswith("-"):
        args.run_id = extra[0]
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not _take_late_words(args, extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # When a write fails (a full disk), SQLAlchemy's pool logs the failed rollback with a
    # traceback of its own; the failure itself is said in one line below.
    logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
    status = 0
    try:
        result = args.handler(args)
    except commands.NothingDone as failure:  # still report what was tried
        print(f"convoscope: error: {failure}", file=sys.stderr)
        result, status = failure.result, 2
    except (StorageError, commands.UserError, FileNotFoundError, ValueError) as error:
        print(f"convoscope: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be written or read: name it, no traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"convoscope: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except Exception as error:  # a database failing mid-step (disk full): one line, no rows
        problem = explain_failure(error)
        if problem is None:
            raise
        print(f"convoscope: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        again = getattr(interrupt, "how_to_finish", "re-run to finish")
        print(f"convoscope: interrupted; what was stored is kept, {again}", file=sys.stderr)
        return 130
    try:
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(commands.describe(args.command, result))
        sys.stdout.flush()
    except BrokenPipeError:  # `... --json | head`: the reader stopped early; the work is done
        # Quiet the flush Python makes at exit, which would report the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


if __name__ == "__main__":
    sys.exit(main())
