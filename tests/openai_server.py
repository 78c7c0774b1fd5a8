"""A real OpenAI-compatible chat completions server on 127.0.0.1, for replay tests and benchmarks.

It speaks the non-streaming `POST /v1/chat/completions` API over real HTTP/1.1 with keep-alive,
so the `openai` client talks to it exactly as it would to a hosted endpoint. Faults (429 with
Retry-After, 5xx, slow replies, malformed bodies) are configured per prompt or for the first N
requests; every request is counted per prompt, so a test can prove that nothing completed was
sent twice after a resume. The answer is derived from the request, so tests know what to expect.

Run it alone (`python tests/openai_server.py --delay 0.01 &`) to serve from a separate process:
it prints its base URL on the first line of stdout and serves until SIGINT or SIGTERM (Ctrl-C,
`kill`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def answer_for(messages: list[dict[str, Any]]) -> str:
    """The deterministic answer to a request: depends on the system message and the prompt."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    prompt = last_user_message(messages)
    digest = hashlib.sha256(json.dumps([system, prompt]).encode()).hexdigest()[:8]
    return f"answer {digest}: {prompt[::-1]}"


def last_user_message(messages: list[dict[str, Any]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


@dataclass
class Fault:
    """What to do instead of a plain answer, for matching requests.

    `prompt` restricts it to requests whose last user message contains that text; `times` is
    how many matching requests it applies to (None: all of them). The first fault that matches
    and has uses left wins.
    """

    status: int | None = None  # an HTTP error status (429, 500, 503, 401...)
    retry_after: str | None = None  # Retry-After header value sent with the error
    delay_s: float = 0.0  # extra seconds before replying
    malformed: bool = False  # a 200 whose body is cut-off JSON
    body: Any = None  # a 200 whose JSON body is this instead of a chat completion
    usage: Any = None  # the completion's `usage` is this instead of the true counts
    trickle_s: float = 0.0  # the reply's first _TRICKLED bytes go out one at a time, this apart
    echo_auth: bool = False  # put the request's Authorization header in the error message
    echo_path: bool = False  # put the request's path and query string in the error message
    prompt: str | None = None
    times: int | None = None


_TRICKLED = 20  # bytes a trickling reply sends slowly: a client reading per byte never waits long


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 resets connections when 128 clients connect at once


class OpenAIServer:
    """A threaded HTTP server; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        faults: list[Fault] | None = None,
        responder: Callable[[list[dict[str, Any]]], str] = answer_for,
    ) -> None:
        self.delay_s = delay_s
        self.responder = responder  # the answer text for a request's messages
        self.faults: list[Fault] = list(faults or [])
        self.requests: Counter[str] = Counter()  # per prompt: requests received
        self.answered: Counter[str] = Counter()  # per prompt: 200 answers written
        # Bodies, auth header, prompt, arrival time, path and query string.
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def total_requests(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def total_answered(self) -> int:
        with self.lock:
            return sum(self.answered.values())

    def take_fault(self, prompt: str) -> Fault | None:
        """Consume one use of the first fault matching this prompt."""
        with self.lock:
            self.requests[prompt] += 1
            for fault in self.faults:
                if fault.prompt is not None and fault.prompt not in prompt:
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                return fault
            return None


def _handler_for(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms stalls

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: the tests read counters, not access logs."""

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            path, _, query = self.path.partition("?")
            if path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(raw)
                messages = body["messages"]
            except (ValueError, KeyError, TypeError):
                self._send(400, {"error": {"message": "bad request body"}})
                return
            auth = self.headers.get("Authorization", "")
            prompt = last_user_message(messages)
            fault = server.take_fault(prompt)
            with server.lock:
                server.received.append(
                    {
                        "body": body,
                        "authorization": auth,
                        "at": time.monotonic(),
                        "prompt": prompt,
                        "path": path,
                        "query": query,
                    }
                )
            delay = server.delay_s + (fault.delay_s if fault else 0.0)
            if delay:
                time.sleep(delay)
            # The client may have given up (timeout) or been killed: then nothing to answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._reply(body, messages, prompt, fault, auth)

        def _reply(
            self,
            body: dict[str, Any],
            messages: list[dict[str, Any]],
            prompt: str,
            fault: Fault | None,
            auth: str,
        ) -> None:
            if fault and fault.status:
                message = f"injected error {fault.status}"
                if fault.echo_auth:
                    message += f" (credentials were {auth!r})"
                if fault.echo_path:
                    message += f" (for http://127.0.0.1{self.path})"
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._send(fault.status, {"error": {"message": message}}, headers)
                return
            if fault and fault.malformed:
                self._send_bytes(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
                return
            if fault and fault.body is not None:
                self._send(200, fault.body)
                return
            answer = server.responder(messages)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion_tokens = len(answer.split())
            self._send(
                200,
                {
                    "id": "chatcmpl-" + hashlib.sha256(answer.encode()).hexdigest()[:16],
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "unknown"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    }
                    if fault is None or fault.usage is None
                    else fault.usage,
                },
                trickle_s=fault.trickle_s if fault else 0.0,
            )
            with server.lock:
                server.answered[prompt] += 1

        def _send(
            self,
            status: int,
            payload: Any,
            headers: dict[str, str] | None = None,
            *,
            trickle_s: float = 0.0,
        ) -> None:
            self._send_bytes(status, json.dumps(payload).encode(), headers, trickle_s=trickle_s)

        def _send_bytes(
            self,
            status: int,
            data: bytes,
            headers: dict[str, str] | None = None,
            *,
            trickle_s: float = 0.0,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if trickle_s:  # each byte well within any per-read timeout, the whole far beyond
                for i in range(_TRICKLED):
                    self.wfile.write(data[i : i + 1])
                    time.sleep(trickle_s)
                data = data[_TRICKLED:]
            self.wfile.write(data)

    return Handler


def main() -> None:
    """Serve until SIGINT or SIGTERM. Not until stdin closes: a job started with `&` gets no
    stdin in a script (it ended at once) and is stopped for reading the tty in a shell."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    args = parser.parse_args()
    stop = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server's threads start, so that they inherit the mask and the signal
    # waits for sigwait below instead of interrupting a request.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with OpenAIServer(delay_s=args.delay) as server:
        print(server.base_url, flush=True)
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
