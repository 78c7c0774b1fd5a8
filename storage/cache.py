"""A persistent key → text cache for answers of external models (e.g. LLM cluster names)."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.logs import utcnow
from storage.schema import llm_cache


class StoredCache(MutableMapping[str, str]):
    """A dict-like view of the `llm_cache` table: each write commits at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getitem__(self, key: str) -> str:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(llm_cache.c.value).where(llm_cache.c.key == key)
            ).scalar_one_or_none()
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: str) -> None:
        """Store `value`; when another process cached the same key meanwhile (the same
        request answered twice), its answer is kept and this one is not an error."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(llm_cache).where(llm_cache.c.key == key))
                row = {"key": key, "value": value, "created_at": utcnow()}
                conn.execute(sa.insert(llm_cache).values(**row))
        except sa.exc.IntegrityError:
            pass

    def __delitem__(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(llm_cache).where(llm_cache.c.key == key))

    def __iter__(self) -> Iterator[str]:
        with self.engine.connect() as conn:
            return iter(list(conn.execute(sa.select(llm_cache.c.key)).scalars()))

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(llm_cache)).scalar_one())
