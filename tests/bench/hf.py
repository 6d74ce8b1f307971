"""The reference implementations the benchmarks compare against, in Hugging Face transformers
(fp32, CPU), on the same model file: the default GGUF, dequantized by transformers' GGUF loader.

  Cherry LLM IFD: one sample at a time, two forward passes (answer after the Alpaca prompt, and
                  the answer after `### Response:` alone), mean cross-entropy over the answer tokens
  Magpie's HF engine: `generate` on a batch of pre-query templates (sampling), then on the batch
                  of response prompts (greedy, left-padded)

Needs the `bench` extra (torch, transformers, gguf); never used by the product.
"""

from __future__ import annotations

import time

from .common import two_pass_ifd


def load_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from magpie_local.models import resolve_model

    path = resolve_model(None).path
    torch.set_num_threads(torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def ifd_cherry(prepared) -> dict:
    """Cherry LLM's algorithm on the token spans magpie-local's scorer prepared (so the IFDs compare)."""
    import torch

    model, _ = load_model()

    def mean_ce(tokens, start):
        ids = torch.tensor([tokens])
        labels = ids.clone()
        labels[0, :start] = -100  # as the reference: loss over the answer tokens only
        with torch.no_grad():
            return model(ids, labels=labels).loss.item()

    return two_pass_ifd(prepared, mean_ce)


def magpie_generate(pre_query: str, response_prompt, n: int, batch: int, instruction_max: int,
                    response_max: int) -> dict:
    """Magpie's two steps with transformers `generate`, `batch` items at a time; generated tokens
    are counted up to each sequence's end (padding after EOS is not counted)."""
    import torch

    model, tokenizer = load_model()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def run(prompts, **sampling):
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        lengths = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else len(row) for row in new]
        texts = [tokenizer.decode(row[:k], skip_special_tokens=True) for row, k in zip(new, lengths)]
        return texts, sum(lengths)

    torch.manual_seed(0)
    tokens = 0
    start = time.perf_counter()
    for first in range(0, n, batch):
        size = min(batch, n - first)
        questions, k = run([pre_query] * size, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           max_new_tokens=instruction_max)
        tokens += k
        _, k = run([response_prompt(q.strip() or "Hello") for q in questions], do_sample=False,
                   max_new_tokens=response_max)
        tokens += k
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "pairs": n}
