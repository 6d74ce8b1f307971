"""Resumable passes of a model over the stored pairs: score, tag, judge, embed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from .. import api, tagging
from ..backends import ServerOptions
from .common import (
    API_KEY_ENV_OPTION,
    BACKEND_OPTION,
    DB_OPTION,
    ENDPOINT_OPTION,
    MODEL_HELP,
    SERVED_MODEL_OPTION,
    TOKENIZER_OPTION,
    Fail,
    _histogram,
    _PassBar,
    app,
    err,
    out,
    safe,
)


@app.command()
def score(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Score these runs' pairs (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Scorer: " + MODEL_HELP + " "
                                     "A small scorer for a big generator's data is Superfiltering."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    weights: str = typer.Option("auto", help="llama.cpp: file (score on the model file as it is), f16, bf16 or "
                                "q8_0 (a copy, made once in the cache), or auto: on a CPU, whichever of them "
                                "measured fastest here for prompts and stays close to the file (`doctor`)."),
    prompt_format: str = typer.Option("chat", help="chat (the scorer's template) or alpaca (the Cherry reference)."),
    max_length: int = typer.Option(512, help="Tokens of context + answer scored at most (the reference's 512)."),
    batch_size: int = typer.Option(16, help="Pairs scored and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score stored pairs by IFD (Instruction-Following Difficulty); resumable like generate."""
    with _PassBar("Scoring", "scores", quiet) as bar:
        scored = api.score(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                           server=ServerOptions(tuple(endpoint), api_key_env, served_model), parallel=parallel,
                           weights=weights, prompt_format=prompt_format, max_length=max_length,
                           batch_size=batch_size, progress=bar.callbacks(), announce=err.print)
    _print_stats(api.ifd_summary(db, scored.id))


def _print_stats(found: api.IFDSummary) -> None:
    ifd = np.array(found.ifd, dtype=float)
    table = Table(title=f"IFD, scoring run {found.run.id}", show_header=False)
    table.add_row("pairs scored", f"{len(ifd)} (truncated {found.truncated}, skipped {sum(found.skipped.values())})")
    for reason, count in found.skipped.most_common():
        table.add_row("  skipped", f"{count}: {safe(reason)}")
    if len(ifd):
        q = np.quantile(ifd, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
        table.add_row("mean ± sd", f"{ifd.mean():.3f} ± {ifd.std():.3f}")
        table.add_row("min p10 p25", f"{q[0]:.3f}  {q[1]:.3f}  {q[2]:.3f}")
        table.add_row("median", f"{q[3]:.3f}")
        table.add_row("p75 p90 max", f"{q[4]:.3f}  {q[5]:.3f}  {q[6]:.3f}")
        table.add_row("IFD > 1", f"{(ifd > 1).sum()} ({(ifd > 1).mean():.1%}): the instruction does not help")
        _histogram(table, ifd, bins=10)
    out.print(table)


@app.command()
def tag(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Tag these runs' pairs (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Judge: " + MODEL_HELP),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    method: str = typer.Option("auto", help="grammar (answers sampled as JSON under llama.cpp's grammar sampler), "
                               "likelihood (closed questions read from next-token probabilities: any backend that "
                               "scores), or auto: likelihood, the more accurate where measured (docs/curation.md)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together (default: up to 32)."),
    batch_size: int = typer.Option(16, help="Pairs tagged and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Tag each stored instruction with task category, input quality and difficulty, the local
    model acting as judge. Resumable like score."""
    with _PassBar("Tagging", "tags", quiet) as bar:
        tagged = api.tag(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                         server=ServerOptions(tuple(endpoint), api_key_env, served_model), method=method,
                         parallel=parallel, batch_size=batch_size, progress=bar.callbacks(), announce=err.print)
    _print_tags(api.tag_summary(db, tagged.id))


def _print_tags(found: api.TagSummary) -> None:
    """Distributions of each tag in a tagging run, as bars."""
    method = found.run.config.get("method", "grammar")
    table = Table(title=f"Tags, tagging run {found.run.id} (by {method}; {found.failed} failed answers)",
                  show_header=False)
    for column, values in tagging.FIELDS.items():
        counts = found.counts[column]
        top = max(counts.values(), default=1)
        table.add_row(f"[bold]{column}[/bold]", "")
        for value in values:
            n = counts.get(value, 0)
            table.add_row(f"  {safe(value)}", "█" * round(30 * n / top) + f" {n}")
    out.print(table)


@app.command()
def judge(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Rate these runs' responses (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="The judge: " + MODEL_HELP + " A judge is only "
                                     "worth its accuracy: the default 135M model is near chance (docs/curation.md)."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    template: str = typer.Option("auto", help="The judge's chat template, as for generate (for models without one)."),
    rubric: Path | None = typer.Option(None, help="A rubric text file holding {instruction} and {response}, asking "
                                       "for a score from 1 to 5 (default: helpfulness, correctness, instruction "
                                       "following)."),
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    weights: str = typer.Option("auto", help="llama.cpp weight copy, as for score."),
    batch_size: int = typer.Option(16, help="Responses rated and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Rate every stored response from 1 to 5 with a local model as judge, read from its next-token
    probabilities over the scores (expected score and distribution). Resumable like score."""
    try:
        text = rubric.read_text(encoding="utf-8") if rubric else None
    except (OSError, UnicodeDecodeError) as e:
        raise Fail(f"cannot read the rubric {rubric}: {getattr(e, 'strerror', None) or e}") from None
    with _PassBar("Judging", "ratings", quiet) as bar:
        judged = api.judge(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                           server=ServerOptions(tuple(endpoint), api_key_env, served_model), weights=weights,
                           template=template, rubric=text, parallel=parallel, batch_size=batch_size,
                           progress=bar.callbacks(), announce=err.print)
    _print_ratings(api.rating_summary(db, judged.id))
    if model is None:
        err.print("Note: the default 135M judge ranks a right answer above a wrong one barely better than chance "
                  "(docs/curation.md, Judge accuracy); judge with a stronger --model before filtering on its "
                  "scores.", soft_wrap=True, highlight=False)


def _print_ratings(found: api.RatingSummary) -> None:
    scores = np.array(found.scores, dtype=float)
    table = Table(title=f"Judge scores, judging run {found.run.id} ({safe(found.run.model)})", show_header=False)
    table.add_row("responses rated", str(len(scores)))
    if len(scores):
        table.add_row("mean ± sd", f"{scores.mean():.2f} ± {scores.std():.2f}")
        _histogram(table, scores, bins=np.linspace(1, 5, 9))
    out.print(table)


@app.command()
def embed(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Embed these runs' turns (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Embedding model: 'minilm' (all-MiniLM-L6-v2, "
                                     "a sentence-embedding model: the `minilm` extra; use --radius 0.25 with it) or "
                                     + MODEL_HELP + " Mean-pooled final hidden states (llama.cpp's embedding mode; "
                                     "MLX the same)."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    text: str = typer.Option("instruction", help="instruction (the user's message) or pair (it and the response: "
                             "for respond runs, whose K answers share one instruction)."),
    max_tokens: int = typer.Option(256, help="Tokens of each text embedded at most."),
    radius: float | None = typer.Option(None, help="Cosine distance within which another turn counts as a repeat "
                                        "(default 0.05: cosine 0.95, the near-duplicate check's bound)."),
    batch_size: int = typer.Option(64, help="Turns embedded and committed together."),
    weights: str = typer.Option("auto", help="llama.cpp weight copy, as for score."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Store an embedding of every stored turn, then each turn's nearest neighbour, its distance and
    the turns within --radius (select --min-distance / --max-repeats), and its 32 most similar turns
    (select --diverse); resumable like score."""
    with _PassBar("Embedding", "embeddings", quiet) as bar:
        done = api.embed(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                         server=ServerOptions(tuple(endpoint), api_key_env, served_model), text=text,
                         max_tokens=max_tokens, radius=radius, batch_size=batch_size, weights=weights,
                         parallel=parallel, progress=bar.callbacks(), announce=err.print)
    median = f"{done.median_distance:.3f}" if done.median_distance is not None else "-"
    out.print(f"Embedding run {done.run.id}: {done.embedded} turns ({done.dim} dimensions, {safe(done.run.model)}); "
              f"{done.repeated} have another within cosine distance {done.radius:g}, {done.alone} do not; "
              f"median distance to the nearest: {median}.", highlight=False)
