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

from . import __version__
from .backends.base import Backend, Request, Sampling
from .models import Model
from .store import Run, Store, config_key
from .templates import ChatFormat, TemplateError

MAX_DROP_FACTOR = 10  # give up when more than 10x the target (+100) has been dropped


class GenerateError(RuntimeError):
    pass


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides what a run generates (the target count aside)."""

    seed: int = 0
    instruction: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=1.0, max_tokens=128))
    response: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, top_p=1.0, max_tokens=512))
    system_prompt: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> GenerateSettings:
        return cls(seed=d["seed"], instruction=Sampling(**d["instruction"]), response=Sampling(**d["response"]),
                   system_prompt=d.get("system_prompt"))


def item_seed(run_seed: int, item: int, step: str) -> int:
    """A 31-bit seed for one step of one item, independent of batch layout."""
    digest = hashlib.blake2b(f"{run_seed}:{item}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def chat_format(model: Model, settings: GenerateSettings, when: datetime | None = None) -> ChatFormat:
    template = model.gguf.chat_template
    if template is None:
        raise TemplateError(f"{model.path.name} has no chat template (tokenizer.chat_template); "
                            "Magpie needs an aligned chat model")
    return ChatFormat(template, bos_token=model.gguf.bos_token, eos_token=model.gguf.eos_token,
                      system_prompt=settings.system_prompt, now=when)


def run_config(model: Model, fmt: ChatFormat, settings: GenerateSettings, model_sha256: str) -> tuple[str, dict]:
    """(config_key, config): the key covers exactly what decides the generated data."""
    decisive = {
        "model_sha256": model_sha256,
        "chat_template_sha256": hashlib.sha256(fmt.source.encode()).hexdigest(),
        "settings": asdict(settings),
    }
    key = config_key(decisive)
    config = dict(decisive, pre_query=fmt.pre_query, instruction_stops=fmt.instruction_stops,
                  response_stops=fmt.response_stops, template_time=(fmt.now or datetime.now(timezone.utc)).isoformat(),
                  magpie_local=__version__)
    return key, config


@dataclass
class Generation:
    """One run's generation loop. `on_tokens` is called as tokens are produced, `on_item` per item."""

    store: Store
    run: Run
    backend: Backend
    fmt: ChatFormat
    settings: GenerateSettings
    batch_size: int = 8
    on_tokens: Callable[[int], None] | None = None
    on_item: Callable[[bool], None] | None = None  # an item finished: kept or dropped

    def run_until_target(self) -> dict[str, int]:
        """Generate until the run holds exactly `target` kept items.

        Items are started in index order and only while they could still be needed (counting
        every running item as kept), and committed in index order in batches of `batch_size`.
        So the stored items are always the first items of the run, whatever finished first,
        and a resumed run continues exactly where the committed prefix ends.
        """
        counts = self.store.run_counts(self.run.id)
        target = self.run.target
        next_item = counts["next_item"]  # next item to start
        first_open = next_item  # first item not committed yet
        kept = counts["kept"]  # committed or finished, kept
        dropped = counts["dropped"]
        running = 0
        done: dict[int, tuple[dict, list[dict]]] = {}  # finished, not committed
        last_commit = time.perf_counter()

        def next_job():
            nonlocal next_item, running
            if kept + running >= target:
                return None
            if dropped > MAX_DROP_FACTOR * target + 100:
                raise GenerateError(f"{dropped} items dropped for {kept} kept; "
                                    "check the model and settings (see `magpie-local runs`)")
            item, next_item, running = next_item, next_item + 1, running + 1
            return item, self.magpie_job(item)

        def commit(final: bool) -> None:
            nonlocal first_open, last_commit
            while True:
                ready = 0
                while first_open + ready in done:
                    ready += 1
                if ready == 0 or (ready < self.batch_size and not final):
                    return
                items = range(first_open, first_open + min(ready, self.batch_size))
                now = time.perf_counter()
                self._commit([done.pop(i) for i in items], items, seconds=now - last_commit)
                last_commit, first_open = now, items[-1] + 1

        for item, row in self.backend.stream(next_job, self.on_tokens):
            running -= 1
            done[item] = row
            if row[0]["status"] == "kept":
                kept += 1
            else:
                dropped += 1
            if self.on_item:
                self.on_item(row[0]["status"] == "kept")
            commit(final=False)
        commit(final=True)
        self.store.finish_run(self.run.id)
        return self.store.run_counts(self.run.id)

    def magpie_job(self, item: int):
        """One item: the instruction from the pre-query template, then the response to it."""
        s, fmt = self.settings, self.fmt
        inst_seed, resp_seed = item_seed(s.seed, item, "instruction"), item_seed(s.seed, item, "response")
        inst = yield Request(fmt.instruction_prompt(), s.instruction, inst_seed, tuple(fmt.instruction_stops),
                             stop_at_control=True)
        instruction = inst.text.strip()
        resp = None
        if instruction:
            resp = yield Request(fmt.response_prompt(instruction), s.response, resp_seed, tuple(fmt.response_stops))
        reason = "empty instruction" if resp is None else ("empty response" if not resp.text.strip() else None)
        conversation = dict(item_index=item, status="dropped" if reason else "kept", drop_reason=reason,
                            system_prompt=s.system_prompt)
        turn = dict(instruction=instruction, raw_instruction=inst.text, response=resp.text.strip() if resp else "",
                    instruction_tokens=inst.completion_tokens, response_tokens=resp.completion_tokens if resp else 0,
                    instruction_prompt_tokens=inst.prompt_tokens,
                    response_prompt_tokens=resp.prompt_tokens if resp else 0,
                    instruction_finish=inst.finish_reason, response_finish=resp.finish_reason if resp else "skipped",
                    instruction_seed=inst_seed, response_seed=resp_seed,
                    instruction_seconds=round(inst.seconds, 4),
                    response_seconds=round(resp.seconds, 4) if resp else 0.0)
        return conversation, [turn]

    def _commit(self, rows: list[tuple[dict, list[dict]]], items: range, seconds: float) -> None:
        kept = sum(1 for c, _ in rows if c["status"] == "kept")
        turns = [t for _, ts in rows for t in ts]
        tokens = sum(t["instruction_tokens"] + t["response_tokens"] for t in turns)
        self.store.commit_batch(self.run.id, dict(
            first_item=items[0], n_items=len(items), kept=kept, dropped=len(items) - kept,
            prompt_tokens=sum(t["instruction_prompt_tokens"] + t["response_prompt_tokens"] for t in turns),
            completion_tokens=tokens, seconds=round(seconds, 4)), rows)
