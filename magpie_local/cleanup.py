"""Clean-up of generated turns, in the spirit of the Magpie reference's sanitising rules.

Nothing here is silent: the raw text is stored beside the cleaned one, every edit is
listed, and every rejected turn gets a reason that the run summary counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
# "Task:", "Question 3:", "## Instruction:", "User:" ... at the very start.
LEADING_LABEL = re.compile(
    r"^\s*(?:#{1,6}\s*)?\**\s*(?:task|question|instruction|query|prompt|problem|request|user|input|human)"
    r"(?:\s*#?\d+)?\s*\**\s*[:：]\s*\**\s*", re.IGNORECASE)
LEADING_NUMBER = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s+")
# Where an instruction turns into its own answer.
ANSWER_MARKER = re.compile(
    r"\n\s*(?:#{1,6}\s*)?\**\s*(?:answer|solution|response|assistant|output|explanation)\s*\**\s*[:：]"
    r"|\n\s*#{1,6}\s*step\s*1\b", re.IGNORECASE)
# Openings of an assistant's reply, not of a user's request.
ANSWER_OPENING = re.compile(
    r"^(?:sure[,!.]|certainly[,!.]|of course[,!.]|absolutely[,!.]|here (?:is|are)\b|here's\b|"
    r"i'd be (?:happy|glad)\b|i would be (?:happy|glad)\b|as an ai\b|great question\b|"
    r"thank you for (?:your|the) question\b|(?:answer|solution|response)\s*[:：])", re.IGNORECASE)


@dataclass
class Cleaned:
    text: str
    edits: list[str] = field(default_factory=list)
    drop_reason: str | None = None


def strip_thinking(text: str, keep_thinking: bool) -> Cleaned:
    """Remove <think> blocks unless they are wanted; an unclosed block means the turn never got
    past its reasoning."""
    if keep_thinking:
        return Cleaned(text)
    edits = []
    if "<think>" in text or "</think>" in text:
        if "</think>" not in text:
            return Cleaned("", ["reasoning not finished"], "unfinished reasoning")
        if "<think>" not in text.split("</think>", 1)[0]:  # templates that open the block in the prompt
            text = text.split("</think>", 1)[1]
        text = THINK_BLOCK.sub("", text)
        edits.append("removed reasoning")
    return Cleaned(text.strip(), edits)


def clean_instruction(raw: str, *, finish_reason: str, keep_thinking: bool = False) -> Cleaned:
    """The user's message as the model wrote it, made fit to train on, or a reason to drop it."""
    if finish_reason == "length":
        return Cleaned(raw.strip(), [], "truncated instruction")
    if finish_reason == "loop":
        return Cleaned(raw.strip(), [], "instruction loops")
    result = strip_thinking(raw, keep_thinking)
    if result.drop_reason:
        return result
    text, edits = result.text, result.edits
    for pattern, what in ((LEADING_LABEL, "label"), (LEADING_NUMBER, "numbering")):
        match = pattern.match(text)
        if match and match.end() < len(text):
            edits.append(f"removed leading {what} {match.group(0).strip()!r}")
            text = text[match.end():]
    marker = ANSWER_MARKER.search(text)
    if marker:
        edits.append(f"cut at answer marker {marker.group(0).strip()!r}")
        text = text[: marker.start()]
    text = text.strip()
    if not text:
        return Cleaned(text, edits, "empty instruction")
    if text.endswith((":", "：")):
        return Cleaned(text, edits, "incomplete instruction")
    if ANSWER_OPENING.match(text):
        return Cleaned(text, edits, "instruction is an answer")
    return Cleaned(text, edits)


def clean_response(raw: str, *, finish_reason: str = "stop", keep_thinking: bool = False) -> Cleaned:
    if finish_reason == "loop":  # stopped as soon as it repeated itself (Sampling.stop_loops)
        return Cleaned(raw.strip(), [], "response loops")
    result = strip_thinking(raw, keep_thinking)
    if not result.drop_reason and not result.text.strip():
        result.drop_reason = "empty response"
    return result


def normalized(text: str) -> str:
    """The key for exact-duplicate detection: case and whitespace do not make a new instruction."""
    return " ".join(text.lower().split())
