"""c-TF-IDF keywords, short names and representatives on real CLINC150 queries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clustering.keywords import class_tfidf_keywords, representatives, short_name


def test_class_tfidf_finds_each_intents_own_words(shared_file: Callable[[str], Path]) -> None:
    data = json.loads(shared_file("clinc150.json").read_text())
    wanted = ["credit_score", "book_hotel", "weather", "transfer", "change_accent"]
    rows = [r for r in data["train"] if r[1] in wanted]
    labels = np.array([wanted.index(intent) for _, intent in rows])
    keywords = class_tfidf_keywords([t for t, _ in rows], labels, len(wanted), n_keywords=8)
    assert "credit score" in keywords[0]
    assert "hotel" in keywords[1]
    assert "weather" in keywords[2]
    assert "transfer" in keywords[3]
    assert "accent" in keywords[4]
    for kws in keywords:  # stop words never make it
        assert not {"what", "the", "my", "is", "can"} & set(kws)
    assert "credit score" in short_name(keywords[0])


def test_unassigned_rows_and_empty_clusters_are_handled() -> None:
    texts = ["reset my phone", "reset the phone please", "hello there", "hi there"]
    keywords = class_tfidf_keywords(texts, np.array([0, 0, -1, -1]), 2)
    assert "reset" in keywords[0] and "hello" not in keywords[0]
    assert keywords[1] == ()


def test_short_name_prefers_top_phrases_and_never_repeats_a_word() -> None:
    kws = ("limit", "credit limit", "increase", "increase credit", "credit", "limit visa")
    assert short_name(kws) == "credit limit / increase"
    weak_phrase = ("spell", "word", "definition", "mean", "spelling", "know spell")
    assert short_name(weak_phrase) == "spell / word / definition"
    assert short_name(()) == "unnamed"
    assert len(short_name(("a" * 30, "b" * 30, "c" * 30))) <= 40


def test_representatives_are_nearest_first_per_cluster() -> None:
    labels = np.array([1, 0, 1, -1, 0, 1])
    distances = np.array([0.3, 0.2, 0.1, 0.0, 0.05, 0.2], dtype=np.float32)
    assert representatives(distances, labels, 3, n=2) == ((4, 1), (2, 5), ())
