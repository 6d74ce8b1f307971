"""The real llama.cpp backend on the embedded default model."""

import sys
from dataclasses import replace

import pytest

from magpie_local.backends.base import Request, Sampling
from magpie_local.backends.llamacpp import BackendError, LlamaCppBackend
from magpie_local.generate import GenerateSettings, chat_format, item_seed
from magpie_local.models import resolve_model


@pytest.fixture(scope="module")
def fmt():
    return chat_format(resolve_model(None), GenerateSettings())


def _instruction_requests(fmt, n, max_tokens=24):
    return [Request(fmt.instruction_prompt(), Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens),
                    item_seed(0, i, "instruction"), tuple(fmt.stops), stop_at_control=True)
            for i in range(n)]


def test_magpie_step_one_writes_a_user_instruction(backend, fmt):
    out = backend.complete(_instruction_requests(fmt, 4))
    assert len(out) == 4
    assert all(c.prompt_tokens == backend.count_tokens(fmt.pre_query) for c in out)
    assert all(0 < c.completion_tokens <= 24 and c.finish_reason in ("stop", "length") for c in out)
    assert sum(bool(c.text.strip()) for c in out) >= 3
    assert not any("<|im_start|>" in c.text or "<|im_end|>" in c.text for c in out)


def test_same_seed_same_output_whatever_the_batch(default_model, fmt):
    """An item's output must not depend on batch size or on which items share its batch."""
    requests = _instruction_requests(fmt, 6)
    greedy = [Request(fmt.response_prompt(q), Sampling(temperature=0.0, max_tokens=20), 1, tuple(fmt.stops))
              for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    results = []
    # One at a time; three together; eight together with prompts split over 64-token decodes.
    for parallel, batch in ((1, 512), (3, 512), (8, 64)):
        with LlamaCppBackend(default_model, ctx=256, parallel=parallel, batch=batch) as be:
            results.append([c.text for c in be.complete(requests + greedy)])
    assert results[0] == results[1] == results[2]
    assert len(set(results[0][:6])) > 1  # different seeds, different instructions


@pytest.mark.parametrize("weights", ["file", "f16", "bf16"])
def test_logits_are_bitwise_the_same_alone_and_with_batch_mates_on_a_long_sequence(weights, request):
    """Past 256 cells llama.cpp's flash attention has a split-cache kernel for one row of one
    stream, prompts of 64+ rows take a tiled one, 16-bit weights take a GEMM kernel only for 2+
    rows, and llama.cpp decodes each run of consecutive sequence ids on its own: the backend
    keeps every decode on the same kernels, so a sequence's logits are the same bits whoever
    shares its steps, next to it or not (on the Q4_1 file and on its F16 and BF16 copies)."""
    import numpy as np

    from .layouts import slot_logits

    model = request.getfixturevalue("default_model" if weights == "file" else f"{weights}_model")
    runs = []
    # (parallel, slots stepping with it, tokens of its prompt prefilled first): alone; with two
    # shorter batch-mates next to it; with one, its prompt prefilled as if 250 tokens were
    # cached; on slot 2 of 5 with mates on slots 0 and 4 (idle slots between them get throwaway
    # rows); on slot 6 of 8 with a mate on slot 0, too far to share a decode: a lone row.
    # Each on 1 or 2 threads, or on a thread count that changes at every decode, as the governor
    # (cpu.ThreadGovernor) may change it on a busy machine.
    for parallel, slot_ids, cached, threads in ((1, [0], 0, 1), (3, [0, 1, 2], 0, 2), (3, [0, 1], 250, "changing"),
                                                (5, [2, 0, 4], 0, 2), (8, [6, 0], 0, 1)):
        fixed = None if threads == "changing" else threads
        with LlamaCppBackend(model, ctx=1024, parallel=parallel, threads=fixed) as be:
            if threads == "changing":
                be.governor = ChangingThreads()
            runs.append(slot_logits(be, slot_ids, cached, steps=24))  # from cell 280 past cell 300
            assert threads != "changing" or be.governor.calls > 24
    assert all(np.array_equal(runs[0], other) for other in runs[1:])


def test_attention_is_as_accurate_as_llama_cpp_without_flash_attention(f16_model):
    """The build patches ggml's one-row flash-attention kernel, which computes every prompt chunk
    and step of ours (patches/ggml-cpu-fa-one-row-blocks.patch). Batch invariance alone would not
    catch a kernel that is wrong the same way in every layout, so its logits are compared with an
    F32 reference: llama.cpp's other attention (no flash attention) over an F32 cache. They must be
    about as close to it as that attention over an F16 cache like ours, on the same build (other
    CPU families have other kernels, so an absolute bound would not travel). Measured on the F16
    copy (no quantized activations to amplify small differences), mean distances as a multiple of
    the F16-cache one: ggml's own kernel, with its FP16 accumulator, 3.7x on AVX-512 and 2.2x on
    AVX2; the patched one 1.1x and 0.9x."""
    import llama_cpp
    import numpy as np

    from .layouts import TEXT, slot_logits

    with LlamaCppBackend(f16_model, ctx=1024, parallel=1) as be:
        ours = slot_logits(be, [0], steps=24)  # a 280-token prompt in chunks, then 24 steps
        tokens = be.tokenize(TEXT)

    def without_flash_attention(cache_type):
        reference = llama_cpp.Llama(str(f16_model), flash_attn=False, type_k=cache_type, type_v=cache_type,
                                    n_ctx=1024, n_batch=32, logits_all=True, n_threads=1, verbose=False)
        try:
            reference.eval(tokens[:280] + tokens[300:324])  # what slot_logits feeds
            return np.array(reference.scores[280:304], dtype=np.float32)
        finally:
            reference.close()

    exact = without_flash_attention(llama_cpp.GGML_TYPE_F32)
    f16_cache = np.abs(without_flash_attention(llama_cpp.GGML_TYPE_F16) - exact)
    error = np.abs(ours - exact)
    assert error.mean() < 1.5 * f16_cache.mean() and error.max() < 1.5 * f16_cache.max(), \
        (error.mean(), f16_cache.mean(), error.max(), f16_cache.max())
    assert np.array_equal(ours.argmax(axis=1), exact.argmax(axis=1))


class ChangingThreads:
    """A governor that gives 1, 2, 1, 2, ... threads, one count per decode."""

    calls = 0

    def threads(self) -> int:
        self.calls += 1
        return 1 + self.calls % 2


def test_reversed_order_gives_the_same_items(backend, fmt):
    requests = _instruction_requests(fmt, 5)
    forward = [c.text for c in backend.complete(requests)]
    backward = [c.text for c in backend.complete(requests[::-1])]
    assert forward == backward[::-1]


def test_max_tokens_and_stop_strings(backend, fmt):
    prompt = fmt.response_prompt("Count from 1 to 20, separated by commas.")
    long = backend.complete([Request(prompt, Sampling(temperature=0.0, max_tokens=5), 0)])[0]
    assert long.finish_reason == "length" and long.completion_tokens == 5
    full = backend.complete([Request(prompt, Sampling(temperature=0.0, max_tokens=40), 0)])[0]
    assert "3" in full.text
    cut = backend.complete([Request(prompt, Sampling(temperature=0.0, max_tokens=40), 0, stop=("3",))])[0]
    assert cut.finish_reason == "stop" and cut.stop_sequence == "3"
    assert cut.text == full.text[: full.text.index("3")]


def test_prompt_longer_than_context_is_a_clear_error(default_model, fmt):
    with LlamaCppBackend(default_model, ctx=64, parallel=1) as be:
        with pytest.raises(BackendError, match="does not fit"):
            be.complete([Request(fmt.response_prompt("word " * 200), Sampling(max_tokens=4), 0)])


def test_context_beyond_training_is_refused(default_model):
    with pytest.raises(BackendError, match="trained context"):
        LlamaCppBackend(default_model, ctx=1_000_000)


def test_kv_cache_that_cannot_fit_is_refused_before_allocating(default_model):
    with pytest.raises(BackendError, match="KV cache"):
        LlamaCppBackend(default_model, ctx=8192, parallel=100_000)


def test_kv_cache_size_matches_the_model_shape(backend):
    from magpie_local.backends.llamacpp import kv_cache_bytes

    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, f16 keys and values.
    assert kv_cache_bytes(backend._lc, backend._model, 1) == 2 * 30 * 3 * 64 * 2


def _anonymous_bytes() -> int:
    """This process's resident anonymous memory."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))


@pytest.mark.skipif(sys.platform != "linux", reason="patches/ggml-cpu-clear-pages.patch is for Linux")
def test_the_kv_cache_takes_memory_only_where_sequences_have_written(default_model, fmt):
    """llama.cpp clears a new KV cache; our build (patches/ggml-cpu-clear-pages.patch) does it
    without writing its pages, so 32 sequences of 1,024 cells cost what they use, and clearing
    the cache gives that memory back."""
    before = _anonymous_bytes()
    with LlamaCppBackend(default_model, ctx=1024, parallel=32) as be:
        created = _anonymous_bytes() - before
        out = be.complete(_instruction_requests(fmt, 32, max_tokens=64))
        used = _anonymous_bytes() - before
        be.clear_cache()
        cleared = _anonymous_bytes() - before
        kv = be.kv_bytes
    assert kv > 700e6  # 33 streams x 1,024 cells x 23,040 bytes
    assert created < kv / 3  # the weights and buffers, not the cache (llama.cpp's own clear: created > kv)
    # Each sequence wrote ~20-75 cells in each of 60 K and V tensors: several MB each.
    cells = sum(c.prompt_tokens + c.completion_tokens for c in out)
    assert cells > 32 * 20
    assert used - created > 0.5 * cells * kv / (33 * 1024)
    assert used - cleared > 0.5 * cells * kv / (33 * 1024)


def test_repacked_weights_do_not_keep_the_file_mapped(default_model):
    """Where llama.cpp repacks the weights into its own buffers, the file is read rather than
    mapped, so its pages are not held twice; otherwise the mapping is the weights."""
    with LlamaCppBackend(default_model, ctx=256, parallel=1) as be:
        with open("/proc/self/maps") as f:
            mapped = str(default_model.resolve()) in f.read()
        assert mapped != be.repacked


def _two_step_job(fmt, i):
    """A Magpie-shaped job: an instruction, then the response on top of it in the same slot."""
    inst = yield _instruction_requests(fmt, i + 1)[i]
    resp = yield Request(fmt.response_prompt(inst.text.strip()), Sampling(temperature=0.0, max_tokens=16), 0,
                         tuple(fmt.stops))
    return inst.text, resp.text, resp.prompt_tokens


def test_two_step_jobs_are_batch_invariant_and_reuse_the_cache(default_model, fmt):
    """Magpie-shaped jobs: the response is decoded on top of the instruction the slot just wrote."""
    results, reused = [], []
    for parallel, batch in ((1, 512), (3, 512), (8, 64)):
        with LlamaCppBackend(default_model, ctx=256, parallel=parallel, batch=batch) as be:
            results.append(be.run([_two_step_job(fmt, i) for i in range(6)]))
            reused.append(be.reused_tokens)
    assert results[0] == results[1] == results[2]
    assert all(response for _, response, _ in results[0])
    # One slot: each later item reuses the pre-query template (all but the two tokens always
    # decoded), and each response at least the pre-query template plus its instruction.
    with LlamaCppBackend(default_model, ctx=256) as be:
        pre_query = be.count_tokens(fmt.pre_query)
    assert reused[0] > 5 * (pre_query - 2) + 6 * pre_query


def test_short_prompts_fed_through_the_steps_give_what_decodes_of_their_own_give(default_model, fmt, monkeypatch):
    """Prompts of up to STEP_PROMPT_MAX tokens (each response's template, each later instruction's
    last two cached tokens) are fed one token a step, as rows of the generation steps, instead of
    decodes of their own: the same bits, so the same results, as when every prompt is prefilled."""
    from magpie_local.backends import llamacpp

    prefilled = []
    real = LlamaCppBackend._prefill
    monkeypatch.setattr(LlamaCppBackend, "_prefill", lambda self, slot: prefilled.append(slot) or real(self, slot))
    results, prefills, feeding = {}, {}, llamacpp.STEP_PROMPT_MAX
    for feed in (feeding, 0):
        monkeypatch.setattr(llamacpp, "STEP_PROMPT_MAX", feed)
        prefilled.clear()
        with LlamaCppBackend(default_model, ctx=256, parallel=3) as be:
            results[feed] = be.run([_two_step_job(fmt, i) for i in range(8)])
        prefills[feed] = len(prefilled)
    assert results[0] == results[feeding]
    assert all(response for _, response, _ in results[0])
    assert prefills[0] == 16  # every request of the 8 jobs
    assert prefills[feeding] <= 6  # each slot's first pre-query template, and few more


def _in_waves(fmt, n, first):
    """(next_job, results) for `stream`: `first` jobs at once, then one more per result seen, as
    Generation hands out items; so a lane that runs dry waits for its neighbour's results."""
    started, results = [], {}

    def next_job():
        if len(started) >= n or len(started) >= first + len(results):
            return None
        started.append(len(started))
        return started[-1], _two_step_job(fmt, started[-1])

    return next_job, results


def test_lanes_side_by_side_give_what_one_context_gives(default_model, fmt):
    """With 2 threads the sequences are split over two contexts (lanes), each stepping on a
    thread of its own; every job's results are what one context on one thread gives, with
    follow-up requests, jobs handed out only as results arrive, and a lane left idle meanwhile."""
    runs = []
    # One lane; two; two under a governor whose count changes at every decode (on 1 thread the
    # lanes take turns, on 2 they decode at once).
    for threads, governor in ((1, None), (2, None), (2, ChangingThreads())):
        with LlamaCppBackend(default_model, ctx=256, parallel=6, threads=threads) as be:
            assert len(be._lanes) == threads
            be.governor = governor
            next_job, results = _in_waves(fmt, 14, first=3)
            for key, result in be.stream(next_job):
                results[key] = result
            runs.append(results)
            assert all(lane.seconds["step"] for lane in be._lanes)  # every lane generated
    assert sorted(runs[0]) == list(range(14)) and runs[0] == runs[1] == runs[2]
    assert governor.calls > 100


def test_layers_offloaded_to_a_gpu_run_in_one_lane(default_model):
    """Lanes are for CPU threads; with layers on a GPU (asked for here; a CPU build runs them on
    the CPU all the same) the sequences stay in one context, whose batches the GPU wants whole."""
    with LlamaCppBackend(default_model, ctx=64, parallel=4, threads=2, gpu_layers=999) as be:
        assert len(be._lanes) == 1 and len(be._slots) == 4
    with LlamaCppBackend(default_model, ctx=64, parallel=4, threads=2, gpu_layers=0) as be:
        assert len(be._lanes) == 2 and len(be._slots) == 4


def test_a_failure_in_a_lane_or_a_job_stops_both_lanes_and_leaves_the_backend_usable(default_model, fmt):
    def broken_job():
        yield _instruction_requests(fmt, 1)[0]
        raise ValueError("the job's own code failed")

    with LlamaCppBackend(default_model, ctx=256, parallel=4, threads=2) as be:
        good = be.run([_two_step_job(fmt, i) for i in range(4)])
        jobs = [_two_step_job(fmt, i) for i in range(3)] + [broken_job()]
        with pytest.raises(ValueError, match="own code failed"):
            be.run(jobs)
        too_long = Request("word " * 400, Sampling(temperature=0.0, max_tokens=8), 0)
        with pytest.raises(BackendError, match="does not fit --ctx 256"):  # raised in a lane's thread
            be.complete(_instruction_requests(fmt, 3) + [too_long])
        stream = be.stream(_in_waves(fmt, 8, first=8)[0])  # the caller stops reading after one result
        next(stream)
        stream.close()
        assert all(slot.free and slot.sampler is None for slot in be._slots)
        assert be.run([_two_step_job(fmt, i) for i in range(4)]) == good


def test_token_pieces_are_right_when_threads_ask_at_once(backend):
    """Generation's lanes turn tokens into text side by side (GGUFVocab.piece_bytes)."""
    import threading

    vocab, tokens = backend.vocab, range(0, backend.vocab.n_vocab, 7)
    want = [vocab.piece_bytes(t) for t in tokens]
    got = []
    readers = [threading.Thread(target=lambda: got.append([vocab.piece_bytes(t) for t in tokens])) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert len(got) == 4 and all(pieces == want for pieces in got)


def test_greedy_sampling_from_few_candidates_picks_what_the_whole_row_would(backend, fmt, monkeypatch):
    """The default response chain (repeat penalty, DRY, greedy) and one with frequency and presence
    penalties pick the same tokens from greedy_candidates as llama_sampler_sample from all 49,152."""
    from magpie_local.generate import PRESETS

    questions = ("Write a poem about the sea.", "List ten fruits, one per line.", "Explain recursion twice.",
                 "Repeat the word hello many times.", "Give me a Python function that sorts a list.")
    chains = (PRESETS["default"][1], Sampling(temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.4,
                                               presence_penalty=0.2))
    requests = [Request(fmt.response_prompt(q), replace(chain, max_tokens=160), 7, tuple(fmt.stops))
                for q in questions for chain in chains]
    from magpie_local.backends import llamacpp

    calls = []
    monkeypatch.setattr(llamacpp, "greedy_candidates",
                        lambda logits, seen, real=llamacpp.greedy_candidates: calls.append(1) or real(logits, seen))
    texts = {}
    try:
        for few in (True, False):
            backend.few_candidates = few
            texts[few] = [(c.text, c.finish_reason) for c in backend.complete(requests)]
    finally:
        backend.few_candidates = True
    assert texts[True] == texts[False]
    assert len(calls) > 500  # the first pass took its tokens from few candidates
    assert sum(len(text) for text, _ in texts[True]) > 2500  # long enough for the penalties to bite


def test_top_p_keeps_the_fewest_candidates_that_hold_p_highest_first(default_model):
    """The build patches llama.cpp's top-p (patches/llama-sampler-top-p-candidates.patch) to sort only
    the candidates that hold p, found from a histogram of the logits, instead of all 49,152. On real
    rows of the default model (raw logits 3 to 34, outside the buckets of llama.cpp's own sort), one
    with 40 equal logits made in the nucleus and one with its 5 best tokens banned, it must keep what
    sorting them all keeps: the fewest candidates, highest logit first and equal logits by token id,
    whose probabilities reach p."""
    import ctypes

    import llama_cpp
    import numpy as np

    from magpie_local.backends.llamacpp import TOKEN_DATA

    llm = llama_cpp.Llama(str(default_model), n_ctx=256, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(b"<|im_start|>user\nHow do I write a short poem about the sea? Tell me", special=True)
        llm.eval(tokens)
        rows = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    tied, banned = rows[-1].copy(), rows[-2].copy()
    by_logit = np.argsort(-tied)
    tied[by_logit[20:60]] = tied[by_logit[40]]
    banned[np.argsort(-banned)[:5]] = -np.inf
    vocab = np.arange(rows.shape[1])
    for row in [*rows[::2], tied, banned]:
        order = np.lexsort((vocab, -row))  # highest logit first, equal logits by token id
        probs = np.exp(row.astype(np.float64) - row.max())
        reached = np.cumsum(probs[order] / probs.sum())
        for p in (0.5, 0.9, 0.98, 0.999):
            data = np.zeros(len(row), dtype=TOKEN_DATA)
            data["id"], data["logit"] = vocab, row
            candidates = llama_cpp.llama_token_data_array(
                data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), len(row), -1, False)
            sampler = llama_cpp.llama_sampler_init_top_p(p, 1)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            llama_cpp.llama_sampler_free(sampler)
            n = candidates.size
            assert list(data["id"][:n]) == list(order[:n]), (p, n)
            # llama.cpp normalizes in float32 over all 49,152 (here: float64), hence the tolerance
            assert reached[n - 1] >= p - 1e-3 and (n == 1 or reached[n - 2] < p + 1e-3), (p, n, reached[n - 2:n])
    assert (tied == tied[by_logit[40]]).sum() >= 40


class OneThread:
    """A governor that leaves one core: other programs have taken the rest."""

    def threads(self) -> int:
        return 1


def test_scoring_side_by_side_gives_the_same_bits_as_one_context(default_model, fmt, monkeypatch):
    """With 2 threads the scorer decodes two sequences at once, one thread each; the figures
    must be the same bits as one context's, in the order asked (sequences of 64+ tokens take
    the tiled attention kernel, shorter ones the one-row kernel)."""
    import threading

    import numpy as np

    texts = ["What is the capital of France? The capital of France is Paris, a city on the Seine.",
             "Write a haiku. " + "Leaves fall on still water, the pond holds the autumn sky. " * 6,
             "Name three colours: red, green and blue.",
             "Explain recursion. " + "A function that calls itself on a smaller part of the problem. " * 10]
    with LlamaCppBackend(default_model, ctx=64, threads=1) as one, \
            LlamaCppBackend(default_model, ctx=64, threads=2) as two:
        items = [(one.tokenize(t), 5) for t in texts] * 2
        choices = [(one.tokenize(t), [one.tokenize(" yes", add_bos=False, special=False)[0], 13]) for t in texts]
        assert max(len(tokens) for tokens, _ in items) >= 64 > min(len(tokens) for tokens, _ in items)
        alone, side = one.token_logprobs(items), two.token_logprobs(items)
        assert len(one._scorers) == 1 and len(two._scorers) == 2
        assert [len(x) for x in side] == [len(tokens) - 5 for tokens, _ in items]
        assert all(np.array_equal(a, b) for a, b in zip(alone, side))
        assert all(np.array_equal(a, b) for a, b in zip(one.choice_logprobs(choices), two.choice_logprobs(choices)))

        # Each context did decode: count which context each decode ran on.
        used = []
        real = two._decode_one
        monkeypatch.setattr(two, "_decode_one", lambda ctx, b, what: used.append(ctx) or real(ctx, b, what))
        two.token_logprobs(items)
        assert {id(ctx) for ctx in used} == {id(ctx) for ctx, _ in two._scorers}
        # With one core left by other programs, the second context takes nothing.
        used.clear()
        two.governor = OneThread()
        assert all(np.array_equal(a, b) for a, b in zip(alone, two.token_logprobs(items)))
        assert {id(ctx) for ctx in used} == {id(two._scorers[0][0])}
        two.governor = None

        # A failure on either thread reaches the caller, after both threads have stopped.
        calls = []

        def failing(ctx, b, what):
            calls.append(1)
            if len(calls) == 3:
                raise BackendError("llama_decode failed with code 1 while scoring")
            return real(ctx, b, what)

        monkeypatch.setattr(two, "_decode_one", failing)
        before = threading.active_count()
        with pytest.raises(BackendError, match="while scoring"):
            two.token_logprobs(items)
        assert threading.active_count() == before
        assert len(calls) < len(items)  # it stopped taking items
        with pytest.raises(BackendError, match="cannot score"):
            two.token_logprobs([([1, 2, 3], 3)])
