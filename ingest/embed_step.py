"""The embed step: stored exchanges → vectors in storage, embedding only what is new.

Vectors are cached by (hash of the embedded text, model name), so a re-run embeds nothing,
new exchanges cost only themselves, and the same text logged many times is embedded once.
Work is stored chunk by chunk: a crash loses at most one chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from sqlalchemy.engine import Engine

from ingest.embed import Embedder, load_embedder
from ingest.embed_text import On, text_for
from ingest.records import content_hash
from storage.engine import checkpoint
from storage.logs import ExchangeFilter, iter_exchanges
from storage.vectors import missing_hashes, store_vectors


@dataclass(frozen=True, slots=True)
class EmbedConfig:
    """Which model embeds which text of each exchange, where, and how much at a time."""

    model: str | None = None  # None = the shipped all-MiniLM-L6-v2
    device: str = "auto"
    fast: bool = False
    on: On = "prompt"
    batch_size: int = 64
    chunk_size: int = 4096  # texts embedded and stored per transaction
    progress: bool = True


@dataclass(frozen=True, slots=True)
class EmbedSummary:
    model: str
    on: str
    exchanges: int
    texts: int  # distinct texts among them
    embedded: int  # newly embedded this run
    cached: int  # already stored

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EmbeddedText:
    """An exchange's id with the text that stands for it and that text's hash."""

    exchange_id: str
    text: str
    text_hash: str


def text_hash(text: str) -> str:
    return content_hash("text", text)


def exchange_texts(
    engine: Engine, *, on: On, where: ExchangeFilter | None = None
) -> Iterator[EmbeddedText]:
    """Every stored exchange as the text that represents it for `on`."""
    columns = ("id", "prompt", "response", "context")
    for batch in iter_exchanges(engine, where=where, columns=columns):
        for row in batch:
            context = json.loads(row["context"]) if row["context"] else []
            text = text_for(row["prompt"], row["response"], context, on=on)
            yield EmbeddedText(row["id"], text, text_hash(text))


def embed_exchanges(
    engine: Engine,
    *,
    config: EmbedConfig,
    embedder: Embedder | None = None,
    items: list[EmbeddedText] | None = None,
) -> EmbedSummary:
    """Embed every stored exchange not embedded yet with this model; returns the counts.

    `items`: `exchange_texts(engine, on=config.on)` when the caller read them already (it
    goes on to load the vectors): reading every exchange with its context is most of a
    step whose vectors are all stored.
    """
    items = list(exchange_texts(engine, on=config.on)) if items is None else items
    texts_by_hash = {item.text_hash: item.text for item in items}
    embedder = embedder or load_embedder(
        config.model, device=config.device, fast=config.fast, batch_size=config.batch_size
    )
    todo = missing_hashes(engine, embedder.name, list(texts_by_hash))
    for start in _chunks(len(todo), config.chunk_size, config.progress):
        hashes = todo[start : start + config.chunk_size]
        vectors = embedder.embed([texts_by_hash[h] for h in hashes])
        store_vectors(engine, embedder.name, hashes, vectors)
    if todo:
        checkpoint(engine)  # 1M vectors are 1.5 GB: into the file before the next step reads
    return EmbedSummary(
        model=embedder.name,
        on=config.on,
        exchanges=len(items),
        texts=len(texts_by_hash),
        embedded=len(todo),
        cached=len(texts_by_hash) - len(todo),
    )


def _chunks(total: int, size: int, progress: bool) -> Iterator[int]:
    """Chunk start offsets, with a progress bar (on stderr) counted in texts."""
    from tqdm import tqdm

    with tqdm(total=total, desc="embed", unit=" text", disable=None if progress else True) as bar:
        for start in range(0, total, size):
            yield start
            bar.update(min(size, total - start))
