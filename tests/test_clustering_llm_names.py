"""LLM cluster names against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from clustering.llm_names import LLMNamer, clean_name, openai_client
from clustering.stages import PassThrough, kmeans_clusterer
from clustering.topics import ClusterConfig, TopicModel, fit_topics
from tests.openai_server import Fault, OpenAIServer


@dataclass
class ChatServer:
    """Answers /v1/chat/completions with a name built from the prompt's first keyword."""

    url: str
    requests: list[dict] = field(default_factory=list)
    fail: bool = False


@pytest.fixture
def server() -> Iterator[ChatServer]:
    state = ChatServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions" or state.fail:
                self.send_error(500 if state.fail else 404)
                return
            state.requests.append(body)
            prompt = body["messages"][-1]["content"]
            keyword = prompt.split("Keywords of this cluster: ", 1)[1].split(",")[0].strip()
            reply = {
                "id": f"chatcmpl-{len(state.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": f'Name: "Asking about {keyword}"\n',
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            payload = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def topics_and_texts(shared_file: Callable[[str], Path]) -> tuple[TopicModel, list[str]]:
    """Real queries of 6 intents, clustered on TF-IDF vectors (cheap, no embedding model)."""
    data = json.loads(shared_file("clinc150.json").read_text())
    wanted = {"credit_score", "book_hotel", "weather", "transfer", "change_accent", "greeting"}
    texts = [t for t, intent in data["train"] if intent in wanted]
    vectors = TfidfVectorizer(stop_words="english").fit_transform(texts).toarray()
    model = fit_topics(
        vectors.astype(np.float32),
        texts,
        config=ClusterConfig(layout=False),
        reducer=PassThrough(),
        clusterer=kmeans_clusterer(6),
    )
    return model, texts


def test_names_come_from_the_endpoint_and_are_cached(
    server: ChatServer, topics_and_texts: tuple[TopicModel, list[str]]
) -> None:
    model, texts = topics_and_texts
    cache: dict[str, str] = {}
    namer = LLMNamer(openai_client(server.url), "local-model", cache=cache, n_neighbours=2)
    names = namer.name_topics(model, texts)

    assert sorted(names) == list(range(model.n_clusters))
    for c, name in names.items():
        assert name == f"Asking about {model.keywords[c][0]}"
    assert len(server.requests) == model.n_clusters == len(cache)
    prompt = server.requests[0]["messages"][-1]["content"]
    assert texts[model.representatives[0][0]] in prompt  # the cluster's own examples
    assert "Neighbouring clusters" in prompt and prompt.count("\n- ") == 2  # the contrast
    assert server.requests[0]["model"] == "local-model"

    again = LLMNamer(openai_client(server.url), "local-model", cache=cache, n_neighbours=2)
    assert again.name_topics(model, texts) == names
    assert len(server.requests) == model.n_clusters  # all answered from the cache

    other_model = LLMNamer(openai_client(server.url), "other-model", cache=cache, n_neighbours=2)
    other_model.name_topics(model, texts)
    assert len(server.requests) == 2 * model.n_clusters  # the cache key includes the model


def test_a_failing_endpoint_leaves_clusters_unnamed_without_raising(
    server: ChatServer,
    topics_and_texts: tuple[TopicModel, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, texts = topics_and_texts
    server.fail = True
    cache: dict[str, str] = {}
    namer = LLMNamer(openai_client(server.url, max_retries=0), "local-model", cache=cache)
    with caplog.at_level(logging.WARNING):
        assert namer.name_topics(model, texts) == {}
    assert cache == {}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith(f"LLM names failed for 6 of {model.n_clusters}")


def test_an_unreachable_endpoint_is_one_warning(
    topics_and_texts: tuple[TopicModel, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    model, texts = topics_and_texts
    namer = LLMNamer(openai_client("http://127.0.0.1:1/v1", max_retries=0), "m", cache={})
    with caplog.at_level(logging.WARNING):
        assert namer.name_topics(model, texts) == {}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "failed for 6 of 6 topics" in said[0]


def test_replies_that_are_not_completions_leave_those_clusters_unnamed(
    topics_and_texts: tuple[TopicModel, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 whose body is not a chat completion (a proxy's HTML page, `{}`, no choices)
    raised TypeError or IndexError after the whole clustering, which was lost."""
    model, texts = topics_and_texts
    faults = [
        Fault(body="<html><body>Sign in to continue</body></html>", times=1),
        Fault(body={}, times=1),
        Fault(body={"id": "x", "object": "chat.completion", "choices": []}, times=1),
        Fault(body=_completion(""), times=1),  # an empty answer: nothing was said of it
        Fault(body=_completion(None), times=1),
    ]
    cache: dict[str, str] = {}
    with OpenAIServer(faults=faults) as server, caplog.at_level(logging.WARNING):
        namer = LLMNamer(openai_client(server.base_url, max_retries=0), "m", cache=cache)
        names = namer.name_topics(model, texts)
    assert len(names) == len(cache) == model.n_clusters - 5  # the others are named
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith(f"LLM names failed for 5 of {model.n_clusters}")
    assert "not a chat completion" in said[0]


def _completion(content: str | None) -> dict[str, object]:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def test_clean_name_strips_decoration_and_bounds_length() -> None:
    assert clean_name('\n  Name: "Credit score checks".\nbecause...') == "Credit score checks"
    assert clean_name("**Hotel booking**") == "Hotel booking"
    assert len(clean_name("word " * 40)) <= 60
    assert clean_name("") == ""
