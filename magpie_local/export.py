"""Export stored conversations as files that fine-tuning tools read, with a dataset card.

Formats (one JSON object per line, or Parquet):
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
            mlx-lm's LoRA trainer, TRL's SFTTrainer, Axolotl "chat_template", most tools
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
            LLaMA-Factory and Axolotl "sharegpt"
  alpaca    {"instruction", "input", "output"} (+ "system", and "history" [[user, assistant], ...]
            for earlier turns, as LLaMA-Factory reads them)
  parquet   the messages layout in a Parquet file (needs pyarrow: pip install 'magpie-local[parquet]')
  dpo       {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
            TRL's conversational preference format (DPOTrainer, ORPO, KTO's paired form), from a
            respond run's rated answers (preference.py)

Files are written only inside the output directory the user names, under fixed names, each
through a temporary file and a rename, so a killed export never leaves a half-written file.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ._version import __version__
from .cleanup import normalized
from .errors import MagpieError
from .files import make_folder, write_atomically, write_bytes
from .store import Store

FORMATS = ("messages", "sharegpt", "alpaca", "parquet", "dpo")


class ExportError(MagpieError, ValueError):
    pass


@dataclass
class Conversation:
    id: int
    run_id: int
    system: str | None
    turns: list[dict] = field(default_factory=list)  # instruction, input, response, response_finish, ifd

    def user_text(self, turn: dict) -> str:
        return f"{turn['instruction']}\n\n{turn['input']}" if turn.get("input") else turn["instruction"]


@dataclass
class Plan:
    """What an export writes, and what it left out and why."""

    conversations: list[Conversation]
    left_out: Counter
    runs: list[int]
    selection: str | None = None
    score_run: int | None = None
    passing: list[str] | None = None
    judge_run: int | None = None  # with min_judge: only conversations whose every turn it rated that high
    min_judge: float | None = None
    embed_run: int | None = None  # with min_distance / max_repeats: whose neighbour statistics
    min_distance: float | None = None
    max_repeats: int | None = None
    reviewed: str | None = None  # "accepted" / "not-rejected": whose every turn's latest review is
    edited: int = 0  # exported turns whose text is a reviewer's revision
    redacted: Counter | None = None  # with redact: the findings replaced by placeholders, by kind


def plan_export(store: Store, *, selection: str | None = None, runs: list[int] | None = None,
                include_cut_off: bool = False, include_system: bool = True, passing: list[str] | None = None,
                min_judge: float | None = None, judge_run: int | None = None, min_distance: float | None = None,
                max_repeats: int | None = None, embed_run: int | None = None, reviewed: str | None = None,
                redact: bool = False) -> Plan:
    """The kept conversations to export: a selection's, or every data run's; with `passing`, only
    conversations whose every turn passed those curation checks; with `min_judge`, only those whose
    every turn judging run `judge_run` rated at least that; with `min_distance` / `max_repeats`, only
    those whose every turn's neighbour statistics in embedding run `embed_run` meet them; with
    `reviewed`, only those whose every turn's latest review is "accepted" (or not "rejected"). An
    edited turn is exported as its latest revision; with `redact`, personal data and secrets in the
    exported turns are replaced by typed placeholders (sensitive.redact)."""
    score_run = None
    if selection is not None:
        score_run, size = store.selection_info(selection)
        if not size:
            raise ExportError(f"no selection named {selection!r} (make one with `magpie-local select`)")
    rows = store.export_rows(score_run_id=score_run, selection=selection, runs=runs, passing=passing,
                             min_judge=min_judge, judge_run_id=judge_run, min_distance=min_distance,
                             max_repeats=max_repeats, embed_run_id=embed_run, reviewed=reviewed)
    conversations: dict[int, Conversation] = {}
    for cid, run_id, system, instruction, input_, response, finish, ifd, edited in rows:
        conv = conversations.setdefault(cid, Conversation(cid, run_id, system if include_system else None))
        conv.turns.append(dict(instruction=instruction, input=input_ or "", response=response,
                               response_finish=finish, ifd=ifd, edited=bool(edited)))
    left_out: Counter = Counter()
    seen: set[str] = set()
    kept = []
    for conv in conversations.values():
        if not include_cut_off and any(t["response_finish"] == "length" for t in conv.turns):
            left_out["response cut off at max tokens"] += 1
            continue
        key = normalized(" ".join(conv.user_text(t) for t in conv.turns))
        if key in seen:  # the same instruction(s) in two runs (duplicates within a run were dropped already)
            left_out["duplicate instruction"] += 1
            continue
        seen.add(key)
        kept.append(conv)
    return Plan(kept, left_out, sorted({c.run_id for c in conversations.values()}), selection, score_run, passing,
                judge_run if min_judge is not None else None, min_judge, embed_run, min_distance, max_repeats,
                reviewed, sum(t["edited"] for c in kept for t in c.turns),
                redact_texts([t for c in kept for t in c.turns], ("instruction", "input", "response")) if redact
                else None)


def redact_texts(records: list[dict], keys: tuple[str, ...]) -> Counter:
    """Replace the personal data and secrets in each record's `keys` by typed placeholders, in place;
    how many of each kind were replaced."""
    from .sensitive import redact

    counts: Counter = Counter()
    for record in records:
        for key in keys:
            if record.get(key):
                record[key], found = redact(record[key])
                counts += found
    return counts


def to_messages(conv: Conversation) -> dict:
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    for t in conv.turns:
        messages += [{"role": "user", "content": conv.user_text(t)}, {"role": "assistant", "content": t["response"]}]
    return {"messages": messages}


def to_sharegpt(conv: Conversation) -> dict:
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": roles[m["role"]], "value": m["content"]}
                              for m in to_messages(conv)["messages"]]}


def to_alpaca(conv: Conversation) -> dict:
    *earlier, last = conv.turns
    record = {"instruction": last["instruction"], "input": last["input"], "output": last["response"]}
    if conv.system:
        record["system"] = conv.system
    if earlier:
        record["history"] = [[conv.user_text(t), t["response"]] for t in earlier]
    return record


def split_train_valid(conversations: list[Conversation], train_share: float | None, seed: int) -> dict[str, list]:
    """{file stem: conversations}: all in `data`, or a seeded shuffle into `train` and `valid`."""
    if train_share is None:
        return {"data": conversations}
    order = list(conversations)
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(order) * (1 - train_share))) if len(order) > 1 else 0
    return {"train": order[n_valid:], "valid": order[:n_valid]}


def file_counts(parts: dict[str, list], fmt: str) -> dict[str, int]:
    suffix = ".parquet" if fmt == "parquet" else ".jsonl"
    return {f"{stem}{suffix}": len(conversations) for stem, conversations in parts.items()}


def write_files(out: Path, fmt: str, parts: dict[str, list], card: str, *, force: bool = False) -> None:
    """Write each part and the dataset card into `out` (created if missing, never outside it)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ExportError("--format parquet needs pyarrow: pip install 'magpie-local[parquet]'") from None
    names = [*file_counts(parts, fmt), "README.md"]
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if not out.parent.is_dir():
        raise ExportError(f"cannot create {out}: directory {out.parent} does not exist")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise ExportError(f"{out} already holds {', '.join(existing)}; use --force to replace them")
    make_folder(out)
    from .preference import to_dpo

    convert = {"messages": to_messages, "sharegpt": to_sharegpt, "alpaca": to_alpaca, "parquet": to_messages,
               "dpo": to_dpo}[fmt]
    for (name, _), conversations in zip(file_counts(parts, fmt).items(), parts.values()):
        records = [convert(c) for c in conversations]
        if fmt == "parquet":
            table = pa.Table.from_pylist(records)
            write_atomically(out / name, lambda f, t=table: pq.write_table(t, f))
        else:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
            write_bytes(out / name, lines)
    write_bytes(out / "README.md", card.encode())


def _card_head(title: str, fmt: str, counts: dict[str, int], unit: str) -> list[str]:
    lines = ["---", "task_categories:", "- text-generation", "tags:", "- synthetic", "- magpie", "---", "",
             f"# {title} (magpie-local)", "",
             f"Exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by magpie-local {__version__}, "
             f"format `{fmt}`.", "", f"| file | {unit} |", "|---|---|"]
    return lines + [f"| `{name}` | {n} |" for name, n in counts.items()]


MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|~])")  # what acts inside a line (an intraword _ does not)


def md(text) -> str:
    """Text for the dataset card's Markdown, inert: HTML characters as entities, Markdown punctuation
    escaped, one line (model and file names are chosen by whoever made the file)."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def code(text) -> str:
    """Text as one Markdown code span, whatever backticks it holds (shown literally, never as HTML)."""
    text = " ".join(str(text).split())
    if "`" not in text:
        return f"`{text}`"
    fence = "`" * (max(len(run) for run in re.findall("`+", text)) + 1)
    return f"{fence} {text} {fence}"  # the spaces keep a backtick at either end apart from the fence


LICENSE = ["", "## License", "", "Generated text is subject to the license and terms of use of the generator "
           "model; imported data keeps its own license.", ""]


def judge_line(store: Store, judge_run_id: int) -> str:
    run = store.get_run(judge_run_id)
    return (f"Judge: **{md(run.model)}** (sha256 `{run.model_sha256}`, judging run {judge_run_id}), rubric sha256 "
            f"`{run.config.get('rubric_sha256')}`, scale {'-'.join(run.config.get('scale', [])[::4])}; "
            "the score is the expected value of the judge's next-token distribution over the scale")


def preference_card(store: Store, runs: list[int], judge_run_id: int, pairs: list, skipped: Counter,
                    counts: dict[str, int], min_margin: float, passing: list[str] | None,
                    reviewed: str | None = None, redacted: Counter | None = None) -> str:
    """README.md for exported preference pairs: their sources, the judge, the margins and what was skipped."""
    lines = _card_head("Synthetic preference data", "dpo", counts, "pairs") + ["", "## Sources", ""]
    for run_id in runs:
        run = store.get_run(run_id)
        r = run.config.get("respond", {})
        lines.append(f"- Run {run_id}: {r.get('responses')} answers per instruction of run "
                     f"{run.config.get('source_run')} by **{md(run.model)}** (sha256 `{run.model_sha256}`, backend "
                     f"{md(run.backend)}), sampling {json.dumps(r.get('sampling'))}, seed {r.get('seed')}")
    lines += ["", "## Pairs", "", f"- {judge_line(store, judge_run_id)}",
              f"- Chosen: the answer with the highest score; rejected: the lowest; minimum margin {min_margin:g}"]
    if passing:
        lines.append(f"- Both answers passed the curation checks {', '.join(passing)}")
    margins = [p.margin for p in pairs]
    if margins:
        lines.append(f"- Margin (chosen - rejected score): mean {statistics.fmean(margins):.3f}, median "
                     f"{statistics.median(margins):.3f}, min {min(margins):.3f}, max {max(margins):.3f} "
                     f"(n={len(margins)})")
    lines += contamination_lines(store, passing)
    lines += sensitive_lines(store, passing, redacted)
    lines += review_lines(store, runs, reviewed, 0)
    lines += [f"- Skipped: {n} instructions ({md(reason)})" for reason, n in skipped.items()]
    return "\n".join(lines + LICENSE)


def dataset_card(store: Store, plan: Plan, fmt: str, counts: dict[str, int]) -> str:
    """README.md for the exported data: where every pair came from and what was done to it."""
    lines = _card_head("Synthetic instruction data", fmt, counts, "conversations") + ["", "## Sources", ""]
    for run_id in plan.runs:
        run = store.get_run(run_id)
        c = store.run_counts(run_id)
        if run.kind == "respond":
            r = run.config.get("respond", {})
            lines.append(f"- Run {run_id}: answers to the instructions of run {run.config.get('source_run')} by "
                         f"**{md(run.model)}** (sha256 `{run.model_sha256}`, backend {md(run.backend)}), "
                         f"{r.get('responses')} per instruction, sampling {json.dumps(r.get('sampling'))}, "
                         f"seed {r.get('seed')}; {c['kept']} kept, {c['dropped']} dropped")
            continue
        if run.kind == "import":
            lines.append(f"- Run {run_id}: imported from {code(run.config.get('file'))} "
                         f"(sha256 `{run.config.get('sha256')}`), {c['kept']} conversations.")
            continue
        s = run.config.get("settings", {})
        drops = ", ".join(f"{n} {md(r)}" for r, n in store.drop_reasons(run_id).items()) or "none"
        systems = ", ".join(sorted({md(p.get("name", "?")) for p in s.get("system_prompts", [])})) or "none"
        lines += [f"- Run {run_id}: Magpie generation with **{md(run.model)}** (sha256 `{run.model_sha256}`, "
                  f"backend {md(run.backend)})",
                  f"  - template: {md(run.config.get('template_origin', 'model'))}, "
                  f"pre-query {code(json.dumps(run.config.get('pre_query', ''))[1:-1])}",
                  f"  - instruction sampling {json.dumps(s.get('instruction'))}, response sampling "
                  f"{json.dumps(s.get('response'))}, seed {s.get('seed')}, turns {s.get('turns', 1)}",
                  f"  - system prompts: {systems}; language: {md(s.get('language') or 'not set')}",
                  f"  - {c['kept']} kept, {c['dropped']} dropped at generation ({drops})",
                  f"  - {verified_line(store, run_id)}"]
    lines += ["", "## Curation", ""]
    if plan.selection:
        lines.append(f"- Selection {code(plan.selection)}" + (f" from scoring run {plan.score_run}" if plan.score_run
                                                           else ""))
        if definition := store.selection_definition(plan.selection):
            lines.append(f"- Selected with: {code(json.dumps(definition, sort_keys=True))}")
        if plan.score_run:
            srun = store.get_run(plan.score_run)
            lines.append(f"- IFD scorer: **{md(srun.model)}** (sha256 `{srun.model_sha256}`), prompt format "
                         f"{srun.config.get('prompt_format')}, max length {srun.config.get('max_length')}")
    if plan.passing:
        lines.append(f"- Only conversations whose every turn passed the curation checks {', '.join(plan.passing)} "
                     f"(`magpie-local curate`, settings {', '.join(code(c) for c in store.check_settings())})")
    ifds = [t["ifd"] for c in plan.conversations for t in c.turns if t["ifd"] is not None]
    if ifds:
        lines.append(f"- IFD of the exported turns: mean {statistics.fmean(ifds):.3f}, median "
                     f"{statistics.median(ifds):.3f}, min {min(ifds):.3f}, max {max(ifds):.3f} (n={len(ifds)})")
    tag_run = store.latest_run("tag")
    if tag_run is not None:
        ids = [c.id for c in plan.conversations]
        for column in ("task_category", "input_quality", "difficulty"):
            counts = store.tag_value_counts(tag_run.id, column, ids)
            if counts:
                lines.append(f"- {column.replace('_', ' ').capitalize()} (tagging run {tag_run.id}, judge "
                             f"{md(tag_run.config.get('judge'))}): " + ", ".join(f"{md(v)} {n}" for v, n in counts))
    if plan.judge_run:
        lines.append(f"- Every turn rated at least {plan.min_judge:g}. {judge_line(store, plan.judge_run)}")
    if plan.embed_run:
        erun = store.get_run(plan.embed_run)
        wanted = ([f"nearest neighbour at least {plan.min_distance:g} away"] if plan.min_distance is not None else []) \
            + ([f"at most {plan.max_repeats} others within the radius"] if plan.max_repeats is not None else [])
        lines.append(f"- Every turn's {' and '.join(wanted)} (embedding run {plan.embed_run}, embedder "
                     f"{md(erun.config.get('embedder'))}, cosine distance)")
    lines += contamination_lines(store, plan.passing)
    lines += sensitive_lines(store, plan.passing, plan.redacted)
    lines += review_lines(store, plan.runs, plan.reviewed, plan.edited)
    for reason, n in plan.left_out.items():
        lines.append(f"- Left out at export: {n} ({md(reason)})")
    return "\n".join(lines + LICENSE)


def verified_line(store: Store, run_id: int) -> str:
    """The latest `magpie-local verify` of a generation run, in the card's words."""
    found = store.latest_verification(run_id)
    if found is None:
        return "not verified (`magpie-local verify` makes items again from their seeds and compares them)"
    made = len(found["items"])
    line = (f"verified {found['checked_at'][:10]}: {found['identical']} of {made} randomly chosen items made again "
            f"from their seeds came out byte for byte the same ({md(found['engine'].get('words', ''))})")
    return line + (f"; {made - found['identical']} did NOT" if found["identical"] < made else "")


def contamination_lines(store: Store, passing: list[str] | None) -> list[str]:
    """The card's account of the eval-contamination check (`curate --against`): each eval set by file
    name and sha256, its prompts, the pairs it flagged, and whether this export left them out."""
    settings = store.check_settings("contamination")
    if not settings:
        return ["- Not checked for eval contamination (`magpie-local curate --against EVAL_FILE`)"]
    found = json.loads(settings[0])
    sets = "; ".join(f"{md(s['file'])} (sha256 `{s['sha256']}`, {s['prompts']} prompts): {s['flagged']} pairs flagged"
                     for s in found["against"])
    excluded = ("flagged pairs are left out" if passing and "contamination" in passing
                else "flagged pairs are not left out (`--passing contamination` would)")
    embedded = (f", or an instruction at cosine {found['cosine']:g} or more to a prompt (embedding run "
                f"{found['embed_run']}'s model)" if found.get("embed_run") else "")
    return [f"- Checked for eval contamination (a shared sequence of {found['ngram']} normalised words, or a whole "
            f"prompt of {found['min_words']}+ words{embedded}): {sets}; {excluded}"]


def sensitive_lines(store: Store, passing: list[str] | None, redacted: Counter | None) -> list[str]:
    """The card's account of personal data and secrets: what `--redact` replaced, kind by kind, and
    what the pii and secrets checks (`curate`) flagged in the database."""
    from .sensitive import PII_KINDS, SECRET_KINDS, Finding

    lines = []
    if redacted is not None:
        found = ", ".join(f"{redacted[k]} {k} (`{Finding(k, 0, 0).placeholder}`)" for k in (*PII_KINDS, *SECRET_KINDS)
                          if redacted[k]) or "none found"
        lines.append(f"- Personal data and secrets replaced by typed placeholders (`--redact`): {found}")
    counts = store.check_counts()
    checked = [c for c in ("pii", "secrets") if c in counts]
    if not checked:
        return lines or ["- Not checked for personal data or secrets (`magpie-local curate`; `export --redact` "
                         "replaces them)"]
    flagged = ", ".join(f"{c} {counts[c][1]} of {sum(counts[c])} turns" for c in checked)
    left_out = [c for c in checked if passing and c in passing]
    what = ("in this export their findings are replaced" if redacted is not None else
            f"flagged pairs are left out ({', '.join(left_out)})" if left_out else
            "flagged pairs are not left out (`--passing pii,secrets` would, or `--redact` replaces them)")
    return lines + [f"- Checked for personal data and secrets (`magpie-local curate`): flagged {flagged}; {what}"]


REVIEWED_MEANS = {"accepted": "only pairs a reviewer accepted",
                  "not-rejected": "every pair but those a reviewer rejected"}


def review_lines(store: Store, runs: list[int], reviewed: str | None, edited: int) -> list[str]:
    """The card's account of the human review of these runs' pairs (magpie-local review)."""
    counts = store.review_counts(runs=runs)
    decided = sum(counts.get(s, 0) for s in ("accepted", "rejected", "flagged"))
    if not decided and not counts["edited"] and not reviewed:
        return ["- Not reviewed by hand"]
    lines = [f"- Reviewed by hand (`magpie-local review`): {decided} of the source runs' pairs, "
             f"{counts.get('accepted', 0)} accepted, {counts.get('rejected', 0)} rejected, "
             f"{counts.get('flagged', 0)} flagged; {counts['edited']} edited"]
    if reviewed:
        lines.append(f"- Exported: {REVIEWED_MEANS[reviewed]} (`--reviewed {reviewed}`)")
    if edited:
        lines.append(f"- {edited} exported turns are a reviewer's revision (the latest); the generated text is kept "
                     "in the database")
    return lines
