"""The server backend's scheduling, retries and checks, against fake servers (httpx MockTransport).

The same backend is tested against real servers in test_server.py; these cover what a real
server cannot be made to do on cue: fail some requests, answer with errors, stay down.
"""

import asyncio
import json

import httpx
import numpy as np
import pytest

from magpie_local.backends import server as server_module
from magpie_local.backends.base import BackendError, Request, Sampling
from magpie_local.backends.server import ServerBackend, _api_base, public_url


class Vocab:
    """Characters as tokens; BOS is token 0, written "^"."""

    bos_id, bos_text, add_bos = 0, "^", False

    def tokenize(self, text, *, add_bos=None, special=True):
        return [0 if c == "^" else ord(c) for c in text]

    def detokenize(self, tokens, special=False):
        return "".join("^" if t == 0 else chr(t) for t in tokens)

    def close(self):
        pass


def completion(text, prompt_tokens, logprobs=None, finish="stop"):
    choice = {"text": text, "finish_reason": finish, "index": 0}
    if logprobs is not None:
        choice["logprobs"] = {"token_logprobs": logprobs}
    return {"choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text)}}


class FakeServer:
    """An OpenAI-compatible endpoint: completes with the prompt reversed; echo gives each prompt
    token the log-probability -token/1000 (first None). `fail` makes its next requests fail."""

    def __init__(self, fail=None, down=False, echo=True):
        self.fail, self.down, self.echo = fail or [], down, echo
        self.prompts, self.headers = [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if not request.url.path.endswith("/completions"):
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        self.headers.append(dict(request.headers))
        if self.fail:
            status = self.fail.pop(0)
            if status == "reset":
                raise httpx.ReadError("connection reset", request=request)
            return httpx.Response(status, json={"error": {"message": f"failure {status}"}})
        prompt = body["prompt"]
        self.prompts.append(prompt)
        if body.get("echo"):
            lp = [None] + [-t / 1000 for t in prompt[1:]] + [-0.1] if self.echo else None
            return httpx.Response(200, json=completion("x", len(prompt), lp))
        text = "".join(chr(t) for t in reversed(prompt))[: body["max_tokens"]]
        return httpx.Response(200, json=completion(text, len(prompt)))


class Router:
    """Dispatches by host to a FakeServer each, answering after `delay` seconds."""

    def __init__(self, delay=0.0, **servers):
        self.servers, self.delay = servers, delay

    async def __call__(self, request):
        await asyncio.sleep(self.delay)
        return self.servers[request.url.host](request)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(server_module, "BACKOFF", 0.01)


def backend(router, hosts, **kw):
    return ServerBackend([f"http://{h}:8000" for h in hosts], Vocab(), served_model="m",
                         transport=httpx.MockTransport(router), **kw)


def requests(n):
    return [Request(f"q{i}", Sampling(temperature=0.0, max_tokens=8), seed=i) for i in range(n)]


def test_endpoint_urls():
    assert _api_base("http://h:8000") == "http://h:8000/v1"
    assert _api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert _api_base("https://h/v1/completions") == "https://h/v1"
    assert public_url("https://user:secret@h/v1?key=1") == "https://h/v1"
    with pytest.raises(BackendError, match="not an http"):
        _api_base("h:8000")


def test_completions_in_order_spread_over_endpoints():
    a, b = FakeServer(), FakeServer()
    with backend(Router(a=a, b=b), ["a", "b"], parallel=2) as be:
        out = be.complete(requests(12))
        assert [c.text for c in out] == [f"q{i}"[::-1] for i in range(12)]
        assert len(a.prompts) > 1 and len(b.prompts) > 1  # probe + work on both
        assert sum(be.spread().values()) == 12


def test_failing_requests_are_retried_and_a_dead_endpoint_left_out():
    flaky, dead = FakeServer(), FakeServer()
    notes = []
    with backend(Router(delay=0.02, a=flaky, b=dead), ["a", "b"], parallel=2, announce=notes.append) as be:
        flaky.fail, dead.down = [503, "reset"], True
        out = be.complete(requests(40))
        assert be.spread() == {"http://a:8000/v1": 40, "http://b:8000/v1": 0}
    assert [c.text for c in out] == [f"q{i}"[::-1] for i in range(40)]
    assert len(flaky.prompts) == 1 + 40  # the probe, then every request exactly once
    assert any("Leaving out http://b:8000/v1" in n for n in notes)


def test_no_endpoint_left_stops_with_the_reason():
    down = FakeServer()
    with backend(Router(a=down), ["a"]) as be:
        down.down = True
        with pytest.raises(BackendError, match="no endpoint is answering.*connection refused"):
            be.complete(requests(3))


def test_client_errors_are_not_retried():
    server = FakeServer()
    with backend(Router(a=server), ["a"]) as be:
        server.fail = [400]
        with pytest.raises(BackendError, match="HTTP 400: failure 400"):
            be.complete(requests(1))


def test_api_key_sent_and_never_described(monkeypatch):
    server = FakeServer()
    with backend(Router(a=server), ["a"], api_key="sekret") as be:
        be.complete(requests(1))
        assert server.headers[-1]["authorization"] == "Bearer sekret"
        assert "sekret" not in json.dumps(be.describe())


def test_unknown_served_model_refused():
    with pytest.raises(BackendError, match="does not serve 'other'; it serves: m"):
        ServerBackend(["http://a:1"], Vocab(), served_model="other", transport=httpx.MockTransport(FakeServer()))


def test_prompt_logprobs_from_echo():
    with backend(Router(a=FakeServer()), ["a"]) as be:
        tokens = [0, 100, 200, 300, 400]
        out = be.token_logprobs([(tokens, 2), (tokens[1:], 1)])
    np.testing.assert_allclose(out[0], [-0.2, -0.3, -0.4])
    np.testing.assert_allclose(out[1], [-0.2, -0.3, -0.4])


def test_scoring_needs_echo_logprobs():
    with backend(Router(a=FakeServer(echo=False)), ["a"]) as be:
        with pytest.raises(BackendError, match="no prompt log-probabilities.*llama-server and Ollama do not"):
            be.token_logprobs([([0, 1, 2], 1)])


class Garbage(FakeServer):
    """Answers completions with what an untrusted server might send."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def __call__(self, request):
        if request.url.path.endswith("/completions") and not json.loads(request.content).get("echo"):
            return httpx.Response(200, content=self.body)
        return super().__call__(request)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"choices": []}', b'{"choices": [{"text": 5}]}',
                                  b'{"choices": ["x"]}'])
def test_malformed_replies_are_errors_not_crashes(body):
    with backend(Router(a=Garbage(body)), ["a"]) as be:
        with pytest.raises(BackendError, match="did not answer with an OpenAI completion"):
            be.complete(requests(1))


def test_nonsense_usage_is_ignored():
    reply = {"choices": [{"text": "fine", "finish_reason": "stop"}], "usage": {"completion_tokens": "many"}}
    with backend(Router(a=Garbage(json.dumps(reply).encode())), ["a"]) as be:
        [done] = be.complete(requests(1))
    assert (done.text, done.completion_tokens, done.finish_reason) == ("fine", 4, "stop")


def test_a_different_prompt_token_count_is_refused():
    reply = {"choices": [{"text": "fine", "finish_reason": "stop"}], "usage": {"prompt_tokens": 99}}
    with backend(Router(a=Garbage(json.dumps(reply).encode())), ["a"]) as be:
        with pytest.raises(BackendError, match="counted 99 prompt tokens where the local tokenizer counts 2"):
            be.complete(requests(1))
