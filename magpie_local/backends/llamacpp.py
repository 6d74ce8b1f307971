"""llama.cpp backend on llama-cpp-python's low-level API.

The high-level `Llama` class decodes one sequence at a time. Here up to `parallel` sequences
run at once, each in its own KV stream: new prompts are prefilled one sequence at a time (short
ones are fed through the steps), then each decode step advances every generating sequence by one
token, and a finished sequence's slot takes the next request at once (continuous batching). The
sequences are split over lanes, a context each, stepping side by side on threads of their own
(see `stream`). Each request has its own sampler chain seeded from the request, and decoding is
arranged so that an item's output never depends on which other items share its batch or lane
(see "Batch invariance").
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cpu import ThreadGovernor, default_threads
from ..gguf import GGUFError, read_gguf
from ..llama_lib import llama_cpp
from ..vocab import GGUFVocab
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
    loops,
)

DEFAULT_CTX = 1024  # tokens per sequence: pre-query + instruction + response fit easily
DEFAULT_BATCH = 512  # tokens per decode call
MAX_AUTO_PARALLEL = 32  # fastest measured for the default model on a 2-core CPU (README, Throughput)
AUTO_KV_SHARE = 0.25  # --parallel auto gives the KV cache at most this share of available memory
SCORE_TOKENS = 2048  # the longest sequence the scorer takes (--max-length is checked against it)
# ggml's CPU flash attention computes one query row at a time below this many rows of a sequence
# per decode (GGML_FA_TILE_Q) and with a tiled kernel, other sums, from it on: prefill chunks stay below.
FA_ROW_KERNEL_MAX_ROWS = 63
# A step decodes each run of consecutive sequence ids on its own (llama.cpp's ubatches); idle
# slots in gaps up to this long get throwaway rows instead, cheaper than one more decode.
STEP_GAP_FILL = 4
# A prompt this short (a Magpie response's template, an instruction's last cached tokens) is fed one
# token a step, as a row of the generation steps, instead of a decode of its own: a decode costs
# about as much with 2 rows as with 16 (the weights are read either way), a row of a step far less.
STEP_PROMPT_MAX = 8
# Generation's lanes: contexts stepping side by side, each on its share of the threads. Two
# contexts of 16 sequences on one thread each step 1.23x faster than one of 32 on two threads, and
# a run is 1.19x faster, on 2 cores (no barrier waits, and one lane's sampling runs while the other
# decodes; docs/throughput.md, Two lanes). More lanes would halve the batch again; not measured.
MAX_LANES = 2
PHASES = ("prompt", "step", "sampling")  # where generation's time goes (LlamaCppBackend.seconds)
# llama.cpp repacks some weight types at load into interleaved layouts (its CPU_REPACK buffers) and
# multiplies them with a gemm kernel in groups of 4 rows and a gemv kernel for the rest. For Q4_K the
# two sum differently, so a row's result depends on its place in the decode; for Q4_0 and IQ4_NL
# they agree (bit for bit, tests/test_weight_types.py). By ggml type id, what ggml-cpu/repack.cpp
# repacks on x86 (Q4_0, Q2_K with AVX-512, Q4_K, IQ4_NL, MXFP4) and, elsewhere, on any CPU (ARM
# adds Q8_0, Q5_K, Q6_K, Q1_0), and which of them were measured invariant (none off x86).
REPACKED_TYPES = {"x86_64": frozenset({2, 10, 12, 20, 39})}
REPACKED_ANYWHERE = frozenset({2, 8, 10, 12, 13, 14, 20, 39, 41})
REPACK_INVARIANT_TYPES = {"x86_64": frozenset({2, 20})}


def repack_is_invariant(model_path: Path) -> bool:
    """Whether llama.cpp may repack this model's weights without making decoding depend on the
    batch: every repackable tensor type it holds was measured invariant on this architecture."""
    try:
        types = read_gguf(model_path, tensors=True).tensor_types
    except GGUFError:
        return False
    machine = platform.machine().lower().replace("amd64", "x86_64")
    variant = REPACKED_TYPES.get(machine, REPACKED_ANYWHERE) - REPACK_INVARIANT_TYPES.get(machine, frozenset())
    return not variant & types.keys()


def log_softmax_at(logits: np.ndarray, targets: np.ndarray, rows: int = 8) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row, without materialising the whole softmax.
    In float32 (numpy sums pairwise: ~1e-7 from float64, at 2.5x the speed), `rows` rows at a
    time so that each pass over them stays in the CPU's cache (twice as fast as whole-array
    passes on 300 rows of 49,152; each row's figures are the same bits either way)."""
    out = np.empty(len(targets), dtype=np.float64)
    shifted = np.empty((rows, logits.shape[1]), dtype=np.float32)
    for i in range(0, len(targets), rows):
        block = logits[i:i + rows]
        n = len(block)
        top = block.max(axis=1, keepdims=True)
        np.exp(np.subtract(block, top, out=shifted[:n]), out=shifted[:n])
        lse = top[:, 0] + np.log(shifted[:n].sum(axis=1), dtype=np.float64)
        out[i:i + n] = block[np.arange(n), targets[i:i + n]] - lse
    return out


TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def only_lowers(s: Sampling) -> bool:
    """Whether _make_sampler's chain for `s` is greedy after penalties that can only lower the
    logits of tokens it has accepted: a repeat penalty of 1 or more (it divides positive logits
    and multiplies negative ones), frequency and presence penalties of 0 or more, DRY."""
    return (s.temperature <= 0 and s.repeat_penalty >= 1.0 and s.frequency_penalty >= 0
            and s.presence_penalty >= 0 and s.dry_multiplier >= 0)


def greedy_candidates(logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The token ids a greedy chain whose penalties only lower the logits of `seen` tokens can
    pick, ascending and once each: the seen tokens, and every other token whose logit ties the
    best of the others. Any other token stays below that best one, so it can neither win nor tie."""
    kept = logits[seen]
    logits[seen] = -np.inf  # restored below
    others = np.flatnonzero(logits >= logits.max())
    logits[seen] = kept
    return np.unique(np.concatenate((seen, others))).astype(np.int32)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, where the OS tells us."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def kv_cache_bytes(lc, model, tokens: int) -> int:
    """Size of an f16 KV cache holding `tokens` tokens (keys and values, every layer)."""
    n_layer = lc.llama_model_n_layer(model)
    n_head, n_head_kv = lc.llama_model_n_head(model), lc.llama_model_n_head_kv(model)
    head_dim = lc.llama_model_n_embd(model) // max(n_head, 1)
    return 2 * n_layer * n_head_kv * head_dim * 2 * tokens


_STOP = object()  # the stream's answer to a lane that must stop


class _Stopped(Exception):
    """A lane was told to stop (the stream ended early, failed or was interrupted)."""


@dataclass(eq=False)
class _Slot:
    seq_id: int  # in its lane's context
    lane: _Lane = field(repr=False)
    index: Any = None  # key of the job this slot works for; None = free
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    n_past: int = 0
    n_prompt: int = 0
    max_new: int = 0
    sampler: object = None
    generated: list[int] = field(default_factory=list)
    text_bytes: bytearray = field(default_factory=bytearray)
    started: float = 0.0
    batch_row: int = -1  # row of this slot's logits in the last decode, -1 if none
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values this sequence holds
    banned_first: list[int] = field(default_factory=list)  # token ids the first sampled token may not be
    few_candidates: bool = False  # greedy under penalties that only lower logits (see _sample)

    @property
    def free(self) -> bool:
        return self.index is None


@dataclass(eq=False)
class _Lane:
    """A context, its batch, and the slots whose sequences it holds: one KV stream each, and one
    more for the padding rows (_put_throwaway)."""
    ctx: Any
    batch: Any
    mem: Any
    threads: int
    slots: list[_Slot] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    reused_tokens: int = 0  # prompt tokens served from the cache instead of decoded
    replies: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # answers from the stream's thread


class LlamaCppBackend(BackendBase):
    name, title = "llamacpp", "llama.cpp"
    capabilities = Capabilities(sampling_controls=ALL_CONTROLS, scoring=True, grammar=True, embeddings=True,
                                weight_copies=True, scoring_window=SCORE_TOKENS, batch_invariant=True)

    @classmethod
    def refuses(cls, model) -> str | None:
        if model.kind != "gguf":
            return f"{model.path} is an mlx-lm directory; the llama.cpp backend needs a .gguf file"
        return None

    @classmethod
    def open(cls, model, sha256, *, ctx, parallel, threads=None, announce=None, server=None) -> LlamaCppBackend:
        return cls(model.path, ctx=ctx, parallel=parallel, threads=threads)

    def __init__(self, model_path: str | Path, *, ctx: int = DEFAULT_CTX, parallel: int | None = 1,
                 threads: int | None = None, gpu_layers: int | None = None, batch: int = DEFAULT_BATCH,
                 repack: bool | None = None):
        """`parallel=None` picks the number of sequences from the model's KV size and free memory.
        `repack=None` lets llama.cpp repack the weights at load only where that keeps decoding
        batch-invariant (repack_is_invariant)."""
        if parallel is not None and parallel < 1:
            raise BackendError("--parallel must be at least 1")
        if ctx < 64:
            raise BackendError("--ctx must be at least 64 tokens")
        lc = self._lc = llama_cpp()
        self.model_path = Path(model_path)
        self.ctx_per_seq = ctx
        self.threads = threads or default_threads()
        # Not told how many: fewer while other programs keep cores busy (cpu.ThreadGovernor).
        self.governor = None if threads else ThreadGovernor(self.threads)

        mparams = lc.llama_model_default_params()
        if gpu_layers is None:
            gpu_layers = 999 if lc.llama_supports_gpu_offload() else 0
        mparams.n_gpu_layers = gpu_layers
        self.repacked = repack_is_invariant(self.model_path) if repack is None else repack
        mparams.use_extra_bufts = self.repacked
        if self.repacked:  # read, not mapped: the file's pages would stay mapped beside their repacked copy
            mparams.load_mode = lc.LLAMA_LOAD_MODE_NONE
        self._model = lc.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {self.model_path} (unsupported architecture or corrupt file)")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab = GGUFVocab(lc, self._model)
        n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        if ctx > n_ctx_train:
            self.close()
            raise BackendError(f"--ctx {ctx} exceeds the model's trained context of {n_ctx_train} tokens")

        free = available_memory()
        if parallel is None:
            per_sequence = kv_cache_bytes(lc, self._model, ctx)
            budget = AUTO_KV_SHARE * free if free else 2**30
            parallel = max(1, min(MAX_AUTO_PARALLEL, int(budget // per_sequence) - 1))
        self.parallel = parallel
        # Lanes spare CPU threads their barrier waits; where the layers run on a GPU they would only
        # halve its batches.
        n_lanes = 1 if gpu_layers else min(MAX_LANES, self.threads, parallel)
        kv = kv_cache_bytes(lc, self._model, ctx * (parallel + n_lanes))
        if free is not None and kv > 0.8 * free:
            self.close()
            raise BackendError(f"--ctx {ctx} x --parallel {parallel} needs a {kv / 2**30:.1f} GiB KV cache, "
                               f"but only {free / 2**30:.1f} GiB of memory is available; lower --ctx or --parallel")
        self.kv_bytes = kv
        self.n_batch = max(batch, 64)
        self._lanes: list[_Lane] = []
        for k in range(n_lanes):  # sequences and threads shared out as evenly as they go
            sequences = parallel // n_lanes + (k < parallel % n_lanes)
            self._lanes.append(self._lane(sequences, self.threads // n_lanes + (k < self.threads % n_lanes)))
        self._slots = [slot for lane in self._lanes for slot in lane.slots]
        self._one_lane_at_a_time = threading.Lock()  # while the governor leaves fewer threads (_llama_decode)
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.few_candidates = True  # greedy chains sample from greedy_candidates (False: the whole row)
        self._scorers: list[tuple[Any, Any]] = []  # (context, batch) of one thread each, made when first asked
        self._embed_ctx = self._embed_batch = None

    def _lane(self, sequences: int, threads: int) -> _Lane:
        """A lane of `sequences` slots whose decodes run on `threads` threads."""
        lc = self._lc
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.ctx_per_seq * (sequences + 1)  # one stream more: the padding sequence
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = sequences + 1
        # Batch invariance: in a unified cache a sequence's cells interleave with its batch-mates'
        # and the attention sums change order, so one KV stream per sequence. Flash attention over
        # an f16 cache reads half the bytes of plain attention over f32 and skips masked cells
        # (1.4x faster steps at --parallel 32); it stays invariant as long as every decode takes
        # its one-row-at-a-time kernel (see _prefill and _step).
        cparams.kv_unified = False
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.type_k = cparams.type_v = lc.GGML_TYPE_F16
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            self.close()
            raise BackendError(f"llama.cpp could not create a context of {self.ctx_per_seq} x {self.parallel} tokens "
                               "(not enough memory? lower --ctx or --parallel)")
        lane = _Lane(ctx, lc.llama_batch_init(self.n_batch, 0, 1), lc.llama_get_memory(ctx), threads)
        lane.slots = [_Slot(seq_id=i, lane=lane) for i in range(sequences)]
        return lane

    @property
    def seconds(self) -> dict[str, float]:
        """Where generation's time went, by phase (prompt, step, sampling), summed over the lanes."""
        return {phase: sum(lane.seconds[phase] for lane in self._lanes) for phase in PHASES}

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the cache instead of decoded."""
        return sum(lane.reused_tokens for lane in self._lanes)

    def clear_cache(self) -> None:
        """Empty every sequence's KV cache (and give its memory back)."""
        for lane in self._lanes:
            self._lc.llama_memory_clear(lane.mem, True)
            for slot in lane.slots:
                slot.cached.clear()

    # -- tokens (see vocab.py) ---------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.vocab.token_text(token)

    # -- generation ---------------------------------------------------------------------

    def _make_sampler(self, s: Sampling, seed: int, grammar: str | None = None):
        """One request's sampler chain, in llama.cpp's own order: grammar, penalties, DRY, then
        greedy, or top-k, top-p, min-p, temperature and a draw seeded from the request. Each chain
        sees only its own request's tokens, so its state never depends on the batch."""
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if grammar is not None:  # first, so every later step only sees tokens the grammar allows
            constraint = lc.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not constraint:
                lc.llama_sampler_free(chain)
                raise BackendError("llama.cpp rejected the grammar")
            lc.llama_sampler_chain_add(chain, constraint)
        window = lambda n: self.ctx_per_seq if n < 0 else n  # noqa: E731 - -1 means the whole sequence
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                lc.llama_vocab_n_tokens(self._vocab), window(s.repeat_last_n), s.repeat_penalty,
                s.frequency_penalty, s.presence_penalty))
        if s.dry_multiplier > 0:
            breakers = (ctypes.c_char_p * len(s.dry_breakers))(*(b.encode() for b in s.dry_breakers))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dry(
                self._vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length, window(s.dry_last_n),
                breakers, len(s.dry_breakers)))
        if s.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(s.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(s.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0x7FFFFFFF))
        return chain

    def _ban(self, slot: _Slot, tokens: Sequence[int]) -> None:
        """Make `tokens` impossible in the slot's logits (before they are sampled)."""
        logits = self._lc.llama_get_logits_ith(slot.lane.ctx, slot.batch_row)
        for token in tokens:
            logits[token] = -np.inf

    def _start(self, slot: _Slot, index: Any, req: Request) -> None:
        tokens, max_new = self.prompt_tokens(req, self.ctx_per_seq)
        # Keep the longest prefix the sequence already holds: the pre-query template (computed
        # as prompt rows by an earlier item), and for a follow-up request the conversation so
        # far, which this same slot has just generated. Either way what is reused depends only
        # on the item itself, never on its batch-mates. At least two tokens are decoded.
        keep = 0
        for a, b in zip(slot.cached, tokens[:-2]):
            if a != b:
                break
            keep += 1
        self._lc.llama_memory_seq_rm(slot.lane.mem, slot.seq_id, keep, -1)
        del slot.cached[keep:]
        slot.lane.reused_tokens += keep
        slot.index, slot.request = index, req
        slot.pending, slot.n_past, slot.n_prompt = tokens[keep:], keep, len(tokens)
        slot.max_new = max_new
        slot.sampler = self._make_sampler(req.sampling, req.seed, req.grammar)
        slot.banned_first = self.token_ids(req.sampling.ban_first) if req.sampling.ban_first else []
        slot.few_candidates = self.few_candidates and req.grammar is None and only_lowers(req.sampling)
        slot.generated, slot.text_bytes = [], bytearray()
        slot.started = time.perf_counter()

    def _finish(self, slot: _Slot, reason: str, stop: str | None, text: str) -> Completion:
        self._lc.llama_sampler_free(slot.sampler)
        done = Completion(text=text, finish_reason=reason, prompt_tokens=slot.n_prompt,
                          completion_tokens=len(slot.generated), seconds=time.perf_counter() - slot.started,
                          stop_sequence=stop)
        slot.index, slot.request, slot.sampler = None, None, None
        return done

    # Batch invariance. With one KV stream per sequence llama.cpp splits a batch into ubatches
    # of consecutive sequence ids holding the same number of rows of each, and computes a lone
    # row (one row of one stream) with other kernels: flash attention splits a long cache
    # across threads, F16 weights skip the GEMM kernel. So a prompt mixed into a batch of
    # generated tokens would lose its first row to a one-row ubatch, and a sequence whose
    # neighbours are idle would step alone, depending on what else runs. Hence:
    #   prefill: one sequence's prompt per decode, 2 to FA_ROW_KERNEL_MAX_ROWS rows at a time;
    #   step:    one row (the last sampled token, or the next token of a prompt of at most
    #            STEP_PROMPT_MAX) of each sequence, one decode per run of consecutive sequence
    #            ids (what llama.cpp would split anyway).
    # A lone row gets a throwaway batch-mate in the next stream. A second row in its
    # own stream would not do: that moved F16 logits by up to 0.03 (measured). Every token is
    # then computed the same way whatever the batch, the lane, the chunking or the order
    # (tests/test_llamacpp.py checks it bit for bit), and on any number of threads.

    def _llama_decode(self, ctx, batch, threads: int | None = None) -> int:
        """llama_decode on `threads` (all of this backend's by default), fewer where the governor
        says so; while it leaves fewer than the lanes hold between them, they take turns."""
        lc = self._lc
        if self.governor is None:
            return lc.llama_decode(ctx, batch)
        n = self.governor.threads()
        if threads is None or n >= self.threads or len(self._lanes) == 1:
            n = min(n, threads or n)
            lc.llama_set_n_threads(ctx, n, n)
            return lc.llama_decode(ctx, batch)
        with self._one_lane_at_a_time:
            lc.llama_set_n_threads(ctx, n, n)
            return lc.llama_decode(ctx, batch)

    def _decode(self, lane: _Lane, n: int, throwaway: Sequence[tuple[int, int]] = (), phase: str = "step") -> None:
        """Decode the first n rows of the lane's batch; then drop the cells of the throwaway rows."""
        lane.batch.n_tokens = n
        start = time.perf_counter()
        try:
            rc = self._llama_decode(lane.ctx, lane.batch, lane.threads)
        finally:
            lane.seconds[phase] += time.perf_counter() - start
            for seq_id, pos in throwaway:
                self._lc.llama_memory_seq_rm(lane.mem, seq_id, pos, -1)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} (KV cache full? lower --parallel or --ctx)")

    @staticmethod
    def _put(lane: _Lane, row: int, seq_id: int, token: int, pos: int, want_logits: bool) -> None:
        b = lane.batch
        b.token[row], b.pos[row], b.n_seq_id[row], b.logits[row] = token, pos, 1, want_logits
        b.seq_id[row][0] = seq_id

    def _put_throwaway(self, lane: _Lane, row: int, seq_id: int, token: int) -> tuple[int, int]:
        """A throwaway row of sequence seq_id (an idle slot, or the padding sequence after the
        lane's last slot), past the cells it keeps; returns what _decode drops afterwards."""
        pos = len(lane.slots[seq_id].cached) if seq_id < len(lane.slots) else 0
        self._put(lane, row, seq_id, token, pos, want_logits=True)
        return seq_id, pos

    def _prefill(self, slot: _Slot) -> None:
        """Decode a slot's pending prompt tokens; the logits of the last one are row slot.batch_row."""
        lane = slot.lane
        while slot.pending:
            take = min(len(slot.pending), self.n_batch - 1, FA_ROW_KERNEL_MAX_ROWS)
            if len(slot.pending) - take == 1:
                take -= 1  # never leave a lone token for the last chunk
            chunk, slot.pending = slot.pending[:take], slot.pending[take:]
            for i, token in enumerate(chunk):
                self._put(lane, i, slot.seq_id, token, slot.n_past + i,
                          want_logits=i == take - 1 and not slot.pending)
            if take > 1:
                self._decode(lane, take, phase="prompt")
            else:  # a lone row: with a batch-mate in the next stream
                self._decode(lane, 2, [self._put_throwaway(lane, 1, slot.seq_id + 1, chunk[0])], phase="prompt")
            slot.cached += chunk
            slot.n_past += take
        slot.batch_row = take - 1

    def _step(self, slots: list[_Slot]) -> Iterator[list[_Slot]]:
        """Decode the next token of every given slot, one row each: its last sampled token, or
        the next of a short prompt being fed (STEP_PROMPT_MAX). One decode per run of consecutive
        sequence ids of a lane (idle slots in gaps of up to STEP_GAP_FILL get throwaway rows,
        which cost less than another decode); yields each run's slots that have logits to sample
        once they are ready (sample them before going on: the next decode of their lane
        overwrites them)."""
        groups: list[list[_Slot]] = []
        for slot in sorted(slots, key=lambda s: (self._lanes.index(s.lane), s.seq_id)):
            last = groups[-1][-1] if groups else None
            if last is not None and last.lane is slot.lane and slot.seq_id - last.seq_id <= 1 + STEP_GAP_FILL:
                groups[-1].append(slot)
            else:
                groups.append([slot])
        for group in groups:
            lane = group[0].lane
            first = group[0].seq_id
            last = max(group[-1].seq_id, first + 1)  # a lone row: with a batch-mate in the next stream
            tokens = {slot.seq_id: slot.pending[0] if slot.pending else slot.generated[-1] for slot in group}
            throwaway = []
            for row, seq_id in enumerate(range(first, last + 1)):
                if seq_id in tokens:
                    self._put(lane, row, seq_id, tokens[seq_id], lane.slots[seq_id].n_past, want_logits=True)
                    lane.slots[seq_id].batch_row = row
                else:
                    throwaway.append(self._put_throwaway(lane, row, seq_id, tokens[group[0].seq_id]))
            self._decode(lane, last - first + 1, throwaway)
            for slot in group:
                if slot.pending:
                    del slot.pending[0]
                slot.cached.append(tokens[slot.seq_id])
                slot.n_past += 1
            yield [slot for slot in group if not slot.pending]  # the others are still feeding their prompts

    def step_rate(self, tokens: Sequence[int], rows: int, steps: int) -> float:
        """Tokens a second of a generation step of `rows` sequences, each fed `tokens` one at a
        time after its first: the speed of batched generation without sampling, for `--weights
        auto` (tune.py) and the benchmarks. The rows are shared out over the lanes as `stream`
        shares its sequences, and the lanes step side by side, as they do there: the sum of each
        lane's rows over its median step. Clears the cache."""
        if not 1 <= rows <= self.parallel or len(tokens) < 3 or steps < 1:
            raise BackendError(f"step_rate needs 1 <= rows <= {self.parallel}, 3 tokens and a step")
        n_lanes = min(len(self._lanes), rows)
        shares = [rows // n_lanes + (k < rows % n_lanes) for k in range(n_lanes)]
        rates = [0.0] * n_lanes

        def run(k: int) -> None:
            slots, times = self._lanes[k].slots[:shares[k]], []
            for slot in slots:
                slot.pending, slot.generated = [tokens[0], tokens[1]], [tokens[2]]
                self._prefill(slot)
            for step in range(steps):
                start = time.perf_counter()
                for _ in self._step(slots):
                    pass
                times.append(time.perf_counter() - start)
                for slot in slots:
                    slot.generated.append(tokens[(3 + step) % len(tokens)])
            rates[k] = len(slots) / float(np.median(times))

        self.clear_cache()
        try:
            self._on_threads([lambda k=k: run(k) for k in range(n_lanes)])
        finally:
            self.clear_cache()
            for slot in self._slots:
                slot.pending, slot.generated, slot.n_past, slot.batch_row = [], [], 0, -1
        return sum(rates)

    @staticmethod
    def _on_threads(work: Sequence, stop: threading.Event | None = None) -> None:
        """Call each of `work` on a thread of its own, the first on this one (so that Ctrl-C lands
        between two of its decodes); a failure sets `stop`, and the first is raised once all are done."""
        failed: list[BaseException] = []

        def call(w) -> None:
            try:
                w()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failed.append(e)
                if stop is not None:
                    stop.set()

        helpers = [threading.Thread(target=call, args=(w,), daemon=True) for w in work[1:]]
        for helper in helpers:
            helper.start()
        try:
            if work:
                call(work[0])
            for helper in helpers:
                helper.join()
        finally:  # interrupted while waiting: stop the others before going
            if stop is not None and any(helper.is_alive() for helper in helpers):
                stop.set()
            for helper in helpers:
                helper.join()
        if failed:
            raise failed[0]

    def _sample(self, slot: _Slot) -> int:
        """Sample the slot's next token from its logits row, as llama_sampler_sample does.

        llama_sampler_sample hands the chain all 49,152 (for the default model) tokens, and its
        penalties look each one up in a hash map: 0.46 ms a token, a tenth of a default run's
        time. A greedy chain whose penalties only lower the logits of tokens already generated
        picks the same token from those tokens and the best of the rest (greedy_candidates), in
        ascending order as in the whole row, so it is handed only them (tests/test_llamacpp.py)."""
        lc, ctx = self._lc, slot.lane.ctx
        if not slot.few_candidates:
            return lc.llama_sampler_sample(slot.sampler, ctx, slot.batch_row)
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, slot.batch_row), shape=(self._n_vocab,))
        ids = greedy_candidates(logits, np.asarray(slot.generated, dtype=np.int64))
        if not len(ids):  # NaN logits: let llama.cpp decide, as it would have
            return lc.llama_sampler_sample(slot.sampler, ctx, slot.batch_row)
        data = np.empty(len(ids), dtype=TOKEN_DATA)
        data["id"], data["logit"], data["p"] = ids, logits[ids], 0.0
        candidates = lc.llama_token_data_array(data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)),
                                               len(ids), -1, False)
        lc.llama_sampler_apply(slot.sampler, ctypes.byref(candidates))
        token = int(data["id"][candidates.selected])
        lc.llama_sampler_accept(slot.sampler, token)
        return token

    def _step_text(self, slot: _Slot, token: int) -> tuple[str | None, str | None, str]:
        """Record a sampled token; return (finish_reason, stop_string, text)."""
        lc, req = self._lc, slot.request
        if lc.llama_vocab_is_eog(self._vocab, token):
            return "stop", None, slot.text_bytes.decode("utf-8", "replace")
        if req.stop_at_control and lc.llama_vocab_is_control(self._vocab, token):
            return "stop", None, slot.text_bytes.decode("utf-8", "replace")
        slot.generated.append(token)
        slot.text_bytes += self.vocab.piece_bytes(token)
        text = slot.text_bytes.decode("utf-8", "ignore")
        for stop in req.stop:
            at = text.find(stop)
            if at >= 0:
                return "stop", stop, text[:at]
        if len(slot.generated) >= slot.max_new:
            return "length", None, slot.text_bytes.decode("utf-8", "replace")
        if req.sampling.stop_loops and loops(slot.generated):
            return "loop", None, slot.text_bytes.decode("utf-8", "replace")
        return None, None, text

    def stream(self, next_job: NextJobFn, progress: ProgressFn | None = None) -> Iterator[tuple[Any, Any]]:
        """Each lane drives its sequences on a thread of its own (_drive). Everything that
        touches the caller's jobs (next_job, the jobs' own code, progress, the results) runs
        here, on the caller's thread, one lane's message at a time: the caller needs no locks,
        and a lane only waits for it when a sequence needs its next request."""
        lc = self._lc
        jobs = Jobs()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        live, parked = len(self._lanes), []  # lanes still driving; idle ones waiting for work, and how much

        def take(want: int) -> list[tuple[Any, Request]]:
            """Up to `want` new jobs' first requests (jobs without requests end at once)."""
            got = []
            while len(got) < want and (pulled := next_job()) is not None:
                key, job = pulled
                if (request := jobs.start(key, job)) is not None:
                    got.append((key, request))
            return got

        drivers = [threading.Thread(target=self._drive, args=(lane, inbox, stop), daemon=True) for lane in self._lanes]
        for driver in drivers:
            driver.start()
        ended = False
        try:
            while live:
                lane, kind, arg = inbox.get()
                if kind == "next":  # arg: (free slots, whether the lane has nothing running)
                    got = take(arg[0])
                    if got or not arg[1]:
                        lane.replies.put(got)
                    else:  # idle: it waits until the others' results make room, or the end
                        parked.append((lane, arg[0]))
                elif kind == "send":
                    lane.replies.put(jobs.send(*arg))
                elif kind == "progress":
                    if progress:
                        progress(arg)
                else:  # "error"
                    raise arg
                while True:
                    yield from jobs.drain()
                    if parked and (got := take(parked[0][1])):
                        parked.pop(0)[0].replies.put(got)
                    elif not jobs.finished:
                        break
                if parked and len(parked) == live:  # nothing runs and nothing is left: the end
                    for idle, _ in parked:
                        idle.replies.put([])
                    live, parked = 0, []
            ended = True
        finally:
            stop.set()
            for lane in self._lanes:
                lane.replies.put(_STOP)
            for driver in drivers:
                driver.join()
            for lane in self._lanes:
                while not lane.replies.empty():
                    lane.replies.get()
            if not ended:  # a failed or interrupted decode leaves the caches in an unknown state
                self.clear_cache()
            for slot in self._slots:
                if slot.sampler is not None:
                    lc.llama_sampler_free(slot.sampler)
                    slot.sampler = None
                slot.index, slot.request = None, None

    def _drive(self, lane: _Lane, inbox: queue.SimpleQueue, stop: threading.Event) -> None:
        """One lane's generation loop (see stream): fill free slots, prefill new prompts, step,
        sample; the lane's messages to the stream's thread go to `inbox`."""

        def ask(kind: str, arg: Any) -> Any:
            inbox.put((lane, kind, arg))
            answer = lane.replies.get()
            if answer is _STOP:
                raise _Stopped
            return answer

        def fill() -> None:
            free = [slot for slot in lane.slots if slot.free]
            if free:
                for slot, (key, request) in zip(free, ask("next", (len(free), len(free) == len(lane.slots)))):
                    self._start(slot, key, request)

        def sample(slot: _Slot) -> int:
            """Sample the slot's next token; on its last one, hand the job its completion.

            Returns 1 if the token joined the completion (an end-of-turn token does not)."""
            before = len(slot.generated)
            if slot.banned_first and not before:
                self._ban(slot, slot.banned_first)
            start = time.perf_counter()
            token = self._sample(slot)
            lane.seconds["sampling"] += time.perf_counter() - start
            reason, stop_string, text = self._step_text(slot, token)
            kept = len(slot.generated) - before
            if reason:
                key = slot.index  # _finish frees the slot
                follow_up = ask("send", (key, self._finish(slot, reason, stop_string, text)))
                if follow_up is not None:  # same slot: its cache holds the conversation so far
                    self._start(slot, key, follow_up)
            return kept

        try:
            while not stop.is_set():
                fill()
                # Prefill new prompts (the short ones are fed through the steps instead) and
                # sample their first tokens; a request that ends at once frees its slot for the
                # next job, hence the loop.
                while starting := [slot for slot in lane.slots
                                   if not slot.free and len(slot.pending) > STEP_PROMPT_MAX]:
                    produced = 0
                    for slot in starting:
                        self._prefill(slot)
                        produced += sample(slot)
                    if produced:
                        inbox.put((lane, "progress", produced))
                    fill()
                generating = [slot for slot in lane.slots if not slot.free]
                if not generating:
                    return  # asked while idle and given nothing: the stream has ended
                produced = sum(sample(slot) for run in self._step(generating) for slot in run)
                if produced:
                    inbox.put((lane, "progress", produced))
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - raised on the stream's thread
            inbox.put((lane, "error", e))

    # -- scoring ------------------------------------------------------------------------

    def _one_sequence_context(self, n_tokens: int, purpose: str, **settings):
        """(context, batch) that decode one whole sequence at a time, for scoring and embedding."""
        lc = self._lc
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_tokens
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        for name, value in settings.items():
            setattr(cparams, name, value)
        ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise BackendError(f"llama.cpp could not create a {purpose} context")
        return ctx, lc.llama_batch_init(n_tokens, 0, 1)

    @staticmethod
    def _fill_one_sequence(b, tokens: Sequence[int], wants_output) -> None:
        for pos, token in enumerate(tokens):
            b.token[pos], b.pos[pos], b.n_seq_id[pos] = token, pos, 1
            b.seq_id[pos][0] = 0
            b.logits[pos] = wants_output(pos)
        b.n_tokens = len(tokens)

    def _scoring_contexts(self) -> list[tuple[Any, Any]]:
        """(context, batch) pairs for scoring, one per thread this backend may use, each decoding
        one whole sequence on one thread, logits where asked (see _side_by_side)."""
        if not self._scorers:
            lc = self._lc
            self._scorers = [self._one_sequence_context(
                SCORE_TOKENS, "scoring", flash_attn_type=lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,  # as generation
                type_k=lc.GGML_TYPE_F16, type_v=lc.GGML_TYPE_F16, n_threads=1, n_threads_batch=1)
                for _ in range(self.threads)]
        return self._scorers

    def _side_by_side(self, items: Sequence, one) -> list:
        """[one(context, batch, item) for item in items], on the scoring contexts side by side:
        each takes the next item when it is done, on a thread of its own.

        One sequence on two threads waits at llama.cpp's barriers after every operation; two
        sequences on one thread each never wait (1.2x faster on 2 cores, measured). A decode's
        results do not depend on its thread count or on which context runs it, so neither do
        the scores. While other programs keep cores busy (the governor) fewer contexts work:
        a context beyond the governor's count stops taking items until the next call."""
        contexts = self._scoring_contexts()
        results: list = [None] * len(items)
        todo = iter(enumerate(items))
        lock, stop = threading.Lock(), threading.Event()

        def work(k: int) -> None:
            while not stop.is_set():
                if k and self.governor is not None and k >= self.governor.threads():
                    return
                with lock:
                    i, item = next(todo, (None, None))
                if i is None:
                    return
                results[i] = one(*contexts[k], item)

        self._on_threads([lambda k=k: work(k) for k in range(min(len(contexts), len(items)))], stop)
        return results

    def _decode_one(self, ctx, b, what: str) -> None:
        """Decode a scoring context's batch, then clear its cache for the next sequence."""
        lc = self._lc
        rc = lc.llama_decode(ctx, b)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} while {what}")

    def token_logprobs(self, items: Sequence[tuple[list[int], int]]) -> list[np.ndarray]:
        """Log-probabilities of tokens[start:] given what precedes them, for each (tokens, start).

        Logits are computed only for the rows that predict a scored token (llama.cpp skips the
        output layer for the others). One sequence per decode: packing several into one
        decode over a shared cache gave logits off by up to 0.24 nats for some of them with
        this llama.cpp (measured against each sequence alone), so we do not.
        """
        lc = self._lc
        n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        for tokens, start in items:
            if not 1 <= start < len(tokens) or len(tokens) > SCORE_TOKENS:
                raise BackendError(f"cannot score tokens[{start}:] of a {len(tokens)}-token sequence")

        def one(ctx, b, item) -> np.ndarray:
            tokens, start = item
            self._fill_one_sequence(b, tokens, lambda pos: start - 1 <= pos < len(tokens) - 1)
            self._decode_one(ctx, b, "scoring")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(tokens) - start, n_vocab))
            return log_softmax_at(logits, np.asarray(tokens[start:]))

        return self._side_by_side(items, one)

    def choice_logprobs(self, items: Sequence[tuple[list[int], Sequence[int]]]) -> list[np.ndarray]:
        """Log-probabilities of each choice token as the next token after each prompt: one decode
        per prompt, logits for its last position only."""
        lc = self._lc
        n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        for tokens, _ in items:
            if not 1 <= len(tokens) <= SCORE_TOKENS:
                raise BackendError(f"a {len(tokens)}-token prompt does not fit the {SCORE_TOKENS}-token scorer")

        def one(ctx, b, item) -> np.ndarray:
            tokens, choices = item
            self._fill_one_sequence(b, tokens, lambda pos: pos == len(tokens) - 1)
            self._decode_one(ctx, b, "reading an answer")
            row = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n_vocab,)).astype(np.float64)
            top = row.max()
            return row[list(choices)] - (top + np.log(np.exp(row - top).sum()))

        return self._side_by_side(items, one)

    def embed(self, texts: Sequence[str], max_tokens: int = 256) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings of `texts` (first `max_tokens` tokens of each),
        from this model in llama.cpp's embedding mode: one row per text."""
        lc = self._lc
        if self._embed_ctx is None:
            self._embed_ctx, self._embed_batch = self._one_sequence_context(
                max_tokens, "embedding", embeddings=True, pooling_type=lc.LLAMA_POOLING_TYPE_MEAN)
        ctx, b = self._embed_ctx, self._embed_batch
        n_embd = lc.llama_model_n_embd(self._model)
        out = np.zeros((len(texts), n_embd), dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = self.tokenize(text, special=False)[:max_tokens] or [lc.llama_vocab_bos(self._vocab)]
            self._fill_one_sequence(b, tokens, lambda pos: True)
            rc = self._llama_decode(ctx, b)
            if rc != 0:
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                raise BackendError(f"llama_decode failed with code {rc} while embedding")
            out[row] = np.ctypeslib.as_array(lc.llama_get_embeddings_seq(ctx, 0), shape=(n_embd,))
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    # -- facts and cleanup --------------------------------------------------------------

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "llama_cpp_python": self._lc.__version__,
            "gpu_offload": bool(self._lc.llama_supports_gpu_offload()),
            "system_info": self._lc.llama_print_system_info().decode("utf-8", "replace").strip(),
            "threads": self.threads,
            "threads_governed": self.governor is not None,
            "parallel": self.parallel,
            "lanes": len(self._lanes),
            "ctx_per_sequence": self.ctx_per_seq,
            # what batch invariance rests on besides the scheduling (docs/throughput.md, Weight types)
            "weights_repacked": self.repacked,
            "tiled_k_quant_matmul": os.environ.get("GGML_CPU_TILED_MM") != "0",
        }

    def close(self) -> None:
        lc = self._lc
        # Batches before their contexts, contexts before the model; each freed once.
        for ctx, batch in getattr(self, "_scorers", ()):
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        self._scorers = []
        for lane in getattr(self, "_lanes", ()):
            lc.llama_batch_free(lane.batch)
            lc.llama_free(lane.ctx)
        self._lanes = []
        for name, free in (("_embed_batch", lc.llama_batch_free), ("_embed_ctx", lc.llama_free),
                           ("_model", lc.llama_model_free)):
            handle = getattr(self, name, None)
            if handle:
                free(handle)
                setattr(self, name, None)

