"""Trained artefacts (reward models, win predictors, routing tables), versioned with their
config, data and metrics.

The artefact's files travel inside the database (zipped into `payload`), so a model and the
scores it wrote can never be separated, whatever the database kind.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.clusters import hold_run
from storage.engine import make_room
from storage.logs import Row, utcnow
from storage.schema import trained_models
from storage.scores import write_scores


@dataclass(frozen=True, slots=True)
class NewModel:
    """A trained artefact not stored yet: what `save_models` writes. Its id is drawn here, so
    an ensemble can name members stored in the same transaction."""

    kind: str
    files: Mapping[str, bytes]
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]
    data_fingerprint: str | None = None
    scores: Mapping[str, float] | None = None  # exchange id → value, stored with the model
    scorer_prefix: str = "reward:"
    # The clustering run the artefact is made for (a routing table's per-cluster choices):
    # held while it is stored, so it is never stored for a run `prune` removed meanwhile.
    run_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def save_model(
    engine: Engine,
    kind: str,
    *,
    files: Mapping[str, bytes],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_fingerprint: str | None = None,
    scores: Mapping[str, float] | None = None,
    scorer_prefix: str = "reward:",
    run_id: str | None = None,
) -> str:
    """Store one trained artefact (`save_models`); returns its id."""
    model = NewModel(kind, files, config, metrics, data_fingerprint, scores, scorer_prefix, run_id)
    save_models(engine, [model])
    return model.id


def save_models(engine: Engine, models: Sequence[NewModel]) -> None:
    """Store artefacts, each with the scores it gave (scorer `<scorer_prefix><id>`), in one
    transaction and in order, the last the newest.

    Stored apart, a process killed between two writes left a half: a model with no scores,
    which `score reward apply` and `reward --file` then took as the current one; or an
    ensemble's member, stored and scored, whose ensemble never came, so that member alone
    became the current reward model and its scores the latest."""
    with engine.begin() as conn:
        write_models(conn, models)
        if any(model.scores is not None for model in models):
            make_room(conn, committing=True)


def write_models(conn: Connection, models: Sequence[NewModel]) -> None:
    """`save_models` inside the caller's transaction (`storage.reports.save_scored` stores a
    whole `score` as one)."""
    created = utcnow()
    for model in models:
        if model.run_id is not None:
            hold_run(conn, model.run_id, stored=model.kind.replace("_", " "), again="score")
        created = max(utcnow(), created + timedelta(microseconds=1))  # the last, newest
        conn.execute(
            sa.insert(trained_models).values(
                id=model.id,
                kind=model.kind,
                created_at=created,
                config=json.dumps(model.config, default=str),
                metrics=json.dumps(model.metrics, default=float),
                data_fingerprint=model.data_fingerprint,
                payload=_zipped(model.files),
            )
        )
        if model.scores is not None:
            write_scores(conn, f"{model.scorer_prefix}{model.id}", model.scores)


def _zipped(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def latest_model(engine: Engine, kind: str | Sequence[str]) -> Row | None:
    """The newest artefact of a kind (or of any of several), with `files` unpacked and
    config/metrics parsed. Found by id first: DuckDB sorting the rows themselves held every
    candidate's payload in memory (a fine-tuned model's is over 100 MB) and ran out."""
    ids = model_ids(engine, kind)
    return load_model(engine, ids[0]) if ids else None


def model_ids(engine: Engine, kind: str | Sequence[str]) -> list[str]:
    """The stored artefacts of a kind (or of several), newest first: ids for a user to pick.

    Of artefacts stored at one time, the smallest id first, as `storage.prune` orders them to
    keep the newest: by time alone `latest_model` could take one that `prune --keep 1` then
    removed, and another became the current model."""
    kinds = [kind] if isinstance(kind, str) else list(kind)
    query = (
        sa.select(trained_models.c.id)
        .where(trained_models.c.kind.in_(kinds))
        .order_by(trained_models.c.created_at.desc(), trained_models.c.id)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def load_model(engine: Engine, model_id: str) -> Row | None:
    """One artefact by id (None when there is none), unpacked like `latest_model`."""
    query = sa.select(trained_models).where(trained_models.c.id == model_id)
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    if row is None:
        return None
    found = _parsed(row)
    with zipfile.ZipFile(io.BytesIO(bytes(found.pop("payload")))) as archive:
        found["files"] = {name: archive.read(name) for name in archive.namelist()}
    return found


def model_info(engine: Engine, model_id: str) -> Row | None:
    """One artefact's id, kind, time, config and metrics, without its payload (a fine-tuned
    model's is over 100 MB): what a summary says of a model it does not run."""
    columns = [trained_models.c[name] for name in ("id", "kind", "created_at", "config", "metrics")]
    query = sa.select(*columns).where(trained_models.c.id == model_id)
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return None if row is None else _parsed(row)


def _parsed(row: Mapping[str, Any]) -> Row:
    """A stored artefact's row with its config and metrics parsed."""
    found = dict(row)
    found["config"] = json.loads(found["config"] or "{}")
    found["metrics"] = json.loads(found["metrics"] or "{}")
    return found
