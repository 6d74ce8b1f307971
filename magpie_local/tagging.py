"""Tags by the local model acting as judge, after the Magpie reference's tagger: task category
(its 12 categories), input quality and difficulty of each user instruction. Two methods:

  grammar     the judge's answer is sampled under a GBNF grammar (llama.cpp's grammar sampler)
              that admits exactly one JSON object with the three fields and their allowed values,
              so every finished answer parses. An answer that still does not (cut off at the
              token limit) is stored as a failure with its raw text, never raised.
  likelihood  one closed question per field, its values lettered A, B, C...; the judge's
              next-token probabilities over the letters, calibrated, pick the value (the most
              likely) and are stored as the distribution. Needs only prompt log-probabilities, so
              it runs on every backend that scores (llama.cpp, MLX, servers), and it never fails.

Calibration (Zhao et al. 2021, "Calibrate before use"): small judges favour a letter whatever the
query (the default model answers A to every question); dividing by the probabilities the judge
gives for a content-free query ("N/A") removes that bias. On 60 Vicuna questions with known
categories the default model's task category was right for 40% calibrated, 17% uncalibrated (all
A), 8% by grammar (docs/curation.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .backends.base import BackendError, Request, Sampling
from .templates import ChatFormat

CATEGORIES = ("Information seeking", "Reasoning", "Planning", "Editing", "Coding & Debugging", "Math",
              "Role playing", "Data analysis", "Creative writing", "Advice seeking", "Brainstorming", "Others")
QUALITIES = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
FIELDS = {"task_category": CATEGORIES, "input_quality": QUALITIES, "difficulty": DIFFICULTIES}
MAX_TOKENS = 64  # the longest allowed answer is about 30 tokens
MAX_INSTRUCTION_CHARS = 2000  # the judge sees the start of very long instructions

PROMPT = """Classify the user query below for a dataset. Answer with one JSON object only.

## User query
```
{instruction}
```

## Fields
- task_category: {categories}
- input_quality (how clear, specific and well-formed the query is): {qualities}
- difficulty (the knowledge and skill needed to answer it well): {difficulties}

Answer as {{"task_category": ..., "input_quality": ..., "difficulty": ...}}"""


def _choice(values: tuple[str, ...]) -> str:
    return " | ".join(json.dumps(json.dumps(v)) for v in values)  # a GBNF literal of a JSON string


def grammar() -> str:
    """GBNF for exactly {"task_category": C, "input_quality": Q, "difficulty": D}."""
    rule = {name: name.replace("_", "-") for name in FIELDS}  # GBNF rule names take no underscores
    fields = ' "," ws '.join(f'"\\"{name}\\":" ws {rule[name]}' for name in FIELDS)
    rules = "\n".join(f"{rule[name]} ::= {_choice(values)}" for name, values in FIELDS.items())
    return f'root ::= "{{" ws {fields} ws "}}"\nws ::= [ ]?\n{rules}\n'


def judge_request(fmt: ChatFormat, instruction: str) -> Request:
    text = PROMPT.format(instruction=instruction[:MAX_INSTRUCTION_CHARS], categories=", ".join(CATEGORIES),
                         qualities=", ".join(QUALITIES), difficulties=", ".join(DIFFICULTIES))
    return Request(fmt.response_prompt(text), Sampling(temperature=0.0, max_tokens=MAX_TOKENS), seed=0,
                   stop=tuple(fmt.stops), grammar=grammar())


@dataclass
class Tags:
    task_category: str | None = None
    input_quality: str | None = None
    difficulty: str | None = None
    error: str | None = None
    raw: str = ""


def parse(text: str) -> Tags:
    """The judge's answer as Tags; anything else is a recorded failure."""
    try:
        data = json.loads(text)
    except ValueError:
        return Tags(error="not valid JSON", raw=text)
    if not isinstance(data, dict):
        return Tags(error="not a JSON object", raw=text)
    for name, values in FIELDS.items():
        if data.get(name) not in values:
            return Tags(error=f"{name} missing or not one of the allowed values", raw=text)
    return Tags(**{name: data[name] for name in FIELDS}, raw=text)


LETTERS = "ABCDEFGHIJKL"  # one per value of the longest field (12 categories)
QUESTIONS = {"task_category": "Which task category does the user query belong to?",
             "input_quality": "How clear, specific and well-formed is the user query?",
             "difficulty": "How much knowledge and skill does answering the user query well need?"}

CLOSED_PROMPT = """Classify the user query below for a dataset.

## User query
```
{instruction}
```

{question}
{options}

Answer with the letter only."""


def letter_ids(backend) -> list[int]:
    """The judge's token id of each option letter, each one token of its vocabulary."""
    try:
        return backend.token_ids(list(LETTERS))
    except BackendError:
        raise BackendError("the judge model's vocabulary does not hold the letters A-L as single tokens; "
                           "tag with --method grammar or another --model") from None


def closed_prompts(fmt: ChatFormat, instruction: str) -> dict[str, str]:
    """{field: the rendered closed question about the instruction}."""
    prompts = {}
    for name, values in FIELDS.items():
        options = "\n".join(f"{LETTERS[i]}. {v}" for i, v in enumerate(values))
        # str.replace, not str.format: the instruction's own braces stay text
        text = CLOSED_PROMPT.replace("{question}", QUESTIONS[name]).replace("{options}", options)
        prompts[name] = fmt.response_prompt(text.replace("{instruction}", instruction[:MAX_INSTRUCTION_CHARS]))
    return prompts


CONTENT_FREE = "N/A"  # the query calibration reads the judge's bias from


def from_likelihoods(logprobs: dict[str, np.ndarray], baseline: dict[str, np.ndarray]) -> Tags:
    """Tags from each field's log-probabilities over its option letters, less those for the
    content-free query (`baseline`): the most likely value of each, and the calibrated
    distributions (normalised over the options) as the raw record."""
    chosen, distributions = {}, {}
    for name, values in FIELDS.items():
        lp = np.asarray(logprobs[name][:len(values)], dtype=np.float64) - baseline[name][:len(values)]
        p = np.exp(lp - lp.max())
        p /= p.sum()
        chosen[name] = values[int(p.argmax())]
        distributions[name] = {v: round(float(x), 6) for v, x in zip(values, p)}
    return Tags(**chosen, raw=json.dumps({"method": "likelihood", "calibrated": CONTENT_FREE,
                                          "distributions": distributions}))
