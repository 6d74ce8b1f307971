"""Answers to stored instructions from a model of one's choice, K per instruction.

A respond run answers the first-turn instructions of a source run (generated, imported, or
imported as instructions only) and links each answer to the conversation it answers. Item
j = p * K + k is answer k to the source's p-th instruction (in item order); its seed derives
from the run seed, p and k only, so a resumed run, or one at another --parallel, stores the
same bytes. Several answers to one instruction, rated by a judge, make preference pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from .backends.base import Backend, Request, Sampling
from .cleanup import clean_response
from .curate import Bounds, check_turn
from .generate import PRESETS, InOrder, item_seed
from .store import Run, Store
from .templates import ChatFormat

# One answer: the generate default's (greedy, measured in docs/generation.md). Several answers need
# sampling to differ: temperature 0.8 and top-p 1.0, the Magpie reference's setting for its
# 5-response preference data (Magpie-Air-DPO), with the default's loop controls kept.
ONE_ANSWER = PRESETS["default"][1]
SEVERAL_ANSWERS = replace(ONE_ANSWER, temperature=0.8, top_p=1.0)


def default_sampling(responses: int) -> Sampling:
    return ONE_ANSWER if responses == 1 else SEVERAL_ANSWERS


@dataclass(frozen=True)
class RespondSettings:
    """Everything that decides what a respond run stores, the source run aside."""

    responses: int = 1  # answers per instruction (K)
    seed: int = 0
    sampling: Sampling | None = None  # None: default_sampling(responses), less what the backend lacks
    template: str = "auto"
    keep_thinking: bool = False
    passing: tuple[str, ...] = ()  # curation checks a kept answer must pass (generate.GENERATE_CHECKS)
    language: str | None = None  # ISO 639-1 code the `language` check asks for

    def decisive(self) -> dict:
        d = asdict(self)
        d["sampling"] = self.sampling.decisive()
        if not self.passing:
            del d["passing"]
        if not self.language:
            del d["language"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RespondSettings:
        return cls(responses=d["responses"], seed=d["seed"], sampling=Sampling.from_dict(d["sampling"]),
                   template=d.get("template", "auto"), keep_thinking=d.get("keep_thinking", False),
                   passing=tuple(d.get("passing", ())), language=d.get("language"))


def user_text(instruction: str, input_: str | None) -> str:
    """The user's message of an instruction with an input (Alpaca), as export writes it."""
    return f"{instruction}\n\n{input_}" if input_ else instruction


@dataclass
class Responding:
    """One respond run's loop over `sources` (store.instructions_to_answer rows): every item is
    answered once, and committed in item order in batches (generate.InOrder)."""

    store: Store
    run: Run
    backend: Backend
    fmt: ChatFormat
    settings: RespondSettings
    sources: list[dict]
    batch_size: int = 16
    on_tokens: Callable[[int], None] | None = None
    on_item: Callable[[int], None] | None = None

    def run_all(self) -> dict[str, int]:
        total = len(self.sources) * self.settings.responses
        next_item = self.store.run_counts(self.run.id)["next_item"]
        commits = InOrder(self.store, self.run.id, next_item, self.batch_size)

        def next_job():
            nonlocal next_item
            if next_item >= total:
                return None
            item, next_item = next_item, next_item + 1
            return item, self.job(item)

        for item, row in self.backend.stream(next_job, self.on_tokens):
            commits.done[item] = row
            if self.on_item:
                self.on_item(1)
            commits.commit(final=False)
        commits.commit(final=True)
        self.store.finish_run(self.run.id)
        return self.store.run_counts(self.run.id)

    def job(self, item: int):
        s = self.settings
        position, k = divmod(item, s.responses)
        source = self.sources[position]
        seed = item_seed(s.seed, position, f"response:{k}")
        prompt = self.fmt.response_prompt(user_text(source["instruction"], source["input"]), source["system_prompt"])
        resp = yield Request(prompt, s.sampling, seed, tuple(self.fmt.stops))
        cr = clean_response(resp.text, finish_reason=resp.finish_reason, keep_thinking=s.keep_thinking)
        turn = dict(turn_index=0, instruction=source["instruction"], input=source["input"], raw_instruction=None,
                    response=cr.text, raw_response=resp.text if resp.text != cr.text else None,
                    instruction_tokens=None, instruction_prompt_tokens=None, response_tokens=resp.completion_tokens,
                    response_prompt_tokens=resp.prompt_tokens, response_finish=resp.finish_reason,
                    response_seed=seed, response_seconds=round(resp.seconds, 4))
        reason = cr.drop_reason
        if not reason and s.passing:
            verdicts = check_turn(turn, Bounds(language=s.language))
            failed = next((verdicts[c] for c in s.passing if verdicts.get(c)), None)
            reason = f"failed check: {failed}" if failed else None
        conversation = dict(item_index=item, status="dropped" if reason else "kept", drop_reason=reason,
                            system_prompt=source["system_prompt"], source_id=source["id"], sample_index=k)
        return conversation, [turn]
