"""What text stands for an exchange when it is embedded: its prompt, its response, or both.

- **prompt** (the default for clustering): the user message, then a short slice of the
  previous user message. Follow-ups such as "yes", "shorter please" or "and in Python?" say
  nothing about their topic on their own; embedded bare they all land in one meaningless
  cluster. The previous *user* message names the topic in a few words (an assistant message
  would be long and about the answer, not the ask). It comes after the prompt and is capped at
  ~200 characters, so a substantial prompt outweighs it (mean pooling weighs every token alike)
  and, when the prompt alone fills the model's window, the context is what gets cut.
- **response**: the response alone.
- **exchange**: the prompt (without context: the response already carries the situation) and
  the response's opening, within one budget. all-MiniLM-L6-v2 reads 256 word pieces (~1,000
  characters of English) and drops the rest, so a long prompt would push the response out
  entirely: the prompt gets at most 40 % of the budget, the response the remainder.

Whitespace is collapsed first: BERT tokenizers ignore it, so this changes nothing the model
sees but keeps character budgets honest for indented code and long runs of blank lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from ingest.records import Message, canonical_role

On = Literal["prompt", "response", "exchange"]

CONTEXT_CHARS = 200  # slice of the previous user message that travels with a prompt
TEXT_CHARS = 1500  # more than the model's 256-token window holds; the rest is never read
EXCHANGE_PROMPT_SHARE = 0.4  # the prompt's share of the budget in "exchange" mode


def squash(text: str) -> str:
    """Runs of whitespace → one space, ends trimmed."""
    return " ".join(text.split())


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary when one is near, marked with "…"."""
    if len(text) <= limit:
        return text
    head = text[: max(limit - 1, 0)]
    space = head.rfind(" ")
    if space >= limit * 0.8:
        head = head[:space]
    return head.rstrip() + "…"


def _role_and_content(message: Mapping[str, str] | Message) -> tuple[str | None, str]:
    if isinstance(message, Message):
        return message.role, message.content
    return canonical_role(str(message.get("role", ""))), str(message.get("content") or "")


def previous_user_message(context: Sequence[Mapping[str, str] | Message]) -> str | None:
    """The last non-empty user message in `context` (raw role names like "human" count)."""
    for message in reversed(context):
        role, content = _role_and_content(message)
        if role == "user" and content.strip():
            return content
    return None


def text_for(
    prompt: str,
    response: str,
    context: Sequence[Mapping[str, str] | Message],
    *,
    on: On,
) -> str:
    """The text to embed for one exchange (see the module docstring for why each is built so)."""
    if on == "prompt":
        text = squash(prompt)
        previous = previous_user_message(context)
        if previous:
            slice_ = clip(squash(previous), CONTEXT_CHARS)
            text = f"{text}\n{slice_}" if text else slice_
        return clip(text, TEXT_CHARS)
    if on == "response":
        return clip(squash(response), TEXT_CHARS)
    if on == "exchange":
        head = clip(squash(prompt), int(TEXT_CHARS * EXCHANGE_PROMPT_SHARE))
        tail = clip(squash(response), TEXT_CHARS - len(head))
        return f"{head}\n\n{tail}" if head and tail else head or tail
    raise ValueError(f"on must be prompt, response or exchange, not {on!r}")
