"""Reading instruction datasets from files written by others (so: untrusted).

Accepted, per record, in a JSON array or JSON Lines file:
  Alpaca    {"instruction": ..., "input": ..., "output": ...}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  messages  {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
  instructions  {"instruction"|"prompt"|"text": ..., "input"?: ...} with no answer (Vicuna and
            MT-Bench question files: {"turns": [...]}, the first turn): imported as instructions
            waiting for `magpie-local respond`

Every record is validated on its own; a bad one yields a `RecordError` naming its line (or
its position in a JSON array), and never stops the others from being read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MagpieError

MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_FILE_BYTES_AS_ARRAY = 512 * 1024 * 1024
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


QUESTION_KEYS = ("instruction", "prompt", "text", "turns")  # instruction-only records, by precedence


class RecordError(MagpieError, ValueError):
    pass


@dataclass
class Record:
    where: str  # "line 12" or "record 12"
    format: str
    turns: list[dict] = field(default_factory=list)  # instruction, input, response
    system_prompt: str | None = None
    pending: bool = False  # instructions only: no answer yet


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise RecordError(f"{what} contains a NUL byte")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate written as a JSON escape ("\ud800")
            raise RecordError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


def _from_messages(items, role_key: str, text_key: str) -> tuple[list[dict], str | None]:
    if not isinstance(items, list) or not items:
        raise RecordError("the conversation must be a non-empty list")
    system, turns, pending = None, [], None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"message {i} is not an object")
        role = ROLES.get(str(item.get(role_key, "")).lower())
        if role is None:
            raise RecordError(f"message {i} has an unknown {role_key} {item.get(role_key)!r}")
        text = _text(item.get(text_key), f"message {i} {text_key}")
        if role == "system":
            if i != 0:
                raise RecordError("a system message may only come first")
            system = text
        elif role == "user":
            if pending is not None:
                raise RecordError(f"message {i}: two user messages in a row")
            pending = text
        else:
            if pending is None:
                raise RecordError(f"message {i}: an assistant message without a user message before it")
            turns.append({"instruction": pending, "input": None, "response": text})
            pending = None
    if not turns:
        raise RecordError("no user/assistant exchange")
    return turns, system


def parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        turns, system = _from_messages(obj["conversations"], "from", "value")
        record = Record(where, "sharegpt", turns, system)
    elif "messages" in obj:
        turns, system = _from_messages(obj["messages"], "role", "content")
        record = Record(where, "messages", turns, system)
    elif "instruction" in obj and "output" in obj:
        inp = obj.get("input") or ""
        record = Record(where, "alpaca", [{"instruction": _text(obj["instruction"], "instruction"),
                                           "input": _text(inp, "input") or None,
                                           "response": _text(obj["output"], "output")}])
    elif question := next((k for k in QUESTION_KEYS if k in obj), None):
        value = obj[question]
        if question == "turns":
            if not isinstance(value, list) or not value:
                raise RecordError("turns must be a non-empty list of strings")
            value = value[0]
        record = Record(where, "instructions", [{"instruction": _text(value, question),
                                                 "input": _text(obj.get("input") or "", "input") or None,
                                                 "response": ""}], pending=True)
    else:
        raise RecordError("not Alpaca (instruction/output), ShareGPT (conversations), messages, or an "
                          "instruction (instruction, prompt or text)")
    for turn in record.turns:
        if not turn["instruction"].strip():
            raise RecordError("empty instruction")
    return record


def _parse(raw: bytes, where: str, parse=parse_record):
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError(f"record is larger than {MAX_RECORD_BYTES // 2**20} MiB")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordError("not valid UTF-8") from None
    except RecursionError:
        raise RecordError("JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg})") from None
    return parse(obj, where)


def _array_items(text: str, path: Path):
    """(start, end, value) of each element of the JSON array `text`, one at a time, so each
    record's own size can be checked like a JSON Lines record's."""
    decoder, ws = json.JSONDecoder(), " \t\n\r"
    at, first = text.index("[") + 1, True
    while True:
        while at < len(text) and text[at] in ws:
            at += 1
        if first and at < len(text) and text[at] == "]":
            break
        first = False
        try:
            value, end = decoder.raw_decode(text, at)
        except (RecursionError, json.JSONDecodeError) as e:
            raise RecordError(f"{path} is not a valid JSON array ({type(e).__name__} near character {at})") from None
        yield at, end, value
        at = end
        while at < len(text) and text[at] in ws:
            at += 1
        if at < len(text) and text[at] == "]":
            break
        if at >= len(text) or text[at] != ",":
            raise RecordError(f"{path} is not a valid JSON array (expected ',' or ']' at character {at})")
        at += 1
    if text[at + 1:].strip():
        raise RecordError(f"{path} is not a valid JSON array (text after its closing ']')")


def read_dataset(path: Path, parse=parse_record) -> tuple[list[Record], list[str]]:
    """(records, errors) of a JSON array or JSON Lines file; errors are 'line N: reason'. `parse(obj,
    where)` makes each record (default: an instruction dataset's Record)."""
    records, errors = [], []
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON array
        if path.stat().st_size > MAX_FILE_BYTES_AS_ARRAY:
            raise RecordError(f"{path} is too large to read as one JSON array; use JSON Lines")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError(f"{path} is not valid UTF-8") from None
        for i, (start, end, obj) in enumerate(_array_items(text, path), start=1):
            try:
                if len(text[start:end].encode("utf-8", "surrogatepass")) > MAX_RECORD_BYTES:
                    raise RecordError(f"record is larger than {MAX_RECORD_BYTES // 2**20} MiB")
                records.append(parse(obj, f"record {i}"))
            except RecordError as e:
                errors.append(f"record {i}: {e}")
        return records, errors
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            number += 1
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of a huge line unread
                    raw = f.readline(1 << 20)
                errors.append(f"line {number}: record is larger than {MAX_RECORD_BYTES // 2**20} MiB")
                continue
            if not raw.strip():
                continue
            try:
                records.append(_parse(raw, f"line {number}", parse))
            except RecordError as e:
                errors.append(f"line {number}: {e}")
    return records, errors
