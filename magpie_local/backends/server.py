"""OpenAI-compatible server backend: vLLM, SGLang, llama.cpp's llama-server, LM Studio, Ollama,
llama-cpp-python's server.

Magpie needs raw completions: the pre-query template goes to `/v1/completions` as the prompt
(a chat endpoint would wrap it in a template of its own). Prompts are tokenized here with the
tokenizer the user names (servers do not all expose theirs) and sent as token ids, or as text
to servers that take no token ids; either way the server's prompt token count is checked.

Many requests are in flight at once: `parallel` per endpoint, spread over every endpoint, on
one asyncio event loop driven from the caller's thread. A request that fails in a way worth
retrying (connection refused or reset, timeout, HTTP 429/5xx) goes back to the queue for any
endpoint; the endpoint that failed waits (backoff doubling from 0.5 s) and gets one request at
a time until it answers again, and after MAX_TRIES failures in a row it is left out. When no
endpoint is left the backend raises, and the run stops with every finished batch committed.

`embed` reads /v1/embeddings (llama-server needs --embedding, llama-cpp-python's server
--embedding true).

IFD scoring needs the log-probabilities of prompt tokens: `echo` + `logprobs`, which vLLM,
SGLang and llama-cpp-python's server return and llama-server and Ollama do not.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from .base import (
    ALL_CONTROLS,
    BackendBase,
    BackendError,
    Capabilities,
    Completion,
    Jobs,
    NextJobFn,
    ProgressFn,
    Request,
    Sampling,
    first_loop,
)
from .options import ServerOptions

DEFAULT_PARALLEL = 8  # requests in flight per endpoint
MAX_TRIES = 5  # failures in a row before an endpoint is left out (~15 s of backoff)
BACKOFF = 0.5  # seconds before the first retry; doubles each time, at most MAX_BACKOFF
MAX_BACKOFF = 30.0
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
PROBE_TEXT = "The capital of France is"
NO_ECHO = ("returns no prompt log-probabilities (echo + logprobs); IFD scoring over a server needs one that "
           "does, such as vLLM, SGLang or llama-cpp-python's server (llama-server and Ollama do not)")
ECHO_SHIFT = ("returns echo log-probabilities shifted by one token for prompts that do not start with the BOS token "
              "(llama-cpp-python's server does this); score with a prompt format whose prompts start with BOS, "
              "or through vLLM or SGLang")


class _Retry(Exception):
    """A request failed in a way worth retrying elsewhere or later."""


def _api_base(url: str) -> str:
    """The /v1 base of an endpoint given as http://host:port, .../v1 or .../v1/completions."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise BackendError(f"--endpoint {url!r} is not an http:// or https:// URL")
    url = re.sub(r"/completions$", "", url)
    return url if url.endswith("/v1") else url + "/v1"


def public_url(url: str) -> str:
    """The URL without user:password@ or a query: what is recorded with a run."""
    url = re.sub(r"^(https?://)[^/@]*@", r"\1", url)
    return url.split("?")[0]


def _message(response) -> str:
    """The server's error message, short and printable."""
    try:
        data = response.json()
        error = data.get("error") or data.get("detail") or data.get("message") or data
        text = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        text = response.text
    text = " ".join(str(text).split())
    return "".join(c for c in text if c.isprintable())[:300]


def _usage(data: dict, name: str) -> int | None:
    """A token count from a reply's `usage`, or None where the server gives none (or nonsense)."""
    usage = data.get("usage")
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _echo_logprobs(data: dict) -> list | None:
    """The `token_logprobs` list of a completion reply, if it has one."""
    logprobs = data["choices"][0].get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    return values if isinstance(values, list) else None


def _prompt_entries(data: dict, logprobs: list) -> int:
    """How many of a reply's echoed log-probabilities belong to the prompt (the rest: the completion)."""
    return len(logprobs) - (_usage(data, "completion_tokens") or 0)


@dataclass
class Endpoint:
    url: str  # the /v1 base
    failures: int = 0  # in a row
    retry_at: float = 0.0  # monotonic time before which it gets no request
    left_out: str | None = None  # why it gets no more requests
    in_flight: int = 0
    answered: int = 0  # requests it completed
    text_prompts: bool = False  # it takes no token-id prompts: send text
    echo_shift: bool = False  # its echo log-probabilities are off by one without a leading BOS
    facts: dict = field(default_factory=dict)


def served_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    """The model names an endpoint lists at /v1/models."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = _api_base(url)
    try:
        r = httpx.get(base + "/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise BackendError(f"{public_url(base)} does not answer ({type(e).__name__}: {e})") from None
    if r.status_code >= 400:
        raise BackendError(f"{public_url(base)}/models: HTTP {r.status_code}: {_message(r)}")
    try:
        return [str(m["id"]) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BackendError(f"{public_url(base)}/models does not list models the OpenAI way") from None


def sampling_payload(s: Sampling) -> dict:
    """The sampling fields of a /v1/completions request, under each server family's names: vLLM and
    SGLang read repetition_penalty, llama-server and llama-cpp-python repeat_penalty and
    repeat_last_n, llama-server dry_*; each server ignores the names it does not know. Penalties
    are sent neutral when off, where a server's own default is not (llama-cpp-python: 1.1)."""
    payload = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
               "min_p": s.min_p, "repeat_penalty": s.repeat_penalty, "repetition_penalty": s.repeat_penalty,
               "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty}
    if s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
        payload["repeat_last_n"] = s.repeat_last_n
    if s.dry_multiplier > 0:
        payload.update(dry_multiplier=s.dry_multiplier, dry_base=s.dry_base, dry_allowed_length=s.dry_allowed_length,
                       dry_penalty_last_n=s.dry_last_n, dry_sequence_breakers=list(s.dry_breakers))
    return payload


class ServerBackend(BackendBase):
    name, title = "server", "server"
    # A ban on the first token alone has no OpenAI-API form (logit_bias holds for every token);
    # stop_loops is applied to the returned text (the server still spends the tokens).
    capabilities = Capabilities(sampling_controls=ALL_CONTROLS - {"ban_first"}, scoring=True, embeddings=True,
                                pooling="server", local=False, concurrent_requests=True)

    @classmethod
    def open(cls, model, sha256, *, ctx, parallel, threads=None, announce=None, server=None) -> ServerBackend:
        """`model`: the served model's tokenizer and chat template (a GGUF file or a tokenizer directory)."""
        from ..vocab import GGUFVocabFile, HFVocab

        server = cls.prepare(server or ServerOptions())
        vocab = (GGUFVocabFile(model.path) if model.kind == "gguf"
                 else HFVocab(model.path / "tokenizer.json", model.bos_token))
        try:
            return cls(server.endpoints, vocab, served_model=server.served_model, api_key=server.api_key(),
                       parallel=parallel, announce=announce)
        except BaseException:
            vocab.close()
            raise

    @classmethod
    def prepare(cls, server: ServerOptions) -> ServerOptions:
        """With the served model named: the one given, or the first that the first endpoint to
        answer lists."""
        if server.served_model or not server.endpoints:
            return server
        for endpoint in server.endpoints:
            try:
                listed = served_models(endpoint, server.api_key())
            except BackendError as e:
                error = e
                continue
            if not listed:
                raise BackendError(f"{endpoint} lists no models; name one with --served-model")
            return replace(server, served_model=listed[0])
        raise error

    @classmethod
    def request_record(cls, sampling: Sampling) -> dict:
        return sampling_payload(sampling)

    def __init__(self, endpoints: Sequence[str], vocab, *, served_model: str, api_key: str | None = None,
                 parallel: int | None = None, timeout: float = 600.0, announce: Callable[[str], None] | None = None,
                 transport=None):
        """`transport`: an httpx transport in place of the network (the unit tests' fake servers)."""
        import httpx

        if not endpoints:
            raise BackendError("--backend server needs at least one --endpoint URL")
        if parallel is not None and parallel < 1:
            raise BackendError("--parallel must be at least 1")
        self.vocab, self.served_model, self.parallel = vocab, served_model, parallel or DEFAULT_PARALLEL
        self._announce = announce or (lambda message: None)
        self._endpoints = [Endpoint(url) for url in dict.fromkeys(_api_base(u) for u in endpoints)]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._embeds: set[str] = set()  # endpoints that have answered /v1/embeddings
        import asyncio  # here, not at import: the registry reads this class's facts without a network stack

        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                         transport=transport)
        try:
            probes = iter([(ep.url, self._probe) for ep in self._endpoints])
            list(self._calls(lambda: next(probes, None), pinned=True))
            for ep in self._endpoints:
                ep.answered = 0  # count work only
        except BaseException:
            self.close()
            raise

    # -- prompts: tokenized here, with the local tokenizer ------------------------------

    def _prompt(self, ep: Endpoint, text: str | None = None, tokens: list[int] | None = None):
        """The prompt field for an endpoint, and the number of tokens it stands for."""
        tokens = self.tokenize(text) if tokens is None else tokens
        if not ep.text_prompts:
            return tokens, len(tokens)
        text = self.vocab.detokenize(tokens, special=True) if text is None else text
        if self.vocab.add_bos and self.vocab.bos_text and text.startswith(self.vocab.bos_text):
            text = text[len(self.vocab.bos_text):]  # the server adds BOS itself, as our tokenizer did
        return text, len(tokens)

    # -- HTTP ---------------------------------------------------------------------------

    async def _send(self, ep: Endpoint, path: str, payload: dict, *, probing: bool = False):
        """POST to `path` under the endpoint: the response, or for a probe (status, message) on failure."""
        import httpx

        try:
            r = await self._client.post(ep.url + path, json={"model": self.served_model, **payload})
        except httpx.TimeoutException:
            raise _Retry("timed out") from None
        except httpx.TransportError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        if r.status_code >= 400 and probing and r.status_code not in RETRY_STATUS - {500}:
            return r.status_code, _message(r)  # 500: llama-cpp-python's answer to token ids
        if r.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {r.status_code}: {_message(r)}")
        if r.status_code >= 400:
            raise BackendError(f"{public_url(ep.url)}{path}: HTTP {r.status_code}: {_message(r)}")
        return r

    async def _post(self, ep: Endpoint, payload: dict, *, probing: bool = False):
        """POST to /completions: the parsed reply, or for a probe also (status, message) on failure."""
        r = await self._send(ep, "/completions", payload, probing=probing)
        if isinstance(r, tuple):
            return r
        try:
            data = r.json()
            choice = data["choices"][0]
            if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{public_url(ep.url)}/completions did not answer with an OpenAI completion") from None
        return data

    async def _get_json(self, url: str) -> dict:
        try:
            r = await self._client.get(url, timeout=10.0)
            data = r.json() if r.status_code == 200 else {}
        except Exception:  # a facts lookup: any failure means "not exposed"
            return {}
        return data if isinstance(data, dict) else {}

    async def _probe(self, ep: Endpoint) -> None:
        """Check an endpoint: it serves the model, takes token-id or text prompts, and how its
        echo log-probabilities line up. Records the server facts kept with a run."""
        root = ep.url[: -len("/v1")]
        listed = [str(m.get("id")) for m in (await self._get_json(ep.url + "/models")).get("data", [])
                  if isinstance(m, dict)]
        if listed and self.served_model not in listed:
            raise BackendError(f"{public_url(ep.url)} does not serve {self.served_model!r}; it serves: "
                               + ", ".join(listed[:10]))
        version = (await self._get_json(root + "/version")).get("version") or \
            (await self._get_json(root + "/props")).get("build_info")
        ep.facts = {"url": public_url(ep.url), "served_model": self.served_model}
        if version:
            ep.facts["version"] = str(version)[:100]
        payload = {"max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        tokens = self.tokenize(PROBE_TEXT)
        reply = await self._post(ep, {"prompt": tokens, **payload}, probing=True)
        if isinstance(reply, tuple):  # no token-id prompts here (llama-cpp-python's server): text
            ep.text_prompts = True
            prompt, _ = self._prompt(ep, PROBE_TEXT)
            reply = await self._post(ep, {"prompt": prompt, **payload}, probing=True)
            if isinstance(reply, tuple):
                raise BackendError(f"{public_url(ep.url)}/completions: HTTP {reply[0]}: {reply[1]}")
        ep.facts["prompts"] = "text" if ep.text_prompts else "token ids"
        logprobs = _echo_logprobs(reply)
        if logprobs is not None and len(logprobs) > 1:
            ep.echo_shift = tokens[0] != self.vocab.bos_id and not self._lines_up(_prompt_entries(reply, logprobs),
                                                                                   tokens)
            ep.facts["prompt_logprobs"] = "echo, off by one without BOS" if ep.echo_shift else "echo"
        else:
            ep.facts["prompt_logprobs"] = None

    # -- the scheduler ------------------------------------------------------------------

    def _live(self) -> list[Endpoint]:
        return [ep for ep in self._endpoints if ep.left_out is None]

    def _free_endpoint(self, now: float, pinned: str | None = None) -> Endpoint | None:
        """The least busy endpoint that may take a request now (one at a time while it is failing)."""
        ready = [ep for ep in self._live() if ep.retry_at <= now and (pinned is None or ep.url == pinned)
                 and ep.in_flight < (1 if ep.failures else self.parallel)]
        return min(ready, key=lambda ep: ep.in_flight, default=None)

    def _failed(self, ep: Endpoint, reason: str, now: float) -> None:
        if now < ep.retry_at:
            return  # a request sent before the last failure: already counted
        ep.failures += 1
        ep.retry_at = now + min(MAX_BACKOFF, BACKOFF * 2 ** (ep.failures - 1))
        if ep.failures < MAX_TRIES:
            return
        ep.left_out = reason
        if not self._live():
            raise BackendError(f"no endpoint is answering; {public_url(ep.url)} failed {MAX_TRIES} times in a row: "
                               f"{reason}")
        self._announce(f"Leaving out {public_url(ep.url)} after {MAX_TRIES} failures in a row ({reason}); "
                       "its requests go to the other endpoints.")

    def _calls(self, pull: Callable[[], tuple[Any, Callable] | None], pinned: bool = False
               ) -> Iterator[tuple[Any, Any]]:
        """Run calls over the endpoints, yielding (key, result) as each ends.

        `pull()` gives the next (key, call) or None for none now; it is asked again after every
        result. `call(endpoint)` makes the coroutine. A call that fails with _Retry is queued
        again for any endpoint (with `pinned`, the key is the endpoint's URL and it stays there).
        """
        import asyncio

        queue: deque[tuple[Any, Callable]] = deque()
        running: dict[asyncio.Task, tuple[Any, Callable, Endpoint]] = {}
        try:
            while True:
                capacity = sum(1 if ep.failures else self.parallel for ep in self._live())
                while len(queue) + len(running) < capacity and (item := pull()) is not None:
                    queue.append(item)
                now = time.monotonic()
                for key, call in list(queue):
                    ep = self._free_endpoint(now, key if pinned else None)
                    if ep is None:
                        continue
                    queue.remove((key, call))
                    ep.in_flight += 1
                    running[self._loop.create_task(call(ep))] = (key, call, ep)
                if not running and not queue:
                    return
                waits = [ep.retry_at - now for ep in self._live() if ep.retry_at > now]
                timeout = max(0.0, min(waits)) if queue and waits else None
                if not running:
                    time.sleep(timeout or 0.05)
                    continue
                done, _ = self._loop.run_until_complete(
                    asyncio.wait(set(running), timeout=timeout, return_when=asyncio.FIRST_COMPLETED))
                now = time.monotonic()
                for task in done:
                    key, call, ep = running.pop(task)
                    ep.in_flight -= 1
                    try:
                        result = task.result()
                    except _Retry as e:
                        self._failed(ep, str(e), now)
                        if pinned and ep.left_out:
                            continue
                        queue.appendleft((key, call))
                        continue
                    ep.failures, ep.answered = 0, ep.answered + 1
                    yield key, result
        finally:
            for task in running:
                task.cancel()
            if running:
                self._loop.run_until_complete(asyncio.gather(*running, return_exceptions=True))

    # -- generation ---------------------------------------------------------------------

    async def _complete(self, ep: Endpoint, request: Request) -> Completion:
        if request.grammar is not None:
            raise BackendError("grammar-constrained sampling needs the llama.cpp backend")
        s = request.sampling
        prompt, n_prompt = self._prompt(ep, request.prompt)
        if s.ban_first:
            raise BackendError("a ban on the first token needs a local backend (llama.cpp or MLX)")
        payload = {"prompt": prompt, **sampling_payload(s), "seed": request.seed}
        if request.stop:
            payload["stop"] = list(request.stop)
        started = time.perf_counter()
        data = await self._post(ep, payload)
        served = _usage(data, "prompt_tokens")
        if served is not None and served != n_prompt:
            raise BackendError(f"{public_url(ep.url)} counted {served} prompt tokens where the local tokenizer counts "
                               f"{n_prompt}: --tokenizer is not the served model's, or the server rewrites prompts")
        choice = data["choices"][0]
        text = choice.get("text") or ""
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        stop = choice.get("stop_reason") if isinstance(choice.get("stop_reason"), str) else None
        for candidate in request.stop:  # servers may cap or ignore stop lists: apply them here too
            if (at := text.find(candidate)) >= 0:
                text, reason, stop = text[:at], "stop", candidate
        n_completion = _usage(data, "completion_tokens")
        if s.stop_loops:
            tokens = self.tokenize(text, add_bos=False, special=False)
            if (end := first_loop(tokens)) is not None:  # where a local backend would have stopped
                text, reason, stop, n_completion = self.detokenize(tokens[:end]), "loop", None, end
        return Completion(text=text, finish_reason=reason, prompt_tokens=n_prompt,
                          completion_tokens=self.count_tokens(text) if n_completion is None else n_completion,
                          seconds=time.perf_counter() - started, stop_sequence=stop)

    def stream(self, next_job: NextJobFn, progress: ProgressFn | None = None) -> Iterator[tuple[Any, Any]]:
        jobs = Jobs()
        ready: deque[tuple[Any, Request]] = deque()  # requests to send

        def advance(key: Any, request: Request | None) -> None:
            if request is not None:
                ready.append((key, request))

        def pull():
            while not ready and (pulled := next_job()) is not None:
                advance(pulled[0], jobs.start(*pulled))
            if not ready:
                return None
            key, request = ready.popleft()
            return key, partial(self._complete, request=request)

        for key, completion in self._calls(pull):
            if progress and completion.completion_tokens:
                progress(completion.completion_tokens)
            advance(key, jobs.send(key, completion))
            yield from jobs.drain()
        yield from jobs.drain()

    # -- scoring ------------------------------------------------------------------------

    def _lines_up(self, entries: int, tokens: list[int]) -> bool:
        """Whether `entries` echoed log-probabilities can be one per token of `tokens`: all of
        them, or all but the BOS tokens (llama-cpp-python leaves those out)."""
        return entries in (len(tokens), len(tokens) - tokens.count(self.vocab.bos_id))

    def check_scoring(self, contexts: Sequence[list[int]], endpoints: Sequence[Endpoint] | None = None) -> None:
        for ep in self._live() if endpoints is None else endpoints:
            if ep.facts.get("prompt_logprobs") is None:
                raise BackendError(f"{public_url(ep.url)} {NO_ECHO}")
            if ep.echo_shift and any(tokens[:1] != [self.vocab.bos_id] for tokens in contexts):
                raise BackendError(f"{public_url(ep.url)} {ECHO_SHIFT}")

    async def _logprobs(self, ep: Endpoint, tokens: list[int], start: int) -> np.ndarray | str:
        """log p(tokens[i] | tokens[:i]) for i >= start, from the server's echoed prompt; or the
        reason this sequence cannot be scored here."""
        self.check_scoring([tokens], [ep])
        prompt, n_prompt = self._prompt(ep, tokens=tokens)
        data = await self._post(ep, {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": True,
                                     "logprobs": 1})
        logprobs = _echo_logprobs(data)
        if logprobs is None:
            raise BackendError(f"{public_url(ep.url)} {NO_ECHO}")
        served = _usage(data, "prompt_tokens") or n_prompt
        if served != n_prompt:
            return f"the server tokenized it differently from the local tokenizer ({served} tokens, not {n_prompt})"
        # One entry per prompt token (the first is null), llama-cpp-python leaving out BOS tokens.
        entries = _prompt_entries(data, logprobs)
        if not self._lines_up(entries, tokens):
            raise BackendError(f"{public_url(ep.url)} returned {entries} prompt log-probabilities for a "
                               f"{n_prompt}-token prompt; they cannot be lined up with its tokens")
        answer = logprobs[entries - (len(tokens) - start): entries]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in answer):
            return "the server returned no finite log-probability for some answer token"
        return np.asarray(answer, dtype=np.float64)

    def token_logprobs(self, items: Sequence[tuple[list[int], int]]) -> list[np.ndarray | str]:
        """As LlamaCppBackend.token_logprobs, every sequence a request of its own, many in flight.
        A sequence the server tokenizes differently gets the reason instead of its values."""
        for tokens, start in items:
            if not 1 <= start < len(tokens):
                raise BackendError(f"cannot score tokens[{start}:] of a {len(tokens)}-token sequence")
        pending = iter(enumerate(items))
        results: list[Any] = [None] * len(items)

        def pull():
            if (nxt := next(pending, None)) is None:
                return None
            index, (tokens, start) = nxt
            return index, partial(self._logprobs, tokens=list(tokens), start=start)

        for index, result in self._calls(pull):
            results[index] = result
        return results

    # -- embeddings ---------------------------------------------------------------------

    async def _embedding(self, ep: Endpoint, text: str) -> np.ndarray:
        # Until an endpoint has answered one, a refusal (500 included) is its last word: no retries.
        r = await self._send(ep, "/embeddings", {"input": text}, probing=ep.url not in self._embeds)
        if isinstance(r, tuple):
            raise BackendError(f"{public_url(ep.url)}/embeddings: HTTP {r[0]}: {r[1]} (does it serve embeddings? "
                               "llama-server needs --embedding, llama-cpp-python's server --embedding true)")
        self._embeds.add(ep.url)
        try:
            (row,) = [np.asarray(d["embedding"], dtype=np.float64) for d in r.json()["data"]]
            if row.ndim not in (1, 2) or row.size == 0:
                raise ValueError
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{public_url(ep.url)}/embeddings did not answer with one embedding") from None
        # A server without pooling (llama-cpp-python's on a chat model) returns a vector per token: their mean.
        row = row.mean(axis=0) if row.ndim == 2 else row
        if not np.isfinite(row).all():
            raise BackendError(f"{public_url(ep.url)}/embeddings returned non-finite values")
        return row

    def embed(self, texts: Sequence[str], max_tokens: int = 256) -> np.ndarray:
        """L2-normalised embeddings from the servers' /v1/embeddings (whatever pooling the server
        applies; the mean over tokens where it returns a vector per token), a text a request, many
        in flight: llama-cpp-python's server misplaces all but the first of several texts in one
        request when it returns vectors per token. A text is cut to its first `max_tokens` tokens here."""
        cut = []
        for text in texts:
            tokens = self.tokenize(text, add_bos=False, special=False)
            cut.append(self.vocab.detokenize(tokens[:max_tokens]) if len(tokens) > max_tokens else text)
        pending = iter(enumerate(cut))
        rows: list[Any] = [None] * len(cut)

        def pull():
            if (nxt := next(pending, None)) is None:
                return None
            index, text = nxt
            return index, partial(self._embedding, text=text or " ")

        for index, row in self._calls(pull):
            rows[index] = row
        if len({row.shape for row in rows}) > 1:
            raise BackendError("the endpoints returned embeddings of different sizes")
        out = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    # -- facts and cleanup --------------------------------------------------------------

    def describe(self) -> dict:
        return {"backend": self.name, "served_model": self.served_model, "parallel": self.parallel,
                "endpoints": [ep.facts for ep in self._endpoints if ep.left_out is None]}

    def spread(self) -> dict[str, int]:
        """Requests each endpoint answered."""
        return {public_url(ep.url): ep.answered for ep in self._endpoints}

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
        if self.vocab is not None:
            self.vocab.close()
            self.vocab = None

