"""Vectors a user brings: `convoscope embed --from FILE --name NAME`.

Teams often embed their logs already (a paid API, a model tuned on their own data, one too
large for this machine), and re-embedding with MiniLM would cluster them in another space.
A file of their vectors is stored under `imported:NAME`, in the same cache as computed ones
(keyed by the hash of the text each stands for), so `cluster --model imported:NAME`,
`assign` and the UI's map read them as they read any model's.

Each row names what its vector stands for by one of:
- `exchange_id`: a stored exchange (`convoscope export` writes each one's `id`); its vector
  stands for the exchange's `--on` text, as a computed one would;
- `text`: the text itself, for vectors of exactly the texts convoscope embeds.

The vector is `vector`, a list of numbers, of one length for the whole name; it is stored
L2-normalised, as computed vectors are (clustering compares directions). A bad row is
rejected with its line and field and the good rows around it are stored; re-importing a
file stores only what is missing. There is no model behind an imported name, so nothing can
be embedded with it: a step that needs a vector the file did not bring says so, by count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from tqdm import tqdm

from ingest.embed import EmbedderError
from ingest.embed_step import exchange_texts, text_hash
from ingest.embed_text import On
from ingest.files import Record, excerpt, iter_json_records, whole_file_reject
from ingest.records import Reject, Truncation
from storage.engine import checkpoint
from storage.vectors import store_vectors, vector_dim

IMPORTED_PREFIX = "imported:"
_CHUNK = 4096  # vectors stored per transaction
_NAME_CHARS = 200 - len(IMPORTED_PREFIX)  # the stored model name is at most 200 characters


def imported_name(name: str) -> str:
    """The stored model name of vectors imported as `name` (validated: one line, not blank)."""
    name = name.strip()
    if not name or len(name) > _NAME_CHARS or any(c in name for c in "\r\n\t"):
        raise ValueError(
            f"--name must be one line of 1 to {_NAME_CHARS} characters (it names the vectors: "
            "`cluster --model imported:NAME` reads them)"
        )
    return name if name.startswith(IMPORTED_PREFIX) else IMPORTED_PREFIX + name


def is_imported(model: str | None) -> bool:
    return model is not None and model.startswith(IMPORTED_PREFIX)


class ImportedVectors:
    """The embedder of an imported name: its vectors are stored, and there is no model to make
    more, so a text without one is an error that says how to bring it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dim = 0  # the file's; the stored vectors carry it

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        raise EmbedderError(
            f"{len(texts)} texts have no {self.name!r} vector, and imported vectors have no "
            f"model to embed more: import vectors for them (`convoscope embed --from FILE "
            f"--name {self.name.removeprefix(IMPORTED_PREFIX)}`; `convoscope export` lists "
            "each exchange's id), or cluster with a model (--model)"
        )


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What one import read (rows, bad ones included) and stored; `rejects` lists the bad
    rows (file, line, field, why)."""

    model: str
    on: str
    read: int = 0
    stored: int = 0
    already_stored: int = 0  # rows whose text had a vector under this name (or a row before)
    rejected: int = 0
    dim: int | None = None
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_vectors(engine: Engine, path: Path, *, name: str, on: On) -> ImportSummary:
    """Store the vectors of `path` (JSONL, a JSON array or Parquet; `.gz` too) under
    `imported:name`. Raises ValueError for a file that cannot be read at all."""
    model = imported_name(name)
    source = str(path)
    dim = vector_dim(engine, model)
    hashes_of: dict[str, str] | None = None  # exchange id → its `on` text's hash, read once
    rejects: list[Reject] = []
    read = stored = already = 0
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal stored, already
        if batch:
            added = store_vectors(
                engine, model, [h for h, _ in batch], np.stack([v for _, v in batch])
            )
            stored, already = stored + added, already + len(batch) - added
            batch.clear()

    rows = tqdm(_records(path, source), desc=f"import {path.name}", unit=" row", disable=None)
    for item in rows:
        read += 1
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        row, line = item.value, item.number
        try:
            if not isinstance(row, dict):
                raise _Bad("record", "expected an object with `vector` and `exchange_id` or `text`")
            if row.get("exchange_id") is not None:  # a Parquet file may hold both columns
                if hashes_of is None:
                    hashes_of = {e.exchange_id: e.text_hash for e in exchange_texts(engine, on=on)}
                key = _known(row["exchange_id"], hashes_of)
            elif row.get("text") is not None:
                if not isinstance(row["text"], str):
                    raise _Bad("text", "expected a string")
                key = text_hash(row["text"])
            else:
                raise _Bad("exchange_id", "missing: each row names a stored exchange (or `text`)")
            vector = _unit_vector(row.get("vector"), dim)
        except _Bad as bad:
            raw = json.dumps(row, default=str) if isinstance(row, dict) else repr(row)
            rejects.append(Reject(source, line, bad.reason, field=bad.field, excerpt=excerpt(raw)))
            continue
        dim = dim or len(vector)
        batch.append((key, vector))
        if len(batch) >= _CHUNK:
            flush()
    flush()
    if stored:
        checkpoint(engine)
    return ImportSummary(
        model=model,
        on=on,
        read=read,
        stored=stored,
        already_stored=already,
        rejected=len(rejects),
        dim=dim,
        rejects=[asdict(r) for r in rejects],
    )


class _Bad(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _records(path: Path, source: str) -> Iterator[Record | Reject]:
    """The file's rows, each a Record or a Reject; a cut file's last row is a Reject too."""
    problem = whole_file_reject(path, source)
    if problem is not None:
        raise ValueError(
            f"{path}: {problem.reason}; vectors are read from JSONL, a JSON array or Parquet"
        )
    if path.name.lower().endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    for item in iter_json_records(path, source=source):
        if isinstance(item, Truncation):
            yield Reject(source, item.line, "the file stops inside this row (cut short?)")
        else:
            yield item


def _parquet_rows(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several kinds for a file that is not Parquet
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    number = 0
    for chunk in table.iter_batches(batch_size=_CHUNK):
        has_vectors = "vector" in chunk.schema.names
        rows = (chunk.drop_columns(["vector"]) if has_vectors else chunk).to_pylist()
        vectors = _vector_cells(chunk.column("vector")) if has_vectors else None
        for i, row in enumerate(rows):
            number += 1
            if vectors is not None:
                row["vector"] = vectors[i]
            yield Record(number=number, value=row)


def _vector_cells(column: Any) -> Sequence[Any]:
    """A Parquet vector column's cells: numpy rows, converted at C speed, where it is a list
    of numbers without nulls (as a data team writes one); else each cell as Python reads it,
    for `_unit_vector` to judge. A cell a row at a time took most of an import's time."""
    import pyarrow as pa

    kind = column.type
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (lists or pa.types.is_fixed_size_list(kind)) or column.null_count:
        return column.to_pylist()
    values = column.flatten()
    numeric = pa.types.is_floating(values.type) or pa.types.is_integer(values.type)
    if not numeric or values.null_count:
        return column.to_pylist()
    numbers = values.to_numpy(zero_copy_only=False)
    if not lists:
        return list(numbers.reshape(len(column), kind.list_size))
    offsets = column.offsets.to_numpy()
    return np.split(numbers, offsets[1:-1] - offsets[0])


def _known(exchange_id: Any, hashes_of: dict[str, str]) -> str:
    if not isinstance(exchange_id, str):
        raise _Bad("exchange_id", "expected a string (an exchange's `id`, as exported)")
    if exchange_id not in hashes_of:
        raise _Bad("exchange_id", "no stored exchange has this id")
    return hashes_of[exchange_id]


def _unit_vector(value: Any, dim: int | None) -> np.ndarray:
    """The row's vector as unit-length float32, or _Bad naming what is wrong with it. Checked
    by numpy as a whole, not number by number: a file holds millions of them."""
    if not isinstance(value, list | tuple | np.ndarray) or not len(value):
        raise _Bad("vector", "expected a non-empty list of numbers")
    vector = np.asarray(value)
    if vector.ndim != 1 or vector.dtype.kind not in "iuf":
        raise _Bad("vector", "expected a flat list of numbers only")
    vector = vector.astype(np.float64)
    if not np.isfinite(vector).all():
        raise _Bad("vector", "holds NaN or infinity")
    if dim and len(vector) != dim:
        raise _Bad("vector", f"has {len(vector)} numbers; the vectors of this name have {dim}")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise _Bad("vector", "is all zeros: it points nowhere")
    if not math.isfinite(norm):
        raise _Bad("vector", "holds numbers too large to measure its length")
    return (vector / norm).astype(np.float32)
