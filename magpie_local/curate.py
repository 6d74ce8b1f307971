"""Curation checks: one named verdict per turn and check, stored, so selections can combine them.

  length      instruction and response lengths within bounds (characters)
  cut_off     the response ended on its own, not at the token limit
  repetition  the response does not loop: share of repeated word 4-grams at most a bound
  refusal     the response does not open by declining what was asked ("I'm sorry, but I can't ...",
              "as a chatbot ..., I don't have the capability to ..."), unless a list or code follows
  disclaimer  the response does not speak of itself as an AI or of what it lacks as one ("as a
              text-based AI", "I don't have personal opinions")
  duplicate   no earlier kept conversation (any run) has the same first instruction, up to case and spacing
  language    (when a language is asked for) instruction and response are in it, by py3langid, offline
  pii         no personal data in instruction or response: e-mail, phone, IP address, payment card,
              IBAN, national identifier (sensitive.py; `export --redact` replaces them instead)
  secrets     no API key, token, private key or URL with a password (sensitive.py)
  near_duplicate  (when an embedding model is given) no earlier conversation's first instruction is
              closer than a cosine bound, by mean-pooled llama.cpp embeddings of a local GGUF model

Each stored row says whether the turn passed and why not, e.g. "repetition 0.62 > 0.30".
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import sensitive
from .cleanup import normalized

CHECKS = ("length", "cut_off", "repetition", "refusal", "disclaimer", "pii", "secrets", "duplicate", "near_duplicate",
          "language", "contamination")
# The self-references of chat models: "as a text-based AI", "I'm not a gardening AI", "as a chatbot
# designed to ...". Measured with the refusal rule on 250 hand-labelled answers (docs/curation.md).
AI = r"(?:AI|A\.I\.|chatbot|chat bot|bot|language model|LLM|(?:virtual |digital |AI )?assistant)"
ADJECTIVES = r"(?:(?!(?:of|for|in|and|with|to|the)\b)[\w-]+ ){0,5}?"  # "a text-based", not "a subset of"
DISCLAIMER = re.compile(
    r"(?<!such )\bas an? " + ADJECTIVES + AI + r"\b"
    r"|\bI(?:'m| am) (?:not |just |only |merely )?an? " + ADJECTIVES + AI + r"\b"
    r"|\bI (?:don't|do not) have (?:personal |real-time |direct |any )?(?:feelings|emotions|opinions|beliefs|"
    r"experiences|preferences|a body|consciousness|the (?:ability|capability|capacity)|(?:real-time )?capabilities|"
    r"(?:real-time |internet )?access)\b"
    r"|\bmy (?:training data|knowledge cut-?off|programming|creators)\b|\bI was (?:trained|programmed|created) by\b"
    r"|\b(?:I(?:'m| am) (?:not able|unable) to|I can(?:'t|not)) "
    r"(?:browse|access the internet|search the (?:web|internet))",
    re.IGNORECASE)
# Declining what was asked, bluntly ("I'm sorry, but I can't help with that") or softly ("I don't have
# the capability to ...", "my role is not to ...").
REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|unfortunately,? i)\b.{0,80}"
    r"\b(?:can(?:'|no)?t|cannot|unable|not able|won'?t)\b"
    r"|\bI(?:'m| am) (?:not able|unable|not equipped|not designed|not programmed|not permitted|not allowed|"
    r"not in a position) to\b"
    r"|\bI (?:can(?:'|no)?t|cannot|won'?t|will not|must decline to|do not|don't) (?:help|assist|provide|fulfill|"
    r"comply|create|generate|write|do|answer|browse|access|find|book|guide|support|recommend|suggest|track|order)\b"
    r"|\bI (?:don't|do not) have (?:the (?:ability|capability|capacity) to|real-time|access to)\b"
    r"|\bI must (?:respectfully )?decline\b|\bmy (?:role|job|purpose|function) is not to\b"
    r"|\bI can only (?:offer|provide|give)\b"
    r"|\bas an ai(?: language model)?\b.{0,40}\b(?:can(?:'|no)?t|cannot|unable)\b",
    re.IGNORECASE | re.DOTALL)
# A decline followed by a list or code does the work after all ("... However, here is an example: ```").
HELPS_ANYWAY = re.compile(r":\s*(?:```|(?:\d+\.|[*-]|\*\*) )")


def refusal(response: str) -> str | None:
    """Where the response opens (first 400 characters) by declining what was asked, the words that
    say so, unless a list or code follows within 600 characters."""
    match = REFUSAL.search(response[:400])
    if match is None or HELPS_ANYWAY.search(response, match.end(), match.end() + 600):
        return None
    return match.group(0)


def disclaimer(response: str) -> str | None:
    """Where the response's first 600 characters speak of it as an AI, chatbot or model, or of what it
    lacks as one (feelings, opinions, real-time access), the words that do."""
    match = DISCLAIMER.search(response[:600])
    return match.group(0) if match else None


@dataclass(frozen=True)
class Bounds:
    min_chars: int = 1
    max_chars: int = 20_000
    max_repetition: float = 0.3  # share of word 4-grams that repeat an earlier one
    language: str | None = None  # ISO 639-1 code; None = no language check


def repetition(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that already occurred in it (0 = none, near 1 = a loop)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(Counter(grams)) / len(grams)


def check_turn(turn: dict, bounds: Bounds) -> dict[str, str | None]:
    """{check: None if passed, else the reason} for one turn (all checks but `duplicate`)."""
    results: dict[str, str | None] = {}
    lengths = {"instruction": len(turn["instruction"]), "response": len(turn["response"])}
    bad = [f"{k} {v} chars" for k, v in lengths.items() if not bounds.min_chars <= v <= bounds.max_chars]
    results["length"] = ", ".join(bad) or None
    results["cut_off"] = "response hit max tokens" if turn.get("response_finish") == "length" else None
    rep = repetition(turn["response"])
    results["repetition"] = f"repetition {rep:.2f} > {bounds.max_repetition:.2f}" if rep > bounds.max_repetition \
        else None
    declined, disclaimed = refusal(turn["response"]), disclaimer(turn["response"])
    results["refusal"] = f"refusal: {' '.join(declined.split())[:60]!r}" if declined else None
    results["disclaimer"] = f"disclaimer: {' '.join(disclaimed.split())[:60]!r}" if disclaimed else None
    results.update(sensitive.reasons(turn["instruction"] + "\n" + (turn.get("input") or "") + "\n" + turn["response"]))
    if bounds.language:
        found = detect_language(turn["instruction"] + "\n" + turn["response"])
        results["language"] = None if found == bounds.language else f"language {found}, not {bounds.language}"
    return results


def detect_language(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def duplicate_reasons(first_instructions: list[tuple[int, str]]) -> dict[int, str | None]:
    """For (conversation id, first instruction) in store order: None for the first of each text."""
    seen: dict[str, int] = {}
    out: dict[int, str | None] = {}
    for conv_id, text in first_instructions:
        key = normalized(text)
        out[conv_id] = f"same instruction as conversation {seen[key]}" if key in seen else None
        seen.setdefault(key, conv_id)
    return out


def near_duplicates(conv_ids: list[int], embeddings: np.ndarray, threshold: float,
                    block: int = 1024) -> dict[int, str | None]:
    """For each conversation, in store order: the reason it is a near-duplicate of an earlier one
    (cosine of normalised embeddings at least `threshold`), else None; the first of a group stays.

    Exact search in blocks of BLAS matrix products: no Python loop over pairs, memory bounded by
    the block, ~n^2 * dim / 2 multiply-adds (100k instructions of a 576-wide model: ~3 TFLOP, under a
    minute on two cores; the embedding pass itself costs far more).
    """
    out: dict[int, str | None] = {}
    for i0 in range(0, len(conv_ids), block):
        i1 = min(i0 + block, len(conv_ids))
        sims = embeddings[i0:i1] @ embeddings[:i1].T
        sims[np.arange(i1)[None, :] >= np.arange(i0, i1)[:, None]] = -np.inf  # earlier items only
        nearest, best = sims.argmax(axis=1), sims.max(axis=1)
        for k in range(i1 - i0):
            out[conv_ids[i0 + k]] = (f"cosine {best[k]:.3f} to conversation {conv_ids[nearest[k]]}"
                                     if best[k] >= threshold else None)
    return out
