"""Joint labels from behaviour signals: unknown is never bad."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from scoring.labels import LabelConfig, joint_labels


def _conversation_rows() -> pd.DataFrame:
    """Signals as ingest stores them for a few synthetic conversations' responses."""
    return pd.DataFrame(
        [
            # retried right away, then the user left
            {"retried": True, "edited": None, "user_turns_after": 0, "rating": None},
            # user went on for 5 turns, no retry: good
            {"retried": False, "edited": False, "user_turns_after": 5, "rating": None},
            # nothing known at all: no label, weight 0
            {"retried": None, "edited": None, "user_turns_after": None, "rating": None},
            # only a 5-star rating
            {"retried": None, "edited": None, "user_turns_after": None, "rating": 5.0},
            # continued 4 turns but regenerated: no length credit, retry says bad
            {"retried": True, "edited": None, "user_turns_after": 4, "rating": None},
            # middle length: neither ended nor continued; thumbs down
            {"retried": None, "edited": None, "user_turns_after": 2, "thumbs": -1},
            # the user edited the request it answers, then went on: no length credit either
            {"retried": False, "edited": True, "user_turns_after": 4, "rating": None},
        ]
    )


def test_joint_target_and_null_handling() -> None:
    labels = joint_labels(_conversation_rows())
    f = labels.frame
    assert f.loc[0, "label"] == 0.0 and f.loc[0, "weight"] == 2.0  # retry + ended
    assert f.loc[1, "label"] == 1.0 and f.loc[1, "weight"] == 3.0  # retry, edit, length
    assert math.isnan(f.loc[2, "label"]) and f.loc[2, "weight"] == 0.0
    assert f.loc[3, "label"] == 1.0 and f.loc[3, "weight"] == 1.0
    assert math.isnan(f.loc[4, "label_length"]) and f.loc[4, "label"] == 0.0
    assert math.isnan(f.loc[5, "label_length"]) and f.loc[5, "label"] == 0.0
    assert math.isnan(f.loc[6, "label_length"]) and f.loc[6, "label"] == 0.5  # retry, edit
    c = labels.counts
    assert c["retry"] == {"known": 4, "good": 2, "bad": 2, "unknown": 3}
    assert c["joint"]["unknown"] == 1 and c["joint"]["known"] == 6


def test_weights_are_configurable_and_pandas_nulls_are_unknown() -> None:
    rows = pd.DataFrame(
        {
            "retried": pd.array([True, pd.NA], dtype="boolean"),
            "rating": [5.0, float("nan")],
            "battle_wins": [None, 3.0],
            "battle_count": [None, 4.0],
        }
    )
    labels = joint_labels(rows, LabelConfig(alpha_retry=3.0, alpha_rating=1.0))
    assert labels.frame.loc[0, "label"] == 0.25  # (3·0 + 1·1) / 4
    assert labels.frame.loc[0, "weight"] == 4.0
    assert labels.frame.loc[1, "label"] == 0.75  # battles only
    assert labels.counts["retry"]["unknown"] == 1
    labels = joint_labels(rows, LabelConfig(alpha_retry=0.0))
    assert labels.frame.loc[0, "label"] == 1.0


def test_leaving_is_unknown_in_a_log_where_no_conversation_goes_on() -> None:
    # api.jsonl: one request per line, each answer "ends" its conversation: no one could stay.
    # chats.jsonl: conversations go on, so there an answer the user left after is bad.
    rows = pd.DataFrame(
        {
            "source": ["api.jsonl"] * 3 + ["chats.jsonl"] * 2,
            "user_turns_after": [0, 0, 0, 0, 4],
            "ended_conversation": [True, True, True, True, False],
        }
    )
    labels = joint_labels(rows)
    assert labels.frame["label_length"].tolist()[3:] == [0.0, 1.0]
    assert labels.frame["label_length"].iloc[:3].isna().all()
    assert labels.counts["length"] == {"known": 2, "good": 1, "bad": 1, "unknown": 3}


def test_thresholds_and_rating_scale_are_configurable() -> None:
    rows = _conversation_rows()
    # K = 3: two turns after is leaving too soon; N = 2: two turns after is going on.
    strict = joint_labels(rows, LabelConfig(ended_within=3, continued_at_least=3))
    assert strict.frame.loc[5, "label_length"] == 0.0
    lenient = joint_labels(rows, LabelConfig(continued_at_least=2))
    assert lenient.frame.loc[5, "label_length"] == 1.0
    # A 1-10 log: 5 stars is below the middle, not the top of a 1-5 scale.
    ten = joint_labels(rows, LabelConfig(rating_min=1.0, rating_max=10.0))
    assert ten.frame.loc[3, "label_rating"] == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="continued_at_least"):
        LabelConfig(ended_within=3, continued_at_least=2)


def test_a_source_that_marks_retries_knows_every_answer_was_or_was_not_retried() -> None:
    """Logs mark the answers a user regenerated and say nothing of the rest: read as unknown,
    the retry label knew only bad answers. In a source that marks it at all, unmarked is 0;
    a source that never marks it stays unknown."""
    from scoring.labels import signal_labels, source_flag

    frame = pd.DataFrame(
        {
            "source": ["gateway.jsonl"] * 4 + ["sharegpt.json"] * 2,
            "retried": [True, None, None, False, None, None],
            "edited": [None, True, None, None, None, None],
        }
    )
    assert source_flag(frame, "retried").tolist()[:4] == [1.0, 0.0, 0.0, 0.0]
    assert source_flag(frame, "edited").tolist()[:4] == [0.0, 1.0, 0.0, 0.0]
    assert source_flag(frame, "retried")[4:].isna().all()
    labels = signal_labels(frame)
    assert labels["retry"].tolist()[:4] == [0.0, 1.0, 1.0, 1.0]
    assert labels["retry"][4:].isna().all() and labels["edit"][4:].isna().all()
