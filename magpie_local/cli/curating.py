"""Reading, curating, selecting and exporting the data: runs, show, stats, curate, select, export, report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from .. import api
from ..curate import Bounds
from ..export import FORMATS
from ..prompts import PromptError, language_code
from .common import (
    BACKEND_OPTION,
    DB_OPTION,
    EMBED_RUN_OPTION,
    MAX_REPEATS_OPTION,
    MIN_DISTANCE_OPTION,
    PASSING_OPTION,
    REVIEWED_OPTION,
    Fail,
    _histogram,
    _print_checks,
    _progress,
    app,
    err,
    out,
    safe,
)
from .passes import _print_ratings, _print_stats, _print_tags


@app.command()
def runs(db: Path = DB_OPTION):
    """List the runs in --db with their counts and status (for scoring runs: pairs scored)."""
    table = Table("id", "kind", "status", "pairs", "target", "dropped", "tokens", "tok/s", "model", "backend",
                  "created")
    for column in table.columns:
        column.no_wrap = True
    for r in api.runs(db):
        table.add_row(str(r.id), safe(r.kind), "complete" if r.complete else "incomplete", str(r.held),
                      str(r.target), str(r.dropped), str(r.tokens), "-" if r.rate is None else f"{r.rate:.1f}",
                      safe(r.model or "-"), safe(r.backend or "-"), safe(r.created))
    out.print(table)


@app.command()
def show(db: Path = DB_OPTION, run: int | None = typer.Option(None, help="Run id (default: the latest)."),
         limit: int = typer.Option(3, help="How many conversations to print."),
         dropped: bool = typer.Option(False, "--dropped", help="Show dropped items, with their reasons.")):
    """Print a few stored conversations (system prompt, then each turn)."""
    shown = api.show(db, run, limit=limit, dropped=dropped)
    for conv in shown.conversations:
        reason = conv["drop_reason"]
        out.rule(f"run {shown.run_id} · item {conv['item_index']}" + (f" · dropped: {safe(reason)}" if reason else ""))
        # Stored text is data: inert and escaped, or "[/INST]" would be read as markup, ESC as a command.
        if conv["system_prompt"]:
            out.print(f"[bold]System ({safe(conv['system_name'] or 'custom')}):[/bold] ",
                      _shown(conv["system_prompt"]), highlight=False)
        for t in conv["turns"]:
            instruction = t["instruction"] if t["instruction"] or not dropped else t["raw_instruction"] or ""
            out.print("[bold]User:[/bold] ", _shown(instruction), highlight=False)
            if t["instruction_cleanup"]:
                out.print(f"[dim]  (clean-up: {safe(t['instruction_cleanup'])})[/dim]", highlight=False)
            if t["response"]:
                out.print("[bold]Assistant:[/bold] ", _shown(t["response"]), highlight=False)
    if not shown.conversations:
        err.print(f"run {shown.run_id} has no {'dropped' if dropped else 'kept'} items")


SHOW_CHARS = 10_000  # of one text; a longer one is cut, with how much more there is


def _shown(text: str) -> str:
    more = len(text) - SHOW_CHARS
    return safe(text[:SHOW_CHARS]) + (f"[dim] ... ({more} more characters; export or review to read them)[/dim]"
                                      if more > 0 else "")


@app.command()
def stats(db: Path = DB_OPTION,
          score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest).")):
    """Print what the database holds: each run's kept and dropped items with the drop reasons, response
    lengths, curation-check counts, the IFD distribution of a scoring run, and the latest tags."""
    found = api.stats(db, score_run)
    _print_data_stats(found)
    for summary, render in ((found.ifd, _print_stats), (found.tags, _print_tags), (found.ratings, _print_ratings)):
        if summary is not None:
            render(summary)


def _print_data_stats(found: api.Stats) -> None:
    table = Table("run", "kind", "model", "kept", "dropped", "drop reasons", title="Data")
    for r in found.runs:
        reasons = ", ".join(f"{n} {why}" for why, n in r.drop_reasons.items()) or "-"
        table.add_row(str(r.run.id), r.run.kind, safe(r.run.model or "-"), str(r.kept + r.pending), str(r.dropped),
                      safe(reasons))
    out.print(table)
    lengths = np.array(found.response_lengths, dtype=float)
    cut = found.cut_off
    table = Table(title="Response length (characters), kept turns", show_header=False)
    q = np.quantile(lengths, [0.1, 0.5, 0.9])
    table.add_row("turns", f"{len(lengths)} ({cut} cut off at max tokens)")
    table.add_row("p10 median p90", f"{q[0]:.0f}  {q[1]:.0f}  {q[2]:.0f}")
    _histogram(table, lengths, bins=np.unique(np.geomspace(max(lengths.min(), 1), max(lengths.max(), 2), 9).round()),
               label="{lo:6.0f}-{hi:<6.0f}")
    out.print(table)
    if found.checks:
        _print_checks(found.checks, "Curation checks")


@app.command()
def curate(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Check these runs' pairs (default: every run's)."),
    min_chars: int = typer.Option(1, help="Shortest instruction or response that passes `length`."),
    max_chars: int = typer.Option(20_000, help="Longest instruction or response that passes `length`."),
    max_repetition: float = typer.Option(0.3, help="Largest share of repeated word 4-grams in a response."),
    language: str | None = typer.Option(None, help="Also check that each pair is in this language (e.g. en)."),
    near_dup_model: str | None = typer.Option(None, "--near-dup-model", help="Also find near-duplicate "
                                              "instructions with this model's embeddings ('default': "
                                              "the embedded model; 'minilm': a sentence-embedding model, "
                                              "with --near-dup-threshold 0.75)."),
    near_dup_threshold: float = typer.Option(0.95, help="Cosine similarity from which an instruction is a "
                                             "near-duplicate of an earlier one."),
    against: list[Path] = typer.Option(None, "--against", help="Also flag pairs that share a 13-word sequence "
                                       "with a prompt of this eval set (JSON, JSON Lines, CSV or Parquet; "
                                       "repeat for several). Later runs of curate check against the same files."),
    against_cosine: float = typer.Option(0.95, help="With --against and an embedding run of the instructions: "
                                         "an instruction at least this close to an eval prompt (cosine, by that "
                                         "run's model) is a near paraphrase of it."),
    backend_choice: str = BACKEND_OPTION,
):
    """Run the curation checks (length, cut_off, repetition, refusal, disclaimer, pii, secrets,
    duplicate; language with --language; contamination with --against) on every kept turn and store
    each verdict with its reason; `select --passing` and `export --passing` then combine them."""
    try:
        code = language_code(language) if language else None
    except PromptError as e:
        raise Fail(str(e)) from None
    bounds = Bounds(min_chars=min_chars, max_chars=max_chars, max_repetition=max_repetition, language=code)
    bar, task = _progress(quiet=False), None

    def embedded(k: int) -> None:  # near-duplicate search only
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("Embedding", total=None, rate="", unit="pairs")
        bar.update(task, advance=k)

    try:
        api.curate(db, runs=run or None, bounds=bounds, near_dup_model=near_dup_model,
                   near_dup_threshold=near_dup_threshold, against=against or None, against_cosine=against_cosine,
                   backend=backend_choice,
                   progress=api.Progress(item=embedded),
                   announce=err.print)
    finally:
        bar.stop()
    turns, counts = api.check_counts(db, run or None)
    _print_checks(counts, f"Curation checks, {turns} turns")


@app.command("select")
def select_(
    db: Path = DB_OPTION,
    name: str = typer.Option("selected", help="Name of the selection (replaced if it exists)."),
    score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest)."),
    top: str | None = typer.Option(None, help="Keep the highest-IFD share, e.g. 10%."),
    top_k: int | None = typer.Option(None, help="Keep the K highest-IFD pairs."),
    min_ifd: float | None = typer.Option(None, help="Keep pairs with IFD at least this."),
    max_ifd: float | None = typer.Option(None, help="Keep pairs with IFD at most this."),
    keep_above_1: bool = typer.Option(False, "--keep-above-1", help="Do not exclude IFD > 1 (misaligned pairs)."),
    passing: str | None = PASSING_OPTION,
    tag_filters: list[str] = typer.Option([], "--tag", help="Only pairs whose tag has one of these values, e.g. "
                                          "'difficulty=hard,very hard' or 'task_category=Math' (repeatable; "
                                          "from the latest tagging run)."),
    min_judge: float | None = typer.Option(None, "--min-judge", help="Only pairs the judge rated at least this "
                                           "(1-5; the latest judging run, or --judge-run)."),
    judge_run: int | None = typer.Option(None, "--judge-run", help="Judging run for --min-judge."),
    min_distance: float | None = MIN_DISTANCE_OPTION,
    max_repeats: int | None = MAX_REPEATS_OPTION,
    embed_run: int | None = EMBED_RUN_OPTION,
    diverse: int | None = typer.Option(None, "--diverse", help="Then keep the K pairs that best cover the rest: "
                                       "IFD-weighted facility location over the embeddings (docs/curation.md)."),
    neighbours: int | None = typer.Option(None, "--neighbours", help="--diverse: similarities kept per pair "
                                          "(default 32; more is slower and nearer the exact objective)."),
    clusters: int | None = typer.Option(None, "--clusters", help="With --per-cluster: k-means the candidates' "
                                        "embeddings into C clusters (Cherry's recipe) ..."),
    per_cluster: int | None = typer.Option(None, "--per-cluster", help="... and keep the N highest-IFD of each."),
    balance: str | None = typer.Option(None, "--balance", help="A tag field (task_category, input_quality, "
                                       "difficulty): the --top/--top-k size in equal shares per value."),
    reviewed: str | None = REVIEWED_OPTION,
    seed: int = typer.Option(0, help="Seed of the k-means start (--clusters)."),
):
    """Mark pairs chosen by IFD, curation checks and tags as a named selection (IFD > 1 is excluded unless asked)."""
    fraction = None
    if top is not None:
        try:
            fraction = float(top.rstrip("%")) / (100 if top.endswith("%") else 1)
        except ValueError:
            raise Fail(f"--top takes a share such as 10% or 0.1, not {top!r}") from None
    tags = [(column.strip(), [v.strip() for v in values.split(",") if v.strip()])
            for column, _, values in (spec.partition("=") for spec in tag_filters)]
    chosen = api.select(db, name, score_run=score_run, top=fraction, top_k=top_k, min_ifd=min_ifd, max_ifd=max_ifd,
                        keep_above_1=keep_above_1, passing=passing, tags=tags, min_judge=min_judge,
                        judge_run=judge_run, min_distance=min_distance, max_repeats=max_repeats, embed_run=embed_run,
                        diverse=diverse, neighbours=neighbours, clusters=clusters, per_cluster=per_cluster,
                        balance=balance, reviewed=reviewed, seed=seed)
    span = f", IFD {chosen.ifd_range[0]:.3f} to {chosen.ifd_range[1]:.3f}" if chosen.ifd_range else ""
    out.print(f"Selection {name!r}: {len(chosen.turn_ids)} of {chosen.eligible} eligible pairs from scoring run "
              f"{chosen.score_run}{span}.", highlight=False)


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing)."),
    db: Path = DB_OPTION,
    fmt: str = typer.Option("messages", "--format", "-f", help=f"One of: {', '.join(FORMATS)}."),
    selection: str | None = typer.Option(None, help="Export this selection (default: every kept conversation)."),
    run: list[int] = typer.Option(None, "--run", help="Only these runs."),
    split_share: float | None = typer.Option(None, "--split", help="Train share, e.g. 0.95: writes train and valid "
                                             "files (the names mlx-lm expects)."),
    seed: int = typer.Option(0, help="Seed of the train/valid shuffle."),
    include_cut_off: bool = typer.Option(False, "--include-cut-off",
                                         help="Also export conversations whose response hit max tokens."),
    no_system: bool = typer.Option(False, "--no-system", help="Leave the system prompts out."),
    passing: str | None = PASSING_OPTION,
    min_judge: float | None = typer.Option(None, "--min-judge", help="Only conversations whose every turn the "
                                           "judge rated at least this (1-5)."),
    judge_run: int | None = typer.Option(None, "--judge-run", help="Judging run for --min-judge and --format dpo "
                                         "(default: the latest)."),
    min_margin: float = typer.Option(0.5, "--min-margin", help="--format dpo: skip pairs whose chosen and rejected "
                                     "scores differ by less."),
    min_distance: float | None = MIN_DISTANCE_OPTION,
    max_repeats: int | None = MAX_REPEATS_OPTION,
    embed_run: int | None = EMBED_RUN_OPTION,
    reviewed: str | None = REVIEWED_OPTION,
    redact: bool = typer.Option(False, "--redact", help="Replace personal data and secrets (e-mail, phone, IP, "
                                "card, IBAN, national id, API key, private key, URL password) with typed "
                                "placeholders such as <EMAIL>, instead of leaving those pairs out."),
    force: bool = typer.Option(False, "--force", help="Replace files of an earlier export in --out."),
):
    """Write stored conversations as training files, with a dataset card (README.md) beside them;
    --format dpo writes preference pairs from `respond --responses K` runs rated by `judge`."""
    done = api.export(db, out, format=fmt, selection=selection, runs=run or None, split=split_share, seed=seed,
                      include_cut_off=include_cut_off, include_system=not no_system, passing=passing,
                      min_judge=min_judge, judge_run=judge_run, min_margin=min_margin, min_distance=min_distance,
                      max_repeats=max_repeats, embed_run=embed_run, reviewed=reviewed, redact=redact,
                      force=force)
    left = ", ".join(f"{n} {why}" for why, n in done.left_out.items()) or "none"
    if done.redacted is not None:
        left += "; redacted: " + (", ".join(f"{n} {kind}" for kind, n in done.redacted.items()) or "nothing found")
    files = ", ".join(f"{name} {n}" for name, n in done.files.items())
    unit = "preference pairs" if fmt == "dpo" else "conversations"
    err.print(f"Exported {done.conversations} {unit} ({fmt}) to {out}: {files}; "
              f"{'skipped' if fmt == 'dpo' else 'left out'}: {left}. Dataset card: {done.card}",
              soft_wrap=True, highlight=False)


@app.command()
def report(
    out_file: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    db: Path = DB_OPTION,
    score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest, if any)."),
    sample: int = typer.Option(50, help="How many pairs the page shows."),
    seed: int = typer.Option(0, help="Seed of the sample."),
):
    """Write one self-contained HTML page: runs, IFD / judge / neighbour / length / tag distributions, a
    sample of pairs."""
    size = api.report(db, out_file, score_run=score_run, sample=sample, seed=seed)
    err.print(f"Wrote {out_file} ({size // 1024} KiB); open it in a browser.", highlight=False)
