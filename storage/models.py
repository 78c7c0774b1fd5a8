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
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.engine import make_room
from storage.logs import Row, utcnow
from storage.schema import trained_models
from storage.scores import write_scores


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
) -> str:
    """Store a trained artefact; returns its id. With `scores` (exchange id → value), the
    values it gave are stored in the same transaction, as scorer `<scorer_prefix><id>`: stored
    apart, a process killed between the two left the newest model with no scores, which
    `score reward apply` and `reward --file` then took as the current one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    model_id = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(
            sa.insert(trained_models).values(
                id=model_id,
                kind=kind,
                created_at=utcnow(),
                config=json.dumps(config, default=str),
                metrics=json.dumps(metrics, default=float),
                data_fingerprint=data_fingerprint,
                payload=buffer.getvalue(),
            )
        )
        if scores is not None:
            write_scores(conn, f"{scorer_prefix}{model_id}", scores)
            make_room(conn, committing=True)
    return model_id


def latest_model(engine: Engine, kind: str | Sequence[str]) -> Row | None:
    """The newest artefact of a kind (or of any of several), with `files` unpacked and
    config/metrics parsed. Found by id first: DuckDB sorting the rows themselves held every
    candidate's payload in memory (a fine-tuned model's is over 100 MB) and ran out."""
    ids = model_ids(engine, kind)
    return load_model(engine, ids[0]) if ids else None


def model_ids(engine: Engine, kind: str | Sequence[str]) -> list[str]:
    """The stored artefacts of a kind (or of several), newest first: ids for a user to pick."""
    kinds = [kind] if isinstance(kind, str) else list(kind)
    query = (
        sa.select(trained_models.c.id)
        .where(trained_models.c.kind.in_(kinds))
        .order_by(trained_models.c.created_at.desc())
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
    found = dict(row)
    with zipfile.ZipFile(io.BytesIO(bytes(found.pop("payload")))) as archive:
        found["files"] = {name: archive.read(name) for name in archive.namelist()}
    found["config"] = json.loads(found["config"] or "{}")
    found["metrics"] = json.loads(found["metrics"] or "{}")
    return found
