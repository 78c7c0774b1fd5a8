"""Replay: send saved inputs to an OpenAI-compatible endpoint and store the answers as logs.

A replay is a stored run (storage.replay) whose items are the selected inputs (context + prompt,
the instruction override as the system message). Requests go through `ingest.chat_client`, which
owns the retry policy (429, 5xx, timeouts and malformed bodies retried with backoff and jitter).

Answers are committed as they finish, grouped with whatever else finished meanwhile (group
commit: one transaction per batch instead of one per answer, so the database never throttles a
fast endpoint), each answer in the same transaction as its item's status. A SIGKILL therefore
loses only the requests in flight; running the same run id again sends only the items not done.
The process driving a run holds a lease on it (storage.replay.Lease), so a second process
resuming the same run meanwhile is refused instead of sending the same inputs again; a killed
one's lease lapses `lease_s` after its last heartbeat, or is taken over at once on request.

Each answer becomes an ordinary exchange (source `replay:<run id>`), so embedding, clustering
and scoring treat it like any other log. The API key is read from the environment at call time
and never stored, logged or kept in an error message.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from tqdm import tqdm

from ingest.chat_client import (
    Answer,
    CallStats,
    ChatClient,
    Failure,
    public_url,
    run_interruptible,
)
from ingest.pipeline import exchange_row
from ingest.records import Exchange, Message, content_hash
from storage.logs import ExchangeFilter, iter_exchanges, utcnow
from storage.replay import (
    DONE,
    FAILED,
    PENDING,
    ItemOutcome,
    Lease,
    LeaseLost,
    claim_run,
    create_run,
    exchanges_by_id,
    get_run,
    item_counts,
    keep_lease,
    open_inputs,
    record_outcomes,
    release_run,
    run_items,
)

REPLAY_SOURCE_PREFIX = "replay:"
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_BOOT_CELLS = 4_000_000  # resampled values held at once by the bootstrap
_MAX_TOKENS = 2**31  # token counts stored must fit a 32-bit column

Select = ExchangeFilter | Sequence[str] | None


class ReplayError(RuntimeError):
    """A replay that cannot start (unknown ids, a run id reused with another model...)."""


@dataclass(frozen=True)
class ReplayConfig:
    """Where to send, what to send with, and how hard to push.

    `params` are generation parameters passed to the endpoint (temperature, max_tokens...).
    `rate_limit` caps requests per second over all workers, retries included (None: no cap).
    `sample` replays a deterministic sample of that many inputs (by `seed`); `dedupe` sends
    identical requests (same messages) once. `on_progress(finished, total)` is called after
    each group commit (the UI draws its progress bar with it). `lease_s`: how long the run
    stays held by this process after its last heartbeat (one every `lease_s / 4`), so how long
    a killed process keeps another from resuming the run without `take_over`.
    """

    model: str
    base_url: str
    instruction: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    rate_limit: float | None = None
    max_attempts: int = 5
    timeout_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0
    sample: int | None = None
    seed: int = 0
    dedupe: bool = True
    progress: bool = True
    on_progress: Callable[[int, int], None] | None = field(default=None, compare=False)
    lease_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What one call of `replay` did, as `convoscope replay --json` prints it."""

    run_id: str
    model: str
    base_url: str
    resumed: bool
    items: int  # inputs in the run
    already_done: int  # done before this call, not sent again
    sent: int  # inputs sent in this call
    requests: int  # HTTP requests in this call, retries included
    done: int  # inputs answered in this call
    failed: int  # inputs that failed every attempt in this call
    retried: int  # retry attempts in this call
    pending: int  # inputs of the run still without an answer (failed ones included)
    seconds: float
    status: str  # done | incomplete
    # What the run replays (`selection_record`); None for a run stored before runs kept it
    selection: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RewardDiff:
    """New answers' reward against the originals on the same inputs."""

    n: int
    mean_original: float
    mean_new: float
    mean_diff: float
    # 95 % bootstrap interval of mean_diff; None for one pair, which bounds nothing (a
    # bootstrap of one value is that value: the interval read as certain)
    ci_low: float | None
    ci_high: float | None
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / n


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """A run's outcome and, given scores, how its answers compare with the originals."""

    run_id: str
    model: str
    base_url: str
    instruction: str | None
    created_at: str
    status: str
    counts: dict[str, int]
    pairs: int  # inputs with a stored new answer
    without_original: int  # of those, saved inputs logged without an answer: not compared
    mean_latency_s: float | None
    prompt_tokens: int
    completion_tokens: int
    overall: RewardDiff | None
    per_cluster: dict[str, RewardDiff]
    # What the run replayed (`selection_record`); None for a run stored before runs kept it
    selection: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay(
    engine: Engine,
    *,
    config: ReplayConfig,
    select: Select = None,
    run_id: str | None = None,
    take_over: bool = False,
    described: Mapping[str, Any] | None = None,
) -> ReplaySummary:
    """Create (or resume, when `run_id` names a stored run) a replay and run it to the end.

    `select` is an ExchangeFilter or a sequence of exchange ids (None: every logged exchange
    that is not itself a replay; replays' answers are inputs only when a filter names their
    run's source, never through a list of ids); it only matters when the run is created: a
    resumed run keeps its items and sends those not done yet. `described` says what chose
    those ids (`selection_record`'s keys: clusters with their names, tag, clustering field,
    filters), stored with a new run: ids alone cannot say later what the run covered. A run
    another process still drives (its lease not lapsed) is refused unless `take_over`: that
    process, if alive, then stops at its next renewal.
    """
    work = areplay(
        engine,
        config=config,
        select=select,
        run_id=run_id,
        take_over=take_over,
        described=described,
    )
    return run_interruptible(work)


async def areplay(
    engine: Engine,
    *,
    config: ReplayConfig,
    select: Select = None,
    run_id: str | None = None,
    take_over: bool = False,
    described: Mapping[str, Any] | None = None,
) -> ReplaySummary:
    """`replay` for callers that already run an event loop."""
    started = time.perf_counter()
    _check_config(config)
    run_id = run_id or uuid.uuid4().hex
    if not _RUN_ID.match(run_id):
        raise ReplayError(f"run id {run_id!r}: use 1-32 letters, digits, '-' or '_'")
    lease = Lease(run_id=run_id, owner=uuid.uuid4().hex, seconds=config.lease_s)
    run = get_run(engine, run_id)
    resumed = run is not None
    if run is None:
        _create(engine, lease, select, config, described)
    else:
        _check_same_run(run, config)
        holder = claim_run(engine, lease, take_over=take_over)
        if holder is not None:
            raise ReplayError(_held_elsewhere(holder))
    inputs = open_inputs(engine, run_id)
    before = item_counts(engine, run_id)
    stored = get_run(engine, run_id)
    selection = None if stored is None else stored["params"].get("selection")
    try:
        try:
            stats = await _send_all(engine, lease, inputs, config)
        finally:  # interrupted too: "running" would outlive the process that ran it
            after = item_counts(engine, run_id)
            status = "done" if after[PENDING] == 0 and after[FAILED] == 0 else "incomplete"
            release_run(engine, lease, status)
    except LeaseLost:
        raise ReplayError(_taken_over(run_id)) from None
    return ReplaySummary(
        run_id=run_id,
        model=config.model,
        base_url=public_url(config.base_url),
        resumed=resumed,
        items=sum(after.values()),
        already_done=before[DONE],
        sent=len(inputs),
        requests=stats.requests,
        done=stats.done,
        failed=stats.failed,
        retried=stats.retried,
        pending=after[PENDING] + after[FAILED],
        seconds=round(time.perf_counter() - started, 3),
        status=status,
        selection=selection,
    )


def _create(
    engine: Engine,
    lease: Lease,
    select: Select,
    config: ReplayConfig,
    described: Mapping[str, Any] | None,
) -> None:
    """Store a new run of the selected inputs, held by `lease`, with what selected them."""
    ids = select_inputs(engine, select, config=config)
    if not ids:
        raise ReplayError(
            "the selection matches no saved input to replay (earlier replays' answers are "
            "inputs only when --filter source=replay:RUN names their run)"
        )
    create_run(
        engine,
        lease=lease,
        model=config.model,
        base_url=public_url(config.base_url),
        instruction=config.instruction,
        params={
            **_run_params(config),
            "selection": selection_record(select, described, inputs=len(ids), config=config),
        },
        exchange_ids=ids,
    )


def _held_elsewhere(run: Mapping[str, Any]) -> str:
    """Why a run cannot be resumed now, and how to take it from a dead process."""
    since, until = (f"{run[key]:%Y-%m-%d %H:%M:%S} UTC" for key in ("owner_since", "lease_until"))
    return (
        f"run {run['id']} is being replayed by another process since {since}, which renews "
        f"its lease while it works (now until {until}): let it finish; if that process is "
        f"dead, resume after {until}, or now with `replay --resume {run['id']} --take-over`"
    )


def _taken_over(run_id: str) -> str:
    return (
        f"run {run_id} was taken over by another process (`--take-over`, or this one's lease "
        "lapsed): this one stopped sending; the answers it stored are kept, and the run is "
        "the other process's to finish"
    )


def selection_record(
    select: Select,
    described: Mapping[str, Any] | None,
    *,
    inputs: int,
    config: ReplayConfig,
) -> dict[str, Any]:
    """What a new run replays, as stored in its params under "selection": the clusters (id
    and the name they had then: names change, and a later clustering reuses no id), the tag,
    the clustering's `on` field and run, the filters, the sample asked for and the number of
    inputs chosen. Always every key, so readers need no guessing; a filter given as `select`
    is recorded when `described` does not say."""
    record: dict[str, Any] = {
        "clusters": [],
        "tag": None,
        "on": None,
        "clustering_run": None,
        "filters": {},
    }
    if isinstance(select, ExchangeFilter):
        record["filters"] = filters_of(select)
    record.update(described or {})
    record["clusters"] = [
        {"id": str(c["id"]), "label": str(c.get("label") or c["id"])} for c in record["clusters"]
    ]
    record["filters"] = {key: list(values) for key, values in record["filters"].items() if values}
    return {**record, "sample": config.sample, "inputs": inputs}


def filters_of(where: ExchangeFilter) -> dict[str, list[str]]:
    """A filter's values, by the `--filter` key that gives them (a window's ends as ISO
    instants, UTC)."""
    return {
        "model": list(where.models),
        "source": list(where.sources),
        "since": [where.since.isoformat()] if where.since else [],
        "until": [where.until.isoformat()] if where.until else [],
    }


def selection_text(selection: Mapping[str, Any] | None, *, short: bool = False) -> str:
    """A run's selection in a line of plain text ("selection not recorded" for a run stored
    before runs recorded it). `short` (a picker's label) names clusters without their ids and
    leaves out the clustering and the count. Cluster names and filter values come from the
    logs: callers that render Markdown or HTML escape this line."""
    if not selection:
        return "selection not recorded"
    clusters = ", ".join(
        f"“{c.get('label') or c.get('id')}”" if short else f"{c.get('id')} “{c.get('label')}”"
        for c in selection.get("clusters") or []
    )
    parts: list[str] = []
    if selection.get("tag"):
        parts.append(f"tag {selection['tag']}" + (f" ({clusters})" if clusters else ""))
    elif clusters:
        parts.append(f"cluster {clusters}")
    if selection.get("on") and parts and not short:
        parts.append(f"{selection['on']} clustering")
    filters = selection.get("filters") or {}
    parts += [f"{key}={','.join(values)}" for key, values in sorted(filters.items())]
    if not parts:
        parts.append("every saved input")
    inputs = selection.get("inputs")
    if inputs is not None and not short:
        sample = selection.get("sample")
        sampled = f" (sample of at most {sample:,})" if sample is not None else ""
        parts.append(f"{inputs:,} input{'' if inputs == 1 else 's'}{sampled}")
    return " · ".join(parts)


def select_inputs(engine: Engine, select: Select, *, config: ReplayConfig) -> list[str]:
    """Ids of the exchanges to replay: selected, deduplicated by request, then sampled."""
    if select is None or isinstance(select, ExchangeFilter):
        where = select or ExchangeFilter()
        named = set(where.sources)
        rows = (
            row
            for batch in iter_exchanges(
                engine, where=where, columns=("id", "context", "prompt", "source")
            )
            for row in batch
            # Replays' own answers are inputs only when their run is asked for by name.
            if not row["source"].startswith(REPLAY_SOURCE_PREFIX) or row["source"] in named
        )
    else:
        wanted = list(dict.fromkeys(select))
        found = exchanges_by_id(engine, wanted, columns=("id", "context", "prompt", "source"))
        missing = [i for i in wanted if i not in found]
        if missing:
            raise ReplayError(f"{len(missing)} exchange id(s) not found, e.g. {missing[0]!r}")
        # A cluster or tag holds earlier replays' answers too: they are not original inputs.
        rows = (found[i] for i in wanted if not found[i]["source"].startswith(REPLAY_SOURCE_PREFIX))
    ids: list[str] = []
    seen: set[str] = set()
    for row in rows:
        if not row["prompt"]:
            continue
        if config.dedupe:
            messages = request_messages(row["context"], row["prompt"], config.instruction)
            key = content_hash(json.dumps(messages, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
        ids.append(row["id"])
    if config.sample is not None and config.sample < len(ids):
        chosen = set(random.Random(config.seed).sample(ids, config.sample))
        ids = [i for i in ids if i in chosen]
    return ids


def request_messages(
    context: str | Sequence[Mapping[str, str]], prompt: str, instruction: str | None
) -> list[dict[str, str]]:
    """The chat messages for an input: its context, then its prompt; an instruction override
    replaces the context's system messages with itself, first."""
    earlier = json.loads(context) if isinstance(context, str) else context
    messages = [{"role": m["role"], "content": m["content"]} for m in earlier]
    if instruction is not None:
        messages = [
            {"role": "system", "content": instruction},
            *(m for m in messages if m["role"] != "system"),
        ]
    messages.append({"role": "user", "content": prompt})
    return messages


def _check_config(config: ReplayConfig) -> None:
    if config.concurrency < 1:
        raise ReplayError("concurrency must be at least 1")
    if config.max_attempts < 1:
        raise ReplayError("max_attempts must be at least 1")
    if config.rate_limit is not None and config.rate_limit <= 0:
        raise ReplayError("rate_limit must be positive (or None for no limit)")
    if config.sample is not None and config.sample < 1:
        raise ReplayError("sample must be at least 1")
    if config.lease_s <= 0:
        raise ReplayError("lease_s must be positive")


def _run_params(config: ReplayConfig) -> dict[str, Any]:
    """What the run records about itself: never the key, only the variable it comes from."""
    return {
        "generation": dict(config.params),
        "api_key_env": config.api_key_env,
        "concurrency": config.concurrency,
        "rate_limit": config.rate_limit,
        "max_attempts": config.max_attempts,
        "timeout_s": config.timeout_s,
        "sample": config.sample,
        "seed": config.seed,
        "dedupe": config.dedupe,
    }


def _check_same_run(run: Mapping[str, Any], config: ReplayConfig) -> None:
    """A resumed run must ask the same question, or its answers would not be comparable."""
    differ = []
    if run["model"] != config.model:
        differ.append(f"model {run['model']!r}, not {config.model!r}")
    if run["instruction"] != config.instruction:
        differ.append("another instruction")
    if run["params"].get("generation", {}) != json.loads(json.dumps(dict(config.params))):
        differ.append("other generation parameters")
    if differ:
        raise ReplayError(
            f"run {run['id']} was started with {' and '.join(differ)}: resume it with what it "
            "was started with (leave those options out), or start a new run"
        )


@dataclass(frozen=True, slots=True)
class _Finished:
    """An item's outcome and, when it succeeded, the rows to store with it."""

    outcome: ItemOutcome
    conversation_row: dict[str, Any] | None = None
    exchange_row: dict[str, Any] | None = None


async def _send_all(
    engine: Engine, lease: Lease, inputs: list[dict[str, Any]], config: ReplayConfig
) -> CallStats:
    """Send every input with `concurrency` workers; one writer commits what they finish, and a
    heartbeat renews the lease while they wait on the endpoint. Writer and heartbeat take
    turns: both update the run's row, which DuckDB refuses to do in two transactions at once."""
    client = ChatClient(config, os.environ.get(config.api_key_env))
    stats = client.stats
    if not inputs:
        return stats
    run_id = lease.run_id
    sender = _Sender(config, client, run_id)
    turns = asyncio.Lock()
    finished: asyncio.Queue[_Finished | None] = asyncio.Queue()
    pending = iter(inputs)
    bar = tqdm(
        total=len(inputs),
        desc=f"replay {run_id}",  # the id `--resume` needs if the run is interrupted
        unit=" req",
        file=sys.stderr,
        disable=None if config.progress else True,
    )

    async def worker() -> None:
        for item in pending:  # one shared iterator: each input goes to exactly one worker
            await finished.put(await sender.send(item))

    async def writer() -> None:
        committed = 0
        while True:
            batch: list[_Finished] = []
            last = await finished.get()
            while last is not None:
                batch.append(last)
                if finished.empty():
                    break
                last = finished.get_nowait()
            if batch:
                async with turns:
                    await asyncio.to_thread(_commit, engine, lease, batch)
                bar.update(len(batch))
                committed += len(batch)
                if config.on_progress is not None:
                    config.on_progress(committed, len(inputs))
                bar.set_postfix(failed=stats.failed, retried=stats.retried, refresh=False)
            if last is None:
                return

    try:
        async with client, asyncio.TaskGroup() as group:
            written = group.create_task(writer())
            beating = group.create_task(keep_lease(engine, lease, turns))
            workers = [
                group.create_task(worker()) for _ in range(min(config.concurrency, len(inputs)))
            ]
            await asyncio.gather(*workers)
            await finished.put(None)
            await written
            beating.cancel()
    except* LeaseLost as lost:  # taken over: the group stopped sending
        raise lost.exceptions[0] from None
    finally:
        bar.close()
    return stats


def _commit(engine: Engine, lease: Lease, batch: list[_Finished]) -> None:
    record_outcomes(
        engine,
        [f.outcome for f in batch],
        lease=lease,
        conversation_rows=[f.conversation_row for f in batch if f.conversation_row],
        exchange_rows=[f.exchange_row for f in batch if f.exchange_row],
    )


class _Sender:
    """Sends one input through the shared client and turns the result into rows to store."""

    def __init__(self, config: ReplayConfig, client: ChatClient, run_id: str) -> None:
        self.config = config
        self.client = client
        self.run_id = run_id
        self.endpoint = public_url(config.base_url)

    async def send(self, item: Mapping[str, Any]) -> _Finished:
        config = self.config
        messages = request_messages(item["context"], item["prompt"], config.instruction)
        result = await self.client.complete(
            config.model, messages, config.params, attempts_before=int(item["attempts"])
        )
        if isinstance(result, Failure):
            return _Finished(
                ItemOutcome(
                    exchange_id=item["id"],
                    status=FAILED,
                    attempts=result.attempts,
                    error=result.error,
                )
            )
        return self._answer(item, messages, result)

    def _answer(
        self, item: Mapping[str, Any], messages: list[dict[str, str]], answer: Answer
    ) -> _Finished:
        completion, latency, attempts = answer.completion, answer.latency_s, answer.attempts
        finish_reason = getattr(completion.choices[0], "finish_reason", None)
        usage = getattr(completion, "usage", None)
        prompt_tokens = _token_count(getattr(usage, "prompt_tokens", None))
        completion_tokens = _token_count(getattr(usage, "completion_tokens", None))
        now = utcnow()
        source = REPLAY_SOURCE_PREFIX + self.run_id
        conversation_id = content_hash("replay", self.run_id, item["id"])
        exchange = Exchange(
            conversation_id=conversation_id,
            turn_index=len(messages),
            context=tuple(Message(role=m["role"], content=m["content"]) for m in messages[:-1]),
            prompt=item["prompt"],
            response=answer.content,
            model=self.config.model,
            instruction=(
                self.config.instruction
                if self.config.instruction is not None
                else item["instruction"]
            ),
            created_at=now,
            source=source,
            external_id=item["external_id"],
            metadata={
                "replay_run": self.run_id,
                "original_exchange_id": item["id"],
                "original_model": item["model"],
                "endpoint": self.endpoint,
                "served_model": getattr(completion, "model", None),
                "latency_s": round(latency, 6),
                "attempts": attempts,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": _token_count(getattr(usage, "total_tokens", None)),
                "finish_reason": finish_reason if isinstance(finish_reason, str) else None,
            },
        )
        conversation_row = {
            "id": conversation_id,
            "external_id": item["external_id"],
            "source": source,
            "created_at": now,
            "n_messages": len(messages) + 1,
            "thumbs": None,
            "rating": None,
            "feedback_text": None,
            "metadata": json.dumps(
                {"replay_run": self.run_id, "original_conversation_id": item["conversation_id"]}
            ),
            "ingested_at": now,
        }
        row = exchange_row(exchange, now)
        return _Finished(
            ItemOutcome(
                exchange_id=item["id"],
                status=DONE,
                attempts=attempts,
                response_exchange_id=row["id"],
                latency_s=latency,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            ),
            conversation_row,
            row,
        )


def _token_count(value: object) -> int | None:
    """A token count the server reported, or None: the body is not validated, and a count
    that is not a sane int ("lots", 10**30) failed the whole commit of its batch."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_TOKENS:
        return value
    return None


def compare(
    engine: Engine,
    run_id: str,
    *,
    scores: Mapping[str, float] | None = None,
    cluster_of: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> ReplayReport:
    """A run's report: counts, latency, tokens and, given scores by exchange id, the reward of
    each new answer against its original (overall and per cluster of the original input)."""
    run = get_run(engine, run_id)
    if run is None:
        raise ReplayError(f"no replay run {run_id!r}")
    items = run_items(engine, run_id)
    done = [i for i in items if i["status"] == DONE and i["response_exchange_id"]]
    latencies = [i["latency_s"] for i in done if i["latency_s"] is not None]
    # A saved input (a prompt logged without its answer) has no original answer: the reward
    # of an empty response is no baseline, and beating it says nothing of the new answers.
    originals = exchanges_by_id(
        engine, [i["exchange_id"] for i in done], columns=("id", "response")
    )
    compared = [i for i in done if originals[i["exchange_id"]]["response"]]
    overall: RewardDiff | None = None
    per_cluster: dict[str, RewardDiff] = {}
    if scores is not None:
        paired = [(i["exchange_id"], i["exchange_id"], i["response_exchange_id"]) for i in compared]
        overall, per_cluster = _paired_diffs(paired, scores, cluster_of, n_boot=n_boot, seed=seed)
    return ReplayReport(
        run_id=run_id,
        model=run["model"],
        base_url=run["base_url"],
        instruction=run["instruction"],
        created_at=run["created_at"].isoformat(),
        status=run["status"],
        counts=item_counts(engine, run_id),
        pairs=len(done),
        without_original=len(done) - len(compared),
        mean_latency_s=float(np.mean(latencies)) if latencies else None,
        prompt_tokens=sum(i["prompt_tokens"] or 0 for i in done),
        completion_tokens=sum(i["completion_tokens"] or 0 for i in done),
        overall=overall,
        per_cluster=per_cluster,
        selection=run["params"].get("selection"),
    )


@dataclass(frozen=True, slots=True)
class RunComparison:
    """Two runs' answers to the inputs both answered: `run` as new, `against` as original in
    each RewardDiff (a prompt change or a model swap measured against the last try, not only
    against what was logged)."""

    run_id: str
    against: str
    against_model: str
    shared: int  # inputs both runs answered
    only_run: int  # answered by `run` alone: left out
    only_against: int
    overall: RewardDiff | None
    per_cluster: dict[str, RewardDiff]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_runs(
    engine: Engine,
    run_id: str,
    against: str,
    *,
    scores: Mapping[str, float] | None,
    cluster_of: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    answers: Sequence[Mapping[str, str]] | None = None,
) -> RunComparison:
    """The reward of `run_id`'s answers against `against`'s on the saved inputs both
    answered, paired by input (overall and per cluster of the input), so two instruction
    versions or two models replayed on one cluster are compared on the same prompts.
    `answers`: the two runs' `answers_by_input`, when the caller has read them already."""
    other = get_run(engine, against)
    if other is None:
        raise ReplayError(f"--against {against!r}: no such replay run")
    if against == run_id:
        raise ReplayError("--against names the run itself: give an earlier run to compare with")
    if answers is None:
        answers = [answers_by_input(engine, r) for r in (run_id, against)]
    shared = sorted(set(answers[0]) & set(answers[1]))
    overall: RewardDiff | None = None
    per_cluster: dict[str, RewardDiff] = {}
    if scores is not None:
        paired = [(i, answers[1][i], answers[0][i]) for i in shared]
        overall, per_cluster = _paired_diffs(paired, scores, cluster_of, n_boot=n_boot, seed=seed)
    return RunComparison(
        run_id=run_id,
        against=against,
        against_model=other["model"],
        shared=len(shared),
        only_run=len(answers[0]) - len(shared),
        only_against=len(answers[1]) - len(shared),
        overall=overall,
        per_cluster=per_cluster,
    )


def _paired_diffs(
    paired: Sequence[tuple[str, str, str]],
    scores: Mapping[str, float],
    cluster_of: Mapping[str, str] | None,
    *,
    n_boot: int,
    seed: int,
) -> tuple[RewardDiff | None, dict[str, RewardDiff]]:
    """The reward difference of (input, baseline answer, new answer) triples where both
    answers are scored: overall, and per cluster of the input when `cluster_of` is given."""
    scored = [
        (item, scores[old], scores[new])
        for item, old, new in paired
        if old in scores and new in scores
    ]
    overall = _reward_diff([(o, n) for _, o, n in scored], n_boot=n_boot, seed=seed)
    if cluster_of is None:
        return overall, {}
    groups: dict[str, list[tuple[float, float]]] = {}
    for item, old, new in scored:
        groups.setdefault(cluster_of.get(item, "unassigned"), []).append((old, new))
    per_cluster = {
        cluster: diff
        for cluster, diffs in sorted(groups.items())
        if (diff := _reward_diff(diffs, n_boot=n_boot, seed=seed)) is not None
    }
    return overall, per_cluster


def answers_by_input(engine: Engine, run_id: str) -> dict[str, str]:
    """Saved input id → the id of the run's stored answer to it: the inputs a run answered,
    which `compare_runs` pairs (and the UI lists apart where only one of two runs did)."""
    return {
        item["exchange_id"]: item["response_exchange_id"]
        for item in run_items(engine, run_id)
        if item["status"] == DONE and item["response_exchange_id"]
    }


def pairs(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    """Original and new answer side by side for every answered input of a run (for the UI)."""
    done = [i for i in run_items(engine, run_id) if i["status"] == DONE]
    wanted = [i["exchange_id"] for i in done] + [i["response_exchange_id"] for i in done]
    found = exchanges_by_id(engine, wanted, columns=("id", "prompt", "response", "model"))
    return [
        {
            "original_id": item["exchange_id"],
            "new_id": item["response_exchange_id"],
            "prompt": found[item["exchange_id"]]["prompt"],
            "original_model": found[item["exchange_id"]]["model"],
            "original_response": found[item["exchange_id"]]["response"],
            "new_response": found[item["response_exchange_id"]]["response"],
            "latency_s": item["latency_s"],
        }
        for item in done
    ]


def _reward_diff(
    pairs: Sequence[tuple[float, float]], *, n_boot: int, seed: int
) -> RewardDiff | None:
    """Mean reward difference (new - original) with a percentile bootstrap CI, and win rate."""
    if not pairs:
        return None
    values = np.asarray(pairs, dtype=float)
    diffs = values[:, 1] - values[:, 0]
    if len(diffs) > 1 and n_boot > 0:
        rng = np.random.default_rng(seed)
        step = max(1, _BOOT_CELLS // len(diffs))  # replicates per chunk: bounded memory
        means = np.concatenate(
            [
                diffs[
                    rng.integers(0, len(diffs), size=(min(step, n_boot - start), len(diffs)))
                ].mean(axis=1)
                for start in range(0, n_boot, step)
            ]
        )
        low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    else:
        low = high = None
    wins, ties = int((diffs > 0).sum()), int((diffs == 0).sum())
    return RewardDiff(
        n=len(diffs),
        mean_original=float(values[:, 0].mean()),
        mean_new=float(values[:, 1].mean()),
        mean_diff=float(diffs.mean()),
        ci_low=low,
        ci_high=high,
        wins=wins,
        ties=ties,
        losses=len(diffs) - wins - ties,
        win_rate=(wins + ties / 2) / len(diffs),
    )
