"""MLX backend on mlx-lm: its BatchGenerator decodes many prompts together (continuous
batching), and scoring runs right-padded batches through one forward pass each.

It offers what the llama.cpp backend offers to the shared code above it: `stream` for jobs,
`tokenize`, `token_logprobs`, `describe`. Each request gets its own sampler with its own
random key, so an item's sampling depends on its seed, not on the global random state. Unlike
the llama.cpp backend, batched MLX decoding is not arranged to be batch-invariant: a resumed
run is complete and duplicate-free, but nothing guarantees that an item comes out as an
uninterrupted run would have made it (on mlx's CPU device 22 items were the same bytes at
--parallel 1, 4 and 8; Metal's kernels were not measured).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..vocab import HFVocab
from .base import (
    BackendBase,
    BackendError,
    Capabilities,
    Completion,
    Jobs,
    NextJobFn,
    ProgressFn,
    Request,
    Sampling,
    loops,
)

DEFAULT_CTX = 1024
AUTO_COPY_MAX_BYTES = 2 << 30  # auto takes MLX for a file it must dequantize only while the copy stays under this
DEFAULT_PARALLEL = 16  # sequences decoded together
SCORE_LOGITS_BYTES = 512 * 2**20  # float32 logits of one scoring forward pass stay under this
EMBED_BATCH = 16  # texts per embedding forward pass


def _import_mlx():
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BackendError(f"MLX is not installed ({e}); run `make install` (or pip install 'magpie-local[mlx]')") \
            from None
    return mx


def make_sampler(s: Sampling, seed: int):
    """A sampler with its own random key: top-k, top-p, min-p, then temperature (llama.cpp's order)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    mx = _import_mlx()
    if s.temperature <= 0:
        return greedy_sampler
    key = mx.random.key(seed & 0x7FFFFFFF)

    def sample(logprobs):
        nonlocal key
        key, sub = mx.random.split(key)
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        if s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0.0:
            logprobs = apply_min_p(logprobs, s.min_p)
        return mx.random.categorical(logprobs * (1.0 / s.temperature), key=sub)

    return sample


def make_logits_processor(s: Sampling, ban_ids: Sequence[int], ctx: int):
    """One request's penalties and first-token ban as an mlx-lm logits processor, with llama.cpp's
    semantics: penalties count only the tokens this request generated (in its last repeat_last_n),
    a repeat penalty divides a positive logit (multiplies a negative one) once per distinct token,
    frequency and presence subtract count * frequency + presence. None when nothing is on.

    mlx-lm calls it once per generated token, in order, so the calls count the tokens generated;
    its token context may also hold prompt tokens, which are left out."""
    penalised = s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty
    if not penalised and not ban_ids:
        return None
    mx = _import_mlx()
    window = ctx if s.repeat_last_n < 0 else s.repeat_last_n
    calls = 0

    def process(tokens, logits):
        nonlocal calls
        generated, calls = calls, calls + 1
        if generated == 0:
            if ban_ids:
                logits[:, list(ban_ids)] = -mx.inf
            return logits
        if not penalised or window == 0:
            return logits
        recent = np.asarray(tokens[-min(generated, window):]).reshape(-1)
        ids, counts = np.unique(recent, return_counts=True)
        ids_list = ids.tolist()
        picked = logits[:, ids_list]
        if s.repeat_penalty != 1.0:
            picked = mx.where(picked < 0, picked * s.repeat_penalty, picked / s.repeat_penalty)
        if s.frequency_penalty or s.presence_penalty:
            picked = picked - mx.array(counts * s.frequency_penalty + s.presence_penalty, dtype=picked.dtype)
        logits[:, ids_list] = picked
        return logits

    return process


@dataclass
class _Sequence:
    key: Any
    request: Request
    prompt_tokens: int
    max_new: int
    started: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def mlx_model_dir(model, sha256: str, announce=None) -> Path:
    """An mlx-lm directory for `model`: itself, or for a GGUF file a converted copy kept in the
    cache (made once, named by the file's hash)."""
    if model.kind == "mlx":
        return model.path
    from ..gguf_to_mlx import convert_to_mlx
    from . import cache_dir

    target = cache_dir() / "mlx" / f"{model.name}-{sha256[:12]}"
    if not (target / "config.json").is_file():
        if announce:
            announce(f"Converting {model.name} for MLX into {target} (once) ...")
        convert_to_mlx(model.path, target)
    return target


class MLXBackend(BackendBase):
    name, title = "mlx", "MLX"
    # DRY has no mlx-lm implementation; it is refused (by capability) before a run is made.
    capabilities = Capabilities(sampling_controls=frozenset({"repeat_penalty", "frequency_penalty",
                                                             "presence_penalty", "ban_first", "stop_loops"}),
                                scoring=True, embeddings=True)

    @classmethod
    def refuses(cls, model) -> str | None:
        if not mlx_installed():
            return "the MLX backend needs mlx and mlx-lm: run `make install` (or pip install 'magpie-local[mlx]')"
        if model.kind == "gguf":
            from ..gguf_to_mlx import refusal

            if (why := refusal(model.gguf)) is not None:
                return f"MLX does not run {model.name} as llama.cpp does: {why}"
        return None

    @classmethod
    def avoids(cls, model) -> str | None:
        from ..gguf_to_mlx import copy_bytes

        if model.kind == "gguf" and (size := copy_bytes(model.gguf)) > max(2 * model.size, AUTO_COPY_MAX_BYTES):
            return (f"its MLX copy would be {size / 2**30:.1f} GiB (MLX has no kernels for this file's "
                    "quantization: it would run 16-bit weights), and llama.cpp runs the file as it is")
        return None

    @classmethod
    def open(cls, model, sha256, *, ctx, parallel, threads=None, announce=None, server=None) -> MLXBackend:
        return cls(mlx_model_dir(model, sha256, announce), ctx=ctx, parallel=parallel)

    def __init__(self, model_dir: str | Path, *, ctx: int = DEFAULT_CTX, parallel: int | None = None):
        if parallel is not None and parallel < 1:
            raise BackendError("--parallel must be at least 1")
        if ctx < 64:
            raise BackendError("--ctx must be at least 64 tokens")
        mx = self._mx = _import_mlx()
        from mlx_lm import load

        self.model_path = Path(model_dir)
        try:
            self.model, self._wrapper = load(str(self.model_path))
        except Exception as e:  # mlx-lm raises many kinds for a bad directory; all mean "cannot load"
            raise BackendError(f"mlx-lm could not load {self.model_path}: {e}") from None
        longest = self.model_config().get("magpie_local", {}).get("max_context")
        if longest and ctx > longest:
            raise BackendError(f"--ctx {ctx} is longer than {longest} tokens, as far as this model runs on MLX as "
                               "llama.cpp runs it (a sliding window or RoPE factors mlx-lm handles otherwise); "
                               "lower --ctx or use --backend llamacpp")
        self.ctx_per_seq = ctx
        self.parallel = parallel or DEFAULT_PARALLEL
        self.vocab = HFVocab(self.model_path / "tokenizer.json", self._wrapper._tokenizer.bos_token)
        self._eos = set(self._wrapper.eos_token_ids)
        self.n_vocab = self.vocab.n_vocab
        mx.eval(self.model.parameters())

    def model_config(self) -> dict:
        import json

        return json.loads((self.model_path / "config.json").read_text(encoding="utf-8"))

    # -- generation ---------------------------------------------------------------------

    def _stop_tokens(self, request: Request) -> list[list[int]]:
        """Token-level stops: end-of-generation tokens, stop strings that are one token, and
        with stop_at_control every control token. Longer stop strings are matched in text."""
        ids = set(self._eos)
        for stop in request.stop:
            token = self.vocab.token_to_id(stop)
            if token is not None:
                ids.add(token)
        if request.stop_at_control:
            ids |= set(self.vocab.control_ids())
        return [[i] for i in sorted(ids)]

    def stream(self, next_job: NextJobFn, progress: ProgressFn | None = None) -> Iterator[tuple[Any, Any]]:
        from mlx_lm.generate import BatchGenerator, StopSequences

        gen = BatchGenerator(self.model, completion_batch_size=self.parallel,
                             prefill_batch_size=min(self.parallel, 8))
        jobs = Jobs()
        running: dict[int, _Sequence] = {}  # BatchGenerator uid -> sequence

        def begin(key: Any, request: Request | None) -> None:
            """Start a job's next request (None: the job has ended)."""
            if request is None:
                return
            if request.grammar is not None:
                raise BackendError("grammar-constrained sampling (for tags) needs the llama.cpp backend; "
                                   "use --backend llamacpp")
            tokens, max_new = self.prompt_tokens(request, self.ctx_per_seq)
            s = request.sampling
            if s.dry_multiplier > 0:
                raise BackendError("DRY sampling has no MLX implementation; use --backend llamacpp")
            processor = make_logits_processor(s, self.token_ids(s.ban_first), self.ctx_per_seq)
            [uid] = gen.insert([tokens], max_tokens=[max_new], samplers=[make_sampler(s, request.seed)],
                               logits_processors=[[processor] if processor else []],
                               stop_sequences=[StopSequences(self._stop_tokens(request))])
            running[uid] = _Sequence(key, request, len(tokens), max_new)

        def finish(uid: int, reason: str, stop: str | None, text: str) -> None:
            seq = running.pop(uid)
            done = Completion(text=text, finish_reason=reason, prompt_tokens=seq.prompt_tokens,
                              completion_tokens=len(seq.generated), seconds=time.perf_counter() - seq.started,
                              stop_sequence=stop)
            begin(seq.key, jobs.send(seq.key, done))

        try:
            while True:
                # Hand over finished results before asking for more work: the caller decides
                # what to start next from what has finished.
                yield from jobs.drain()
                while len(running) < self.parallel and (pulled := next_job()) is not None:
                    begin(pulled[0], jobs.start(*pulled))
                if not running:
                    if jobs.finished:  # jobs that ended without a request
                        continue
                    break
                _, responses = gen.next()
                produced = 0
                for r in responses:
                    seq = running.get(r.uid)
                    if seq is None:
                        continue
                    if r.finish_reason == "stop":  # a stop token: not part of the text
                        piece = self.detokenize([r.token])
                        finish(r.uid, "stop", piece if piece in seq.request.stop else None,
                               self.detokenize(seq.generated))
                        continue
                    seq.generated.append(r.token)
                    produced += 1
                    text = self.detokenize(seq.generated)
                    hit = next(((s, text.find(s)) for s in seq.request.stop if s in text), None)
                    if hit is not None:
                        gen.remove([r.uid])
                        finish(r.uid, "stop", hit[0], text[:hit[1]])
                    elif r.finish_reason == "length" or len(seq.generated) >= seq.max_new:
                        if r.finish_reason is None:
                            gen.remove([r.uid])
                        finish(r.uid, "length", None, text)
                    elif seq.request.sampling.stop_loops and loops(seq.generated):
                        gen.remove([r.uid])
                        finish(r.uid, "loop", None, text)
                if progress and produced:
                    progress(produced)
        finally:
            gen.close()

    # -- scoring ------------------------------------------------------------------------

    def token_logprobs(self, items: Sequence[tuple[list[int], int]]) -> list[np.ndarray]:
        """Log-probabilities of tokens[start:] given what precedes them, for each (tokens, start).

        Sequences of similar length share a forward pass, right-padded: with a causal mask a
        position never sees the padding after it, so padding changes no scored logit."""
        mx = self._mx
        for tokens, start in items:
            if not 1 <= start < len(tokens):
                raise BackendError(f"cannot score tokens[{start}:] of a {len(tokens)}-token sequence")
        budget = max(1, SCORE_LOGITS_BYTES // (4 * self.n_vocab))  # tokens per forward pass
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        results: list[np.ndarray | None] = [None] * len(items)
        while order:
            batch = [order.pop(0)]
            while order and (len(batch) + 1) * len(items[order[0]][0]) <= budget:
                batch.append(order.pop(0))
            width = len(items[batch[-1]][0])
            ids = np.zeros((len(batch), width), dtype=np.int32)
            for row, i in enumerate(batch):
                ids[row, :len(items[i][0])] = items[i][0]
            logits = self.model(mx.array(ids)).astype(mx.float32)[:, :-1]
            targets = mx.array(ids[:, 1:, None])
            picked = mx.take_along_axis(logits, targets, axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
            picked = np.array(picked, dtype=np.float64)
            for row, i in enumerate(batch):
                tokens, start = items[i]
                results[i] = picked[row, start - 1:len(tokens) - 1]
        return results

    def choice_logprobs(self, items: Sequence[tuple[list[int], Sequence[int]]]) -> list[np.ndarray]:
        """Log-probabilities of each choice token as the next token after each prompt: one forward
        pass per prompt, the last position's distribution."""
        mx = self._mx
        results = []
        for tokens, choices in items:
            last = self.model(mx.array([list(tokens)]))[0, -1].astype(mx.float32)
            logprobs = last - mx.logsumexp(last)
            results.append(np.array(logprobs[mx.array(list(choices))], dtype=np.float64))
        return results

    # -- embeddings ---------------------------------------------------------------------

    def embed(self, texts: Sequence[str], max_tokens: int = 256) -> np.ndarray:
        """Mean-pooled, L2-normalised final hidden states (after the last norm, as llama.cpp's
        embedding mode pools them) of the first `max_tokens` tokens of each text. Texts of similar
        length share a forward pass, right-padded: causal attention keeps padding out of the
        positions pooled."""
        mx = self._mx
        body = getattr(self.model, "model", None)
        if body is None:
            raise BackendError(f"this mlx-lm model ({type(self.model).__module__}) exposes no hidden states to embed")
        empty = [self.vocab.bos_id if self.vocab.bos_id is not None else min(self._eos)]
        rows = [self.tokenize(t, special=False)[:max_tokens] or empty for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: list[np.ndarray | None] = [None] * len(rows)
        for first in range(0, len(order), EMBED_BATCH):
            batch = order[first:first + EMBED_BATCH]
            width = len(rows[batch[-1]])
            ids = np.zeros((len(batch), width), dtype=np.int32)
            for r, i in enumerate(batch):
                ids[r, :len(rows[i])] = rows[i]
            hidden = np.array(body(mx.array(ids)).astype(mx.float32))
            for r, i in enumerate(batch):
                out[i] = hidden[r, :len(rows[i])].mean(axis=0)
        vectors = np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)
        return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    # -- facts and cleanup --------------------------------------------------------------

    def describe(self) -> dict:
        import importlib.metadata

        return {
            "backend": self.name,
            "mlx": importlib.metadata.version("mlx"),
            "mlx_lm": importlib.metadata.version("mlx-lm"),
            "device": str(self._mx.default_device()),
            "parallel": self.parallel,
            "ctx_per_sequence": self.ctx_per_seq,
        }

    def close(self) -> None:
        self.model = None

