"""The fast CPU mode: a static embedding model distilled from the same sentence transformer.

Why model2vec rather than an int8 ONNX export of the transformer: a static model replaces the
whole network by one lookup table (a vector per vocabulary token, averaged over the text), so
it embeds tens of thousands of texts a second on two cores where the transformer manages a few
hundred, while int8 ONNX buys at most a few times. It stays in the same family of meaning as
the model it came from; what it costs in quality is measured in benchmarks/bench_embed.py.

Distillation runs the source model once over its own vocabulary (about two minutes on two CPU
cores for MiniLM), offline, and the result is cached under the user cache dir, so later runs
load it in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ingest.embed import (
    DEFAULT_ALIASES,
    DEFAULT_MODEL_NAME,
    EmbedderError,
    default_model_path,
    error_summary,
    l2_normalise,
    looks_like_path,
)

PCA_DIMS = 256  # model2vec's default: PCA to 256 dims keeps quality and shrinks the table
FAST_SUFFIX = f"+model2vec-{PCA_DIMS}"  # a static variant's name: its source's, then this
MAX_TOKENS = 256  # the window all-MiniLM-L6-v2 sees, so both modes embed the same words
DISTILL_FORMAT = 1  # bump when the recipe below changes, so stale caches are not reused


def cache_dir() -> Path:
    """$CONVOSCOPE_CACHE_DIR, else $XDG_CACHE_HOME/convoscope, else ~/.cache/convoscope."""
    explicit = os.environ.get("CONVOSCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "convoscope"


class StaticEmbedder:
    """A model2vec static model: token vectors averaged, unit rows, no batching concerns."""

    def __init__(self, model: object, *, name: str) -> None:
        self.name = name
        self._model = model
        self.dim = int(model.dim)  # type: ignore[attr-defined]

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Unit-length float32 rows in input order; a text with no known token stays all zero."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(  # type: ignore[attr-defined]
            list(texts),
            show_progress_bar=progress,
            max_length=MAX_TOKENS,
            use_multiprocessing=False,
        )
        return l2_normalise(vectors)


def _source(name_or_path: str) -> tuple[str, str]:
    """(what to distil from, the stable name of the source model)."""
    if name_or_path in DEFAULT_ALIASES:
        return str(default_model_path()), DEFAULT_MODEL_NAME
    if looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser().resolve()
        if not path.is_dir():
            raise EmbedderError(f"embedding model directory {path} does not exist")
        if path == default_model_path().resolve():
            return str(path), DEFAULT_MODEL_NAME
        return str(path), str(path)
    return name_or_path, name_or_path


def _distil(source: str, target: Path) -> None:
    """Distil `source` into `target`, written whole or not at all (a crash leaves no half)."""
    from model2vec.distill import distill

    print(
        f"convoscope: distilling a fast model from {source} into {target} (once)", file=sys.stderr
    )
    try:
        model = distill(source, pca_dims=PCA_DIMS, device="cpu")
    except Exception as exc:
        raise EmbedderError(
            f"cannot distil a fast model from {source!r} ({error_summary(exc)}); it must be a "
            "local transformers model directory or a hub id already in the local cache"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".distil-", dir=target.parent))
    try:
        model.save_pretrained(str(staging))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def static_model_dir(name_or_path: str) -> Path:
    """The folder of a model's fast static variant (a model2vec model), distilled into the
    cache on first use: what `load_static_embedder` loads and `route --export` ships beside a
    routing table, since a gateway cannot rebuild it from its name."""
    source, source_name = _source(name_or_path)
    key = hashlib.sha256(f"{source_name}|{PCA_DIMS}|{DISTILL_FORMAT}".encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name)[-60:]
    target = cache_dir() / "static" / f"{slug}-{key}"
    if not (target / "config.json").exists():
        _distil(source, target)
    return target


def load_static_embedder(name_or_path: str) -> StaticEmbedder:
    """The fast embedder for a model: distilled on first use, then loaded from the cache."""
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(str(static_model_dir(name_or_path)), force_download=False)
    return StaticEmbedder(model, name=f"{_source(name_or_path)[1]}{FAST_SUFFIX}")


def split_embedder_name(name: str) -> tuple[str, bool]:
    """(the model, whether it is that model's fast static variant) for an embedder's stored
    name: what `score --fast` or `cluster --fast` stored (`all-MiniLM-L6-v2+model2vec-256`)
    names no model to load."""
    return name.removesuffix(FAST_SUFFIX), name.endswith(FAST_SUFFIX)
