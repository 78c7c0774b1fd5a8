"""One chat completion at a time against an OpenAI-compatible endpoint, with the retry policy
that replay and the LLM judge share.

The `openai` client's own retries are off, so this module alone decides what is retried: 429,
408/409, 5xx, timeouts, dropped connections and malformed bodies, with exponential backoff,
jitter and the server's Retry-After. Other errors (400, 401, 404...) fail at once: retrying
cannot fix them. So does an empty answer (a whole completion whose text is empty): the endpoint
worked and the model said nothing, which is no malformed body, and no answer to store either
(an empty response is a saved input waiting for replay); it fails as "empty answer". The API
key is given by the caller (read from the environment at call time), never stored, and scrubbed
from every error text this module returns.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import signal
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import openai

T = TypeVar("T")

DUMMY_API_KEY = "sk-local-no-key"  # local servers want some bearer token, not a real one
_ERROR_CHARS = 500


class CallPolicy(Protocol):
    """Where to send and how hard to push (ReplayConfig and JudgeConfig both are one)."""

    base_url: str
    timeout_s: float
    rate_limit: float | None
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    retry_after_max_s: float


class MalformedResponse(ValueError):
    """A 200 whose body is not a usable chat completion."""


class RequestTimeout(TimeoutError):
    """An attempt that took longer than `timeout_s` in all: httpx's timeout is per read, so a
    server trickling a byte at a time would otherwise hold a worker forever."""


@dataclass(slots=True)
class CallStats:
    """Counts over every call of one client: HTTP requests, retries, answers, failures."""

    requests: int = 0
    retried: int = 0
    done: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    content: str
    completion: Any  # the openai ChatCompletion (usage, served model, finish reason)
    latency_s: float  # of the attempt that succeeded
    attempts: int  # including those before, when the caller resumes an item


@dataclass(frozen=True, slots=True)
class Failure:
    error: str  # kind, status and message, the key scrubbed out
    attempts: int


def public_url(url: str) -> str:
    """The endpoint without credentials or query string: safe to store and show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# How a failure that is the model's empty answer, not a transport or format error, begins.
EMPTY_ANSWER = "empty answer"


# A URL's user:password@, and each value of a query string (`?api-key=...&b=...`), anywhere.
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")
_QUERY_VALUE = re.compile(r"([?&][\w.\-~%]+=)[^&\s'\"#]*")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with these secrets, URL credentials and query values replaced by ***: error
    texts are stored and printed, and a gateway may quote the URL (`?api-key=`) in them."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub("***@", text))


class ChatClient:
    """An AsyncOpenAI client plus a rate limiter and the retry policy; an async context."""

    def __init__(self, policy: CallPolicy, api_key: str | None) -> None:
        self.policy = policy
        self.stats = CallStats()
        self._secret = api_key or DUMMY_API_KEY
        self._limiter = _RateLimiter(policy.rate_limit)
        self._rng = random.Random()
        # A query string (Azure's `?api-version=`) goes on every request: the client would
        # otherwise append `chat/completions` after it. Its values may be keys: never shown.
        url = urlsplit(policy.base_url)
        query = parse_qsl(url.query, keep_blank_values=True)
        self._hidden = [self._secret, *(value for _, value in query if len(value) >= 4)]
        self._client = openai.AsyncOpenAI(
            base_url=urlunsplit((*url[:3], "", "")),
            api_key=self._secret,
            max_retries=0,  # retries are ours: counted, logged and bounded by max_attempts
            timeout=policy.timeout_s,
            default_query=dict(query) or None,
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._client.close()

    async def complete(
        self,
        model: str,
        messages: list[dict[str, str]],
        params: Mapping[str, Any],
        *,
        attempts_before: int = 0,
    ) -> Answer | Failure:
        """The first usable answer within `max_attempts`, or why there was none."""
        attempts = attempts_before
        for attempt in range(1, self.policy.max_attempts + 1):
            await self._limiter.wait()
            attempts += 1
            self.stats.requests += 1
            started = time.perf_counter()
            try:
                completion = await self._create(model, messages, params)
                content = _content(completion)
            except (openai.APIError, ValueError, RequestTimeout) as error:
                retryable, retry_after = _classify(error)
                if not retryable or attempt == self.policy.max_attempts:
                    self.stats.failed += 1
                    return Failure(self._describe(error), attempts)
                self.stats.retried += 1
                await asyncio.sleep(self._backoff(attempt, retry_after))
                continue
            if not content.strip():
                self.stats.failed += 1
                return Failure(self._empty(completion), attempts)
            self.stats.done += 1
            return Answer(content, completion, time.perf_counter() - started, attempts)
        raise AssertionError("unreachable: the last attempt returns")

    async def _create(
        self, model: str, messages: list[dict[str, str]], params: Mapping[str, Any]
    ) -> Any:
        """One request, within `timeout_s` in all (headers and every byte of the body)."""
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                return await self._client.chat.completions.create(
                    model=model, messages=messages, **params
                )
        except TimeoutError:
            limit = f"{self.policy.timeout_s:g}"
            raise RequestTimeout(f"Request timed out: no whole reply within {limit} s") from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter, never shorter than the server's Retry-After."""
        policy = self.policy
        ceiling = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (attempt - 1))
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, policy.retry_after_max_s))
        return delay

    def _empty(self, completion: Any) -> str:
        """Why an empty answer came back, as far as the server said (`length`: max_tokens
        spent before any text, as reasoning models do; `content_filter`: withheld)."""
        reason = getattr(completion.choices[0], "finish_reason", None)
        said = f" (finish_reason {reason!r})" if isinstance(reason, str) else ""
        text = f"{EMPTY_ANSWER}: the endpoint answered with no text{said}"
        return redact(text, self._hidden)[:_ERROR_CHARS]

    def _describe(self, error: Exception) -> str:
        """Kind, status, message and underlying cause ("Connection error." alone says nothing
        of a refused port or a failed TLS handshake), with every secret redacted."""
        status = getattr(error, "status_code", None)
        text = f"{type(error).__name__}" + (f" {status}" if status else "") + f": {error}"
        cause = error.__cause__
        if cause is not None and str(cause) not in text:
            text += f" ({type(cause).__name__}: {cause})"
        return redact(text, self._hidden)[:_ERROR_CHARS]


class _RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, over all workers."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


def _content(completion: Any) -> str:
    """The answer text ("" for a message without any), or MalformedResponse when the body is
    not a usable completion (the client does not validate it: `choices` may be anything the
    server sent)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("the completion has no list of choices")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise MalformedResponse("the completion's first choice has no message")
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        raise MalformedResponse("the completion's first choice has no text")
    return content or ""


def _classify(error: Exception) -> tuple[bool, float | None]:
    """Whether an error is worth retrying, and the wait the server asked for, if any."""
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        retryable = status in (408, 409, 429) or status >= 500
        return retryable, _retry_after(error.response.headers) if retryable else None
    if isinstance(error, openai.APIConnectionError):  # timeouts included
        return True, None
    # Bodies that are not JSON, or not a chat completion, are usually a proxy's hiccup.
    retryable = (ValueError, openai.APIResponseValidationError, RequestTimeout)
    return isinstance(error, retryable), None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            seconds = (when - datetime.now(when.tzinfo)).total_seconds()
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


# Seconds a run may take to unwind after Ctrl-C before it is ended anyway (see run_interruptible).
INTERRUPT_GRACE_S = 10.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_interruptible(work: Coroutine[Any, Any, T], *, grace_s: float = INTERRUPT_GRACE_S) -> T:
    """`asyncio.run(work)`, where Ctrl-C always ends it: KeyboardInterrupt within seconds.

    SIGTERM (`kill`, a container stopping) is handled as Ctrl-C: without it the process died
    at once, its run left "running" and its answered but uncommitted work lost. The first
    signal cancels the work, which unwinds (requests cancelled, the client closed,
    what was committed kept). If that has not finished `grace_s` later, or at a second
    Ctrl-C, the loop stops with KeyboardInterrupt and whatever is still unwinding is left to
    the process's exit, not awaited: a cancelled request's cleanup can wait on a server that
    holds its reply, and an interrupted replay once kept running for minutes that way.
    """
    gave_up = False

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def give_up() -> None:
            nonlocal gave_up
            gave_up = True
            raise KeyboardInterrupt  # raised in a loop callback, it stops the loop

        def interrupt() -> None:
            if task.cancelling():
                give_up()
            task.cancel()
            loop.call_later(grace_s, give_up)

        try:
            for signum in _STOP_SIGNALS:
                loop.add_signal_handler(signum, interrupt)
        except (ValueError, RuntimeError, NotImplementedError):
            return await work  # not the main thread (the UI's replay page): as asyncio.run
        try:
            return await work
        except asyncio.CancelledError:
            if task.cancelling():
                raise KeyboardInterrupt from None
            raise
        finally:
            for signum in _STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    runner = asyncio.Runner()
    try:
        result = runner.run(main())
    except KeyboardInterrupt:
        if gave_up:  # leave the stuck tasks unawaited, and quiet about being left
            runner.get_loop().set_exception_handler(lambda _loop, _context: None)
        else:
            runner.close()
        raise
    except BaseException:
        runner.close()
        raise
    runner.close()
    return result
