"""Preference pairs (DPO, ORPO, KTO) from a respond run's K answers per instruction, rated by a judge.

For each instruction with at least two rated answers: chosen = the highest expected score,
rejected = the lowest (ties: the earlier answer). A pair is skipped, with the reason counted,
when the margin between them is below `min_margin`, when they are the same text, or when either
failed one of the named curation checks. Answers cut off at the token limit are not candidates
(unless asked), as they are left out of the other export formats. With `reviewed`, the chosen
answer must be one a reviewer accepted ("accepted") or did not reject ("not-rejected"); any
rated answer can still be the rejected one. An edited answer takes part as its latest revision.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .cleanup import normalized
from .respond import user_text
from .store import Store


@dataclass
class PreferencePair:
    source_id: int  # the conversation whose instruction both answer
    system: str | None
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def preference_pairs(store: Store, run_id: int, judge_run_id: int, *, min_margin: float = 0.0,
                     passing: list[str] | None = None, include_system: bool = True,
                     include_cut_off: bool = False,
                     reviewed: str | None = None) -> tuple[list[PreferencePair], Counter]:
    """(pairs in instruction order, {reason: instructions skipped}) of respond run `run_id`. Answers cut
    off at the token limit take no part unless `include_cut_off` (as in the other export formats)."""
    groups = store.answer_groups(run_id, judge_run_id)
    kept = [a["turn_id"] for answers in groups.values() for a in answers if a["status"] == "kept"]
    failed = store.failed_checks(kept, passing) if passing else {}
    pairs, skipped = [], Counter()
    for source_id, answers in groups.items():
        rated = [a for a in answers if a["status"] == "kept" and a["score"] is not None
                 and (include_cut_off or a["response_finish"] != "length")]
        if len(rated) < 2:
            skipped["fewer than 2 kept, rated answers" + ("" if include_cut_off else " not cut off")] += 1
            continue
        eligible = [a for a in rated if reviewed is None or (a["review"] == "accepted" if reviewed == "accepted"
                                                             else a["review"] != "rejected")]
        if not eligible:
            skipped[f"no answer a reviewer {'accepted' if reviewed == 'accepted' else 'did not reject'}"] += 1
            continue
        best = max(eligible, key=lambda a: (a["score"], -a["sample_index"]))
        worst = min(rated, key=lambda a: (a["score"], a["sample_index"]))
        check = failed.get(best["turn_id"]) or failed.get(worst["turn_id"])
        if best is worst or best["score"] - worst["score"] < min_margin:
            skipped[f"margin below {min_margin:g}"] += 1
        elif normalized(best["response"]) == normalized(worst["response"]):
            skipped["chosen and rejected are the same text"] += 1
        elif check:
            skipped[f"an answer failed the {check} check"] += 1
        else:
            pairs.append(PreferencePair(source_id, best["system_prompt"] if include_system else None,
                                        user_text(best["instruction"], best["input"]), best["response"],
                                        worst["response"], best["score"], worst["score"]))
    return pairs, skipped


def to_dpo(pair: PreferencePair) -> dict:
    """TRL's conversational preference format."""
    prompt = [{"role": "system", "content": pair.system}] if pair.system else []
    prompt.append({"role": "user", "content": pair.prompt})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}
