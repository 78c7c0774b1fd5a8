"""Cluster runs, their clusters and assignments, and what people say about clusters.

A run is written in one transaction, so a crash leaves either the whole run or none of it.
Names, notes and tags that people give are keyed by the stable cluster id, not by run, so
they survive re-clustering; a person's name always wins over the automatic one.

Rows added to a run after it is stored (`assign`'s assignments, `score`'s reports) confirm,
in their own transaction, that the run is still there (`hold_run`): `prune` may remove a run
that a newer `cluster` superseded while an `assign` or `score` of it was still computing, and
rows written for it then were orphans no reader sees and no prune removes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.engine import StorageError
from storage.logs import Row, insert_new_rows, insert_rows, utcnow
from storage.schema import (
    assignments,
    cluster_annotations,
    cluster_runs,
    clusters,
    retired_cluster_ids,
    tags,
)


def save_cluster_run(
    engine: Engine, run: Row, cluster_rows: Sequence[Row], assignment_rows: Sequence[Row]
) -> None:
    """Store a finished run with all its clusters and assignments, atomically."""
    with engine.begin() as conn:
        insert_rows(conn, cluster_runs, [run])
        insert_rows(conn, clusters, list(cluster_rows))
        insert_rows(conn, assignments, list(assignment_rows))


class RunRemoved(StorageError):
    """A write for a clustering run that `convoscope prune` removed while the command ran.

    `prune` keeps the newest runs of each field, so this is a run a newer `cluster` superseded
    after the command read it; nothing was stored for it, and running the command again works
    on the latest clustering. A StorageError, so the CLI says it in one line (exit 2)."""

    def __init__(self, run_id: str, *, stored: str, again: str) -> None:
        super().__init__(
            f"clustering run {run_id} was removed by `convoscope prune` while this ran (a "
            f"newer `convoscope cluster` had superseded it), so what it computed for that run "
            f"({stored}) was not stored: "
            f"run `convoscope {again}` again, which works on the latest clustering"
        )
        self.run_id = run_id


def hold_run(conn: Connection, run_id: str, *, stored: str, again: str) -> None:
    """Confirm, first thing in the caller's write transaction, that clustering run `run_id`
    is stored, and keep `prune` from removing it until that transaction ends; raise
    RunRemoved (the transaction then stores nothing) when it is gone.

    A plain SELECT would not do: on SQLite the driver opens the transaction at its first
    write, so the SELECT runs on its own and a prune can commit between it and the insert;
    on PostgreSQL a prune's uncommitted delete is invisible to it. So:

    - SQLite: a no-op UPDATE of the run's row. It opens the transaction and takes the
      database's one write lock at once (waiting out a prune that holds it), on the newest
      snapshot, so the check and every row written after it are one step for any prune;
      its row count says whether the run is there.
    - PostgreSQL: SELECT ... FOR KEY SHARE on the run's row, the lock a foreign-key check
      takes: it waits for a prune that deleted the row to end (and then finds it gone), and
      a prune's DELETE of the row waits for this transaction, after which it deletes the
      rows this one wrote (`storage.prune` deletes the runs' rows before what hangs off them,
      in later statements that see what committed meanwhile). Writers of one run do not
      block each other.
    - DuckDB: a plain SELECT; a DuckDB file has one writing process, so no prune runs beside.
    """
    where = cluster_runs.c.id == run_id
    if conn.dialect.name == "sqlite":
        touched = sa.update(cluster_runs).where(where).values(n_rows=cluster_runs.c.n_rows)
        found = conn.execute(touched).rowcount > 0
    else:
        query = sa.select(cluster_runs.c.id).where(where)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(read=True, key_share=True)
        found = conn.execute(query).first() is not None
    if not found:
        raise RunRemoved(run_id, stored=stored, again=again)


def require_run(engine: Engine, run_id: str, *, stored: str, again: str) -> None:
    """Raise RunRemoved when clustering run `run_id` is no longer stored: for a step that
    read a run minutes ago (`assign` embeds first) to say so before it reads the run's
    clusters, which would be none. Not a guard of a write: `hold_run` is."""
    if not run_stored(engine, run_id):
        raise RunRemoved(run_id, stored=stored, again=again)


def add_assignments(engine: Engine, assignment_rows: Sequence[Row]) -> int:
    """Assign new exchanges to an existing run's clusters; already assigned ones are kept.
    Raises RunRemoved, storing nothing, when `prune` removed the run meanwhile."""
    if not assignment_rows:
        return 0
    run_id = assignment_rows[0]["run_id"]
    with engine.begin() as conn:
        hold_run(conn, run_id, stored="new assignments", again="assign")
        present = set(
            conn.execute(
                sa.select(assignments.c.exchange_id).where(assignments.c.run_id == run_id)
            ).scalars()
        )
        new = [row for row in assignment_rows if row["exchange_id"] not in present]
        insert_rows(conn, assignments, new)
    return len(new)


# What `cluster --on` clusters by, and the field whose clustering a command that acts on "the
# latest clustering" (`clusters`, `export`, `replay`, `score`, the UI) takes unless its --on
# names another.
ON_FIELDS = ("prompt", "response", "exchange")
DEFAULT_ON = "prompt"


def latest_run(engine: Engine, on_field: str = DEFAULT_ON) -> Row | None:
    """The latest clustering of `on_field`: its newest cluster run, or None before any.

    The one rule for "the latest clustering": each field's runs are their own topics, so the
    newest run of any field is not it (after `cluster --on response`, exports carried
    response topics while `clusters` listed prompt ones).

    Of runs stored at one time, the smallest id, as `storage.prune.stored_runs` orders them:
    by time alone the pick was the engine's."""
    query = (
        sa.select(cluster_runs)
        .where(cluster_runs.c.on_field == on_field)
        .order_by(cluster_runs.c.created_at.desc(), cluster_runs.c.id)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row else None


def newer_run(engine: Engine, run_id: str) -> Row | None:
    """The newest run of `run_id`'s `on` field when that is another run (the exchanges were
    clustered again since), else None: `run_id` is the newest, or is not stored."""
    on_field = run_field(engine, run_id)
    newest = None if on_field is None else latest_run(engine, on_field=on_field)
    return newest if newest is not None and newest["id"] != run_id else None


def run_field(engine: Engine, run_id: str) -> str | None:
    """The `on` field clustering run `run_id` clustered (None: no such run stored)."""
    query = sa.select(cluster_runs.c.on_field).where(cluster_runs.c.id == run_id)
    with engine.connect() as conn:
        return conn.execute(query).scalar()


def run_stored(engine: Engine, run_id: str) -> bool:
    """Whether clustering run `run_id` is stored. `prune` removes superseded runs (never the
    newest of a field), so an artefact naming a run that is gone names a stale clustering."""
    query = sa.select(sa.func.count()).select_from(cluster_runs).where(cluster_runs.c.id == run_id)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one() > 0


def latest_runs(engine: Engine) -> list[Row]:
    """The latest clustering of each `on` field clustered, in ON_FIELDS order."""
    with engine.connect() as conn:
        fields = set(conn.execute(sa.select(cluster_runs.c.on_field).distinct()).scalars())
    return [run for field in ON_FIELDS if field in fields and (run := latest_run(engine, field))]


def latest_field_of(engine: Engine, cluster_id: str) -> str | None:
    """The `on` field whose latest clustering holds `cluster_id` (ids are unique across
    fields), None when none does: says which --on a command given a cluster id needs."""
    query = (
        sa.select(cluster_runs.c.on_field, cluster_runs.c.id)
        .join(clusters, clusters.c.run_id == cluster_runs.c.id)
        .where(clusters.c.id == cluster_id)
    )
    with engine.connect() as conn:
        holding = conn.execute(query).all()
    latest = {run["id"] for run in latest_runs(engine)}
    return next((field for field, run_id in holding if run_id in latest), None)


def cluster_ids_used(engine: Engine) -> set[str]:
    """Every cluster id any run, of any `on` field, has used: the stored runs' and those of
    runs `prune` removed (`retired_cluster_ids`), which a fresh id must not take either."""
    held = sa.select(clusters.c.id).union(sa.select(retired_cluster_ids.c.cluster_id))
    with engine.connect() as conn:
        return set(conn.execute(held).scalars())


def load_clusters(engine: Engine, run_id: str) -> list[Row]:
    """A run's clusters with the display name (a person's name wins) and tags: topics then
    groups, each largest first, equal sizes by id.

    The id settles equal sizes: without it DuckDB returned them in the order they were stored
    (the fit's), SQLite and PostgreSQL in id order, so `clusters` listed unscored topics of
    one size in another order on each engine (the UI's `storage.views._cluster_rows` orders
    the same way)."""
    query = (
        sa.select(
            clusters, cluster_annotations.c.name.label("user_name"), cluster_annotations.c.note
        )
        .select_from(
            clusters.outerjoin(
                cluster_annotations, cluster_annotations.c.cluster_id == clusters.c.id
            )
        )
        .where(clusters.c.run_id == run_id)
        .order_by(clusters.c.level, clusters.c.size.desc(), clusters.c.id)
    )
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    by_cluster = load_tags(engine, "cluster")
    for row in rows:
        row["keywords"] = json.loads(row["keywords"])
        row["representatives"] = json.loads(row["representatives"] or "[]")
        row["name"] = row["user_name"] or row["auto_name"]
        row["tags"] = by_cluster.get(row["id"], [])
    return rows


def load_assignments(engine: Engine, run_id: str) -> dict[str, str | None]:
    """exchange id → cluster id (None = unassigned) for one run."""
    query = sa.select(assignments.c.exchange_id, assignments.c.cluster_id).where(
        assignments.c.run_id == run_id
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).all())


def topic_of(engine: Engine, run_id: str) -> dict[str, str]:
    """exchange id → its topic in the run, for the exchanges it assigned to one (per-cluster
    figures of a replay report and of the Replay page)."""
    return {k: v for k, v in load_assignments(engine, run_id).items() if v is not None}


def _one_line(name: str) -> str:
    """A cluster name as one line of printable text: `rename t3 $'two\nlines'` stored a line
    break that split the `clusters` table, and a control character (a bidi override) would
    reorder what is shown after it. Runs of white space become one space."""
    return "".join(ch for ch in " ".join(name.split()) if ch.isprintable())


def annotate_cluster(
    engine: Engine, cluster_id: str, *, name: str | None = None, note: str | None = None
) -> Row:
    """Set a person's name and/or note for a cluster (None leaves that field as it was); a
    blank name clears it. Returns the name and note now stored, so a caller reports what is
    kept rather than what was typed.

    Another process can annotate the same cluster first between this one's look-up and its
    insert (two people renaming at once); the insert then fails on the key, and the look-up
    runs again and updates what that process stored.
    """
    try:
        return _annotate(engine, cluster_id, name=name, note=note)
    except sa.exc.IntegrityError:
        return _annotate(engine, cluster_id, name=name, note=note)


def _annotate(engine: Engine, cluster_id: str, *, name: str | None, note: str | None) -> Row:
    with engine.begin() as conn:
        current = (
            conn.execute(
                sa.select(cluster_annotations).where(cluster_annotations.c.cluster_id == cluster_id)
            )
            .mappings()
            .first()
        )
        values: dict[str, Any] = {"updated_at": utcnow()}
        if name is not None:
            values["name"] = _one_line(name) or None
        if note is not None:
            values["note"] = note
        if current is None:
            conn.execute(sa.insert(cluster_annotations).values(cluster_id=cluster_id, **values))
        else:
            conn.execute(
                sa.update(cluster_annotations)
                .where(cluster_annotations.c.cluster_id == cluster_id)
                .values(**values)
            )
    before = {} if current is None else dict(current)
    return {field: values.get(field, before.get(field)) for field in ("name", "note")}


def add_tag(engine: Engine, kind: str, target_id: str, tag: str) -> bool:
    """Tag a cluster or an exchange; False when it carried the tag already. Tagging twice is
    a no-op, also when another process tags the same target between this one's look-up and
    its insert (`insert_new_rows`)."""
    with engine.begin() as conn:
        exists = conn.execute(
            sa.select(sa.func.count())
            .select_from(tags)
            .where(tags.c.target_kind == kind, tags.c.target_id == target_id, tags.c.tag == tag)
        ).scalar_one()
        if not exists:
            row = {"target_kind": kind, "target_id": target_id, "tag": tag, "created_at": utcnow()}
            insert_new_rows(conn, tags, [row])
    return not exists


def remove_tag(engine: Engine, kind: str, target_id: str, tag: str) -> bool:
    """Untag; False when the target did not carry the tag (a typo the caller can name)."""
    where = (tags.c.target_kind == kind, tags.c.target_id == target_id, tags.c.tag == tag)
    with engine.begin() as conn:
        present = conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one() > 0
        conn.execute(sa.delete(tags).where(*where))
    return present


def exchanges_in_clusters(
    engine: Engine, run_id: str, *, cluster_id: str | None = None, tag: str | None = None
) -> list[str]:
    """Exchange ids of one run in a cluster (a topic or a parent group), or tagged `tag`
    (directly, or through their cluster)."""
    selected: set[str] = set()
    with engine.connect() as conn:
        cluster_ids: set[str] = set() if cluster_id is None else {cluster_id}
        if tag is not None:
            tagged = conn.execute(
                sa.select(tags.c.target_kind, tags.c.target_id).where(tags.c.tag == tag)
            ).all()
            cluster_ids.update(t for kind, t in tagged if kind == "cluster")
            selected.update(t for kind, t in tagged if kind == "exchange")
        if cluster_ids:  # a group's exchanges are assigned to its topics
            cluster_ids.update(
                conn.execute(
                    sa.select(clusters.c.id).where(
                        clusters.c.run_id == run_id, clusters.c.parent_id.in_(sorted(cluster_ids))
                    )
                ).scalars()
            )
            selected.update(
                conn.execute(
                    sa.select(assignments.c.exchange_id).where(
                        assignments.c.run_id == run_id,
                        assignments.c.cluster_id.in_(sorted(cluster_ids)),
                    )
                ).scalars()
            )
    return sorted(selected)


def load_tags(engine: Engine, kind: str) -> dict[str, list[str]]:
    """target id → sorted tags, for one kind of target (cluster or exchange)."""
    query = sa.select(tags.c.target_id, tags.c.tag).where(tags.c.target_kind == kind)
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for target, tag in conn.execute(query):
            found.setdefault(target, []).append(tag)
    return {target: sorted(values) for target, values in found.items()}
