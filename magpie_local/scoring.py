"""IFD: Instruction-Following Difficulty (Cherry LLM, Li et al. 2023, arXiv 2308.12032).

For an instruction Q and its answer A:

    loss_cond   = mean cross-entropy of A's tokens after Q
    loss_direct = mean cross-entropy of the same tokens without Q
    ifd         = loss_cond / loss_direct          (Cherry LLM)
    ifd_ppl     = exp(loss_cond) / exp(loss_direct)  (the Superfiltering variant)

IFD > 1 means the instruction makes the answer *harder* to predict: the pair is misaligned.
Among the rest, a higher IFD marks an instruction the model finds harder to follow.

Two prompt formats:
  chat    Q is the scorer's own chat template up to the assistant's turn (the whole
          conversation before this answer, for multi-turn data); the direct context is the
          template's assistant-turn opening alone (e.g. `<|im_start|>assistant\\n`).
  alpaca  exactly the Cherry reference: Q is the Alpaca prompt ending `### Response:`, A follows
          with no separator, and the direct text is `### Response:` + A.

The answer span is located by tokenizing context and answer separately and concatenating the
token lists, so no merge across the boundary can move it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .templates import ChatFormat

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_DIRECT = "### Response:"
PROMPT_FORMATS = ("chat", "alpaca")


@dataclass
class Pair:
    """One assistant turn to score, with the conversation before it."""

    instruction: str
    answer: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns
    system_prompt: str | None = None


@dataclass
class Score:
    loss_direct: float | None = None
    loss_cond: float | None = None
    answer_tokens: int = 0
    context_tokens: int = 0
    ifd: float | None = None
    ifd_ppl: float | None = None
    truncated: bool = False
    skip_reason: str | None = None

    @property
    def above_1(self) -> bool | None:
        return None if self.ifd is None else self.ifd > 1.0


def user_text(pair: Pair) -> str:
    return f"{pair.instruction}\n\n{pair.input}" if pair.input else pair.instruction


class IFDScorer:
    def __init__(self, backend, prompt_format: str = "chat", fmt: ChatFormat | None = None, max_length: int = 512):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {prompt_format!r} (use {' or '.join(PROMPT_FORMATS)})")
        if prompt_format == "chat" and fmt is None:
            raise ValueError("the chat prompt format needs the scorer's chat template")
        self.backend, self.prompt_format, self.fmt, self.max_length = backend, prompt_format, fmt, max_length

    def contexts(self, pair: Pair) -> tuple[str, str] | str:
        """(conditional context, direct context), or a reason the pair cannot be scored."""
        if self.prompt_format == "alpaca":
            if pair.history:
                return "the alpaca prompt format scores single-turn pairs only"
            template = ALPACA_PROMPT_INPUT if pair.input else ALPACA_PROMPT
            return template.format(instruction=pair.instruction, input=pair.input), ALPACA_DIRECT
        messages = [{"role": "system", "content": pair.system_prompt}] if pair.system_prompt else []
        for user, assistant in pair.history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": user_text(pair)})
        cond = self.fmt.render(messages, add_generation_prompt=True)
        direct = self.fmt.generation_prompt
        if self.fmt.bos_token and cond.startswith(self.fmt.bos_token):
            direct = self.fmt.bos_token + direct
        return cond, direct

    def prepare(self, pair: Pair) -> tuple[list[int], list[int], list[int], Score]:
        """Token lists (conditional context, direct context, answer) and the score's bookkeeping."""
        score = Score()
        if not pair.answer.strip():
            score.skip_reason = "empty answer"
            return [], [], [], score
        contexts = self.contexts(pair)
        if isinstance(contexts, str):
            score.skip_reason = contexts
            return [], [], [], score
        cond = self.backend.tokenize(contexts[0])
        direct = self.backend.tokenize(contexts[1])
        answer = self.backend.tokenize(pair.answer, add_bos=False, special=False)
        room = self.max_length - len(cond)
        if room < 1:
            score.skip_reason = f"instruction is longer than --max-length {self.max_length} tokens"
            return [], [], [], score
        if len(answer) > room:
            answer, score.truncated = answer[:room], True
        score.answer_tokens, score.context_tokens = len(answer), len(cond)
        return cond, direct, answer, score

    def score(self, pairs: list[Pair]) -> list[Score]:
        prepared = [self.prepare(p) for p in pairs]
        todo = [i for i, (_, _, _, s) in enumerate(prepared) if s.skip_reason is None]
        sequences = []
        for i in todo:
            cond, direct, answer, _ = prepared[i]
            sequences += [(cond + answer, len(cond)), (direct + answer, len(direct))]
        logprobs = self.backend.token_logprobs(sequences)
        for k, i in enumerate(todo):
            score = prepared[i][3]
            cond_lp, direct_lp = logprobs[2 * k], logprobs[2 * k + 1]
            if isinstance(cond_lp, str) or isinstance(direct_lp, str):  # a server could not score it
                score.skip_reason = cond_lp if isinstance(cond_lp, str) else direct_lp
                continue
            score.loss_cond = float(-cond_lp.mean())
            score.loss_direct = float(-direct_lp.mean())
            if not (math.isfinite(score.loss_cond) and math.isfinite(score.loss_direct)) or score.loss_direct <= 0:
                score.skip_reason = "losses are not finite and positive"
                score.loss_cond = score.loss_direct = None
                continue
            score.ifd = score.loss_cond / score.loss_direct
            score.ifd_ppl = math.exp(score.loss_cond - score.loss_direct)
        return [p[3] for p in prepared]
