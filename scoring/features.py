"""Cheap structural features of a (prompt, response) text pair, for the reward head.

A sentence embedding of a truncated response cannot see how long it is or how it is laid out,
yet judges (human and LLM alike) reward long, well-structured answers and punish refusals and
answers cut off mid-sentence. These counts are computed from the raw text with a few regular
expressions, so they cost nothing next to the embedding and work for any language model's
output. Counts are log-scaled (their effect saturates) and every value is finite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"\w+")
_BULLET = re.compile(r"^\s*[-*•+]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
_HEADER = re.compile(r"^\s*#{1,6}\s+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_CODE_BLOCK = re.compile(r"```")
_INLINE_CODE = re.compile(r"(?<!`)`[^`\n]+`(?!`)")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_REFUSAL = re.compile(
    r"\b(?:I(?:'m| am) sorry|I apologi[sz]e|as an AI|I (?:cannot|can't|can not|am unable|"
    r"won't)|I'm not able|I do not have (?:access|the ability)|language model)\b",
    re.IGNORECASE,
)
# Chat-template text leaking into the answer (a weak model continuing the conversation).
_TEMPLATE_LEAK = re.compile(
    r"(?:^|\n)\s*(?:###\s*(?:Instruction|Response|Input)|Human:|User:|Assistant:|<\|)",
    re.IGNORECASE,
)
_AFFIRMATION = re.compile(
    r"^\s*(?:sure|certainly|of course|absolutely|great question|here(?:'s| is| are))\b",
    re.IGNORECASE,
)
_URL = re.compile(r"https?://")
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_CLOSING = re.compile(
    r"\b(?:in summary|in conclusion|overall|to summari[sz]e|remember|note that)\b", re.IGNORECASE
)

RESPONSE_FEATURES = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_paragraphs",
    "log_bullets",
    "log_numbered",
    "log_headers",
    "log_bold",
    "log_code_blocks",
    "log_inline_code",
    "log_table_rows",
    "log_sentences",
    "mean_word_len",
    "unique_word_ratio",
    "refusal",
    "closing_phrase",
    "ends_unfinished",
    "prompt_word_overlap",
    "log_chars_over_prompt",
)
PROMPT_FEATURES = ("prompt_log_chars", "prompt_log_words", "prompt_log_lines")
# Added after the first release, so they come last: the older columns stay a prefix.
QUALITY_FEATURES = (
    # Degenerate or off-target answers: template leaks, repeated lines and word trigrams,
    # a script other than the prompt's, a copy of the prompt; and style: an opening
    # affirmation, links, emoji, sentence length, the longest line (walls of text).
    "template_leak",
    "affirmation",
    "repeated_lines",
    "repeated_trigrams",
    "non_ascii_gap",
    "cjk_mismatch",
    "log_urls",
    "log_emoji",
    "log_words_per_sentence",
    "echoes_prompt",
    "log_longest_line",
)
# Only ever append: a stored reward head reads the first N columns it was trained on.
FEATURE_NAMES = RESPONSE_FEATURES + PROMPT_FEATURES + QUALITY_FEATURES

# What kind of answer a prompt asks for: experts differ by task (one writes code better, another
# explains better) and the judge's length preference matters less when a short answer is asked.
_PROMPT_CUES = {
    "asks_brief": r"\b(?:brief|briefly|short|concise|one word|single word|one sentence|"
    r"in \d+ words|yes or no|only|just)\b",
    "asks_list": r"\b(?:list|steps|ways|examples|ideas|tips|suggest|recommend)\b",
    "asks_creative": r"\b(?:write|story|poem|essay|letter|email|song|joke|blog|article|lyrics)\b",
    "asks_explain": r"\b(?:explain|why|how|describe|what is|what are|difference|compare)\b",
    "asks_transform": r"\b(?:classify|categori[sz]e|identify|extract|convert|translate|rewrite|"
    r"correct|grammar|rephrase|paraphrase|summari[sz]e)\b",
    "asks_code": r"```|\b(?:code|python|javascript|java|c\+\+|function|sql|program|script|"
    r"regex|html|css|bash)\b",
    "asks_math": r"\d+\s*[-+*/^=]\s*\d+|\b(?:calculate|solve|equation|math|probability)\b",
    "asks_opinion": r"\b(?:you think|your opinion|should i|would you|do you)\b",
}
PROMPT_CUE_PATTERNS = {k: re.compile(v, re.IGNORECASE) for k, v in _PROMPT_CUES.items()}
PROMPT_ONLY_FEATURES = (
    "log_chars",
    "log_words",
    "log_lines",
    "has_question",
    "ends_with_question",
    "has_colon",
    "digit_share",
    *PROMPT_CUE_PATTERNS,
)

# How each prompt feature is computed, for a gateway that routes without this package (the
# routing table carries it): `_prompt_row` below is the reference implementation.
PROMPT_FEATURE_DEFINITIONS: dict[str, dict[str, str]] = {
    "log_chars": {"formula": "ln(1 + number of characters)"},
    "log_words": {"formula": "ln(1 + number of matches of the regex \\w+)"},
    "log_lines": {"formula": "ln(1 + number of lines that are not blank)"},
    "has_question": {"formula": "1 if the prompt contains '?', else 0"},
    "ends_with_question": {"formula": "1 if the prompt ends with '?' (trailing spaces ignored)"},
    "has_colon": {"formula": "1 if the prompt contains ':', else 0"},
    "digit_share": {"formula": "number of digits / max(1, number of characters)"},
    **{
        name: {"regex": pattern, "flags": "i", "formula": "1 if the regex matches anywhere, else 0"}
        for name, pattern in _PROMPT_CUES.items()
    },
}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _non_ascii_share(text: str) -> float:
    # Characters dropped by an ASCII encode are those above 127: counted in C, not per char
    # in Python (this was a third of the reward step's time on long answers).
    return (len(text) - len(text.encode("ascii", "ignore"))) / max(1, len(text))


def _row(response: str, prompt: str) -> list[float]:
    """One exchange's features, in the order of FEATURE_NAMES."""
    words, prompt_words = _words(response), _words(prompt)
    lines = [ln for ln in response.splitlines() if ln.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", response) if p.strip()]
    stripped = response.rstrip()
    unique = len(set(words)) / len(words) if words else 0.0
    p_set = set(prompt_words)
    overlap = sum(w in p_set for w in set(words)) / len(p_set) if p_set else 0.0
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    n_sentences = len(_SENTENCE_END.findall(response))
    counts = [
        len(response),
        len(words),
        len(lines),
        len(paragraphs),
        len(_BULLET.findall(response)),
        len(_NUMBERED.findall(response)),
        len(_HEADER.findall(response)),
        len(_BOLD.findall(response)),
        len(_CODE_BLOCK.findall(response)) // 2,
        len(_INLINE_CODE.findall(response)),
        len(_TABLE_ROW.findall(response)),
        n_sentences,
    ]
    stripped_lines = [ln.strip() for ln in lines]
    log1p = math.log1p  # on Python floats: numpy's per-scalar calls cost more than the work
    return [
        *(log1p(c) for c in counts),
        sum(map(len, words)) / len(words) if words else 0.0,
        unique,
        float(bool(_REFUSAL.search(response[:400]))),
        float(bool(_CLOSING.search(response[-600:]))),
        float(bool(stripped) and stripped[-1] not in ".!?)]}\"'`*:|"),
        overlap,
        log1p(len(response)) - log1p(len(prompt)),
        log1p(len(prompt)),
        log1p(len(prompt_words)),
        log1p(sum(1 for ln in prompt.splitlines() if ln.strip())),
        float(bool(_TEMPLATE_LEAK.search(response))),
        float(bool(_AFFIRMATION.search(response[:80]))),
        1.0 - len(set(stripped_lines)) / len(lines) if lines else 0.0,
        1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0,
        abs(_non_ascii_share(response) - _non_ascii_share(prompt)),
        float(bool(_CJK.search(response)) != bool(_CJK.search(prompt))),
        log1p(len(_URL.findall(response))),
        log1p(len(_EMOJI.findall(response))),
        log1p(len(words) / max(1, n_sentences)),
        float(len(prompt) > 30 and prompt.strip()[:200] in response),
        log1p(max((len(ln) for ln in stripped_lines), default=0)),
    ]


def _prompt_row(prompt: str) -> list[float]:
    """One prompt's features, in the order of PROMPT_ONLY_FEATURES."""
    words = _WORD.findall(prompt)
    lines = sum(1 for ln in prompt.splitlines() if ln.strip())
    return [
        math.log1p(len(prompt)),
        math.log1p(len(words)),
        math.log1p(lines),
        float("?" in prompt),
        float(prompt.rstrip().endswith("?")),
        float(":" in prompt),
        sum(map(str.isdigit, prompt)) / max(1, len(prompt)),
        *(float(bool(p.search(prompt))) for p in PROMPT_CUE_PATTERNS.values()),
    ]


def prompt_features(prompts: Iterable[str]) -> np.ndarray:
    """Prompt-only features (n, len(PROMPT_ONLY_FEATURES)): length and the kind of task asked.

    They use nothing but the prompt, so a router may use them before any expert has answered.
    """
    rows = (_prompt_row(p if isinstance(p, str) else "") for p in prompts)
    return _matrix(rows, len(PROMPT_ONLY_FEATURES))


def text_features(responses: Iterable[str], prompts: Iterable[str]) -> np.ndarray:
    """Structural features (n, len(FEATURE_NAMES)) for paired responses and prompts.

    Missing texts (None / NaN) count as empty, so a row is always defined.
    """
    rows = (
        _row(r if isinstance(r, str) else "", p if isinstance(p, str) else "")
        for r, p in zip(responses, prompts, strict=True)
    )
    return _matrix(rows, len(FEATURE_NAMES))


def _matrix(rows: Iterable[list[float]], width: int) -> np.ndarray:
    """Feature rows as a float32 matrix, each row stored as it is made: a list of every row
    first held each value as a Python float, 1.4 KB an exchange for 41 features (+140 MB at
    100K exchanges, for a 16 MB matrix)."""
    return np.fromiter(rows, dtype=np.dtype((np.float32, width)))


# A feature whose training std is below this never varied there: its weight learned nothing.
CONSTANT_STD = 1e-5
# Standardised values beyond this many training stds are clipped.
CLIP_STDS = 6.0


def standardise(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(features − mean) / std as the models read them, safe for texts unlike the training set.

    A feature that never varied in training (no code block in any trained answer, say) reads
    as its training mean, and every value is clipped to ±CLIP_STDS: dividing by the 1e-6
    kept in `std` for such a feature once turned one code block into a reward of −28,000, and
    one newline in a prompt into certain wins for an arbitrary expert.
    """
    std = np.asarray(std, dtype=np.float32)
    z = (np.asarray(features, dtype=np.float32) - mean) / np.maximum(std, CONSTANT_STD)
    z[:, std < CONSTANT_STD] = 0.0
    return np.clip(z, -CLIP_STDS, CLIP_STDS)
