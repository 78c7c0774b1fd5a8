"""Embedding vectors, cached by (text hash, model name).

Vectors are stored as little-endian float32 bytes: one portable column type on all three
engines, and a 384-dimension vector costs 1.5 KB. Keying by the hash of the embedded text
(not the exchange) means the same text is embedded once however often it was logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.logs import insert_rows
from storage.schema import vectors

_CHUNK = 5000


def missing_hashes(engine: Engine, model: str, hashes: Sequence[str]) -> list[str]:
    """The hashes among `hashes` (deduplicated, order kept) with no vector for `model` yet."""
    wanted = list(dict.fromkeys(hashes))
    found: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = sa.select(vectors.c.text_hash).where(
                vectors.c.model == model, vectors.c.text_hash.in_(chunk)
            )
            found.update(conn.execute(query).scalars())
    return [h for h in wanted if h not in found]


def store_vectors(engine: Engine, model: str, hashes: Sequence[str], matrix: np.ndarray) -> int:
    """Store one vector per hash (rows of `matrix`); hashes already stored are skipped."""
    if len(hashes) != len(matrix):
        raise ValueError(f"{len(hashes)} hashes for {len(matrix)} vectors")
    data = np.ascontiguousarray(matrix, dtype="<f4")
    new = set(missing_hashes(engine, model, hashes))
    rows = []
    for text_hash, vector in zip(hashes, data, strict=True):
        if text_hash in new:
            new.discard(text_hash)  # a hash repeated in the batch is stored once
            rows.append(
                {
                    "text_hash": text_hash,
                    "model": model,
                    "dim": data.shape[1],
                    "vector": vector.tobytes(),
                }
            )
    with engine.begin() as conn:
        insert_rows(conn, vectors, rows)
    return len(rows)


def load_vectors(engine: Engine, model: str, hashes: Sequence[str]) -> np.ndarray:
    """A (len(hashes), dim) float32 matrix in the order of `hashes`; all must be stored."""
    wanted = list(dict.fromkeys(hashes))
    by_hash: dict[str, bytes] = {}
    with engine.connect() as conn:
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = sa.select(vectors.c.text_hash, vectors.c.vector).where(
                vectors.c.model == model, vectors.c.text_hash.in_(chunk)
            )
            by_hash.update((h, bytes(v)) for h, v in conn.execute(query))
    absent = [h for h in wanted if h not in by_hash]
    if absent:
        raise LookupError(f"{len(absent)} texts have no {model!r} vector; run `convoscope embed`")
    if not hashes:
        return np.zeros((0, 0), dtype=np.float32)
    # A bytearray is writable, so the array over it needs no copy (1.5 GB at 1M vectors).
    buffer = bytearray().join(by_hash[h] for h in hashes)
    by_hash.clear()
    matrix = np.frombuffer(buffer, dtype="<f4").reshape(len(hashes), -1)
    return matrix.astype(np.float32, copy=False)


def count_vectors(engine: Engine, model: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(vectors)
    if model is not None:
        query = query.where(vectors.c.model == model)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
