"""Chat templates: sandboxed rendering and Magpie's pre-query template.

The pre-query template is the chat template rendered up to where the user's text would
start. We find it by rendering the model's own Jinja template with a sentinel user message
and keeping everything before the sentinel; the same trick gives the text that closes a
user turn (used as a stop string when the model writes an instruction) and the text that
closes an assistant turn.

Templates come from model files written by strangers, so they run in Jinja's immutable
sandbox with bounded output size and render time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import registry
from .errors import MagpieError
from .registry import Family

MAX_OUTPUT_CHARS = 1_000_000
MAX_RENDER_SECONDS = 5.0
# Sentinels: plain letters and digits, so no template filter (trim, escape, ...) alters them.
USER_1, ASSISTANT_1, USER_2 = "MAGPIEusr1q7x", "MAGPIEast1k3z", "MAGPIEusr2w9v"


class TemplateError(MagpieError, ValueError):
    """A chat template could not be rendered or gives no usable Magpie prompt."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template refused: {message}")


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # Hugging Face's tojson: keeps non-ASCII text as is, unlike Jinja's HTML-safe version.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (Hugging Face's assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None


def render(source: str, messages: list[dict], *, add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "", now: datetime | None = None, enable_thinking: bool | None = None) -> str:
    """Render a chat template in the sandbox. `now` pins strftime_now() for reproducible runs."""
    template = _compile(source)
    moment = now or datetime.now(timezone.utc)
    context = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token,
                   strftime_now=lambda fmt: moment.strftime(str(fmt)))
    if enable_thinking is not None:
        context["enable_thinking"] = enable_thinking
    out: list[str] = []
    size = 0
    deadline = time.monotonic() + MAX_RENDER_SECONDS
    try:
        for chunk in template.generate(**context):
            out.append(chunk)
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
            if time.monotonic() > deadline:
                raise TemplateError(f"chat template took longer than {MAX_RENDER_SECONDS:.0f}s to render")
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
    except Exception as e:  # any runtime failure inside untrusted template code
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
    return "".join(out)


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
