"""Tags by the local model acting as judge, after the Magpie reference's tagger: task category
(its 12 categories), input quality and difficulty of each user instruction.

The judge's answer is sampled under a GBNF grammar (llama.cpp's grammar sampler) that admits
exactly one JSON object with the three fields and their allowed values, so every finished
answer parses. An answer that still does not (cut off at the token limit) is stored as a
failure with its raw text, never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .backends.base import Request, Sampling
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
