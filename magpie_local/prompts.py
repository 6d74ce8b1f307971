"""System prompts that steer what Magpie generates: tasks, languages and weighted mixtures.

A system prompt goes before the pre-query template, so the model writes the kind of user
message that fits it. The math, code and translation prompts are the Magpie reference's
own (MIT); the others follow the same pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MagpieError

TASKS = {
    "math": ("You are an AI assistant designed to provide helpful, step-by-step guidance on solving math problems. "
             "The user will ask you a wide range of complex mathematical questions.\nYour purpose is to assist users "
             "in understanding mathematical concepts, working through equations, and arriving at the correct "
             "solutions."),
    "code": ("You are an AI assistant designed to provide helpful, step-by-step guidance on coding problems. The user "
             "will ask you a wide range of coding questions.\nYour purpose is to assist users in understanding coding "
             "concepts, working through code, and arriving at the correct solutions."),
    "translation": ("You are an AI assistant specifically designed to provide accurate and contextually appropriate "
                    "translations. Users will ask you to translate text between various languages.\nYour purpose is "
                    "to assist users in understanding and conveying meaning across languages, maintaining the "
                    "original context and nuances."),
    "reasoning": ("You are an AI assistant designed to help with logical reasoning. The user will give you puzzles, "
                  "arguments and problems that need careful step-by-step thinking.\nYour purpose is to reason "
                  "clearly, check each step, and reach well-justified conclusions."),
    "creative": ("You are an AI assistant designed to help with creative writing. The user will ask you for stories, "
                 "poems, scripts and other imaginative texts.\nYour purpose is to write vivid, original and "
                 "well-crafted pieces that fit the user's request."),
    "editing": ("You are an AI assistant designed to help edit and improve written text. The user will give you "
                "drafts to proofread, rewrite, shorten or adapt.\nYour purpose is to make their writing clearer, "
                "more correct and better suited to its audience."),
    "data-analysis": ("You are an AI assistant designed to help with data analysis. The user will ask you about "
                      "datasets, statistics, spreadsheets and charts.\nYour purpose is to help users interpret data, "
                      "choose suitable methods and draw sound conclusions."),
    "advice": ("You are an AI assistant designed to give thoughtful, practical advice. The user will ask you about "
               "personal, professional and everyday decisions.\nYour purpose is to help users weigh their options "
               "and act wisely."),
}

LANGUAGES = {
    "ar": "Arabic", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 20_000


class PromptError(MagpieError, ValueError):
    pass


@dataclass(frozen=True)
class SystemPrompt:
    name: str
    text: str
    weight: float = 1.0

    def __post_init__(self):
        for what, value in (("name", self.name), ("text", self.text)):
            if "\x00" in value:
                raise PromptError(f"system prompt {what} holds a NUL byte")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (a JSON escape, or bytes the shell could not decode)
                raise PromptError(f"system prompt {what} is not valid Unicode text") from None


def language_name(code_or_name: str) -> str:
    value = code_or_name.strip()
    if value.lower() in LANGUAGES:
        return LANGUAGES[value.lower()]
    names = {n.lower(): n for n in LANGUAGES.values()}
    if value.lower() in names:
        return names[value.lower()]
    raise PromptError(f"unknown language {code_or_name!r}; use an ISO 639-1 code such as "
                      f"{', '.join(list(LANGUAGES)[:8])} ... or a name such as Spanish")


def language_code(code_or_name: str) -> str:
    """ISO 639-1 code of a language given by code or name (`Spanish` -> `es`)."""
    name = language_name(code_or_name)
    return next(code for code, n in LANGUAGES.items() if n == name)


def language_note(language: str) -> str:
    """The cheapest effective steer: one sentence in the system prompt (recorded with the run)."""
    name = language_name(language)
    return f"The user always writes in {name}, and you always answer in {name}."


def task_prompt(task: str) -> SystemPrompt:
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return SystemPrompt(task, TASKS[task])


def load_system_prompts(path: Path) -> list[SystemPrompt]:
    """A mixture file: JSONL or a JSON array of {"text": ..., "name": ..., "weight": ...}
    (name and weight optional), or a plain-text file with one prompt per line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read system prompts from {path}: {e}") from None
    stripped = raw.strip()
    if not stripped:
        raise PromptError(f"{path} holds no system prompts")
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PromptError(f"{path}: not valid JSON: {e}") from None
        items = list(enumerate(records, 1)) if isinstance(records, list) else [(1, records)]
    elif stripped.startswith("{"):
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except (json.JSONDecodeError, RecursionError) as e:
                    raise PromptError(f"{path} line {n}: not valid JSON: {e}") from None
    else:
        items = [(n, {"text": line.strip()}) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if len(items) > MAX_PROMPTS:
        raise PromptError(f"{path} holds {len(items)} system prompts (limit {MAX_PROMPTS})")
    prompts = []
    for n, item in items:
        where = f"{path} record {n}"
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise PromptError(f"{where}: needs a non-empty string 'text'")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise PromptError(f"{where}: 'weight' must be a positive number")
        if len(item["text"]) > MAX_PROMPT_CHARS or "\x00" in item["text"]:
            raise PromptError(f"{where}: text is longer than {MAX_PROMPT_CHARS} characters or holds a NUL byte")
        prompts.append(SystemPrompt(str(item.get("name") or f"prompt-{n}"), item["text"].strip(), float(weight)))
    return prompts


def pick(prompts: tuple[SystemPrompt, ...], unit: float) -> SystemPrompt | None:
    """The prompt at `unit` (in [0, 1)) of the cumulative weights: a seeded, reproducible draw."""
    if not prompts:
        return None
    total = sum(p.weight for p in prompts)
    acc = 0.0
    for p in prompts:
        acc += p.weight / total
        if unit < acc:
            return p
    return prompts[-1]
