"""Magpie generation: instructions from the pre-query template, then responses, in batches.

Item i of a run always gets the same seeds (derived from the run seed and i), so a run
that is killed and resumed produces exactly what an uninterrupted run would have, and the
output does not depend on how items were grouped into batches.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property

from ._version import __version__
from .backends.base import Backend, Request, Sampling
from .cleanup import clean_instruction, clean_response, normalized
from .curate import Bounds, check_turn
from .errors import MagpieError
from .models import Model
from .prompts import SystemPrompt, language_code, language_note, pick
from .store import Run, Store, config_key
from .templates import ChatFormat, chat_format_for

MAX_DROP_FACTOR = 10  # give up when more than 10x the target (+100) has been dropped
# The curation checks generation can apply to each pair as it is made (`passing`); duplicate
# instructions are always dropped within a run, near-duplicates need an embedding pass (`curate`).
GENERATE_CHECKS = ("length", "cut_off", "repetition", "refusal", "disclaimer", "pii", "secrets", "language")


class GenerateError(MagpieError, RuntimeError):
    pass


# (instruction, response) sampling by preset. `magpie` is the paper's (instruction temperature 1,
# greedy responses), chosen for 8B-70B models: small models loop under it. `default` was chosen
# from the sweep in docs/generation.md (tests/bench/quality.py) on the default model.
PRESETS: dict[str, tuple[Sampling, Sampling]] = {
    "magpie": (Sampling(temperature=1.0, top_p=1.0, max_tokens=128),
               Sampling(temperature=0.0, top_p=1.0, max_tokens=512)),
    # Instructions: top-p 0.98 cuts the far tail that derails small models into rambling past the
    # token limit, without losing diversity. Responses: greedy, a repetition penalty and DRY against
    # loops, and a loop stop for those that loop anyway (they are dropped, having cost few tokens).
    "default": (Sampling(temperature=1.0, top_p=0.98, max_tokens=128),
                Sampling(temperature=0.0, top_p=1.0, max_tokens=512, repeat_penalty=1.1, dry_multiplier=0.8,
                         stop_loops=True)),
}


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides what a run generates (the target count aside)."""

    seed: int = 0
    instruction: Sampling = field(default_factory=lambda: PRESETS["default"][0])
    response: Sampling = field(default_factory=lambda: PRESETS["default"][1])
    system_prompts: tuple[SystemPrompt, ...] = ()  # one is drawn per item, by weight
    language: str | None = None
    turns: int = 1
    keep_thinking: bool = False
    template: str = "auto"  # see templates.chat_format_for
    passing: tuple[str, ...] = ()  # curation checks a kept pair must pass (GENERATE_CHECKS); others are dropped
    # Instructions alone, stored as 'pending' for `respond` (generate --response-model): one turn.
    instructions_only: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> GenerateSettings:
        prompts = tuple(SystemPrompt(**p) for p in d.get("system_prompts", ()))
        if d.get("system_prompt"):  # runs stored before mixtures existed
            prompts = (SystemPrompt("custom", d["system_prompt"]),)
        return cls(seed=d["seed"], instruction=Sampling.from_dict(d["instruction"]),
                   response=Sampling.from_dict(d["response"]), system_prompts=prompts, language=d.get("language"),
                   turns=d.get("turns", 1), keep_thinking=d.get("keep_thinking", False),
                   template=d.get("template", "auto"), passing=tuple(d.get("passing", ())),
                   instructions_only=d.get("instructions_only", False))

    def decisive(self) -> dict:
        """The settings as stored and keyed: controls at their defaults are left out, so a run
        stored before a control existed has the same key as the same settings given now."""
        d = asdict(self)
        d["instruction"], d["response"] = self.instruction.decisive(), self.response.decisive()
        if not self.passing:
            del d["passing"]
        if not self.instructions_only:
            del d["instructions_only"]
        return d

    def bounds(self) -> Bounds:
        """The curation bounds `passing` checks against: curate's defaults, and the run's language."""
        return Bounds(language=language_code(self.language) if self.language else None)

    def system_for(self, item: int) -> tuple[str | None, str | None]:
        """(name, text) of item's system prompt: a seeded draw from the mixture, plus the language note."""
        unit = item_seed(self.seed, item, "system") / 2**31
        chosen = pick(self.system_prompts, unit)
        parts = [chosen.text if chosen else None, language_note(self.language) if self.language else None]
        text = "\n\n".join(p for p in parts if p) or None
        return (chosen.name if chosen else ("language" if text else None)), text

    def all_system_texts(self) -> list[str]:
        """Every system text this run can use (each is checked against the template up front)."""
        note = language_note(self.language) if self.language else None
        texts = ["\n\n".join(p for p in (sp.text, note) if p) for sp in self.system_prompts]
        return texts or ([note] if note else [])


def item_seed(run_seed: int, item: int, step: str) -> int:
    """A 31-bit seed for one step of one item, independent of batch layout."""
    digest = hashlib.blake2b(f"{run_seed}:{item}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def chat_format(model: Model, settings: GenerateSettings, when: datetime | None = None) -> ChatFormat:
    fmt = chat_format_for(model.chat_template, template=settings.template, bos_token=model.bos_token,
                          eos_token=model.eos_token, keep_thinking=settings.keep_thinking, now=when)
    for text in settings.all_system_texts():
        fmt.check_system(text)
    return fmt


def run_config(fmt: ChatFormat, settings: GenerateSettings, model_sha256: str,
               engine: dict | None = None) -> tuple[str, dict]:
    """(config_key, config): the key covers exactly what decides the generated data: the model,
    its template, the settings and `engine`, the backend's and weight copy's part of the key
    (ModelSession.key(): another backend or weight type runs other kernels, makes other text)."""
    decisive = {
        "model_sha256": model_sha256,
        "chat_template_sha256": hashlib.sha256(fmt.source.encode()).hexdigest(),
        "settings": settings.decisive(),
        **(engine or {}),
    }
    key = config_key(decisive)
    config = dict(decisive, pre_query=fmt.pre_query, template_origin=fmt.origin,
                  template_family=fmt.family.name if fmt.family else None, stops=fmt.stops,
                  template_time=(fmt.now or datetime.now(timezone.utc)).isoformat(), magpie_local=__version__)
    return key, config


@dataclass
class Generation:
    """One run's generation loop. `on_tokens` is called as tokens are produced, `on_item` as each
    item ends, with 1 if it added a kept pair, else 0."""

    store: Store
    run: Run
    backend: Backend
    fmt: ChatFormat
    settings: GenerateSettings
    batch_size: int = 8
    on_tokens: Callable[[int], None] | None = None
    on_item: Callable[[int], None] | None = None

    def run_until_target(self) -> dict[str, int]:
        """Generate until the run holds exactly `target` kept items.

        Items are started in index order and only while they could still be needed (counting
        every running item as kept), and committed in index order in batches of `batch_size`.
        So the stored items are always the first items of the run, whatever finished first,
        and a resumed run continues exactly where the committed prefix ends. An instruction
        seen before is a duplicate of the lowest-indexed item that has it, whatever order the
        items finish in, so duplicates are dropped the same way in every run.
        """
        counts = self.store.run_counts(self.run.id)
        target = self.run.target
        next_item = counts["next_item"]  # next item to start
        kept = counts["kept"] + counts["pending"]  # committed or finished, kept (instructions only: pending)
        dropped = counts["dropped"]
        running = 0
        commits = InOrder(self.store, self.run.id, next_item, self.batch_size)
        done = commits.done  # finished, not committed
        owner = dict.fromkeys(self.store.kept_instruction_keys(self.run.id), -1)  # key -> item that keeps it

        def next_job():
            nonlocal next_item, running
            if kept + running >= target:
                return None
            if dropped > MAX_DROP_FACTOR * target + 100:
                raise GenerateError(f"{dropped} items dropped for {kept} kept; "
                                    "check the model and settings (see `magpie-local runs`)")
            item, next_item, running = next_item, next_item + 1, running + 1
            return item, self.magpie_job(item)

        def finish(item: int, row: tuple[dict, list[dict]]) -> int:
            """Record a finished item; returns 1 if the run gained a kept item, else 0."""
            done[item] = row
            conversation = row[0]
            if conversation["status"] == "dropped":
                return 0
            key = normalized(row[1][0]["instruction"])
            holder = owner.get(key)
            if holder is None:
                owner[key] = item
                return 1
            if holder < item:  # an earlier item (or a committed one, -1) has it
                _drop(conversation, "duplicate instruction")
                return 0
            _drop(done[holder][0], "duplicate instruction")  # a later item finished first; not committed yet
            owner[key] = item
            return 0  # one kept item replaced another

        for item, row in self.backend.stream(next_job, self.on_tokens):
            running -= 1
            change = finish(item, row)
            kept += change
            dropped += 1 - change
            if self.on_item:
                self.on_item(change)
            commits.commit(final=False)
        commits.commit(final=True)
        self.store.finish_run(self.run.id)
        return self.store.run_counts(self.run.id)

    def magpie_job(self, item: int):
        """One conversation: each turn's user message from the conversation so far (the pre-query
        template for the first), then the response to it. Any bad turn drops the conversation."""
        s, fmt = self.settings, self.fmt
        system_name, system = s.system_for(item)
        history: list[dict] = []
        turns: list[dict] = []
        reason = None
        for t in range(s.turns):
            step = "" if t == 0 else f":{t}"
            inst_seed = item_seed(s.seed, item, "instruction" + step)
            resp_seed = item_seed(s.seed, item, "response" + step)
            inst = yield Request(fmt.instruction_prompt(system, history), s.instruction, inst_seed,
                                 tuple(fmt.stops), stop_at_control=True)
            ci = clean_instruction(inst.text, finish_reason=inst.finish_reason, keep_thinking=s.keep_thinking)
            resp = cr = None
            if not ci.drop_reason and not s.instructions_only:
                resp = yield Request(fmt.response_prompt(ci.text, system, history), s.response, resp_seed,
                                     tuple(fmt.stops))
                cr = clean_response(resp.text, finish_reason=resp.finish_reason, keep_thinking=s.keep_thinking)
            turns.append(dict(
                turn_index=t, instruction=ci.text, raw_instruction=inst.text,
                instruction_cleanup="; ".join(ci.edits) or None,
                response=cr.text if cr else "", raw_response=resp.text if resp and resp.text != cr.text else None,
                instruction_tokens=inst.completion_tokens, response_tokens=resp.completion_tokens if resp else 0,
                instruction_prompt_tokens=inst.prompt_tokens,
                response_prompt_tokens=resp.prompt_tokens if resp else 0,
                instruction_finish=inst.finish_reason, response_finish=resp.finish_reason if resp else "skipped",
                instruction_seed=inst_seed, response_seed=resp_seed,
                instruction_seconds=round(inst.seconds, 4),
                response_seconds=round(resp.seconds, 4) if resp else 0.0))
            if s.instructions_only:
                reason = ci.drop_reason
                break
            reason = ci.drop_reason or cr.drop_reason or self._failed_check(turns[-1])
            if reason:
                reason = reason if s.turns == 1 else f"turn {t + 1}: {reason}"
                break
            history += [{"role": "user", "content": ci.text}, {"role": "assistant", "content": cr.text}]
        kept = "pending" if s.instructions_only else "kept"
        conversation = dict(item_index=item, status="dropped" if reason else kept, drop_reason=reason,
                            system_prompt=system, system_name=system_name)
        return conversation, turns

    def _failed_check(self, turn: dict) -> str | None:
        """The first of the run's `passing` checks that the turn fails, as a drop reason."""
        if not self.settings.passing:
            return None
        verdicts = check_turn(turn, self._bounds)
        failed = next((verdicts[c] for c in self.settings.passing if verdicts.get(c)), None)
        return f"failed check: {failed}" if failed else None

    @cached_property
    def _bounds(self) -> Bounds:
        return self.settings.bounds()


class InOrder:
    """Finished items (`done`: item -> (conversation, turns)), committed in index order in batches
    of `size` from item `first`: the stored items are always a run's first items, whatever finished
    first, so a resumed run goes on where the committed prefix ends."""

    def __init__(self, store: Store, run_id: int, first: int, size: int):
        self.store, self.run_id, self.first_open, self.size = store, run_id, first, size
        self.done: dict[int, tuple[dict, list[dict]]] = {}
        self.last_commit = time.perf_counter()

    def commit(self, final: bool) -> None:
        """Commit every full batch that is ready (and with `final` the rest)."""
        while True:
            ready = 0
            while self.first_open + ready in self.done:
                ready += 1
            if ready == 0 or (ready < self.size and not final):
                return
            items = range(self.first_open, self.first_open + min(ready, self.size))
            rows = [self.done.pop(i) for i in items]
            now = time.perf_counter()
            kept = sum(1 for c, _ in rows if c["status"] != "dropped")
            turns = [t for _, ts in rows for t in ts]
            self.store.commit_batch(self.run_id, dict(
                first_item=items[0], n_items=len(items), kept=kept, dropped=len(items) - kept,
                prompt_tokens=sum((t["instruction_prompt_tokens"] or 0) + t["response_prompt_tokens"] for t in turns),
                completion_tokens=sum((t["instruction_tokens"] or 0) + t["response_tokens"] for t in turns),
                seconds=round(now - self.last_commit, 4)), rows)
            self.last_commit, self.first_open = now, items[-1] + 1


def _drop(conversation: dict, reason: str) -> None:
    conversation["status"], conversation["drop_reason"] = "dropped", reason


# What `verify` compares of each turn made again: everything generation decides, not its timings.
REPLAYED_FIELDS = ("instruction", "raw_instruction", "instruction_cleanup", "response", "raw_response",
                   "instruction_tokens", "response_tokens", "instruction_prompt_tokens", "response_prompt_tokens",
                   "instruction_finish", "response_finish", "instruction_seed", "response_seed")


def replay_difference(stored: tuple[dict, list[dict]], made: tuple[dict, list[dict]]) -> str | None:
    """How an item made again differs from the stored one (the first difference), or None. Whether
    a kept item is a duplicate depends on the items before it, so that drop reason is not compared."""
    (conv, turns), (again, again_turns) = stored, made
    duplicate = conv["drop_reason"] == "duplicate instruction"
    for key in ("system_prompt", "system_name") + (() if duplicate else ("status", "drop_reason")):
        if conv[key] != again[key]:
            return f"{key} differs: stored {conv[key]!r}, made again {again[key]!r}"
    if len(turns) != len(again_turns):
        return f"{len(turns)} turns stored, {len(again_turns)} made again"
    for t, (a, b) in enumerate(zip(turns, again_turns)):
        for key in REPLAYED_FIELDS:
            if a[key] != b.get(key):
                where = f"turn {t + 1} {key}" if len(turns) > 1 else key
                if isinstance(a[key], str) and isinstance(b.get(key), str):
                    at = next((i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y), min(len(a[key]),
                                                                                                 len(b[key])))
                    where += f" from character {at}"
                    a_part, b_part = a[key][max(0, at - 20):at + 40], b[key][max(0, at - 20):at + 40]
                    return f"{where}: stored {a_part!r}, made again {b_part!r}"
                return f"{where} differs: stored {a[key]!r}, made again {b.get(key)!r}"
    return None
