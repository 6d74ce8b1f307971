"""A local model as judge: it rates each response on a fixed rubric from 1 to 5.

The rating is read from the judge's next-token probabilities over the score tokens "1".."5"
(the expected score, and the distribution over the five), not from sampled text: so it is
deterministic, never fails to parse, needs no grammar sampler, and works on every backend that
scores prompts (llama.cpp, MLX, servers that return prompt log-probabilities). `mass` is the
probability the judge put on the score tokens at all: near 0, it was not answering the question.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .backends.base import BackendError
from .errors import UsageError
from .templates import ChatFormat

SCALE = ("1", "2", "3", "4", "5")
MAX_PROMPT_TOKENS = 2048  # what every scoring backend takes (llama.cpp's scorer: SCORE_TOKENS)
MAX_INSTRUCTION_CHARS = 2000
MAX_RESPONSE_CHARS = 4000

RUBRIC = """Rate the assistant's response to the user's instruction below.

## Instruction
{instruction}

## Response
{response}

## Rubric
Judge helpfulness (does it give the user what they need), correctness (is what it says true and \
sound) and instruction following (does it do what was asked, in the form asked).
1 = useless or wrong, 2 = poor, 3 = acceptable, 4 = good, 5 = excellent.

Answer with a single digit from 1 to 5."""


def load_rubric(text: str | None) -> str:
    """The rubric to judge with: the built-in one, or a user's, which must hold {instruction} and {response}."""
    if text is None:
        return RUBRIC
    missing = [f"{{{k}}}" for k in ("instruction", "response") if f"{{{k}}}" not in text]
    if missing:
        raise UsageError(f"a rubric must contain {' and '.join(missing)} where the judge reads them")
    return text


def rubric_sha256(rubric: str) -> str:
    return hashlib.sha256(rubric.encode()).hexdigest()


def score_token_ids(backend) -> list[int]:
    """The judge's token id of each score, which must each be one token of its vocabulary."""
    try:
        return backend.token_ids(list(SCALE))
    except BackendError:
        raise UsageError("the judge model's vocabulary does not hold the scores 1-5 as single tokens; "
                         "choose another --model to judge with") from None


def judge_tokens(backend, fmt: ChatFormat, rubric: str, instruction: str, response: str) -> list[int]:
    """The judge's prompt as tokens: the rubric with the pair in it, in the judge's chat template;
    a long response is cut (and then the instruction) until the prompt fits MAX_PROMPT_TOKENS."""
    inst, resp = instruction[:MAX_INSTRUCTION_CHARS], response[:MAX_RESPONSE_CHARS]
    while True:
        # str.replace, not str.format: the pair's own braces stay text
        text = rubric.replace("{instruction}", inst).replace("{response}", resp)
        tokens = backend.tokenize(fmt.response_prompt(text))
        if len(tokens) <= MAX_PROMPT_TOKENS or not (inst or resp):
            return tokens[-MAX_PROMPT_TOKENS:]
        if len(resp) > 200:
            resp = resp[:len(resp) // 2]
        else:
            inst = inst[:len(inst) // 2]


@dataclass
class Rating:
    score: float  # expected score, 1-5
    distribution: list[float]  # probability of each score, "1" first (normalised over the scale)
    mass: float  # probability of the score tokens among all next tokens


def rating(logprobs: np.ndarray) -> Rating:
    """The rating from the log-probabilities of the score tokens, in SCALE order."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    top = logprobs.max()
    weights = np.exp(logprobs - top)
    p = weights / weights.sum()
    return Rating(score=round(float(p @ np.arange(1, len(SCALE) + 1)), 6),
                  distribution=[round(float(x), 6) for x in p], mass=round(float(np.exp(top) * weights.sum()), 6))
