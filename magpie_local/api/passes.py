"""score, tag, judge and embed: resumable passes of a model over the stored pairs, one row per turn
in the pass's table, committed in batches, so a killed pass goes on where it stopped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..backends import ServerOptions
from ..errors import UsageError
from ..generate import GenerateSettings, chat_format
from ..store import Run, Store, config_key
from .session import Announce, Lifecycle, ModelSession, Progress, one_sequence_parallel, opened_store, quiet
from .settings import at_least, numbers_checked

# Runs that annotate data, by kind, and the table each keeps its rows in (one per turn).
PASS_TABLES = {"score": "scores", "tag": "tags", "judge": "ratings", "embed": "embeddings"}


def data_runs(store: Store, runs: list[int] | None, verb: str) -> tuple[list[int] | None, int]:
    """(the data runs a pass covers, None for all; their number of kept turns)."""
    sources = sorted(set(runs)) if runs else None
    for source in sources or []:
        if (kind := store.get_run(source).kind) in PASS_TABLES:
            raise UsageError(f"run {source} is a {kind} run, not data")
    total = store.count_turns(sources)
    if total == 0:
        raise UsageError(f"{store.path} holds no pairs to {verb}" + (f" in runs {sources}" if sources else ""))
    return sources, total


Work = Callable[[list[dict]], list[dict]]  # stored rows in, each row's fields for the pass's table out


# The config key naming the model of each pass, as stored since each pass began.
MODEL_ROLES = {"score": "scorer", "tag": "judge", "judge": "judge", "embed": "embedder"}


def run_pass(db, kind: str, session: ModelSession, runs: list[int] | None, config: dict,
             work_for: Callable[[object], Work], *, ctx: int, parallel: int | None, batch_size: int,
             progress: Progress | None, announce: Announce) -> Run:
    """The pass of `kind` with `session`'s model over the kept turns of `runs` (None: all): the
    run with these settings (`config`, with the model, the sources and the session's key added)
    found again or made, and every turn without a row committed in batches. `work_for(backend)`
    gives the function that computes a batch's rows on the opened backend."""
    table, role = PASS_TABLES[kind], MODEL_ROLES[kind]
    with opened_store(db, create=False) as store:
        sources, total = data_runs(store, runs, kind)
        sha = session.sha256(store)
        config = {f"{role}_sha256": sha, role: session.model.name, **config, "source_runs": sources, **session.key()}
        key = config_key(config)
        with session.open(sha, ctx=ctx, parallel=parallel, announce=announce) as opened:
            work = work_for(opened)
            found = store.find_run(kind, key)
            life = Lifecycle(store, progress or Progress())
            run = life.begin(kind, key, config, session, sha, opened, total, found,
                             store.rows_done(found.id, table) if found else 0)
            with life.going_on(lambda: f"The {table} so far are committed"):
                while rows := store.turns_to_score(run.id, sources, batch_size, table=table):
                    rows_out = [dict(turn_id=r["id"], **fields) for r, fields in zip(rows, work(rows))]
                    store.commit_scores(run.id, rows_out, table=table)
                    if life.progress.item:
                        life.progress.item(len(rows))
            store.finish_run(run.id)
            return store.get_run(run.id)


@numbers_checked
def score(db: str | Path | Store, *, runs: list[int] | None = None, model: str | None = None,
          backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
          parallel: int | None = None, weights: str = "auto", prompt_format: str = "chat", max_length: int = 512,
          batch_size: int = 16, progress: Progress | None = None, announce: Announce = quiet) -> Run:
    """Score the stored pairs (of `runs`, or all) by IFD with `model` (default: the embedded model);
    returns the scoring run. Resumable: the same call again scores only what is missing.
    `progress.item(k)` is called as each batch of k pairs is committed."""
    from ..scoring import PROMPT_FORMATS, IFDScorer, Pair

    if prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"--prompt-format must be one of: {', '.join(PROMPT_FORMATS)}")
    at_least(1, ("--batch-size", batch_size))
    session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
    window = session.caps.scoring_window
    if not 16 <= max_length <= window:
        raise UsageError(f"--max-length must be between 16 and {window}")
    session.with_weights(weights, "prompt", announce)
    fmt = chat_format(session.model, GenerateSettings()) if prompt_format == "chat" else None

    def work_for(opened) -> Work:
        scorer = IFDScorer(opened, prompt_format, fmt, max_length)
        opened.check_scoring(scorer.prepare(Pair("Hello", "Hi"))[:2])  # before a run is made

        def work(rows: list[dict]) -> list[dict]:
            pairs = [Pair(r["instruction"], r["response"], r["input"] or "", r["history"], r["system_prompt"])
                     for r in rows]
            return [dict(ifd_above_1=s.above_1, loss_direct=s.loss_direct, loss_cond=s.loss_cond,
                         answer_tokens=s.answer_tokens, context_tokens=s.context_tokens, ifd=s.ifd,
                         ifd_ppl=s.ifd_ppl, truncated=s.truncated, skip_reason=s.skip_reason)
                    for s in scorer.score(pairs)]
        return work

    return run_pass(db, "score", session, runs, {"prompt_format": prompt_format, "max_length": max_length}, work_for,
                    ctx=64, parallel=one_sequence_parallel(session.caps, parallel), batch_size=batch_size,
                    progress=progress, announce=announce)


TAG_METHODS = ("auto", "grammar", "likelihood")


@numbers_checked
def tag(db: str | Path | Store, *, runs: list[int] | None = None, model: str | None = None, backend: str = "auto",
        server: ServerOptions | None = None, tokenizer: str | None = None, method: str = "auto",
        parallel: int | None = None, batch_size: int = 16, progress: Progress | None = None,
        announce: Announce = quiet) -> Run:
    """Tag each stored instruction with task category, input quality and difficulty, `model` (default:
    the embedded model) acting as judge (tagging.py): by `method` grammar (answers sampled as valid
    JSON) or likelihood (closed questions, read from calibrated next-token probabilities); auto is
    likelihood where the backend scores, else grammar. Returns the tagging run. Resumable like score."""
    from dataclasses import asdict

    from .. import tagging

    at_least(1, ("--batch-size", batch_size))
    if method not in TAG_METHODS:
        raise UsageError(f"--method must be one of: {', '.join(TAG_METHODS)}")
    session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
    caps, name = session.caps, session.backend
    if method == "auto":  # likelihood was the more accurate on every backend measured (docs/curation.md)
        method = "likelihood" if caps.scoring else "grammar"
    if method == "grammar" and not caps.grammar:
        raise UsageError(f"--method grammar needs llama.cpp's grammar sampler, which the {name} backend lacks; "
                         "use --method likelihood")
    if method == "likelihood" and not caps.scoring:
        raise UsageError(f"--method likelihood reads next-token probabilities, which the {name} backend does not give")
    fmt = chat_format(session.model, GenerateSettings())
    prompt = tagging.PROMPT if method == "grammar" else tagging.CLOSED_PROMPT
    config = {"prompt_sha256": config_key({"prompt": prompt}), **({"method": method} if method != "grammar" else {})}

    def work_for(opened) -> Work:
        if method == "grammar":
            def work(rows: list[dict]) -> list[dict]:
                answers = opened.complete([tagging.judge_request(fmt, r["instruction"]) for r in rows])
                return [asdict(tagging.parse(a.text)) for a in answers]
            return work
        letters = tagging.letter_ids(opened)

        def closed(instructions: list[str]) -> list[dict]:
            """{field: log-probabilities of its option letters} for each instruction."""
            asks = [tagging.closed_prompts(fmt, text) for text in instructions]
            lps = iter(opened.choice_logprobs([(opened.tokenize(ask[f]), letters[:len(tagging.FIELDS[f])])
                                               for ask in asks for f in tagging.FIELDS]))
            return [{f: next(lps) for f in tagging.FIELDS} for _ in asks]

        baseline = closed([tagging.CONTENT_FREE])[0]

        def work(rows: list[dict]) -> list[dict]:
            return [asdict(tagging.from_likelihoods(lp, baseline)) for lp in closed([r["instruction"] for r in rows])]
        return work

    return run_pass(db, "tag", session, runs, config, work_for, ctx=1024, parallel=parallel, batch_size=batch_size,
                    progress=progress, announce=announce)


@numbers_checked
def judge(db: str | Path | Store, *, runs: list[int] | None = None, model: str | None = None,
          backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
          weights: str = "auto", template: str = "auto", rubric: str | None = None, parallel: int | None = None,
          batch_size: int = 16, progress: Progress | None = None, announce: Announce = quiet) -> Run:
    """Rate every stored response (of `runs`, or all) from 1 to 5 with `model` (default: the embedded
    model) as judge, on `rubric` (default: judging.RUBRIC; text with {instruction} and {response});
    the rating is read from the judge's next-token probabilities (judging.py). Returns the judging
    run; resumable like score. `progress.item(k)` is called as each batch of k ratings is committed."""
    import json

    from .. import judging
    from ..respond import user_text

    at_least(1, ("--batch-size", batch_size))
    rubric = judging.load_rubric(rubric)
    session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
    if not session.caps.scoring:
        raise UsageError(f"judging reads next-token probabilities, which the {session.backend} backend does not give")
    session.with_weights(weights, "judge", announce)
    fmt = chat_format(session.model, GenerateSettings(template=template))
    config = {"rubric_sha256": judging.rubric_sha256(rubric), "rubric": rubric, "scale": list(judging.SCALE),
              "template": template}

    def work_for(opened) -> Work:
        scores = judging.score_token_ids(opened)

        def work(rows: list[dict]) -> list[dict]:
            prompts = [judging.judge_tokens(opened, fmt, rubric, user_text(r["instruction"], r["input"]),
                                            r["response"]) for r in rows]
            ratings = [judging.rating(lp) for lp in opened.choice_logprobs([(p, scores) for p in prompts])]
            return [dict(score=r.score, distribution=json.dumps(r.distribution), mass=r.mass) for r in ratings]
        return work

    return run_pass(db, "judge", session, runs, config, work_for, ctx=64,
                    parallel=one_sequence_parallel(session.caps, parallel), batch_size=batch_size, progress=progress,
                    announce=announce)


EMBED_TEXTS = ("instruction", "pair")


@dataclass
class EmbedResult:
    """An embedding run and the neighbour statistics over its embeddings (neighbours.py)."""

    run: Run
    embedded: int  # turns the run holds embeddings of
    dim: int
    alone: int  # turns with no neighbour closer than the radius
    repeated: int  # turns with at least one
    radius: float
    median_distance: float | None  # of each turn to its nearest neighbour


@numbers_checked
def embed(db: str | Path | Store, *, runs: list[int] | None = None, model: str | None = None,
          backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
          text: str = "instruction", max_tokens: int = 256, radius: float | None = None, batch_size: int = 64,
          weights: str = "auto", parallel: int | None = None, progress: Progress | None = None,
          announce: Announce = quiet) -> EmbedResult:
    """Embed every stored turn (of `runs`, or all) with `model` (default: the embedded model,
    mean-pooled; on a server, whatever its /v1/embeddings gives) and store one normalised float16
    vector per turn in an embedding run; then store each turn's nearest neighbour, its cosine
    distance and the number of turns within `radius` (default neighbours.RADIUS). `text` is the
    user's message ("instruction") or it and the response ("pair"). Resumable like score: the
    same call embeds only what is missing, and the neighbour statistics are recomputed over the
    whole run."""
    import numpy as np

    from ..neighbours import RADIUS, to_blob
    from ..respond import user_text

    radius = RADIUS if radius is None else radius
    if text not in EMBED_TEXTS:
        raise UsageError(f"--text must be one of: {', '.join(EMBED_TEXTS)}")
    if not 0 <= radius < 2:
        raise UsageError("--radius is a cosine distance, from 0 up to 2")
    if batch_size < 1 or not 8 <= max_tokens <= 8192:
        raise UsageError("--batch-size must be at least 1 and --max-tokens between 8 and 8192")
    session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
    if not session.caps.embeddings:
        raise UsageError(f"the {session.title} backend cannot embed")
    session.with_weights(weights, "embedder", announce)
    config = {"text": text, "max_tokens": max_tokens, "pooling": session.caps.pooling}

    def work_for(opened) -> Work:
        def work(rows: list[dict]) -> list[dict]:
            texts = [user_text(r["instruction"], r["input"]) + (f"\n\n{r['response']}" if text == "pair" else "")
                     for r in rows]
            return [dict(vector=to_blob(v)) for v in opened.embed(texts, max_tokens=max_tokens)]
        return work

    with opened_store(db, create=False) as store:
        run = run_pass(store, "embed", session, runs, config, work_for, ctx=64,
                       parallel=one_sequence_parallel(session.caps, parallel), batch_size=batch_size,
                       progress=progress, announce=announce)
        turn_ids, vectors, found = store_neighbours(store, run.id, radius)
    distances = found.distance[~np.isnan(found.distance)]
    return EmbedResult(run, len(turn_ids), vectors.shape[1], alone=int((found.repeats == 0).sum()),
                       repeated=int((found.repeats > 0).sum()), radius=radius,
                       median_distance=float(np.median(distances)) if len(distances) else None)


def store_neighbours(store: Store, embed_run_id: int, radius: float):
    """Search an embedding run's vectors (neighbours.py) and store, replacing the earlier ones,
    each turn's neighbour statistics and its DEGREE most similar turns. Returns (turn ids, vectors,
    neighbours.Neighbours)."""
    import numpy as np

    from ..neighbours import cosines_to_blob, from_blobs, ids_to_blob, nearest_neighbours

    turn_ids, blobs = store.embedding_rows(embed_run_id)
    vectors = from_blobs(blobs)
    found = nearest_neighbours(vectors, radius)
    ids = np.append(np.asarray(turn_ids, dtype=np.int64), -1)  # -1 (padding) maps to -1
    similar = ids[found.similar]
    store.replace_neighbours(embed_run_id, (  # a generator: 100k rows are not held at once
        dict(turn_id=t, nearest_turn_id=int(row[0]) if len(row) else None,
             distance=None if np.isnan(d) else round(float(d), 6), repeats=int(k), radius=radius,
             similar=ids_to_blob(row), similarity=cosines_to_blob(cos))
        for t, row, cos, d, k in zip(turn_ids, similar, found.cosine, found.distance, found.repeats)))
    return turn_ids, vectors, found
