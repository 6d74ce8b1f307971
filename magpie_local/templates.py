"""Chat templates: sandboxed rendering and Magpie's pre-query template.

The pre-query template is the chat template rendered up to where the user's text would
start. We find it by rendering the model's own Jinja template with a sentinel user message
and keeping everything before the sentinel; the same trick gives the text that closes a
user turn (used as a stop string when the model writes an instruction) and the text that
closes an assistant turn.

Templates come from model files written by strangers, so they run in Jinja's immutable
sandbox, in a process of their own bounded in time, memory and output (template_sandbox.py).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import registry
from .errors import MagpieError
from .registry import Family
from .template_sandbox import write_message

MAX_RENDER_SECONDS = 5.0
# Sentinels: plain letters and digits, so no template filter (trim, escape, ...) alters them.
USER_1, ASSISTANT_1, USER_2 = "MAGPIEusr1q7x", "MAGPIEast1k3z", "MAGPIEusr2w9v"


class TemplateError(MagpieError, ValueError):
    """A chat template could not be rendered or gives no usable Magpie prompt."""


WORDING = {"refused": "chat template refused: {}", "unsafe": "chat template tried an unsafe operation: {}",
           "syntax": "chat template has a syntax error ({})", "output": "chat template {}",
           "memory": "chat template {}", "failed": "chat template failed to render: {}"}


class _Renderer:
    """The renderer process (template_sandbox.py), started on the first render and again after one
    that had to be stopped; one request at a time."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            script = Path(__file__).with_name("template_sandbox.py")
            self._proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self._proc

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def render(self, request: dict) -> dict:
        with self._lock:
            proc = self._start()
            try:
                write_message(proc.stdin, request)
                reply = self._reply(proc, time.monotonic() + MAX_RENDER_SECONDS)
            except (OSError, ValueError):  # the renderer died (killed for its memory, say)
                reply = {"error": "memory", "message": "took the renderer's process down"}
            if reply is None:
                self.stop()
                raise TemplateError(f"chat template took longer than {MAX_RENDER_SECONDS:.0f}s to render")
            if reply.get("error") in ("memory", "output"):
                self.stop()  # a fresh process for the next render: this one's heap is spoiled
            return reply

    @staticmethod
    def _reply(proc: subprocess.Popen, deadline: float) -> dict | None:
        """The renderer's reply, or None if none came before the deadline."""
        data = b""
        fd = proc.stdout.fileno()
        while True:
            if len(data) >= 4 and len(data) >= (need := 4 + struct.unpack(">I", data[:4])[0]):
                return json.loads(data[4:need])
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise OSError("the renderer exited")
            data += chunk


_renderer = _Renderer()
atexit.register(_renderer.stop)


def render(source: str, messages: list[dict], *, add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "", now: datetime | None = None, enable_thinking: bool | None = None) -> str:
    """Render a chat template in the sandboxed renderer process, bounded in time, memory and
    output (template_sandbox.py). `now` pins strftime_now() for reproducible runs."""
    reply = _renderer.render({"source": source, "messages": messages, "add_generation_prompt": add_generation_prompt,
                              "bos_token": bos_token, "eos_token": eos_token,
                              "now": (now or datetime.now(timezone.utc)).isoformat(),
                              "enable_thinking": enable_thinking})
    if "error" in reply:
        raise TemplateError(WORDING.get(reply["error"], "chat template failed: {}").format(reply["message"]))
    return reply["text"]


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise TemplateError("chat template drops or reorders message content; cannot derive a pre-query template")
    return text[i + len(start):j]


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


Message = dict  # {"role": ..., "content": ...}


@dataclass
class ChatFormat:
    """Everything Magpie needs from one model's chat template.

    `family` (from the registry) adds stop strings the template cannot tell; `keep_thinking`
    is passed to templates as `enable_thinking` (Qwen3, SmolLM3, DeepSeek-R1 ...), so by
    default thinking models answer without a reasoning block.
    """

    source: str
    bos_token: str = ""
    eos_token: str = ""
    family: Family | None = None
    keep_thinking: bool = False
    now: datetime | None = None
    origin: str = "model"  # where the template came from, for `templates detect` and the run config
    pre_query: str = field(init=False)
    user_end: str = field(init=False)  # after the user's text, up to the assistant's text
    assistant_end: str = field(init=False)  # after the assistant's text, up to the next user's text

    def __post_init__(self) -> None:
        turn = self.render([{"role": "user", "content": USER_1}], add_generation_prompt=False)
        if USER_1 not in turn:
            raise TemplateError("chat template does not include the user's message")
        self.pre_query = turn[: turn.index(USER_1)]
        if not self.pre_query.strip():
            raise TemplateError("chat template puts nothing before the user's message; no pre-query template")
        convo = self.render([{"role": "user", "content": USER_1}, {"role": "assistant", "content": ASSISTANT_1},
                             {"role": "user", "content": USER_2}], add_generation_prompt=False)
        if not convo.startswith(self.pre_query):
            raise TemplateError("chat template renders the first user turn differently in longer conversations")
        self.user_end = _between(convo, USER_1, ASSISTANT_1)
        self.assistant_end = _between(convo, ASSISTANT_1, USER_2)
        if self.keep_thinking and self.family and self.family.skip_reasoning:
            raise TemplateError(f"--keep-thinking is not supported for {self.family.name} models")

    def at(self, when: datetime) -> ChatFormat:
        """This format as rendered at `when` (a run's own clock, so templates that print today's
        date render as they did when the run began); itself where the template reads no clock."""
        if "strftime_now" not in self.source or when == self.now:
            self.now = when
            return self
        return ChatFormat(self.source, bos_token=self.bos_token, eos_token=self.eos_token, family=self.family,
                          keep_thinking=self.keep_thinking, now=when, origin=self.origin)

    def render(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        return render(self.source, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token, eos_token=self.eos_token, now=self.now,
                      enable_thinking=self.keep_thinking)

    @staticmethod
    def _messages(system: str | None, history: Sequence[Message], user: str) -> list[Message]:
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *history, {"role": "user", "content": user}]

    def instruction_prompt(self, system: str | None = None, history: Sequence[Message] = ()) -> str:
        """Magpie step 1: everything before the next user's text; the model writes that text."""
        if not system and not history:
            return self.pre_query
        text = self.render(self._messages(system, history, USER_2), add_generation_prompt=False)
        if USER_2 not in text:
            raise TemplateError("chat template drops the user's message after a system prompt or earlier turns")
        return text[: text.index(USER_2)]

    def response_prompt(self, instruction: str, system: str | None = None, history: Sequence[Message] = ()) -> str:
        """Magpie step 2: the conversation in the full template, ending with the generation prompt."""
        prompt = self.render(self._messages(system, history, instruction), add_generation_prompt=True)
        if self.family and self.family.skip_reasoning and not self.keep_thinking:
            prompt += self.family.skip_reasoning
        return prompt

    def check_system(self, system: str) -> None:
        """Raise a clear error if this template has no place for a system prompt."""
        try:
            prefix = self.instruction_prompt(system)
        except TemplateError as e:
            raise TemplateError(f"this model's chat template has no system turn ({e}); "
                                "--system-prompt, --task and --language need one") from None
        if system not in prefix:
            raise TemplateError("this model's chat template ignores system prompts; "
                                "--system-prompt, --task and --language need one")

    @property
    def generation_prompt(self) -> str:
        """What the template adds to open the assistant's turn (e.g. `<|im_start|>assistant\n`)."""
        turn = [{"role": "user", "content": USER_1}]
        closed = self.render(turn, add_generation_prompt=False)
        opened = self.render(turn, add_generation_prompt=True)
        return opened[len(closed):] if opened.startswith(closed) else self.user_end

    @property
    def user_header(self) -> str:
        """What opens a later user turn (the reference's multi-turn append template)."""
        text = self.assistant_end.lstrip(" ")
        for marker in (self.eos_token, *registry.markers(text)[:1]):
            if marker and text.startswith(marker):
                return text[len(marker):].lstrip("\n")
        return text

    @property
    def stops(self) -> list[str]:
        """Strings that end a generated turn: the template's special-token markers, BOS/EOS and the
        family's own. The backend also stops at end-of-generation tokens by id."""
        structure = self.user_end + self.assistant_end
        found = registry.markers(structure) or [_first_line(self.user_end), _first_line(self.assistant_end)]
        found += [self.bos_token, self.eos_token,
                 *(self.family.extra_stops if self.family else ())]
        return [s for s in dict.fromkeys(found) if s]


def chat_format_for(model_template: str | None, *, template: str = "auto", bos_token: str = "", eos_token: str = "",
                    keep_thinking: bool = False, now: datetime | None = None) -> ChatFormat:
    """The chat format a run uses. `template` is "auto" (the model's own template, or the
    registry's canonical one where its family prefers that), "model" (always the model's own),
    a family name (that family's canonical template) or the path of a .jinja file."""
    kw = dict(bos_token=bos_token, eos_token=eos_token, keep_thinking=keep_thinking, now=now)
    if template in ("auto", "model"):
        if model_template is None:
            raise TemplateError("the model file has no chat template (tokenizer.chat_template); pass --template "
                                "FAMILY (see `magpie-local templates list`) or --template FILE.jinja")
        family = registry.detect(model_template)
        if template == "auto" and family and family.prefer_registry_template:
            return ChatFormat(family.template, family=family, origin=f"registry:{family.name} "
                              f"(replaces the model's own: {family.prefer_registry_template})", **kw)
        return ChatFormat(model_template, family=family, origin="model", **kw)
    if template.endswith(".jinja") or "/" in template:
        path = Path(template)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"cannot read chat template {path}: {e}") from None
        return ChatFormat(source, family=registry.detect(source), origin=f"file:{path}", **kw)
    try:
        family = registry.get(template)
    except KeyError as e:
        raise TemplateError(str(e.args[0])) from None
    if family.template is None:
        raise TemplateError(f"the registry has no canonical template for {family.name}; its models carry their own")
    return ChatFormat(family.template, family=family, origin=f"registry:{family.name}", **kw)
