"""The embedding stage: the real default model on small texts, OOM back-off, errors, text_for."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.embed import (
    DEFAULT_MODEL_NAME,
    Embedder,
    EmbedderError,
    default_model_path,
    encode_in_batches,
    load_embedder,
)
from ingest.embed_text import CONTEXT_CHARS, TEXT_CHARS, text_for
from ingest.records import Message

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXTS = [
    "How do I reset my password?",
    "hi",
    "I forgot my password and cannot log in to my account, what should I do now?",
    "Recommend a good recipe for a vegetarian lasagna with spinach and ricotta cheese",
    "what's the weather like in Paris tomorrow",
    "Can you help me change my login password",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder(device="cpu", batch_size=2)


def test_default_model_vectors_are_unit_rows_in_input_order(embedder: Embedder) -> None:
    vectors = embedder.embed(TEXTS)
    assert embedder.name == DEFAULT_MODEL_NAME
    assert vectors.shape == (len(TEXTS), embedder.dim) == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # TEXTS are not sorted by length and batch_size=2 makes three batches: each row must still
    # be the vector of the text at that position, as when the text is embedded alone.
    alone = np.vstack([embedder.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(vectors, alone, atol=1e-5)


def test_similar_texts_are_closer_than_unrelated(embedder: Embedder) -> None:
    v = embedder.embed(TEXTS)
    password, forgot, recipe, weather, change = v[0], v[2], v[3], v[4], v[5]
    assert password @ change > password @ recipe
    assert password @ forgot > password @ weather
    assert recipe @ weather < password @ change


def test_same_intent_queries_are_closer_on_clinc(
    embedder: Embedder, shared_file: Callable[[str], Path]
) -> None:
    data = json.loads(shared_file("clinc150.json").read_text())
    by_intent: dict[str, list[str]] = {}
    for text, intent in data["test"]:
        by_intent.setdefault(intent, []).append(text)
    intents = sorted(by_intent)[:8]
    texts = [t for intent in intents for t in by_intent[intent][:4]]
    labels = np.repeat(np.arange(len(intents)), 4)
    sims = embedder.embed(texts) @ embedder.embed(texts).T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(texts), dtype=bool)
    assert sims[same & off_diagonal].mean() > sims[~same].mean() + 0.2


def test_empty_input_and_progress_on_stderr(
    embedder: Embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embedder.embed([]).shape == (0, embedder.dim)
    embedder.embed(TEXTS[:3], progress=True)
    captured = capsys.readouterr()
    assert "3/3" in captured.err
    assert captured.out == ""


def test_default_model_has_one_name_whatever_it_is_called() -> None:
    by_path = load_embedder(str(default_model_path()), device="cpu")
    by_alias = load_embedder(f"sentence-transformers/{DEFAULT_MODEL_NAME}", device="cpu")
    assert by_path.name == by_alias.name == DEFAULT_MODEL_NAME


def _encoder_that_fits(limit: int, sizes: list[int]) -> Callable[[Sequence[str]], np.ndarray]:
    """A real encoder that raises torch's CUDA OOM error for batches above `limit`."""

    def encode(batch: Sequence[str]) -> np.ndarray:
        sizes.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.array([[float(len(text)), 1.0] for text in batch], dtype=np.float32)

    return encode


def test_out_of_memory_halves_the_batch_and_goes_on() -> None:
    texts = [f"text number {i}" + "!" * i for i in range(21)]
    sizes: list[int] = []
    done: list[int] = []
    out = encode_in_batches(_encoder_that_fits(5, sizes), texts, 16, on_done=done.append)
    np.testing.assert_array_equal(out[:, 0], [len(t) for t in texts])
    assert sizes[:3] == [16, 8, 4]  # halved twice, then kept at 4 for the rest
    assert set(sizes[3:]) <= {4, 1}
    assert sum(done) == len(texts)


def test_out_of_memory_on_a_single_text_is_raised() -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encode_in_batches(_encoder_that_fits(0, []), ["too long"], 8)


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EmbedderError, match="does not exist"):
        load_embedder(str(missing), device="cpu")


def test_a_model_file_instead_of_its_directory_is_named_a_file(tmp_path: Path) -> None:
    """A file given as the model (its model.safetensors, its config.json) was said not to
    exist, sending the user looking for a typo in a path that is there."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    with pytest.raises(EmbedderError, match="is a file: give the model's directory"):
        load_embedder(str(weights), device="cpu")


def test_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(EmbedderError, match="not a loadable"):
        load_embedder(str(tmp_path), device="cpu")


def test_uncached_hub_name_offline_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedderError, match="offline") as info:
        load_embedder("someone/no-such-embedding-model", device="cpu")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_uncached_hub_name_with_the_hub_unreachable_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Online mode with no route to the hub: huggingface_hub retried each file with back-off
    for 80 s, printing "Retrying in 8s", before the error. A closed port stands in for the
    hub here; the error names it and comes before any download is tried."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(EmbedderError, match="cannot be reached") as info:
        load_embedder("someone/no-such-embedding-model", device="cpu")
    assert f"http://127.0.0.1:{port}" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(EmbedderError, match="no CUDA GPU"):
        load_embedder(device="cuda")


@pytest.mark.slow
def test_fast_mode_is_a_static_model_from_the_same_model() -> None:
    """Distils once (about two minutes on two cores) into the user cache, then loads from it."""
    fast = load_embedder(fast=True)
    assert fast.name == f"{DEFAULT_MODEL_NAME}+model2vec-256"
    vectors = fast.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), fast.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    password, recipe, change = vectors[0], vectors[3], vectors[5]
    assert password @ change > password @ recipe


def test_text_for_prompt_adds_a_short_slice_of_the_previous_user_message() -> None:
    earlier = "Write a Python function that parses ISO dates " + "and handles timezones " * 30
    context = [
        {"role": "system", "content": "You are helpful."},
        {"role": "human", "content": earlier},
        {"role": "gpt", "content": "Here is a function ..."},
    ]
    text = text_for("make it   shorter", "def parse(s): ...", context, on="prompt")
    first, second = text.split("\n")
    assert first == "make it shorter"
    assert second.startswith("Write a Python function that parses ISO dates")
    assert len(second) <= CONTEXT_CHARS and second.endswith("…")
    assert "Here is a function" not in text and "helpful" not in text


def test_text_for_prompt_accepts_messages_and_no_context() -> None:
    context = (Message(role="user", content="Plan a trip to Rome"), Message("assistant", "Sure"))
    assert text_for("for 3 days", "", context, on="prompt") == "for 3 days\nPlan a trip to Rome"
    assert text_for("for 3 days", "", [], on="prompt") == "for 3 days"


def test_text_for_response_is_the_response_alone() -> None:
    context = [{"role": "user", "content": "earlier"}]
    assert text_for("q?", "An\n\n  answer.", context, on="response") == "An answer."
    assert len(text_for("q", "word " * 2000, [], on="response")) <= TEXT_CHARS


def test_text_for_exchange_keeps_room_for_the_response() -> None:
    short = text_for("What is 2+2?", "It is 4.", [{"role": "user", "content": "x"}], on="exchange")
    assert short == "What is 2+2?\n\nIt is 4."
    long = text_for("explain " * 1000, "because " * 1000, [], on="exchange")
    prompt_part, response_part = long.split("\n\n")
    assert len(long) <= TEXT_CHARS + 2
    assert len(prompt_part) <= 0.4 * TEXT_CHARS
    assert response_part.startswith("because") and len(response_part) > 0.5 * TEXT_CHARS


def test_text_for_rejects_an_unknown_target() -> None:
    with pytest.raises(ValueError, match="prompt, response or exchange"):
        text_for("a", "b", [], on="both")  # type: ignore[arg-type]
