"""The machine and the models on it: doctor (what runs fastest here), the models a user has, and
converting one to another weight type or to an mlx-lm directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MagpieError, UsageError
from ..models import Model, available_models, models_dir, resolve_model
from ..tune import auto_skips
from .session import Announce, quiet
from .settings import numbers_checked


@dataclass
class Diagnosis:
    """What `doctor` found: the machine, and what `--weights auto` runs `model` on here, measured."""

    machine: dict  # CPU, cores, llama.cpp version and build (tune.machine)
    model: Model
    choice: object | None  # tune.WeightsChoice, or None where auto does not measure
    skipped: str | None  # why auto runs the file as it is without measuring

    @property
    def crashed(self) -> list[str]:
        """The weight types whose run killed its process (SIGILL, SIGSEGV): an unsafe build."""
        return [m.kind for m in self.choice.measured if m.crashed] if self.choice else []


def machine_info() -> dict:
    """This machine's CPU, cores, and the llama.cpp build (measures nothing)."""
    from ..tune import machine as here

    return here()


def doctor(model: str | None = None, *, remeasure: bool = False, announce: Announce = quiet) -> Diagnosis:
    """The machine and the measured `--weights auto` choice for `model` (default: the embedded
    model): cached per CPU and llama.cpp build, measured now if there is none or `remeasure`."""
    from ..tune import machine, weights_choice

    m = resolve_model(model)
    skipped = auto_skips(m)
    choice = None if skipped else weights_choice(m, remeasure=remeasure, announce=announce)
    if choice is not None and (file := choice.measured[0]).failure and not file.crashed:
        raise UsageError(f"{m.name} does not run here: {file.failure}")
    return Diagnosis(machine=choice.machine if choice else machine(), model=m, choice=choice, skipped=skipped)


@dataclass
class ModelEntry:
    """A model `models list` shows: the name --model takes, where it was found, what it is, and the
    engine `--backend auto` runs it on (with why, where it passes one over), or why it is unusable."""

    name: str
    source: str  # default, models/, Hugging Face cache, LM Studio, Ollama, GPT4All, path
    path: Path | None
    model: Model | None = None
    problem: str | None = None  # why it cannot be used (or is not there)
    engine: str | None = None  # the backend auto takes
    engine_why: str | None = None

    @property
    def template_family(self) -> str | None:
        """The chat template's known family (registry.py), "own" for another template, None for none."""
        from ..registry import detect

        template = self.model.chat_template if self.model else None
        if template is None:
            return None
        family = detect(template)
        return family.name if family else "own"


def list_models(paths: list[str] | None = None) -> list[ModelEntry]:
    """Every model on this machine magpie-local can find, nothing downloaded: the embedded default,
    GGUF files and mlx-lm folders under models/ (or $MAGPIE_LOCAL_MODELS), the Hugging Face cache,
    LM Studio's and GPT4All's folders, Ollama's store (local_models.py), and `paths`; each read from
    its metadata alone, with the engine auto would run it on, or the reason it is unusable."""
    from ..backends import choose_backend
    from ..local_models import discover

    found = [(str(path), source, path, note) if source != "default" else
             ("default", f"built in ({path.name})" if path else "built in", path, note)
             for source, path, note in available_models(paths)]
    found += [(f.name, f.source, f.path, "") for f in discover()]
    entries = []
    for name, source, path, note in found:
        if path is None:
            entries.append(ModelEntry(name, source, None, problem=note))
            continue
        try:
            entry = ModelEntry(name, source, path, resolve_model(name if ":" in name.split("/")[0] else str(path)))
            choice = choose_backend("auto", entry.model)
            entry.engine, entry.engine_why = choice.name, choice.why
        except MagpieError as e:
            entry = ModelEntry(name, source, path, problem=str(e))
        entries.append(entry)
    return entries


def convert_model(model: str | None, to: str, out: str | Path | None = None, *, force: bool = False,
                  announce: Announce = quiet) -> Path:
    """Write a copy of GGUF `model` (default: the embedded model): `to="mlx"` an mlx-lm directory
    (default models/NAME-mlx), else a GGUF file in weight type `to` (convert.KINDS; default
    models/NAME.TYPE.gguf). Returns the path written."""
    from ..convert import convert_gguf, default_output
    from ..gguf_to_mlx import convert_to_mlx

    m = resolve_model(model)
    if m.kind != "gguf":
        raise UsageError(f"{m.path} is not a GGUF file; models convert reads GGUF files")
    folder = models_dir()
    if to == "mlx":
        target = Path(out) if out else folder / f"{m.name}-mlx"
        announce(f"Converting {m.name} to an mlx-lm directory ...")
        return convert_to_mlx(m.path, target)
    target = Path(out) if out else default_output(m.path, to, folder)
    if out is None:
        folder.mkdir(exist_ok=True)
    if target.exists() and not force:
        raise UsageError(f"{target} exists; use --force to replace it")
    announce(f"Converting {m.name} to {to} ...")
    convert_gguf(m.path, target, to)
    return target


# What a first look at a model's instructions tells about its template (check_model): a share of
# the sample at or above which the sentence is said.
TELLING_SHARE = 0.5
# Template text a model should never write into a user's message: its own markers (registry.markers)
# and the usual ones of other families, a sign that the template is not the one it was trained on.
FOREIGN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "[INST]", "[/INST]",
                   "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


@dataclass
class Sample:
    """One instruction (and answer) the check made, and what was wrong with it, if anything."""

    instruction: str  # as the model wrote it
    response: str
    verdict: str | None  # why it would be dropped or what leaks into it; None: fine


@dataclass
class ModelCheck:
    """What `doctor --model` found on a first run of a model: its template, engine, a few pairs and
    what they say about the template, and the time `generate -n 1000` would take here."""

    model: Model
    engine: str  # the backend's title
    engine_why: str | None
    family: str | None  # the template's known family (registry), "own", or None for no template
    pre_query: str | None = None
    stops: list[str] | None = None
    samples: list[Sample] | None = None
    problems: list[str] | None = None  # plain sentences; empty: the template looks right
    tokens_per_second: float | None = None  # generated, with len(samples) sequences at once
    seconds_for_1000: float | None = None


@numbers_checked
def check_model(model: str | None = None, *, backend: str = "auto", template: str = "auto", samples: int = 8,
                seed: int = 0, announce: Announce = quiet) -> ModelCheck:
    """A first run of `model` (default: the embedded one): the engine auto takes, its template's
    pre-query text and stops, `samples` Magpie items made as generate makes them (same jobs, same
    clean-up, nothing stored), and plainly what is wrong with the template where something is: no
    chat template (a base model), empty instructions, template tokens leaking into the text,
    fragments. Their speed gives the time `generate -n 1000` would take here."""
    import time

    from ..generate import GenerateSettings, Generation
    from ..registry import detect, markers
    from ..templates import TemplateError
    from .session import ModelSession
    from .settings import at_least, generation_settings, sampling_preset

    at_least(1, ("--samples", samples))
    session = ModelSession.choose(model, backend=backend, announce=announce)
    m = session.model
    source = m.chat_template
    check = ModelCheck(m, session.title, session.why, None if source is None else
                       (detect(source).name if detect(source) else "own"), problems=[])
    if source is None and template == "auto":
        check.problems.append(f"{m.name} has no chat template: it looks like a base model, which writes no "
                              "instructions of its own. Magpie needs a chat (instruct) model; if this is one, "
                              "give its family with --template (magpie-local templates list).")
        return check
    inst, resp = sampling_preset("default", session.backend)
    try:
        settings, fmt = generation_settings(GenerateSettings(seed=seed, template=template, instruction=inst,
                                                             response=resp), m, session.backend)
    except TemplateError as e:
        check.problems.append(f"its chat template cannot be used: {e}")
        return check
    check.pre_query, check.stops = fmt.pre_query, fmt.stops
    from ..tune import auto_skips, cached_choice

    measured = session.caps.weight_copies and not auto_skips(m) and cached_choice(m) is not None
    session.with_weights("auto" if measured else "file", "step", announce)  # as generate runs it, once measured
    from ..models import sha256_file

    with session.open(sha256_file(m.path), ctx=1024, parallel=samples, announce=announce) as opened:
        maker = Generation(None, None, opened, fmt, settings)
        started = time.perf_counter()
        items = opened.run([maker.magpie_job(i) for i in range(samples)])
        seconds = time.perf_counter() - started
    leaks = [s for s in dict.fromkeys((*fmt.stops, *markers(fmt.pre_query), *FOREIGN_MARKERS)) if s]
    check.samples, tokens = [], 0
    for conversation, turns in items:
        turn = turns[0]
        tokens += (turn["instruction_tokens"] or 0) + (turn["response_tokens"] or 0)
        raw = turn["raw_instruction"] or turn["instruction"]
        leaked = next((s for s in leaks if s in raw or s in (turn["raw_response"] or turn["response"])), None)
        verdict = f"template text {leaked!r} in it" if leaked else conversation["drop_reason"]
        check.samples.append(Sample(raw, turn["response"], verdict))
    verdicts = [s.verdict or "" for s in check.samples]

    def share(*words: str) -> float:
        return sum(any(w in v for w in words) for v in verdicts) / max(len(verdicts), 1)

    if share("template text") >= TELLING_SHARE / 2:
        check.problems.append("template tokens leak into the text: the model writes its own turn markers, so the "
                              "template or its stop strings are not the ones it was trained with (try --template)")
    if share("empty instruction") >= TELLING_SHARE:
        check.problems.append(f"the model writes nothing after the pre-query text {fmt.pre_query!r}: the template "
                              "may be wrong for it (try --template FAMILY)")
    if share("truncated", "incomplete", "loops") >= TELLING_SHARE:
        check.problems.append("most instructions come out as fragments (cut off, unfinished or looping): the model "
                              "may be too small or a base model, or the template wrong")
    if share("is an answer") >= TELLING_SHARE:
        check.problems.append("most instructions read as answers, not questions: the template's user turn may be "
                              "misplaced")
    kept = sum(1 for s in check.samples if s.verdict is None)
    if seconds and tokens and kept:
        check.tokens_per_second = tokens / seconds
        check.seconds_for_1000 = 1000 * (tokens / kept) / check.tokens_per_second  # dropped items' tokens included
    return check
