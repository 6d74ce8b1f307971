"""Curation checks: one named verdict per turn and check, stored, so selections can combine them.

  length      instruction and response lengths within bounds (characters)
  cut_off     the response ended on its own, not at the token limit
  repetition  the response does not loop: share of repeated word 4-grams at most a bound
  refusal     the response is not a refusal ("I'm sorry, but I can't ...", "As an AI language model")
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

CHECKS = ("length", "cut_off", "repetition", "refusal", "pii", "secrets", "duplicate", "near_duplicate", "language",
          "contamination")
REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|unfortunately,? i)\b.{0,80}"
    r"\b(?:can(?:'|no)?t|cannot|unable|not able|won'?t)\b"
    r"|\bas an ai(?: language)? model\b|\bi(?: am|'m) not able to (?:help|assist|provide)\b"
    r"|\bi can(?:'|no)?t (?:help|assist|provide|comply) with\b", re.IGNORECASE | re.DOTALL)


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
    match = REFUSAL.search(turn["response"][:400])
    results["refusal"] = f"refusal: {match.group(0)[:60]!r}" if match else None
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
