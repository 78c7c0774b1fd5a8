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

from storage.logs import insert_new_rows
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
    with engine.begin() as conn:  # another process may embed the same texts meanwhile
        return insert_new_rows(conn, vectors, rows)


def load_vectors(engine: Engine, model: str, hashes: Sequence[str]) -> np.ndarray:
    """A (len(hashes), dim) float32 matrix in the order of `hashes`; all must be stored.

    Each chunk read is written straight into its rows: holding every vector's bytes by hash
    and then joining them held the matrix three times over (450 MB at 100K prompts)."""
    first: dict[str, int] = {}  # hash -> its first row; later rows repeat that row
    repeats: list[tuple[int, int]] = []
    for row, text_hash in enumerate(hashes):
        if text_hash in first:
            repeats.append((row, first[text_hash]))
        else:
            first[text_hash] = row
    wanted = list(first)
    matrix: np.ndarray | None = None
    filled = np.zeros(len(hashes), dtype=bool)
    with engine.connect() as conn:
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            query = sa.select(vectors.c.text_hash, vectors.c.vector).where(
                vectors.c.model == model, vectors.c.text_hash.in_(chunk)
            )
            for text_hash, blob in conn.execute(query):
                vector = np.frombuffer(blob, dtype="<f4")
                if matrix is None:
                    matrix = np.empty((len(hashes), len(vector)), dtype=np.float32)
                matrix[first[text_hash]] = vector
                filled[first[text_hash]] = True
    absent = [h for h, row in first.items() if not filled[row]]
    if absent:
        raise LookupError(f"{len(absent)} texts have no {model!r} vector; run `convoscope embed`")
    if matrix is None:
        return np.zeros((0, 0), dtype=np.float32)
    if repeats:
        rows, sources = np.asarray(repeats).T
        matrix[rows] = matrix[sources]
    return matrix


def vector_dim(engine: Engine, model: str) -> int | None:
    """The length of `model`'s stored vectors (None before any is stored)."""
    query = sa.select(vectors.c.dim).where(vectors.c.model == model).limit(1)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def count_vectors(engine: Engine, model: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(vectors)
    if model is not None:
        query = query.where(vectors.c.model == model)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
