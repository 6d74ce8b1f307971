"""One sequence's logits in a chosen batch layout of the real llama.cpp backend: the check behind
batch invariance (tests/test_llamacpp.py, tests/test_weight_types.py, tests/bench/weights.py)."""

import numpy as np

TEXT = "The quick brown fox jumps over the lazy dog while the cat watches from the old red barn. " * 40


def slot_logits(be, slot_ids, cached=0, steps=5):
    """Slot slot_ids[0]'s logits over teacher-forced steps from cell 280 on, while the other slots
    in slot_ids step with it (prompts of other, shorter lengths). With `cached`, its prompt is
    prefilled in two parts, as if that many tokens had been in the cache. The backend's cache is
    emptied first, so one backend can compute several layouts."""
    tokens = be.tokenize(TEXT)
    assert len(tokens) > 300 + steps
    be.clear_cache()
    for slot in be._slots:
        slot.n_past = 0
    slots = [be._slots[i] for i in slot_ids]
    for i, slot in enumerate(slots):
        slot.pending = tokens[: cached or (280 if i == 0 else 20 + 3 * i)]  # mates: 23 to 113
        be._prefill(slot)
        if i == 0 and cached:
            slot.pending = tokens[cached:280]
            be._prefill(slot)
        slot.generated = [tokens[300]]
    out = []
    for step in range(steps):
        for run in be._step(slots):
            if slots[0] in run:
                row = be._lc.llama_get_logits_ith(slots[0].lane.ctx, slots[0].batch_row)
                out.append(np.ctypeslib.as_array(row, shape=(be.vocab.n_vocab,)).copy())
        for slot in slots:
            slot.generated.append(tokens[301 + step])
    return np.stack(out)
