"""Eval contamination: does a pair repeat an evaluation set's question?

The method of datatrove's and NeMo Curator's decontamination: texts are normalised (Unicode NFKC,
case-folded, punctuation dropped: the words alone), and a pair is contaminated when its instruction or
its answer contains a 13-word sequence of an eval prompt. A prompt shorter than 13 words counts as one
sequence of its own length when it has at least 8 words; shorter prompts are too common to match on
(e.g. "What is the capital of France?") and are not checked.

Eval files are untrusted: JSON arrays, JSON Lines, CSV with a header row, or Parquet, each record's
prompt taken from the first field of PROMPT_KEYS it has (any case).
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .importers import MAX_RECORD_BYTES, RecordError, read_dataset

NGRAM = 13
MIN_WORDS = 8  # a shorter prompt is never matched; one of 8-12 words must appear whole
# With an embedding run of the instructions: an instruction this close to an eval prompt (cosine of
# the run's model's embeddings) is a near paraphrase. The default chat model's unrelated
# instructions reach 0.93 (docs/curation.md); with `embed --model minilm` paraphrases score 0.75+.
PARAPHRASE_COSINE = 0.95
# The prompt fields of instruction files (import's) and of the common eval sets: GSM8K, TruthfulQA and
# ARC "question", MATH "problem", MT-Bench "turns" (every turn), HumanEval and IFEval "prompt".
PROMPT_KEYS = ("instruction", "prompt", "question", "problem", "query", "text", "turns")
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The text as normalised words: NFKC, case-folded, punctuation and spacing dropped."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@dataclass
class EvalSet:
    name: str  # the file's name
    path: str  # absolute
    sha256: str
    prompts: list[str]


def prompts_of(record, where: str) -> list[str]:
    """The prompts of one eval record (a dict): its first PROMPT_KEYS field, any case; every turn of a
    list of turns. RecordError when it has none."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected an object with a prompt field, got {type(record).__name__}")
    keys = {str(k).casefold(): k for k in record}
    key = next((keys[k] for k in PROMPT_KEYS if k in keys), None)
    if key is None:
        raise RecordError(f"{where}: no prompt field (one of {', '.join(PROMPT_KEYS)})")
    value = record[key]
    values = value if isinstance(value, list) else [value]
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise RecordError(f"{where}: the {key} field holds no text")
    return texts


def _records(path: Path):
    """(where, record) of every record of an eval file, by its format."""
    suffix = path.suffix.casefold()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading Parquet needs pyarrow: pip install 'magpie-local[parquet]'") from None
        try:
            table = pq.ParquetFile(path)
            for b, batch in enumerate(table.iter_batches(batch_size=1024)):
                for i, record in enumerate(batch.to_pylist()):
                    yield f"row {b * 1024 + i + 1}", record
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"{path} is not a readable Parquet file ({e})") from None
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(MAX_RECORD_BYTES)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                for i, record in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), start=2):
                    yield f"line {i}", record
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not valid UTF-8") from None
        except csv.Error as e:
            raise UsageError(f"{path} is not a readable CSV file ({e})") from None
    else:  # JSON array or JSON Lines, with import's limits
        records, errors = read_dataset(path, parse=lambda obj, where: (where, obj))
        if errors:
            raise UsageError(f"{path}: {errors[0]}")
        yield from records


def read_eval_set(path: str | Path) -> EvalSet:
    """An eval file's prompts. UsageError for a missing or unreadable file, or a record without a prompt."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no eval file {path}")
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        prompts = []
        for where, record in _records(path):
            prompts += prompts_of(record, where)
    except RecordError as e:
        raise UsageError(f"{path}: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if not prompts:
        raise UsageError(f"{path} holds no eval prompts")
    return EvalSet(path.name, str(path.resolve()), digest.hexdigest(), prompts)


class EvalIndex:
    """Every checked word sequence of some eval sets, found by its first MIN_WORDS words."""

    def __init__(self, sets: list[EvalSet]):
        self.sets = sets
        self.anchors: dict[tuple[str, ...], list[tuple[tuple[str, ...], int, int]]] = {}
        seen = set()
        for s, eval_set in enumerate(sets):
            for p, prompt in enumerate(eval_set.prompts):
                w = words(prompt)
                grams = ([tuple(w[i:i + NGRAM]) for i in range(len(w) - NGRAM + 1)] if len(w) >= NGRAM
                         else [tuple(w)] if len(w) >= MIN_WORDS else [])
                for gram in grams:
                    if gram not in seen:
                        seen.add(gram)
                        self.anchors.setdefault(gram[:MIN_WORDS], []).append((gram, s, p))
        self.sequences = len(seen)

    def find(self, text: str) -> tuple[tuple[str, ...], int, int] | None:
        """(the shared word sequence, eval set index, prompt index) of the first eval sequence in
        `text`, or None."""
        w = words(text)
        anchors = self.anchors
        for i in range(len(w) - MIN_WORDS + 1):
            found = anchors.get(tuple(w[i:i + MIN_WORDS]))
            if found:
                for gram, s, p in found:
                    if tuple(w[i:i + len(gram)]) == gram:
                        return gram, s, p
        return None

    def check(self, instruction: str, response: str) -> tuple[str, int] | None:
        """(why a pair is contaminated, the eval set's index), or None when it is not."""
        for part, text in (("instruction", instruction), ("answer", response)):
            if hit := self.find(text):
                gram, s, p = hit
                shared = " ".join(gram)
                shared = shared if len(shared) <= 100 else shared[:99] + "…"
                return f"its {part} shares {len(gram)} words with {self.sets[s].name} prompt {p + 1}: \"{shared}\"", s
        return None
