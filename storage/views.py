"""Read queries behind the UI: every figure, table and list a page shows comes from here.

The UI never writes SQL; it calls these functions (through its cache) and renders what they
return. Text a user types (a keyword search) only ever reaches the database as a bound
parameter, with LIKE wildcards escaped. Every query takes the same `ViewFilter`, so a filter
chosen in the sidebar applies to every view alike. Results are plain dicts and lists, so they
cache and pickle cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.contexts import context_columns, read_with_contexts, stream_with_contexts
from storage.logs import CONVERSATION_EXPORT_COLUMNS, Row, add_conversation_fields
from storage.schema import (
    assignments,
    battles,
    cluster_annotations,
    cluster_reports,
    cluster_runs,
    clusters,
    conversations,
    exchanges,
    scores,
    tags,
)
from storage.scores import latest_scorer

_CHUNK = 5000  # ids per IN (...) probe: under SQLite's bound-parameter limit
PROMPT_PREVIEW = 200  # characters of a prompt carried by map points and search hits

# An exchange's behaviour signals, as stored (NULL = the log did not say).
SIGNAL_NAMES: tuple[str, ...] = (
    "retried",
    "edited",
    "deleted",
    "rating",
    "thumbs",
    "user_turns_after",
    "ended_conversation",
    "seconds_to_next_user_message",
)
# The exchange columns of every export: the ids a user joins on, the text and signals.
EXCHANGE_EXPORT_COLUMNS: tuple[str, ...] = (
    "id",
    "external_id",
    "conversation_id",
    "turn_index",
    "model",
    "source",
    "created_at",
    "instruction",
    "context",
    "prompt",
    "response",
    *SIGNAL_NAMES,
)
# What a UI export row holds before its scores: the exchange and its conversation's, then
# where the exchange landed.
EXPORT_COLUMNS: tuple[str, ...] = (
    *EXCHANGE_EXPORT_COLUMNS,
    *CONVERSATION_EXPORT_COLUMNS,
    "cluster_id",
    "cluster_label",
    "tags",
)
# Exchange columns a drill-down shows beside the chat turns.
DETAIL_COLUMNS: tuple[str, ...] = (
    "id",
    "conversation_id",
    "turn_index",
    "context",
    "prompt",
    "response",
    "model",
    "source",
    "created_at",
    "retried",
    "edited",
    "deleted",
    "rating",
    "thumbs",
    "user_turns_after",
    "ended_conversation",
)


@dataclass(frozen=True, slots=True)
class ViewFilter:
    """The sidebar's selection; empty tuples mean no restriction. Tags match an exchange
    tagged directly or through its cluster (or that cluster's parent group)."""

    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    tags: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.models or self.sources or self.since or self.until or self.tags)


# ---------------------------------------------------------------------------- building blocks


def _conditions(run_id: str | None, flt: ViewFilter) -> list[sa.ColumnElement[bool]]:
    """WHERE terms for `flt` over `exchanges` (joined with the run's assignments when tagged)."""
    terms: list[sa.ColumnElement[bool]] = []
    if flt.models:
        terms.append(exchanges.c.model.in_(flt.models))
    if flt.sources:
        terms.append(exchanges.c.source.in_(flt.sources))
    if flt.since is not None:
        terms.append(exchanges.c.created_at >= flt.since)
    if flt.until is not None:
        terms.append(exchanges.c.created_at < flt.until)
    if flt.tags:
        tagged = sa.select(tags.c.target_id).where(tags.c.tag.in_(flt.tags))
        direct = exchanges.c.id.in_(tagged.where(tags.c.target_kind == "exchange"))
        if run_id is None:
            terms.append(direct)
        else:
            tagged_clusters = tagged.where(tags.c.target_kind == "cluster")
            children = sa.select(clusters.c.id).where(
                clusters.c.run_id == run_id, clusters.c.parent_id.in_(tagged_clusters)
            )
            via_cluster = exchanges.c.id.in_(
                sa.select(assignments.c.exchange_id).where(
                    assignments.c.run_id == run_id,
                    sa.or_(
                        assignments.c.cluster_id.in_(tagged_clusters),
                        assignments.c.cluster_id.in_(children),
                    ),
                )
            )
            terms.append(sa.or_(direct, via_cluster))
    return terms


def _joined(run_id: str | None, scorer: str | None) -> sa.FromClause:
    """exchanges ⟕ the run's assignments ⟕ the scorer's values."""
    joined: sa.FromClause = exchanges
    if run_id is not None:
        joined = joined.outerjoin(
            assignments,
            sa.and_(assignments.c.exchange_id == exchanges.c.id, assignments.c.run_id == run_id),
        )
    if scorer is not None:
        joined = joined.outerjoin(
            scores, sa.and_(scores.c.exchange_id == exchanges.c.id, scores.c.scorer == scorer)
        )
    return joined


def _rate(column: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
    """Share of rows where a boolean signal is true, among rows where it is known."""
    return sa.func.avg(sa.case((column.is_(None), None), (column, 1.0), else_=0.0))


def _flag_rate(name: str) -> sa.ColumnElement[float]:
    """`_rate` of a flag a log marks where it happened (`retried`, `edited`): in a source that
    marks it at all, an unmarked answer was not retried (0), as `scoring.labels.source_flag`
    reads it; elsewhere it stays unknown. Read as unknown, only the retried answers were
    known, and every retry rate was 100 %."""
    column = exchanges.c[name]
    marking = exchanges.alias("marking")
    logged = sa.select(marking.c.source).where(marking.c[name].is_not(None)).distinct()
    return sa.func.avg(
        sa.case(
            (column.is_not(None), sa.case((column, 1.0), else_=0.0)),
            (exchanges.c.source.in_(logged), 0.0),
            else_=None,
        )
    )


def _json(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def display_name(row: Row) -> str:
    """A person's name wins over the automatic one."""
    return row.get("user_name") or row.get("auto_name") or str(row.get("id"))


# ------------------------------------------------------------------------------- versioning


def database_version(engine: Engine) -> tuple[Any, ...]:
    """A cheap fingerprint of everything the UI shows: it changes whenever an ingest, a run,
    a score, a report, a rename, a note or a tag does, so caches keyed on it stay fresh.
    Battles count apart from exchanges: a replay judge's verdicts are battles alone."""
    parts = (
        sa.select(sa.func.count(), sa.func.max(exchanges.c.ingested_at)).select_from(exchanges),
        sa.select(sa.func.count(), sa.func.max(battles.c.ingested_at)).select_from(battles),
        sa.select(sa.func.count(), sa.func.max(cluster_runs.c.created_at)).select_from(
            cluster_runs
        ),
        sa.select(sa.func.count(), sa.func.max(cluster_annotations.c.updated_at)).select_from(
            cluster_annotations
        ),
        sa.select(sa.func.count(), sa.func.max(tags.c.created_at)).select_from(tags),
        sa.select(sa.func.count(), sa.func.max(scores.c.created_at)).select_from(scores),
        sa.select(sa.func.count(), sa.func.max(cluster_reports.c.created_at)).select_from(
            cluster_reports
        ),
    )
    with engine.connect() as conn:
        return tuple(str(value) for part in parts for value in conn.execute(part).one())


def reward_scorer(engine: Engine) -> str | None:
    """The newest reward model's scorer name (`reward:<id>`), or None before scoring."""
    return latest_scorer(engine, "reward:")


# ---------------------------------------------------------------------------------- options


def filter_options(engine: Engine) -> dict[str, Any]:
    """What the sidebar offers: models, sources, tags and the date range of the logs."""
    with engine.connect() as conn:
        # Each result is read whole before the next query: DuckDB drops an unread one.
        models = sorted(
            conn.execute(
                sa.select(exchanges.c.model).where(exchanges.c.model.is_not(None)).distinct()
            ).scalars()
        )
        sources = sorted(conn.execute(sa.select(exchanges.c.source).distinct()).scalars())
        tag_names = sorted(conn.execute(sa.select(tags.c.tag).distinct()).scalars())
        first, last = conn.execute(
            sa.select(sa.func.min(exchanges.c.created_at), sa.func.max(exchanges.c.created_at))
        ).one()
        return {
            "models": models,
            "sources": sources,
            "tags": tag_names,
            "first": first,
            "last": last,
        }


# --------------------------------------------------------------------------------- overview


def overview(
    engine: Engine, run_id: str | None, flt: ViewFilter, *, scorer: str | None
) -> dict[str, Any]:
    """Headline figures for the filtered exchanges."""
    query = sa.select(
        sa.func.count().label("exchanges"),
        sa.func.count(sa.distinct(exchanges.c.conversation_id)).label("conversations"),
        sa.func.count(sa.distinct(exchanges.c.model)).label("models"),
        _flag_rate("retried").label("retry_rate"),
        _rate(exchanges.c.ended_conversation).label("end_rate"),
        (sa.func.avg(scores.c.value) if scorer else sa.null()).label("reward_mean"),
        (sa.func.count(assignments.c.cluster_id) if run_id else sa.literal(0)).label("assigned"),
    ).select_from(_joined(run_id, scorer))
    query = query.where(*_conditions(run_id, flt))
    with engine.connect() as conn:
        figures = dict(conn.execute(query).mappings().one())
        n_clusters = 0
        if run_id is not None:
            n_clusters = conn.execute(
                sa.select(sa.func.count())
                .select_from(clusters)
                .where(clusters.c.run_id == run_id, clusters.c.level == 0)
            ).scalar_one()
    figures["clusters"] = n_clusters
    total = figures["exchanges"] or 0
    figures["assigned_share"] = (figures["assigned"] / total) if total and run_id else None
    return figures


def cluster_table(engine: Engine, run_id: str, flt: ViewFilter, *, scorer: str | None) -> list[Row]:
    """The run's topics, weakest first, each with its report, name, tags and the figures of
    the filtered exchanges in it. Under a filter, clusters with none of them are left out, and
    the CI, weakness and reason, which describe the whole run, too: the rows then come lowest
    filtered reward first."""
    stats = (
        sa.select(
            assignments.c.cluster_id,
            sa.func.count().label("n"),
            (sa.func.avg(scores.c.value) if scorer else sa.null()).label("reward_filtered"),
            _flag_rate("retried").label("retry_filtered"),
            _rate(exchanges.c.ended_conversation).label("end_filtered"),
        )
        .select_from(_joined(run_id, scorer))
        .where(assignments.c.cluster_id.is_not(None), *_conditions(run_id, flt))
        .group_by(assignments.c.cluster_id)
    )
    with engine.connect() as conn:
        by_cluster = {row["cluster_id"]: dict(row) for row in conn.execute(stats).mappings()}
        rows = _cluster_rows(conn, run_id)
    total = sum(s["n"] for s in by_cluster.values())
    parents = {r["id"]: display_name(r) for r in rows if r["level"] == 1}
    table = []
    for row in rows:
        if row["level"] != 0:
            continue
        stat = by_cluster.get(row["id"])
        if stat is None and flt.active:
            continue
        report = row["report"]
        routing = report.get("routing") or {}
        n = stat["n"] if stat else 0
        # A report describes the whole run; under a filter the figures are recomputed.
        run_wide = bool(report) and not flt.active
        table.append(
            {
                "id": row["id"],
                "name": display_name(row),
                "auto_name": row["auto_name"],
                "parent": parents.get(row["parent_id"]) if row["parent_id"] else None,
                "parent_id": row["parent_id"],
                "keywords": row["keywords"],
                "tags": row["tags"],
                "note": row["note"],
                "size": row["size"],
                "n": n,
                "share": (n / total) if total else 0.0,
                "reward_mean": report.get("reward_mean")
                if run_wide
                else (stat or {}).get("reward_filtered"),
                "reward_ci": report.get("reward_ci") if run_wide else None,
                "retry_rate": report.get("retry_rate")
                if run_wide
                else (stat or {}).get("retry_filtered"),
                "end_rate": report.get("end_rate")
                if run_wide
                else (stat or {}).get("end_filtered"),
                "edit_rate": report.get("edit_rate") if run_wide else None,
                "best_expert": routing.get("best_expert"),
                "gain": routing.get("gain"),
                # The weakness and its reason rank the whole run; a slice has neither.
                "weakness": row["weakness"] if run_wide else None,
                "reason": report.get("reason") if run_wide else None,
            }
        )
    table.sort(key=_weakest_first)  # under a filter: the lowest filtered reward first
    return table


def group_table(engine: Engine, run_id: str, flt: ViewFilter, *, scorer: str | None) -> list[Row]:
    """The run's parent groups, weakest first, each with its report and the names of its
    weakest topics. As in `cluster_table`, a report describes the whole run, so under a filter
    the size, share, mean reward and rates are recomputed over the group's filtered
    exchanges (all its topics' rows pooled, not a mean of topic means), the CI, weakness,
    reason and weakest topics (which rank the whole run) are left out, and groups with none
    of them are left out."""
    topic = clusters.alias("topic")
    stats = (
        sa.select(
            topic.c.parent_id,
            sa.func.count().label("n"),
            (sa.func.avg(scores.c.value) if scorer else sa.null()).label("reward_filtered"),
            _flag_rate("retried").label("retry_filtered"),
            _flag_rate("edited").label("edit_filtered"),
            _rate(exchanges.c.ended_conversation).label("end_filtered"),
        )
        .select_from(
            _joined(run_id, scorer).join(
                topic, sa.and_(topic.c.run_id == run_id, topic.c.id == assignments.c.cluster_id)
            )
        )
        .where(topic.c.parent_id.is_not(None), *_conditions(run_id, flt))
        .group_by(topic.c.parent_id)
    )
    with engine.connect() as conn:
        by_group = {row["parent_id"]: dict(row) for row in conn.execute(stats).mappings()}
        rows = _cluster_rows(conn, run_id)
    total = sum(s["n"] for s in by_group.values())
    names = {r["id"]: display_name(r) for r in rows}
    table = []
    for row in rows:
        if row["level"] != 1:
            continue
        stat = by_group.get(row["id"])
        if stat is None and flt.active:
            continue
        report = row["report"]
        n = stat["n"] if stat else 0
        run_wide = bool(report) and not flt.active
        filtered = stat or {}
        table.append(
            {
                "id": row["id"],
                "name": display_name(row),
                "keywords": row["keywords"],
                "tags": row["tags"],
                "topics": sum(1 for r in rows if r["parent_id"] == row["id"]),
                "n": n,
                "share": (n / total) if total else 0.0,
                "reward_mean": report.get("reward_mean")
                if run_wide
                else filtered.get("reward_filtered"),
                "reward_ci": report.get("reward_ci") if run_wide else None,
                "retry_rate": report.get("retry_rate")
                if run_wide
                else filtered.get("retry_filtered"),
                "edit_rate": report.get("edit_rate") if run_wide else filtered.get("edit_filtered"),
                "end_rate": report.get("end_rate") if run_wide else filtered.get("end_filtered"),
                "weakness": row["weakness"] if run_wide else None,
                "reason": report.get("reason") if run_wide else None,
                "weakest_topics": [
                    names.get(t["id"], t["id"])
                    for t in (report.get("weakest_topics", []) if run_wide else [])
                ],
            }
        )
    table.sort(key=_weakest_first)  # under a filter: the lowest filtered reward first
    return table


def _weakest_first(row: Row) -> tuple[Any, ...]:
    weakness = row["weakness"]
    reward = row["reward_mean"]
    return (
        weakness is None,
        -(weakness or 0.0),
        reward is None,
        reward if reward is not None else 0.0,
        -row["n"],
    )


def _cluster_rows(conn: Connection, run_id: str) -> list[Row]:
    """Every cluster of a run with its annotation, tags and report (payload parsed)."""
    query = (
        sa.select(
            clusters.c.id,
            clusters.c.parent_id,
            clusters.c.level,
            clusters.c.auto_name,
            clusters.c.keywords,
            clusters.c.size,
            clusters.c.share,
            clusters.c.representatives,
            cluster_annotations.c.name.label("user_name"),
            cluster_annotations.c.note,
            cluster_reports.c.weakness,
            cluster_reports.c.payload,
        )
        .select_from(
            clusters.outerjoin(
                cluster_annotations, cluster_annotations.c.cluster_id == clusters.c.id
            ).outerjoin(
                cluster_reports,
                sa.and_(
                    cluster_reports.c.run_id == clusters.c.run_id,
                    cluster_reports.c.cluster_id == clusters.c.id,
                ),
            )
        )
        .where(clusters.c.run_id == run_id)
        .order_by(clusters.c.level, clusters.c.size.desc(), clusters.c.id)
    )
    rows = [dict(r) for r in conn.execute(query).mappings()]
    cluster_tags = _tags_by_target(conn, "cluster")
    for row in rows:
        row["keywords"] = _json(row["keywords"], [])
        row["representatives"] = _json(row["representatives"], [])
        row["report"] = _json(row.pop("payload"), {})
        row["tags"] = cluster_tags.get(row["id"], [])
    return rows


def _tags_by_target(conn: Connection, kind: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    query = sa.select(tags.c.target_id, tags.c.tag).where(tags.c.target_kind == kind)
    for target, tag in conn.execute(query.order_by(tags.c.tag)):
        found.setdefault(target, []).append(tag)
    return found


def cluster_names(engine: Engine, run_id: str) -> dict[str, str]:
    """cluster id → the name shown for it, for every cluster of a run (topics and groups)."""
    query = (
        sa.select(clusters.c.id, clusters.c.auto_name, cluster_annotations.c.name)
        .select_from(
            clusters.outerjoin(
                cluster_annotations, cluster_annotations.c.cluster_id == clusters.c.id
            )
        )
        .where(clusters.c.run_id == run_id)
    )
    with engine.connect() as conn:
        return {cid: user or auto for cid, auto, user in conn.execute(query)}


# ---------------------------------------------------------------------------------- cluster


def cluster_detail(engine: Engine, run_id: str, cluster_id: str) -> Row | None:
    """One cluster with its parent's name, report, name, note and tags; None if not in run."""
    with engine.connect() as conn:
        rows = {r["id"]: r for r in _cluster_rows(conn, run_id)}
    row = rows.get(cluster_id)
    if row is None:
        return None
    parent = rows.get(row["parent_id"]) if row["parent_id"] else None
    row["name"] = display_name(row)
    row["parent"] = display_name(parent) if parent else None
    row["children"] = [display_name(r) for r in rows.values() if r["parent_id"] == cluster_id]
    return row


def cluster_exchanges(
    engine: Engine,
    run_id: str,
    cluster_id: str,
    flt: ViewFilter,
    *,
    scorer: str | None,
    order: str = "worst",
    limit: int = 10,
) -> list[Row]:
    """Exchanges of one cluster with their reward and their conversation's free-text feedback:
    the `worst` (lowest reward, else most behavioural complaints), or the `representative`
    ones the clustering picked."""
    columns, added = context_columns([exchanges.c[name] for name in DETAIL_COLUMNS])
    reward = scores.c.value if scorer else sa.null()
    query = (
        sa.select(*columns, reward.label("reward"), conversations.c.feedback_text)
        .select_from(
            _joined(run_id, scorer).outerjoin(
                conversations, conversations.c.id == exchanges.c.conversation_id
            )
        )
        .where(assignments.c.cluster_id == cluster_id, *_conditions(run_id, flt))
    )
    with engine.connect() as conn:
        if order == "representative":
            ids = _json(
                conn.execute(
                    sa.select(clusters.c.representatives).where(
                        clusters.c.run_id == run_id, clusters.c.id == cluster_id
                    )
                ).scalar_one_or_none(),
                [],
            )[:limit]
            if not ids:
                return []
            rows = read_with_contexts(conn, query.where(exchanges.c.id.in_(ids)), added)
            found = {r["id"]: r for r in rows}
            return [found[i] for i in ids if i in found]
        if order != "worst":
            raise ValueError(f"order must be 'worst' or 'representative', not {order!r}")
        complaints = (
            sa.case((exchanges.c.retried, 1), else_=0)
            + sa.case((exchanges.c.edited, 1), else_=0)
            + sa.case((exchanges.c.ended_conversation, 1), else_=0)
        )
        ordering = [complaints.desc(), exchanges.c.id]
        if scorer:
            ordering.insert(0, scores.c.value.asc().nulls_last())
        query = query.order_by(*ordering).limit(limit)
        return read_with_contexts(conn, query, added)


def reward_values(
    engine: Engine, run_id: str, cluster_id: str | None, flt: ViewFilter, *, scorer: str
) -> list[float]:
    """Reward of every filtered exchange in a cluster (or in the whole run when None)."""
    query = (
        sa.select(scores.c.value)
        .select_from(_joined(run_id, scorer))
        .where(scores.c.value.is_not(None), *_conditions(run_id, flt))
    )
    if cluster_id is not None:
        query = query.where(assignments.c.cluster_id == cluster_id)
    with engine.connect() as conn:
        return [float(v) for v in conn.execute(query).scalars()]


# -------------------------------------------------------------------------------- over time

PERIODS: tuple[str, ...] = ("day", "week", "month")


def pick_period(first: date | None, last: date | None) -> str:
    """The period that makes a readable series of [first, last]: days for up to a month of
    logs, weeks for up to half a year, months beyond."""
    if first is None or last is None:
        return "week"
    days = (last - first).days
    return "day" if days <= 31 else "week" if days <= 183 else "month"


def cluster_trend(
    engine: Engine,
    run_id: str,
    flt: ViewFilter,
    *,
    scorer: str | None,
    period: str | None = None,
    cluster_id: str | None = None,
) -> dict[str, Any]:
    """The run's exchanges per period of their `created_at` (UTC): how many, how many the
    scorer scored, their mean reward and its sample SD, retry and end rates, for each
    cluster (`rows`; cluster None: not placed, outliers included) and for all of them
    (`totals`). `periods` lists every period from the first to the last, empty ones too (a
    week without traffic is news); `undated` counts the filtered exchanges without a time,
    which no period holds. `period` None picks one from the times' span (`pick_period`)."""
    terms = [*_conditions(run_id, flt)]
    if cluster_id is not None:
        terms.append(assignments.c.cluster_id == cluster_id)
    joined = _joined(run_id, scorer)
    dated = exchanges.c.created_at.is_not(None)
    with engine.connect() as conn:
        if period is None:
            span = sa.select(
                sa.func.min(exchanges.c.created_at), sa.func.max(exchanges.c.created_at)
            )
            first, last = conn.execute(span.select_from(joined).where(dated, *terms)).one()
            period = pick_period(first, last)
        start = _period_start(period, engine.dialect.name)
        figures = (
            start.label("start"),
            sa.func.count().label("exchanges"),
            (sa.func.count(scores.c.value) if scorer else sa.literal(0)).label("scored"),
            (sa.func.avg(scores.c.value) if scorer else sa.null()).label("reward_mean"),
            (sa.func.avg(scores.c.value * scores.c.value) if scorer else sa.null()).label("sq"),
            _flag_rate("retried").label("retry_rate"),
            _rate(exchanges.c.ended_conversation).label("end_rate"),
        )
        by_cluster = sa.select(assignments.c.cluster_id, *figures).group_by(
            assignments.c.cluster_id, start
        )
        rows = [
            dict(row)
            for row in conn.execute(by_cluster.select_from(joined).where(dated, *terms)).mappings()
        ]
        totals = [
            dict(row)
            for row in conn.execute(
                sa.select(*figures).select_from(joined).where(dated, *terms).group_by(start)
            ).mappings()
        ]
        undated = sa.select(sa.func.count()).select_from(_joined(run_id, None))
        missing = conn.execute(undated.where(exchanges.c.created_at.is_(None), *terms)).scalar_one()
    for row in (*rows, *totals):
        row["start"] = _day(row["start"])
        row["reward_sd"] = _sample_sd(row.pop("sq"), row["reward_mean"], row["scored"])
    rows.sort(key=lambda r: (r["start"], r["cluster_id"] or ""))
    totals.sort(key=lambda r: r["start"])
    periods = _period_range(totals[0]["start"], totals[-1]["start"], period) if totals else []
    return {
        "period": period,
        "periods": periods,
        "rows": rows,
        "totals": totals,
        "undated": missing,
    }


def _sample_sd(mean_square: float | None, mean: float | None, n: int) -> float | None:
    """The sample standard deviation from a mean and a mean of squares (None below 2 values),
    so a change between periods can carry its uncertainty without reading every value."""
    if mean_square is None or mean is None or n < 2:
        return None
    return math.sqrt(max(mean_square - mean * mean, 0.0) * n / (n - 1))


def _period_start(period: str, dialect: str) -> sa.ColumnElement[Any]:
    """The first day of the period (weeks start on Monday) that holds each exchange's
    `created_at`. SQLite has no date_trunc; its date functions say the same. `period` is one
    of PERIODS, never user text, and is written into the SQL as a constant: PostgreSQL
    refuses a GROUP BY whose expression has other bound parameters than the selected one."""
    if period not in PERIODS:
        raise ValueError(f"the period is one of {', '.join(PERIODS)}, not {period!r}")
    column = exchanges.c.created_at
    if dialect == "sqlite":
        if period == "day":
            return sa.func.date(column)
        if period == "week":  # back 6 days, then on to a Monday: this week's Monday
            return sa.func.date(
                column, sa.literal_column("'-6 days'"), sa.literal_column("'weekday 1'")
            )
        return sa.func.strftime(sa.literal_column("'%Y-%m-01'"), column)
    return sa.func.date_trunc(sa.literal_column(f"'{period}'"), column)


def _day(value: Any) -> str:
    """A period's start, as each database returns it (datetime, date or text), in ISO form."""
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)[:10]


def _period_range(first: str, last: str, period: str) -> list[str]:
    """Every period's start from `first` to `last` (both starts of `period`, ISO dates)."""
    out = []
    day, end = date.fromisoformat(first), date.fromisoformat(last)
    while day <= end:
        out.append(day.isoformat())
        if period == "day":
            day += timedelta(days=1)
        elif period == "week":
            day += timedelta(days=7)
        else:
            day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return out


# ----------------------------------------------------------------------------------- search


def keyword_search(
    engine: Engine,
    run_id: str | None,
    text: str,
    flt: ViewFilter,
    *,
    scorer: str | None = None,
    limit: int = 50,
) -> list[Row]:
    """Filtered exchanges whose prompt or response contains `text` (case-insensitive),
    lowest reward first when scored.

    `text` is a bound parameter and its `%`, `_` and escape characters are escaped, so a
    search for "100%" finds exactly that and never becomes a pattern or SQL.
    """
    needle = text.strip().lower()
    if not needle:
        return []
    return _hits(engine, run_id, flt, scorer=scorer, where=_contains(needle), limit=limit)


def keyword_count(engine: Engine, run_id: str | None, text: str, flt: ViewFilter) -> int:
    """How many filtered exchanges `keyword_search` would find with no limit: the page shows
    the first few and says how many there are, not the limit, as if it were all of them."""
    needle = text.strip().lower()
    if not needle:
        return 0
    query = (
        sa.select(sa.func.count())
        .select_from(_joined(run_id, None))
        .where(_contains(needle), *_conditions(run_id, flt))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _contains(needle: str) -> sa.ColumnElement[bool]:
    """Prompt or response contains `needle` (lower case), its LIKE wildcards escaped."""
    return sa.or_(
        sa.func.lower(exchanges.c.prompt).contains(needle, autoescape=True),
        sa.func.lower(exchanges.c.response).contains(needle, autoescape=True),
    )


def exchanges_by_ids(
    engine: Engine,
    run_id: str | None,
    ids: Sequence[str],
    flt: ViewFilter,
    *,
    scorer: str | None = None,
) -> list[Row]:
    """Search-hit rows for those of `ids` that pass `flt`, in the order given (semantic
    search ranks by meaning first, then the sidebar filter applies)."""
    found: dict[str, Row] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        for row in _hits(
            engine,
            run_id,
            flt,
            scorer=scorer,
            where=exchanges.c.id.in_(chunk),
            limit=len(chunk),
        ):
            found[row["id"]] = row
    return [found[i] for i in ids if i in found]


def _hits(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    *,
    scorer: str | None,
    where: sa.ColumnElement[bool],
    limit: int,
) -> list[Row]:
    query = (
        sa.select(
            exchanges.c.id,
            sa.func.substr(exchanges.c.prompt, 1, PROMPT_PREVIEW).label("prompt"),
            sa.func.substr(exchanges.c.response, 1, PROMPT_PREVIEW).label("response"),
            exchanges.c.model,
            exchanges.c.created_at,
            (assignments.c.cluster_id if run_id else sa.null()).label("cluster_id"),
            (scores.c.value if scorer else sa.null()).label("reward"),
        )
        .select_from(_joined(run_id, scorer))
        .where(where, *_conditions(run_id, flt))
        # Lowest reward first (the answers a search is usually after), then by id: by id
        # alone the first 50 of many hits were an arbitrary draw.
        .order_by(*((scores.c.value.asc().nulls_last(),) if scorer else ()), exchanges.c.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def run_text_rows(engine: Engine, run_id: str) -> Iterator[list[Row]]:
    """(id, prompt, response, context) of every exchange assigned in a run, in batches: what
    a semantic index needs to recompute the embedded text and find its vector.

    Ordered by (conversation, turn) so parents come first, then by id, which two exchanges
    at one turn (`storage.logs.iter_exchanges` says how) need: the index's row order breaks ties
    between equal similarities (copies of one text), so it must not be the engine's."""
    columns = [exchanges.c.id, exchanges.c.prompt, exchanges.c.response, exchanges.c.context]
    columns, added = context_columns(columns)
    query = (
        sa.select(*columns)
        .select_from(
            exchanges.join(
                assignments,
                sa.and_(
                    assignments.c.exchange_id == exchanges.c.id, assignments.c.run_id == run_id
                ),
            )
        )
        .order_by(exchanges.c.conversation_id, exchanges.c.turn_index, exchanges.c.id)
    )
    yield from stream_with_contexts(engine, query, added, _CHUNK)


def run_info(engine: Engine, run_id: str) -> Row | None:
    with engine.connect() as conn:
        row = (
            conn.execute(sa.select(cluster_runs).where(cluster_runs.c.id == run_id))
            .mappings()
            .first()
        )
    return dict(row) if row else None


# -------------------------------------------------------------------------------------- map


def map_points(
    engine: Engine,
    run_id: str,
    flt: ViewFilter,
    *,
    scorer: str | None,
    limit: int,
) -> tuple[list[Row], int]:
    """Up to `limit` filtered exchanges with their map position, cluster, model, reward and a
    prompt preview, plus how many there are in all. Beyond `limit` the sample is the rows with
    the smallest ids: ids are hashes, so that is a uniform sample, and the same one every time
    (the map does not reshuffle on each rerun)."""
    base = (
        sa.select(
            exchanges.c.id,
            assignments.c.cluster_id,
            assignments.c.x,
            assignments.c.y,
            exchanges.c.model,
            sa.func.substr(exchanges.c.prompt, 1, PROMPT_PREVIEW).label("prompt"),
            (scores.c.value if scorer else sa.null()).label("reward"),
        )
        .select_from(_joined(run_id, scorer))
        .where(assignments.c.x.is_not(None), *_conditions(run_id, flt))
    )
    count = sa.select(sa.func.count()).select_from(base.subquery())
    with engine.connect() as conn:
        total = conn.execute(count).scalar_one()
        rows = [
            dict(r) for r in conn.execute(base.order_by(exchanges.c.id).limit(limit)).mappings()
        ]
    return rows, total


# ---------------------------------------------------------------------------------- experts


def expert_matrix(engine: Engine, run_id: str) -> list[Row]:
    """One row per (topic, expert) from the run's reports: Elo with CI, battles, and the win
    rate in the cluster's battles (the `win_rate` the report gives, ties half; a report from
    before it had one: the mean Bradley–Terry win probability the Elo ratings imply)."""
    with engine.connect() as conn:
        rows = _cluster_rows(conn, run_id)
    matrix = []
    for row in rows:
        if row["level"] != 0:  # a group's leaderboard pools its topics': not a column here
            continue
        board = row["report"].get("leaderboard") or []
        ratings = [line["elo"] for line in board if line.get("elo") is not None]
        routing = row["report"].get("routing") or {}
        for line in board:
            elo = line.get("elo")
            others = [r for r in ratings if r is not elo]
            win_rate = line.get("win_rate")
            if win_rate is None and elo is not None and others:
                win_rate = sum(1.0 / (1.0 + 10 ** ((o - elo) / 400.0)) for o in others) / len(
                    others
                )
            ci = line.get("ci") or [None, None]
            matrix.append(
                {
                    "cluster_id": row["id"],
                    "cluster": display_name(row),
                    "weakness": row["weakness"],
                    "share": row["share"],
                    "model": line.get("model"),
                    "elo": elo,
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "battles": line.get("battles"),
                    "rank": line.get("rank"),
                    "win_rate": win_rate,
                    "best": line.get("model") == routing.get("best_expert"),
                }
            )
    return matrix


def routing_rows(engine: Engine, run_id: str) -> list[Row]:
    """Per topic: who serves it now, the suggested expert, its predicted win rate and gain."""
    with engine.connect() as conn:
        rows = _cluster_rows(conn, run_id)
    table = []
    for row in rows:
        routing = row["report"].get("routing")
        if row["level"] != 0 or not routing:
            continue
        served = routing.get("served_by") or {}
        table.append(
            {
                "cluster_id": row["id"],
                "cluster": display_name(row),
                "share": row["share"],
                "served_by": max(served, key=served.get) if served else None,
                "best_expert": routing.get("best_expert"),
                "predicted_win_rate": routing.get("predicted_win_rate"),
                "gain": routing.get("gain"),
                "cheapest_within_tolerance": routing.get("cheapest_within_tolerance"),
            }
        )
    table.sort(key=lambda r: -(r["gain"] or 0.0))
    return table


def battle_models(engine: Engine, flt: ViewFilter) -> list[Row]:
    """(model_a, model_b, winner) of every judged battle of two experts whose two sides pass
    the filter: the input of a global leaderboard (an expert against itself ranks nothing).

    In battle id order: the leaderboard's seeded bootstrap resamples rows by position, so rows
    in whatever order a join returns them (PostgreSQL's hash join differs from DuckDB's and
    SQLite's) gave the same battles other CIs, ranks and ties on each engine."""
    a, b = exchanges.alias("a"), exchanges.alias("b")
    query = sa.select(
        a.c.model.label("model_a"), b.c.model.label("model_b"), battles.c.winner
    ).select_from(
        battles.join(a, a.c.id == battles.c.exchange_a).join(b, b.c.id == battles.c.exchange_b)
    )
    query = query.where(a.c.model.is_not(None), b.c.model.is_not(None), a.c.model != b.c.model)
    if flt.models:
        query = query.where(a.c.model.in_(flt.models), b.c.model.in_(flt.models))
    if flt.sources:
        query = query.where(a.c.source.in_(flt.sources))
    if flt.since is not None:
        query = query.where(a.c.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(a.c.created_at < flt.until)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query.order_by(battles.c.id)).mappings()]


# ----------------------------------------------------------------------------------- export


def count_rows(
    engine: Engine, run_id: str | None, flt: ViewFilter, *, cluster_ids: Sequence[str] = ()
) -> int:
    query = sa.select(sa.func.count()).select_from(_joined(run_id, None))
    query = query.where(*_conditions(run_id, flt))
    if cluster_ids and run_id is not None:
        query = query.where(assignments.c.cluster_id.in_(list(cluster_ids)))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def score_names(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(scores.c.scorer).distinct()).scalars())


def export_rows(
    engine: Engine,
    run_id: str | None,
    flt: ViewFilter,
    *,
    cluster_ids: Sequence[str] = (),
    batch_size: int = _CHUNK,
    with_metadata: bool = False,
) -> Iterator[list[Row]]:
    """The filtered exchanges as export rows, in batches: `EXPORT_COLUMNS` (cluster id, the
    name shown for the cluster, its tags and the exchange's own, joined by "; ") followed by
    one `score:<scorer>` column per scorer in the database (None where unscored), and the
    stored `metadata` and `conversation_metadata` (JSON text) when `with_metadata`."""
    names = cluster_names(engine, run_id) if run_id else {}
    scorers = score_names(engine)
    cluster_id = assignments.c.cluster_id if run_id else sa.null()
    wanted = (*EXCHANGE_EXPORT_COLUMNS, "metadata") if with_metadata else EXCHANGE_EXPORT_COLUMNS
    selected, added = context_columns([exchanges.c[c] for c in wanted])
    query = (
        sa.select(
            *selected,
            cluster_id.label("cluster_id"),
        )
        .select_from(_joined(run_id, None))
        .where(*_conditions(run_id, flt))
        .order_by(exchanges.c.conversation_id, exchanges.c.turn_index, exchanges.c.id)
    )
    if cluster_ids and run_id is not None:
        query = query.where(assignments.c.cluster_id.in_(list(cluster_ids)))
    with engine.connect() as conn:
        cluster_tags = _tags_by_target(conn, "cluster")
        exchange_tags = _tags_by_target(conn, "exchange")
        parent_of = (
            dict(
                conn.execute(
                    sa.select(clusters.c.id, clusters.c.parent_id).where(
                        clusters.c.run_id == run_id
                    )
                ).all()
            )
            if run_id
            else {}
        )
        for batch in stream_with_contexts(engine, query, added, batch_size):
            values = _scores_for(conn, [r["id"] for r in batch]) if scorers else {}
            for row in batch:
                cid = row["cluster_id"]
                row["cluster_label"] = names.get(cid) if cid else None
                found = list(cluster_tags.get(cid, [])) if cid else []
                if cid and parent_of.get(cid):
                    found += cluster_tags.get(parent_of[cid], [])
                found += exchange_tags.get(row["id"], [])
                row["tags"] = "; ".join(sorted(set(found)))
                own = values.get(row["id"], {})
                for scorer in scorers:
                    row[f"score:{scorer}"] = own.get(scorer)
            add_conversation_fields(engine, batch, with_metadata=with_metadata)
            yield batch


def _scores_for(conn: Connection, ids: list[str]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        query = sa.select(scores.c.exchange_id, scores.c.scorer, scores.c.value).where(
            scores.c.exchange_id.in_(chunk)
        )
        for exchange_id, scorer, value in conn.execute(query):
            found.setdefault(exchange_id, {})[scorer] = value
    return found
