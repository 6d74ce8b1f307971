"""The chat-template renderer's own process: chat templates come inside model files written by
strangers, so they are rendered here, never in the process that holds the database and the model.

The parent (templates.py) starts this file as a script (it imports nothing of magpie_local, so it
starts in a few tens of milliseconds) and sends it render requests over a pipe. Here a template
runs in Jinja's immutable sandbox, in a process whose address space is capped (MEMORY_LIMIT) and
whose output is capped (MAX_OUTPUT_CHARS); the parent kills it when a render takes longer than its
time limit and starts another for the next render. So no template, however it loops or grows its
strings, can hang the command or take the machine's memory.

Protocol: each message is a 4-byte big-endian length and that many bytes of JSON. A request is
{"source", "messages", "add_generation_prompt", "bos_token", "eos_token", "now" (ISO time),
"enable_thinking"}; the reply is {"text": ...} or {"error": kind, "message": ...} with kind one of
"refused" (the template's raise_exception), "unsafe" (the sandbox stopped it), "syntax", "output",
"memory" or "failed".
"""

from __future__ import annotations

import json
import struct
import sys
from datetime import datetime
from functools import lru_cache

MAX_OUTPUT_CHARS = 1_000_000
MEMORY_LIMIT = 512 * 2**20  # bytes of address space the renderer may use in all


class _Refused(Exception):
    pass


def _raise_exception(message):
    raise _Refused(str(message))


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # Hugging Face's tojson: keeps non-ASCII text as is, unlike Jinja's HTML-safe version.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (Hugging Face's assistant-mask marker): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render(request: dict) -> dict:
    """One request's reply (see the module's docstring)."""
    import jinja2

    try:
        template = _compile(request["source"])
    except jinja2.TemplateSyntaxError as e:
        return {"error": "syntax", "message": f"line {e.lineno}: {e.message}"}
    moment = datetime.fromisoformat(request["now"])
    context = dict(messages=request["messages"], add_generation_prompt=request["add_generation_prompt"],
                   bos_token=request["bos_token"], eos_token=request["eos_token"],
                   strftime_now=lambda fmt: moment.strftime(str(fmt)))
    if request.get("enable_thinking") is not None:
        context["enable_thinking"] = request["enable_thinking"]
    out, size = [], 0
    try:
        for chunk in template.generate(**context):
            out.append(chunk)
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                return {"error": "output", "message": f"output exceeds {MAX_OUTPUT_CHARS} characters"}
    except _Refused as e:
        return {"error": "refused", "message": str(e)}
    except jinja2.exceptions.SecurityError as e:
        return {"error": "unsafe", "message": str(e)}
    except MemoryError:
        return {"error": "memory", "message": f"used more than {MEMORY_LIMIT >> 20} MiB of memory"}
    except RecursionError:
        return {"error": "failed", "message": "recursion too deep"}
    except Exception as e:  # any runtime failure inside untrusted template code
        return {"error": "failed", "message": f"{type(e).__name__}: {e}"}
    return {"text": "".join(out)}


def read_message(stream) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    return json.loads(stream.read(n))


def write_message(stream, message: dict) -> None:
    data = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _cap_memory() -> None:
    try:
        import resource
    except ImportError:  # Windows: the time limit still holds
        return
    for limit in ("RLIMIT_AS", "RLIMIT_DATA"):  # macOS enforces the second, Linux both
        if hasattr(resource, limit):
            try:
                resource.setrlimit(getattr(resource, limit), (MEMORY_LIMIT, MEMORY_LIMIT))
            except (ValueError, OSError):
                pass


def main() -> None:
    import jinja2  # noqa: F401  (imported before the memory cap: its import is not a template's doing)

    _cap_memory()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (request := read_message(stdin)) is not None:
        try:
            reply = render(request)
        except MemoryError:  # building the reply itself
            reply = {"error": "memory", "message": f"used more than {MEMORY_LIMIT >> 20} MiB of memory"}
        write_message(stdout, reply)


if __name__ == "__main__":
    main()
