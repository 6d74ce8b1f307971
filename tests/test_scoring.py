"""IFD scoring on the real default model, checked against an independent plain computation."""

import math

import numpy as np
import pytest

from magpie_local.backends.llamacpp import LlamaCppBackend
from magpie_local.generate import GenerateSettings, chat_format
from magpie_local.models import resolve_model
from magpie_local.scoring import ALPACA_PROMPT_INPUT, IFDScorer, Pair

PAIRS = [
    Pair("Name the capital of France.", "The capital of France is Paris."),
    Pair("Add the numbers.", "The sum is 12.", input="5 and 7"),
    Pair("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds fold into night."),
    Pair("What colour is the sky?", "Bananas are yellow and grow in bunches."),  # misaligned on purpose
]


@pytest.fixture(scope="module")
def scorer_parts(default_model):
    with LlamaCppBackend(default_model, ctx=512) as backend:
        yield backend, chat_format(resolve_model(None), GenerateSettings())


def plain_mean_ce(default_model, context: str, answer: str, backend) -> float:
    """Independent path: one sequence, logits for every position, log-softmax in numpy (float64)."""
    import llama_cpp

    tokens = backend.tokenize(context) + backend.tokenize(answer, add_bos=False, special=False)
    start = len(backend.tokenize(context))
    llm = llama_cpp.Llama(str(default_model), n_ctx=512, logits_all=True, verbose=False, flash_attn=True,
                          type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_F16)  # the scorer's attention
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-np.mean([logp[p - 1, tokens[p]] for p in range(start, len(tokens))]))


@pytest.mark.parametrize("prompt_format", ["alpaca", "chat"])
def test_ifd_matches_an_independent_plain_computation(default_model, scorer_parts, prompt_format):
    backend, fmt = scorer_parts
    scorer = IFDScorer(backend, prompt_format, fmt)
    for pair, score in zip(PAIRS[:2], scorer.score(PAIRS[:2])):
        cond, direct = scorer.contexts(pair)
        loss_cond = plain_mean_ce(default_model, cond, pair.answer, backend)
        loss_direct = plain_mean_ce(default_model, direct, pair.answer, backend)
        assert score.loss_cond == pytest.approx(loss_cond, rel=1e-4)
        assert score.loss_direct == pytest.approx(loss_direct, rel=1e-4)
        assert score.ifd == pytest.approx(loss_cond / loss_direct, rel=1e-4)
        assert score.ifd_ppl == pytest.approx(math.exp(loss_cond) / math.exp(loss_direct), rel=1e-4)


def test_alpaca_format_is_the_cherry_reference(scorer_parts):
    backend, fmt = scorer_parts
    cond, direct = IFDScorer(backend, "alpaca").contexts(PAIRS[1])
    assert cond == ALPACA_PROMPT_INPUT.format(instruction="Add the numbers.", input="5 and 7")
    assert cond.endswith("### Input:\n5 and 7\n\n### Response:") and direct == "### Response:"


def test_answer_span_is_exactly_the_answer(scorer_parts):
    backend, fmt = scorer_parts
    scorer = IFDScorer(backend, "chat", fmt)
    for pair in PAIRS:
        cond, direct, answer, score = scorer.prepare(pair)
        assert backend.detokenize(answer) == pair.answer
        assert score.answer_tokens == len(answer) and score.context_tokens == len(cond)


def test_misaligned_pair_scores_higher_and_flags(scorer_parts):
    backend, fmt = scorer_parts
    scores = IFDScorer(backend, "chat", fmt).score(PAIRS)
    assert all(s.ifd is not None and s.ifd > 0 for s in scores)
    assert scores[3].ifd > scores[0].ifd
    assert scores[0].above_1 is False


def test_truncation_and_skips_never_give_nan(scorer_parts):
    backend, fmt = scorer_parts
    scorer = IFDScorer(backend, "chat", fmt, max_length=60)
    long_answer = "word " * 200
    scores = scorer.score([Pair("Say many words.", long_answer), Pair("Say nothing.", "   "),
                           Pair("x " * 100, "Too long a question.")])
    assert scores[0].truncated and scores[0].context_tokens + scores[0].answer_tokens == 60
    assert scores[0].ifd is not None and math.isfinite(scores[0].ifd)
    assert scores[1].skip_reason == "empty answer" and scores[1].ifd is None
    assert "longer than --max-length" in scores[2].skip_reason and scores[2].loss_cond is None


def test_multi_turn_is_conditioned_on_the_conversation(scorer_parts):
    backend, fmt = scorer_parts
    scorer = IFDScorer(backend, "chat", fmt)
    pair = Pair("And its population?", "About two million people.",
                history=(("Name the capital of France.", "Paris."),))
    cond, _ = scorer.contexts(pair)
    assert "Name the capital of France." in cond and cond.index("Paris.") < cond.index("And its population?")
    assert IFDScorer(backend, "alpaca").score([pair])[0].skip_reason.startswith("the alpaca prompt format")


def test_log_softmax_at_is_exact_and_the_same_bits_whatever_the_block():
    """The scorer's log-softmax works a few rows at a time: each row's figure must not depend
    on how many rows share its block, and must match a float64 computation."""
    import numpy as np

    from magpie_local.backends.llamacpp import log_softmax_at

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((21, 49152)) * 4).astype(np.float32)
    logits[3, 17] = 90.0  # exp would overflow float32 without the max shifted out
    targets = rng.integers(0, 49152, 21)
    targets[3] = 17
    wide = logits.astype(np.float64)
    reference = wide[np.arange(21), targets] - np.log(np.exp(wide - wide.max(axis=1, keepdims=True)).sum(axis=1)) \
        - wide.max(axis=1)
    default = log_softmax_at(logits, targets)
    assert np.abs(default - reference).max() < 1e-5
    assert abs(default[3]) < 1e-5  # a row dominated by its target
    for rows in (1, 5, 21, 64):
        assert np.array_equal(log_softmax_at(logits, targets, rows=rows), default)
