"""The Python API: what each command does, as functions that take Python values and return them.

The CLI is a thin layer over these: it parses options, calls a function here, and renders the
result. Every function takes the database as a path or as an open `Store`; errors are MagpieError
subclasses with one-line messages (errors.py).

    import magpie_local as ml

    result = ml.generate("magpie.db", 20)
    print(result.counts)  # {'kept': 20, 'dropped': 3, ...}

One module per stage: generation (generate), verification (verify), answers (respond), passes
(score, tag, judge, embed), curation (curate), reviewing (review: the pairs table, decisions and edits, the review app),
selection (select), exporting (export), data (import and reading back),
machine (doctor, models); session holds what every command that runs a model shares, and
settings the checks every command's settings pass before anything runs.
"""

from .answers import respond
from .curation import curate, curate_checks
from .data import (
    IFDSummary,
    ImportResult,
    RatingSummary,
    RunCounts,
    RunSummary,
    Shown,
    Stats,
    TagSummary,
    check_counts,
    ifd_summary,
    import_file,
    rating_summary,
    run_counts,
    runs,
    show,
    stats,
    tag_summary,
)
from .exporting import ExportResult, export, report
from .generation import generate
from .machine import (
    Diagnosis,
    ModelCheck,
    ModelEntry,
    Sample,
    check_model,
    convert_model,
    doctor,
    list_models,
    machine_info,
)
from .passes import EMBED_TEXTS, PASS_TABLES, TAG_METHODS, EmbedResult, embed, judge, score, store_neighbours, tag
from .reviewing import (
    Dashboard,
    PairFilters,
    PairsPage,
    dashboard,
    filter_choices,
    measure_runs,
    pair,
    pairs,
    review,
    revise,
)
from .selection import Selection, judge_run_or_latest, pass_run_or_latest, score_run_or_latest, select
from .session import Announce, GenerateResult, ModelSession, Progress
from .settings import (
    backend_name,
    backend_title,
    check_sampling,
    resolve_passing,
    respond_sampling,
    sampling_for,
    sampling_preset,
)
from .verification import VerifyResult, verify

__all__ = [
    "Announce", "Dashboard", "Diagnosis", "EMBED_TEXTS", "EmbedResult", "ExportResult", "GenerateResult", "IFDSummary",
    "ImportResult", "ModelCheck", "ModelEntry", "ModelSession", "PASS_TABLES", "PairFilters", "PairsPage",
    "Progress", "RatingSummary", "RunCounts", "RunSummary", "Sample", "Selection", "Shown", "Stats", "TAG_METHODS",
    "TagSummary", "backend_name", "backend_title", "check_counts", "check_model", "check_sampling", "convert_model",
    "curate", "curate_checks", "dashboard", "doctor", "embed", "export", "filter_choices", "generate", "ifd_summary",
    "import_file", "judge", "judge_run_or_latest", "list_models", "machine_info", "measure_runs", "pair", "pairs",
    "pass_run_or_latest", "rating_summary", "report", "resolve_passing", "respond", "respond_sampling", "review",
    "revise", "run_counts", "runs", "sampling_for", "sampling_preset", "score", "score_run_or_latest", "select",
    "show", "stats", "store_neighbours", "tag", "tag_summary", "VerifyResult", "verify",
]
