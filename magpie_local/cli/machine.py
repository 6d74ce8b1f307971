"""The machine and the models: doctor, models list/convert, templates list/show/detect."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .. import api, registry
from ..convert import KINDS as WEIGHT_TYPES
from ..models import resolve_model
from ..prompts import task_prompt
from ..templates import chat_format_for
from .common import BACKEND_OPTION, Fail, app, err, models_app, out, safe, templates_app


@app.command()
def doctor(
    model: str | None = typer.Argument(None, help="GGUF file or model name (default: the embedded model)."),
    check: str | None = typer.Option(None, "--model", "-m", help="Check a model on its first run: engine, template, "
                                     "a few pairs made for real, what is wrong with its template if anything, "
                                     "and the time `generate -n 1000` takes here (any name `models list` shows)."),
    backend_choice: str = BACKEND_OPTION,
    template: str = typer.Option("auto", help="--model: the chat template to check, as for generate."),
    samples: int = typer.Option(8, help="--model: how many pairs to make."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure again instead of reading the cache."),
    build_check: bool = typer.Option(False, "--build-check", help="Measure afresh and exit 3 if llama.cpp crashed "
                                     "on any weight type (`make install` runs this after building)."),
):
    """Print this machine's CPU and llama.cpp build, and what `--weights auto` runs a model on here:
    the file and each copy measured (prompt and generation-step speed, drift from the file), and why
    each was or was not chosen. With --model, first check that model: the engine, its template, a
    few pairs, and plainly what is wrong if the template is (exit code 1)."""
    from ..tune import DRIFT_MAX, DRIFT_MEAN, MARGIN, ROWS, build_features

    here = api.machine_info()
    out.print(f"CPU: {here['cpu']}, {here['cores']} cores", highlight=False)
    out.print(f"llama.cpp {here['llama_cpp']}, built for: {' '.join(build_features(here['build'])) or 'no extensions'}",
              highlight=False)
    if check:
        found = api.check_model(check, backend=backend_choice, template=template, samples=samples,
                                announce=err.print)
        _print_check(found)
        if found.problems:  # no use measuring the weights of a model that does not make data
            raise typer.Exit(1)
    diagnosis = api.doctor(model or check, remeasure=remeasure or build_check, announce=err.print)
    choice = diagnosis.choice
    if choice is None:
        out.print(f"--weights auto runs {safe(diagnosis.model.name)} as it is: {diagnosis.skipped}", highlight=False)
        return
    when = "cached" if choice.cached else "measured now"
    table = Table("weights", "size", "prompt tok/s", f"{ROWS}-row step tok/s", "drift mean / max", "verdict",
                  title=f"--weights auto for {safe(diagnosis.model.name)} ({when}, {choice.seconds:.1f} s)")
    for m in choice.measured:
        verdict = m.failure or ", ".join(f"chosen for {w}" for w, k in (("prompts", choice.prompt),
                                                                         ("steps", choice.step)) if k == m.kind) or "ok"
        drift = "-" if m.drift_mean is None else f"{m.drift_mean:.3f} / {m.drift_max:.2f}"
        speed = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        table.add_row(m.kind, f"{m.size / 2**20:.0f} MiB", speed(m.prompt_tok_s), speed(m.step_tok_s), drift, verdict)
    out.print(table)
    out.print(f"auto takes, of those that ran and drift at most {DRIFT_MEAN} / {DRIFT_MAX} nats per token from the "
              f"file, the one with the least drift within {MARGIN:.2f}x of the fastest (the file first). Prompts "
              f"(score, judge, tag, embed): {choice.prompt}; steps (generate, respond): {choice.step}.",
              highlight=False)
    if build_check and diagnosis.crashed:
        err.print(f"llama.cpp crashed here on {', '.join(diagnosis.crashed)}: this build is not safe on this CPU",
                  highlight=False)
        raise typer.Exit(3)


def _print_check(found: api.ModelCheck) -> None:
    m = found.model
    why = f" ({safe(found.engine_why)})" if found.engine_why else ""
    out.print(f"[bold]Model[/bold] {safe(m.name)}: {safe(m.architecture or '?')}, {(m.n_params or 0) / 1e6:.0f}M "
              f"parameters, {safe(m.quantization)}; runs on {found.engine}{why}", highlight=False)
    family = {None: "none", "own": "its own (no known family)"}.get(found.family, found.family)
    out.print(f"[bold]Template[/bold] {safe(family)}", highlight=False)
    if found.pre_query is not None:
        out.print(f"  pre-query {safe(repr(found.pre_query))}", highlight=False, soft_wrap=True)
        out.print(f"  stops     {safe(', '.join(repr(s) for s in found.stops))}", highlight=False)
    if found.samples:
        rate = f", {found.tokens_per_second:.0f} generated tok/s with {len(found.samples)} at once" \
            if found.tokens_per_second else ""
        out.print(f"[bold]First pairs[/bold]{rate}", highlight=False)
        for s in found.samples:
            mark = "[red]✗[/red]" if s.verdict else "[green]✓[/green]"
            text = " ".join(s.instruction.split())
            out.print(f"  {mark} {safe(text[:90])}{'...' if len(text) > 90 else ''}"
                      + (f"  [dim]({safe(s.verdict)})[/dim]" if s.verdict else ""), highlight=False)
    for problem in found.problems:
        out.print(f"[bold red]Problem[/bold red] {safe(problem)}", highlight=False, soft_wrap=True)
    if not found.problems:
        out.print("[bold green]The template looks right[/bold green] for Magpie: instructions come out whole.",
                  highlight=False)
    if found.seconds_for_1000:
        out.print(f"generate -n 1000 would take about {found.seconds_for_1000 / 60:.0f} minutes here (from this run's "
                  "speed; generate runs up to 32 sequences at once, usually faster).", highlight=False)


@models_app.command("list")
def models_list(paths: list[str] = typer.Argument(None, help="Extra model paths to describe.")):
    """Show the embedded default model, GGUF files and mlx-lm directories under models/, and any paths given."""
    table = Table("--model", "found in", "arch", "params", "weights", "size", "chat template", "auto runs it on")
    notes = []
    for entry in api.list_models(paths):
        m = entry.model
        if m is None:
            table.add_row(safe(entry.name), safe(entry.source), "-", "-", "-", "-", "-",
                          safe(f"unusable: {entry.problem}" if entry.path else entry.problem))
            continue
        params = f"{m.n_params / 1e9:.1f}B" if (m.n_params or 0) >= 1e9 else f"{(m.n_params or 0) / 1e6:.0f}M"
        family = entry.template_family
        engine = api.backend_title(entry.engine) + (" *" if entry.engine_why else "")
        if entry.engine_why:
            notes.append(f"* {entry.name}: {entry.engine_why}")
        table.add_row(safe(entry.name), safe(entry.source), safe(m.architecture or "?"), params,
                      safe(m.quantization), f"{m.size / 2**20:.0f} MiB",
                      "none (base model?)" if family is None else safe(family), engine)
    out.print(table)
    for note in notes:
        out.print(safe(note), highlight=False, soft_wrap=True)


@models_app.command("convert")
def models_convert(
    model: str | None = typer.Argument(None, help="GGUF file (default: the embedded model)."),
    to: str = typer.Option(..., "--to", help=f"mlx (an mlx-lm model directory), or a GGUF weight type: "
                           f"{', '.join(WEIGHT_TYPES)}."),
    output: Path | None = typer.Option(None, "--out", help="Output path (default: models/NAME.TYPE.gguf, "
                                       "or models/NAME-mlx for --to mlx)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (GGUF types)."),
):
    """Write a local copy of a model: an mlx-lm directory, or another GGUF weight type.

    --to mlx makes an mlx-lm model directory offline for the families MLX runs as llama.cpp does
    (Llama-2/3, Mistral, Qwen2/3, Gemma-2/3, Phi-3: docs/models.md; Q4_0/Q4_1/Q8_0 stay quantized,
    other types become F16). On x86 CPUs an F16 or BF16 GGUF copy of a Q4_1 model scores 1.5-2.7x
    faster; `make bench` measures the speed and the drift."""
    target = api.convert_model(model, to, output, force=force, announce=err.print)
    if target.is_dir():
        out.print(f"Wrote {target}. Use it with: --model {target} --backend mlx", highlight=False, soft_wrap=True)
    else:
        out.print(f"Wrote {target} ({target.stat().st_size / 2**20:.0f} MiB). Use it with: --model {target}",
                  highlight=False, soft_wrap=True)


@templates_app.command("list")
def templates_list():
    """The families the registry knows; everything else is derived from the model's own template."""
    table = Table("family", "description", "canonical template", "models")
    for f in registry.FAMILIES:
        canonical = ("used instead of the model's" if f.prefer_registry_template else "for files without one") \
            if f.template else "-"
        table.add_row(f.name, f.description, canonical, ", ".join(f.examples))
    out.print(table)


@templates_app.command("show")
def templates_show(family: str = typer.Argument(..., help="A family from `templates list`.")):
    """Print a family's canonical chat template and what Magpie derives from it."""
    try:
        f = registry.get(family)
    except KeyError as e:
        raise Fail(str(e.args[0])) from None
    out.print(f"[bold]{f.name}[/bold]: {safe(f.description)}", highlight=False)
    if f.prefer_registry_template:
        out.print(f"Used instead of the model's own template: {safe(f.prefer_registry_template)}", highlight=False)
    if f.template is None:
        out.print("No canonical template: models of this family carry their own; "
                  "`templates detect MODEL` shows what is derived from it.")
        return
    out.print("[bold]Template[/bold]")
    out.print(safe(f.template), highlight=False, soft_wrap=True)
    _print_format(chat_format_for(None, template=f.name, bos_token="<BOS>", eos_token="<EOS>"), vocab=None)


@templates_app.command("detect")
def templates_detect(
    model: str | None = typer.Argument(None, help="GGUF file or mlx-lm directory (default: the embedded model)."),
    template: str = typer.Option("auto", help="As for generate: auto, model, a family, or a .jinja file."),
    system_prompt: str | None = typer.Option(None, help="Show the pre-query template with this system prompt."),
    task: str | None = typer.Option(None, help="Show the pre-query template with this task's system prompt."),
):
    """Show the pre-query template, stop strings and ids, and the multi-turn template for a model."""
    m = resolve_model(model)
    fmt = chat_format_for(m.chat_template, template=template, bos_token=m.bos_token, eos_token=m.eos_token)
    out.print(f"[bold]model[/bold]       {safe(m.name)} ({safe(str(m.path))})", highlight=False)
    _print_format(fmt, vocab=m.gguf)
    system = task_prompt(task).text if task else system_prompt
    if system:
        fmt.check_system(system)
        out.print(f"[bold]with system[/bold] {safe(repr(fmt.instruction_prompt(system)))}", highlight=False,
                  soft_wrap=True)


def _stop_source(fmt, stop: str) -> str:
    if stop in registry.markers(fmt.user_end + fmt.assistant_end):
        return "template"
    if stop in (fmt.bos_token, fmt.eos_token):
        return "BOS" if stop == fmt.bos_token else "EOS"
    return f"registry:{fmt.family.name}" if fmt.family and stop in fmt.family.extra_stops else "template"


def _print_format(fmt, vocab) -> None:
    fam = fmt.family
    rows = [("family", f"{fam.name} ({fam.description})" if fam else "unknown (derived from the template alone)"),
            ("template", fmt.origin + (" (tokenizer.chat_template of the GGUF file)" if fmt.origin == "model" else "")),
            ("pre-query", repr(fmt.pre_query))]
    if vocab is not None and vocab.get("tokenizer.ggml.add_bos_token") and fmt.bos_token \
            and not fmt.pre_query.startswith(fmt.bos_token):
        rows.append(("", f"the tokenizer adds {fmt.bos_token!r} in front"))
    ids = vocab.token_ids(fmt.stops) if vocab is not None else {}
    rows += [("next user", repr(fmt.user_header) + "  (appended after an assistant turn)"),
             ("assistant", repr(fmt.generation_prompt) + "  (opens the response)"),
             ("stops", ", ".join(f"{s!r}" + (f"={ids[s]}" if s in ids else "") + f" ({_stop_source(fmt, s)})"
                                 for s in fmt.stops)),
             ("thinking", "yes: <think> blocks are removed unless --keep-thinking" if fam and fam.thinking else "no")]
    for name, value in rows:
        out.print(f"[bold]{name:<11}[/bold] {safe(value)}", highlight=False, soft_wrap=True)
