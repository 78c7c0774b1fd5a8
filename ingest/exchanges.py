"""Split conversations into exchanges (one per model response) and read signals off the structure.

Conventions, chosen so the reward model's labels mean what they say:
- Every assistant message that answers a user message is an exchange; its prompt is the
  nearest earlier user message, its context every earlier message before that prompt (system
  messages included, regenerated responses excluded: the user never built on those).
  Assistant messages before the first user message (a bot's greeting) are context only.
- `user_turns_after` counts user messages after the response; `ended_conversation` is true
  when there are none, except for a retried response: regenerating is a reaction, not leaving.
- A request the user edited (`Message.replaced`, as `--merge-history` reads a gateway's log)
  is the prompt of its answers, which are marked `edited`; neither is in later contexts, and
  it is not a user turn of its own: the edit that replaced it is, so the answers before count
  the chat's turns once, and the edited answer is followed by the edit (never "ended").
- `seconds_to_next_user_message` is the gap to the next user message when both are dated.
- Conversation-level thumbs and rating (Chai's `thumbs_up`) apply to the last response that was
  kept (not retried), the one the user judged on leaving, and only when no response in the
  conversation carries that signal itself. Free-text feedback stays on the conversation.
- A last user message with no answer after it (a conversation with none at all, or a question
  the log stops at) yields an exchange with an empty response: a saved input, waiting for
  replay. Earlier unanswered messages are context of the next answer.
- `instruction` is the conversation's logged instruction, else the latest system message.
- Tool use is part of a turn, not an answer: an assistant message that calls a tool and the
  tool's result (role `tool`) are not exchanges. The answer that follows them keeps them in its
  metadata (`tool_steps`), and later turns see them in their context.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from ingest.records import BattleRecord, Conversation, Exchange, Message


def split_conversation(conv: Conversation, conversation_id: str | None = None) -> list[Exchange]:
    """One Exchange per answered user message, in conversation order (see module docstring).

    `conversation_id` replaces `conv.id` (the ingest gives a repeated copy its own id, and has
    hashed the content already). One pass over the messages: ShareGPT-sized logs split tens of
    thousands of these a second.
    """
    messages = conv.messages
    users = [i for i, m in enumerate(messages) if m.role == "user" and not m.replaced]
    if not users:
        return []
    if conversation_id is None:
        conversation_id = conv.id
    thumbs_at = _feedback_target(conv, users[0], "thumbs")
    rating_at = _feedback_target(conv, users[0], "rating")
    kept: list[Message] = []  # earlier messages a later turn builds on (retries left out)
    context: tuple[Message, ...] = ()
    prompt: Message | None = None
    system: str | None = None
    users_seen = 0
    steps: list[Message] = []  # tool calls and results since the prompt
    exchanges = []
    for i, m in enumerate(messages):
        role = m.role
        if role == "user":
            context = tuple(kept)
            prompt = m
            if not m.replaced:
                users_seen += 1
            steps = []
        elif role == "system":
            system = m.content
        elif _is_step(m):
            steps.append(m)
        elif prompt is not None:
            after = len(users) - users_seen
            next_user = messages[users[users_seen]] if after else None
            exchanges.append(
                Exchange(
                    conversation_id=conversation_id,
                    turn_index=i,
                    context=context,
                    prompt=prompt.content,
                    response=m.content,
                    model=m.model or conv.model,
                    instruction=conv.instruction or system,
                    created_at=m.created_at or conv.created_at,
                    source=conv.source,
                    external_id=m.external_id or conv.external_id,
                    retried=m.retried,
                    edited=m.edited,
                    deleted=m.deleted,
                    rating=conv.rating if i == rating_at else m.rating,
                    thumbs=conv.thumbs if i == thumbs_at else m.thumbs,
                    user_turns_after=after,
                    ended_conversation=False if m.retried else after == 0,
                    seconds_to_next_user_message=_gap(m, next_user),
                    metadata=_with_steps(m.metadata, steps),
                )
            )
            steps = []
        if not _set_aside(m):
            kept.append(m)
    if not exchanges or exchanges[-1].turn_index < users[-1]:  # the last request unanswered
        exchanges.append(_saved_input(conv, conversation_id, users[-1]))
    return exchanges


def _feedback_target(conv: Conversation, first_user: int, signal: str) -> int | None:
    """The response a conversation-level signal ("thumbs" or "rating") applies to, if any.

    The last kept (not retried or edited away) answer, and only when no answer carries that
    signal itself.
    """
    if getattr(conv, signal) is None:
        return None
    answers = [
        i
        for i, m in enumerate(conv.messages)
        if m.role == "assistant" and i > first_user and not _is_step(m)
    ]
    if any(getattr(conv.messages[i], signal) is not None for i in answers):
        return None
    return next((i for i in reversed(answers) if not _set_aside(conv.messages[i])), None)


def _set_aside(m: Message) -> bool:
    """A regenerated answer, or a request the user edited and its answers: the user never built
    on them, and the model answering later turns never saw them."""
    return bool(m.retried) or m.replaced


def _is_step(m: Message) -> bool:
    """A tool's result, or an assistant message that calls a tool (OpenAI's `tool_calls`, or
    the older `function_call`): a step towards the answer, not the answer."""
    if m.role == "tool":
        return True
    extra = m.metadata
    return (
        bool(extra)
        and m.role == "assistant"
        and ("tool_calls" in extra or "function_call" in extra)
    )


def _with_steps(extra: dict[str, Any] | None, steps: list[Message]) -> dict[str, Any]:
    out = dict(extra) if extra else {}
    if steps:
        out["tool_steps"] = [
            {"role": s.role, "content": s.content, **(s.metadata or {})} for s in steps
        ]
    return out


def battle_exchanges(b: BattleRecord) -> tuple[Exchange, Exchange]:
    """The two answers of a battle as one-turn exchanges, ids derived from content only.

    No battle id goes into them, so an answer that appears in many battles (AlpacaEval's
    baseline answers every prompt 28 times) is one exchange, and so is the same answer logged
    elsewhere.
    """
    a = _one_turn(b, b.model_a, b.response_a)
    other = _one_turn(b, b.model_b, b.response_b)
    return a, other


def _one_turn(b: BattleRecord, model: str, response: str) -> Exchange:
    conv = Conversation(
        messages=(
            *b.context,
            Message(role="user", content=b.prompt),
            Message(role="assistant", content=response, model=model),
        ),
        source=b.source,
        line=b.line,
    )
    # A judged pair says nothing about what the user did next: those signals stay unknown.
    return replace(split_conversation(conv)[-1], user_turns_after=None, ended_conversation=None)


def _saved_input(conv: Conversation, conversation_id: str, prompt_at: int) -> Exchange:
    messages = conv.messages
    prompt = messages[prompt_at]
    return Exchange(
        conversation_id=conversation_id,
        turn_index=len(messages),
        context=tuple(c for c in messages[:prompt_at] if not _set_aside(c)),
        prompt=prompt.content,
        response="",
        model=prompt.model or conv.model,
        instruction=conv.instruction or _latest_system(messages, prompt_at),
        created_at=prompt.created_at or conv.created_at,
        source=conv.source,
        external_id=prompt.external_id or conv.external_id,
        metadata=dict(prompt.metadata or {}),
    )


def _latest_system(messages: tuple[Message, ...], before: int) -> str | None:
    for m in reversed(messages[:before]):
        if m.role == "system":
            return m.content
    return None


def _gap(response: Message, next_user: Message | None) -> float | None:
    if next_user is None or response.created_at is None or next_user.created_at is None:
        return None
    return _seconds(response.created_at, next_user.created_at)


def _seconds(start: datetime, end: datetime) -> float | None:
    try:
        return (end - start).total_seconds()
    except TypeError:  # one naive, one aware: no defined gap
        return None
