"""Reward head on stored embeddings, the fine-tuned transformer, and a user's own model."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring.features import FEATURE_NAMES, PROMPT_ONLY_FEATURES, prompt_features, text_features
from scoring.labels import joint_labels
from scoring.reward_head import HeadConfig, Pairs, RewardHead, head_features, simple_features
from scoring.reward_lexical import LexicalConfig, LexicalReward, anchors
from scoring.reward_model import (
    FineTuneConfig,
    SequenceClassifierReward,
    TransformerReward,
    default_backbone,
)
from tests.tiny_reward_model import tiny_classifier

MODELS = {"FuseChat-Gemma-2-9B-Instruct", "alpaca-7b", "claude-2", "vicuna-13b"}


def _exchanges(path: Path, n_prompts: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Battles of the first prompts, and their answers as one row per (prompt, response)."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if int(r["prompt_id"]) < n_prompts and r["model_b"] in MODELS:
                rows.append(r)
    battles = pd.DataFrame(rows)
    answers = pd.concat(
        [
            battles[["prompt_id", "prompt", "response_a"]].rename(columns={"response_a": "r"}),
            battles[["prompt_id", "prompt", "response_b"]].rename(columns={"response_b": "r"}),
        ]
    ).drop_duplicates("r", ignore_index=True)
    return battles, answers


@pytest.fixture
def slice_(shared_file: Callable[[str], Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _exchanges(shared_file("alpacaeval_battles_dev.jsonl.gz"), 40)


def _pairs(battles: pd.DataFrame, answers: pd.DataFrame) -> Pairs:
    row = {r: i for i, r in enumerate(answers["r"])}
    outcome = battles["winner"].map({"model_a": 1.0, "model_b": 0.0, "tie": 0.5})
    return Pairs(
        a=battles["response_a"].map(row).to_numpy(),
        b=battles["response_b"].map(row).to_numpy(),
        outcome=outcome.to_numpy(),
    )


def test_head_trains_on_battles_and_behaviour_and_scores(
    slice_: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    battles, answers = slice_
    st = SentenceTransformer(default_backbone(), device="cpu")
    st.max_seq_length = 128
    emb = st.encode(list(answers["r"]) + list(answers["prompt"].unique()), batch_size=32)
    prompt_emb = dict(zip(answers["prompt"].unique(), emb[len(answers) :], strict=True))
    p = np.stack([prompt_emb[t] for t in answers["prompt"]])
    extra = simple_features(answers["r"].str.len(), answers["prompt"].str.len())
    feats = head_features(p, emb[: len(answers)], extra)

    train = battles["prompt_id"].astype(int) < 30
    test = battles[~train & (battles["winner"] != "tie")]
    # Behaviour labels for a few answers (an "edited" flag), unknown for the rest.
    signals = pd.DataFrame({"edited": [None] * len(answers)}, dtype=object)
    signals.loc[:9, "edited"] = [True, False] * 5
    labels = joint_labels(signals)
    head = RewardHead(HeadConfig(epochs=40)).fit(
        feats, labels.label.to_numpy(), labels.weight.to_numpy(), _pairs(battles[train], answers)
    )
    held = _pairs(test, answers)
    s = head.score(feats)
    acc = np.mean((s[held.a] > s[held.b]) == (held.outcome == 1.0))
    assert acc >= 0.7  # chance is 0.5; the seeded head scores ~0.75 on this slice
    again = RewardHead.load(head.save(tmp_path / "head"))
    np.testing.assert_allclose(again.score(feats), s, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to train"):
        RewardHead().fit(feats, np.full(len(feats), np.nan))


def test_lexical_model_learns_words_from_battles_and_labels(
    slice_: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    """The n-gram model ranks held-out battles better than chance from the training battles,
    learns which words behaviour labels punish, and reloads to the same scores."""
    battles, answers = slice_
    prompts, responses = list(answers["prompt"]), list(answers["r"])
    train = battles["prompt_id"].astype(int) < 30
    model = LexicalReward().fit(prompts, responses, pairs=_pairs(battles[train], answers))
    held = _pairs(battles[~train & (battles["winner"] != "tie")], answers)
    s = model.score(prompts, responses)
    acc = np.mean((s[held.a] > s[held.b]) == (held.outcome == 1.0))
    assert acc >= 0.7  # chance is 0.5
    again = LexicalReward.load(model.save(tmp_path / "lexical"))
    np.testing.assert_allclose(again.score(prompts, responses), s, rtol=1e-6)

    # Pointwise behaviour labels (soft ones too): apologies were retried, plans were kept.
    texts = [f"Sorry, I cannot help with trip {i}." for i in range(20)]
    texts += [f"Here is a detailed plan for trip {i}: museums, then dinner." for i in range(20)]
    labels = np.array([0.0] * 19 + [np.nan] + [1.0] * 19 + [0.8])
    behaviour = LexicalReward().fit([""] * 40, texts, labels=labels)
    unseen = behaviour.score(["", ""], ["Sorry, I cannot do that.", "Here is a plan: museums."])
    assert unseen[0] < 0 < unseen[1]  # logits: P(good) below and above one half
    with pytest.raises(ValueError, match="nothing to train"):
        LexicalReward().fit(["p"], ["r"], labels=np.array([np.nan]))
    with pytest.raises(ValueError, match="no words"):
        LexicalReward().fit(["p", "p"], ["", "!"], labels=np.array([1.0, 0.0]))
    # Answers of one-letter words only (digits): the way out is the structural head.
    with pytest.raises(ValueError, match="score with --mode head"):
        LexicalReward().fit(["p", "p"], ["1", "7 a"], labels=np.array([1.0, 0.0]))


def test_an_anchor_experts_style_is_discounted(tmp_path: Path) -> None:
    """A reference that answers in every battle and wins most of them: a plain fit credits its
    opening word as much as what really wins ("detailed"); the anchored fit credits the
    reference itself, so its word counts far less next to the real signal."""
    responses: list[str] = []
    authors: list[str] = []
    outcome = []
    for i in range(80):
        detailed = i % 4 == 0  # a quarter of the experts' answers are detailed: they win
        responses += [f"certainly topic{i} answer", f"{'detailed ' * detailed}topic{i} answer"]
        authors += ["reference", f"expert{i % 3}"]
        outcome.append(0.0 if detailed else 1.0)
    pairs = Pairs(np.arange(0, 160, 2), np.arange(1, 160, 2), np.array(outcome))
    prompts = [""] * len(responses)

    def weights(blend: float, who: list[str] | None) -> tuple[float, float]:
        model = LexicalReward(LexicalConfig(anchor_blend=blend))
        model.fit(prompts, responses, pairs=pairs, authors=who)
        assert model.vectorizer is not None
        assert model.anchors == (["reference"] if who and blend > 0 else [])
        assert (
            LexicalReward.load(model.save(tmp_path / f"{blend}{bool(who)}")).anchors
            == model.anchors
        )
        vocabulary = model.vectorizer.vocabulary_
        return model.coef[vocabulary["certainly"]], model.coef[vocabulary["detailed"]]

    plain_style, plain_quality = weights(0.0, authors)
    style, quality = weights(1.0, authors)
    assert 0 < style / quality < 0.5 * plain_style / plain_quality
    assert weights(1.0, None) == (plain_style, plain_quality)  # no authors: the plain fit

    names, column = anchors(authors, pairs, share=0.5)
    assert names == ["reference"] and column is not None and column.shape == (160, 1)
    np.testing.assert_array_equal(column.toarray()[:, 0], np.array(authors) == "reference")
    assert anchors(authors, pairs, share=1.01) == ([], None)  # nobody plays in more than all
    assert anchors(None, pairs, share=0.5) == ([], None)


def test_transformer_fine_tunes_saves_and_loads(
    slice_: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    battles, answers = slice_
    config = FineTuneConfig(max_length=48, steps=4, batch_size=8, device="cpu")
    model = TransformerReward(config)
    prompts, responses = list(answers["prompt"]), list(answers["r"])
    before = model.score(prompts[:6], responses[:6])
    labels = np.full(len(answers), np.nan)
    labels[:4] = [1.0, 0.0, 1.0, 0.0]
    model.fit(prompts, responses, labels=labels, pairs=_pairs(battles.head(20), answers))
    after = model.score(prompts[:6], responses[:6])
    assert after.shape == (6,) and not np.allclose(before, after)
    again = TransformerReward.load(model.save(tmp_path / "rm"), device="cpu")
    np.testing.assert_allclose(again.score(prompts[:6], responses[:6]), after, atol=1e-4)


def test_users_own_sequence_classifier_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    own = tmp_path / "own-rm"
    clf = AutoModelForSequenceClassification.from_pretrained(default_backbone(), num_labels=2)
    clf.save_pretrained(own)
    AutoTokenizer.from_pretrained(default_backbone()).save_pretrained(own)
    rm = SequenceClassifierReward(own, max_length=64, device="cpu")
    s = rm.score(["What is 2+2?", "What is 2+2?"], ["4", "The answer is four."])
    assert s.shape == (2,) and np.isfinite(s).all()


def test_text_features_see_structure_refusals_and_cut_offs() -> None:
    prompt = "List three ways to save water at home."
    plain = "Take shorter showers."
    structured = (
        "## Ways to save water\n\n1. **Shorter showers**: cut five minutes.\n"
        "2. Fix leaks.\n3. Run full loads only.\n\n- Bonus: use `greywater`.\n"
    )
    refusal = "I'm sorry, but as an AI I cannot help with that and"
    f = pd.DataFrame(
        text_features([plain, structured, refusal, None], [prompt] * 3 + [None]),
        columns=list(FEATURE_NAMES),
    )
    assert np.isfinite(f.to_numpy()).all()
    assert f.loc[1, "log_chars"] > f.loc[0, "log_chars"]
    assert f.loc[1, ["log_numbered", "log_headers", "log_bold", "log_bullets"]].gt(0).all()
    assert f.loc[0, ["log_numbered", "log_headers", "log_bold", "log_bullets"]].eq(0).all()
    assert f.loc[1, "log_inline_code"] > 0
    assert f.loc[2, "refusal"] == 1 and f.loc[0, "refusal"] == 0
    assert f.loc[2, "ends_unfinished"] == 1 and f.loc[0, "ends_unfinished"] == 0
    assert f.loc[1, "prompt_word_overlap"] > f.loc[0, "prompt_word_overlap"]
    assert f.loc[3].eq(0).all()  # a missing response and prompt read as empty


def test_prompt_features_name_the_task() -> None:
    f = pd.DataFrame(
        prompt_features(["Write a Python function that adds 2+2?", "Why is the sky blue?", ""]),
        columns=list(PROMPT_ONLY_FEATURES),
    )
    assert f.loc[0, ["asks_code", "asks_creative", "asks_math", "ends_with_question"]].eq(1).all()
    assert f.loc[1, ["asks_explain", "has_question"]].eq(1).all()
    assert f.loc[1, "asks_code"] == 0
    assert f.loc[2].eq(0).all()


def test_head_inputs_name_their_feature_set() -> None:
    """A stored head records which features it read. The default reads the answers' structure
    alone and never asks for embeddings; the older sets prefix them, so heads trained before
    keep scoring with what they were fit on."""
    from scoring.reward_step import HEAD_FEATURES, head_inputs

    frame = pd.DataFrame({"prompt": ["Hi?", "List three fruits"], "response": ["Hello.", None]})
    vectors = np.ones((2, 4), dtype=np.float32)
    asked: list[int] = []

    def embeddings() -> tuple[np.ndarray, np.ndarray]:
        asked.append(1)
        return vectors, vectors

    structure = head_inputs(frame, HEAD_FEATURES, embeddings)
    assert structure.shape == (2, len(FEATURE_NAMES)) and not asked
    text = head_inputs(frame, f"text:{len(FEATURE_NAMES)}", embeddings)
    older = head_inputs(frame, "text:22", embeddings)  # a head from before 11 were added
    lengths = head_inputs(frame, "lengths", embeddings)
    assert len(asked) == 3
    assert text.shape == (2, 3 * 4 + len(FEATURE_NAMES)) and lengths.shape == (2, 3 * 4 + 3)
    assert np.array_equal(text[:, 3 * 4 :], structure)
    assert np.array_equal(older, text[:, : 3 * 4 + 22])
    assert np.isfinite(text).all() and np.isfinite(lengths).all()
    for unknown in ("v9", f"text:{len(FEATURE_NAMES) + 1}", "text", "structure:x"):
        with pytest.raises(ValueError, match="newer convoscope"):
            head_inputs(frame, unknown, embeddings)


def test_text_features_flag_degenerate_answers() -> None:
    """Template leaks, loops, a switch of script and a copied prompt are what weak models do;
    the head can only learn to punish them if the features see them."""
    prompt = "Explain briefly why the sky is blue, in plain words please."
    good = "Sunlight scatters off air molecules. Blue light scatters most, so the sky looks blue."
    looped = "The sky is blue.\nThe sky is blue.\nThe sky is blue.\n### Instruction: next"
    foreign = "天空是蓝色的，因为瑞利散射。"
    echo = prompt + " Because of scattering."
    f = pd.DataFrame(
        text_features([good, looped, foreign, echo], [prompt] * 4), columns=list(FEATURE_NAMES)
    )
    assert np.isfinite(f.to_numpy()).all()
    assert f.loc[1, "template_leak"] == 1 and f.loc[0, "template_leak"] == 0
    assert f.loc[1, "repeated_lines"] == 0.5  # 2 distinct of 4 and f.loc[0, "repeated_lines"] == 0
    assert f.loc[1, "repeated_trigrams"] > f.loc[0, "repeated_trigrams"]
    assert f.loc[2, "cjk_mismatch"] == 1 and f.loc[0, "cjk_mismatch"] == 0
    assert f.loc[2, "non_ascii_gap"] > 0.5
    assert f.loc[3, "echoes_prompt"] == 1 and f.loc[0, "echoes_prompt"] == 0


def test_training_fingerprint_changes_with_any_training_data() -> None:
    from scoring.reward_step import training_fingerprint

    ids = ["e1", "e2", "e3"]
    label = np.array([1.0, np.nan, 0.0])
    weight = np.array([1.0, 0.0, 2.0])
    holdout = np.array([False, False, True])
    pairs = Pairs(np.array([0]), np.array([1]), np.array([1.0]))
    base = training_fingerprint(ids, label, weight, holdout, pairs)
    assert base == training_fingerprint(list(ids), label.copy(), weight, holdout, pairs)
    assert len(base) == 64
    changed = [
        training_fingerprint(["e1", "e2", "e4"], label, weight, holdout, pairs),
        training_fingerprint(ids, np.array([1.0, np.nan, 1.0]), weight, holdout, pairs),
        training_fingerprint(ids, label, np.array([1.0, 0.0, 1.0]), holdout, pairs),
        training_fingerprint(ids, label, weight, np.array([True, False, False]), pairs),
        training_fingerprint(
            ids, label, weight, holdout, Pairs(np.array([0]), np.array([1]), np.array([0.0]))
        ),
        training_fingerprint(ids, label, weight, holdout, None),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_feature_never_seen_in_training_cannot_swamp_the_reward() -> None:
    # Trained on plain answers: no code, no table. Such answers once scored -28,000 to -116,000
    # (a constant feature divided by its 1e-6 std); they must stay on the trained scale.
    rng = np.random.default_rng(0)
    responses = [" ".join(["word"] * int(n)) + "." for n in rng.integers(3, 60, size=60)]
    feats = text_features(responses, [f"question {i}?" for i in range(60)])
    labels = (np.array([len(r) for r in responses]) > 120).astype(float)
    head = RewardHead(HeadConfig(epochs=20)).fit(feats, labels, np.ones(60))
    seen = head.score(feats)
    unseen = ["Call `x.reverse()` on it.", "```\nx.reverse()\n```", "| a | b |\n| 1 | 2 |"]
    new = head.score(text_features(unseen, ["q?"] * 3))
    spread = seen.max() - seen.min()
    assert np.all(np.abs(new - seen.mean()) < 2 * spread)


def test_equal_rewards_or_lengths_agree_half_with_the_judge() -> None:
    from scoring.agreement import JudgedBattle, agreement

    battles = [
        JudgedBattle(reward_a=0.7, reward_b=0.7, length_a=10, length_b=10, winner="a"),
        JudgedBattle(reward_a=0.3, reward_b=0.3, length_a=20, length_b=20, winner="a"),
        JudgedBattle(reward_a=0.9, reward_b=0.1, length_a=50, length_b=10, winner="a"),
        JudgedBattle(reward_a=0.9, reward_b=0.1, length_a=50, length_b=10, winner="tie"),
    ]
    found = agreement(battles)
    assert (found.battles, found.ties) == (3, 1)
    # An equal pair counted as "b preferred", so both were wrong here: 1/3.
    assert found.accuracy == found.longer_wins == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_a_users_model_reads_no_more_tokens_than_it_has_positions(tmp_path: Path) -> None:
    """A model of 64 positions failed on the first long pair (a tensor size error): the
    texts were cut at 512 tokens whatever the model could read."""
    rm = SequenceClassifierReward(tiny_classifier(tmp_path / "rm", positions=64), device="cpu")
    s = rm.score(["word " * 300, "hi"], ["an answer " * 100, "hello"])
    assert s.shape == (2,) and np.isfinite(s).all()


def test_a_users_model_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    """Saved without its tokenizer files, a model loaded an empty vocabulary: every word read
    as unknown and every answer scored alike, without a warning."""
    bare = tiny_classifier(tmp_path / "rm", tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        SequenceClassifierReward(bare, device="cpu")


def test_a_users_model_given_by_a_relative_path_is_found_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`score --reward-model rm` stored "rm" as it was given: `score reward apply` (or
    `reward --file`) run from another folder then said the directory does not exist."""
    from ingest.pipeline import IngestConfig, ingest_paths
    from scoring.step import ScoreConfig, apply_reward, train_reward_only
    from storage.engine import open_database

    work = tmp_path / "work"
    work.mkdir()
    tiny_classifier(work / "rm")
    log = work / "chats.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant",
         "content": f"Answer {i}.", "thumbs": 1 if i % 2 else -1}], "model": "bot"}
        for i in range(4)
    ]  # fmt: skip
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    engine = open_database(f"duckdb:///{tmp_path / 'db.duckdb'}")
    ingest_paths([log], engine=engine, config=IngestConfig(progress=False))
    monkeypatch.chdir(work)
    trained = train_reward_only(engine, config=ScoreConfig(reward_model_dir="rm"))
    monkeypatch.chdir(tmp_path)
    applied = apply_reward(engine, config=ScoreConfig())
    engine.dispose()
    assert applied["reward_model"] == trained["reward_model"] and applied["exchanges"] == 4


def test_alpha_battle_zero_keeps_battles_out_of_training(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--alpha-battle 0` left battles out of the joint target only: the pairwise loss still
    learnt the judge's preferences. On a log of battles alone there is then nothing to learn
    from, and the error says why; the battles still measure a model trained on other signals."""
    from ingest.pipeline import IngestConfig, ingest_paths
    from scoring.labels import LabelConfig
    from scoring.step import ScoreConfig, train_reward_only
    from storage.engine import open_database

    log = tmp_path / "battles.jsonl"
    with gzip.open(shared_file("alpacaeval_battles_dev.jsonl.gz"), "rt") as source:
        log.write_text("".join(line for _, line in zip(range(60), source, strict=False)))
    engine = open_database(f"duckdb:///{tmp_path / 'db.duckdb'}")
    ingest_paths([log], engine=engine, config=IngestConfig(progress=False))
    trained = train_reward_only(engine, config=ScoreConfig(mode="head"))  # pairwise
    assert trained["labels"]["battle"]["known"] > 0
    no_battles = ScoreConfig(mode="head", labels=LabelConfig(alpha_battle=0.0))
    with pytest.raises(ValueError, match="--alpha-battle 0 leaves them out"):
        train_reward_only(engine, config=no_battles)
    engine.dispose()
