"""The SQLite store: runs, batches, conversations and turns.

Every batch is written in one transaction (`Store.commit_batch`), so after a crash a pair
is either fully stored or absent, and UNIQUE constraints make a duplicate impossible even
if a caller got its bookkeeping wrong. The file is tagged with our own `application_id`,
so we never write into a database made by something else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .cleanup import normalized
from .errors import MagpieError

APPLICATION_ID = 0x4D47504C  # "MGPL"
BUSY_TIMEOUT = float(os.environ.get("MAGPIE_LOCAL_BUSY_TIMEOUT", "30"))  # seconds to wait on a locked database
SCHEMA_VERSION = 9

# One verdict per turn and curation check (curate.py), so selections can combine them.
CHECKS_TABLE = """CREATE TABLE checks (
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    name TEXT NOT NULL,
    passed INTEGER NOT NULL,
    reason TEXT,
    settings TEXT NOT NULL,
    checked_at TEXT NOT NULL,
    PRIMARY KEY (turn_id, name)
)"""

# Judge tags per turn and tagging run (tagging.py); a failed answer keeps its raw text and the error.
TAGS_TABLE = """CREATE TABLE tags (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the tagging run
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    task_category TEXT, input_quality TEXT, difficulty TEXT,  -- NULL when the answer failed
    error TEXT,
    raw TEXT NOT NULL,
    UNIQUE(run_id, turn_id)
)"""

# A judge's rating of a turn's response per judging run (judging.py): the expected score and the
# distribution over the scale's scores, read from the judge's next-token probabilities.
RATINGS_TABLE = """CREATE TABLE ratings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the judging run
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    score REAL NOT NULL,                          -- expected score over the scale
    distribution TEXT NOT NULL,                   -- JSON: probability of each score, lowest first
    mass REAL NOT NULL,                           -- probability the judge put on the score tokens at all
    UNIQUE(run_id, turn_id)
)"""

# One embedding per turn and embedding run (its model and text kind in the run's config), and the
# neighbour statistics over that run's embeddings (the Magpie reference's min_neighbor_distance and
# repeat_count), recomputed whole when the run gains embeddings.
EMBEDDINGS_TABLE = """CREATE TABLE embeddings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the embedding run
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    vector BLOB NOT NULL,                         -- L2-normalised, float16 little-endian
    UNIQUE(run_id, turn_id)
)"""

NEIGHBOURS_TABLE = """CREATE TABLE neighbours (
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the embedding run
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    nearest_turn_id INTEGER REFERENCES turns(id), -- NULL when the turn is alone in the run
    distance REAL,                                -- cosine distance (1 - cosine) to the nearest other turn
    repeats INTEGER NOT NULL,                     -- other turns within `radius`
    radius REAL NOT NULL,{graph}
    PRIMARY KEY (run_id, turn_id)
)"""
# Since schema 7, each turn's most similar other turns (the graph select --diverse reads), most similar
# first: turn ids as int64 little-endian (-1 pads), and their cosines as float32 little-endian.
NEIGHBOUR_GRAPH_COLUMNS = ("similar BLOB", "similarity BLOB")
NEIGHBOURS_TABLE_V6 = NEIGHBOURS_TABLE.format(graph="")
NEIGHBOURS_TABLE = NEIGHBOURS_TABLE.format(graph="".join(f"\n    {c}," for c in NEIGHBOUR_GRAPH_COLUMNS))

# How each named selection was made: every select argument, as JSON (its turns are in `selections`).
SELECTION_DEFINITIONS_TABLE = """CREATE TABLE selection_definitions (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created_at TEXT NOT NULL
)"""

# A person's decisions on a turn (the review app): each decision is a row, the latest counts; an edit
# is a revision, the turn itself is never changed (export takes a turn's latest revision). Full-text
# search runs over turns and revisions alike (FTS5, external content: the text is not stored twice).
REVIEW_TABLES = [
    """CREATE TABLE reviews (
    id INTEGER PRIMARY KEY,
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    state TEXT NOT NULL,                          -- 'accepted' | 'rejected' | 'flagged' | 'unreviewed' (taken back)
    note TEXT,
    created_at TEXT NOT NULL
)""",
    "CREATE INDEX reviews_turn ON reviews(turn_id, id)",
    """CREATE TABLE revisions (
    id INTEGER PRIMARY KEY,
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    instruction TEXT NOT NULL, input TEXT, response TEXT NOT NULL,
    note TEXT,
    created_at TEXT NOT NULL
)""",
    "CREATE INDEX revisions_turn ON revisions(turn_id, id)",
    "CREATE VIRTUAL TABLE turns_fts USING fts5(instruction, response, content='turns', content_rowid='id')",
    """CREATE TRIGGER turns_fts_add AFTER INSERT ON turns BEGIN
    INSERT INTO turns_fts(rowid, instruction, response) VALUES (new.id, new.instruction, new.response);
END""",
    "CREATE VIRTUAL TABLE revisions_fts USING fts5(instruction, response, content='revisions', content_rowid='id')",
    """CREATE TRIGGER revisions_fts_add AFTER INSERT ON revisions BEGIN
    INSERT INTO revisions_fts(rowid, instruction, response) VALUES (new.id, new.instruction, new.response);
END""",
    # The review table sorts and filters by these at 100k pairs.
    "CREATE INDEX scores_run_ifd ON scores(run_id, ifd)",
    "CREATE INDEX ratings_run_score ON ratings(run_id, score)",
    "CREATE INDEX checks_failed ON checks(name, passed, turn_id)",
]

# `magpie-local verify`: a generation run's items made again from their seeds and compared byte for byte.
VERIFICATIONS_TABLE = """CREATE TABLE verifications (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the generation run replayed
    items TEXT NOT NULL,                          -- JSON: the item indices made again
    identical INTEGER NOT NULL,                   -- how many of them came out the same, byte for byte
    mismatches TEXT NOT NULL,                     -- JSON: one line per item that did not
    engine TEXT NOT NULL,                         -- JSON: the backend's description (versions, build)
    checked_at TEXT NOT NULL
)"""

SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,                 -- 'generate' | 'import' | 'respond' | 'score' | 'tag' | 'judge' | 'embed'
    status TEXT NOT NULL,               -- 'running' | 'complete'
    target INTEGER NOT NULL,            -- kept conversations wanted (generate), items (import, score)
    config_key TEXT NOT NULL,           -- hash of the settings that decide the output
    config TEXT NOT NULL,               -- full settings, JSON
    model TEXT, model_path TEXT, model_sha256 TEXT,
    backend TEXT, versions TEXT,        -- JSON
    created_at TEXT NOT NULL, updated_at TEXT, finished_at TEXT
);
CREATE INDEX runs_config_key ON runs(config_key);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    batch_index INTEGER NOT NULL,
    first_item INTEGER NOT NULL, n_items INTEGER NOT NULL,
    kept INTEGER NOT NULL, dropped INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    committed_at TEXT NOT NULL,
    UNIQUE(run_id, batch_index)
);
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    item_index INTEGER NOT NULL,        -- attempt number within the run; decides the seeds
    batch_id INTEGER NOT NULL REFERENCES batches(id),
    status TEXT NOT NULL,               -- 'kept' | 'dropped' | 'pending' (an imported instruction awaiting `respond`)
    drop_reason TEXT,
    system_prompt TEXT,
    system_name TEXT,                   -- task or mixture entry the system prompt came from
    created_at TEXT NOT NULL,
    source_id INTEGER REFERENCES conversations(id),  -- respond runs: the conversation whose instruction this answers
    sample_index INTEGER,               -- respond runs: which of the K responses to that instruction
    UNIQUE(run_id, item_index)
);
CREATE INDEX conversations_run_status ON conversations(run_id, status);
CREATE TABLE turns (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    turn_index INTEGER NOT NULL,
    instruction TEXT NOT NULL, raw_instruction TEXT, input TEXT, response TEXT NOT NULL,
    instruction_cleanup TEXT,           -- edits made to raw_instruction, '; '-separated
    raw_response TEXT,                  -- only where clean-up changed the response
    -- generation facts; NULL for imported data
    instruction_tokens INTEGER, response_tokens INTEGER,
    instruction_prompt_tokens INTEGER, response_prompt_tokens INTEGER,
    instruction_finish TEXT, response_finish TEXT,
    instruction_seed INTEGER, response_seed INTEGER,
    instruction_seconds REAL, response_seconds REAL,
    UNIQUE(conversation_id, turn_index)
);
CREATE TABLE scores (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),  -- the scoring run
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    loss_direct REAL, loss_cond REAL,             -- NULL when skipped
    answer_tokens INTEGER NOT NULL, context_tokens INTEGER NOT NULL,
    ifd REAL, ifd_ppl REAL, ifd_above_1 INTEGER,
    truncated INTEGER NOT NULL,
    skip_reason TEXT,
    UNIQUE(run_id, turn_id)
);
CREATE TABLE selections (
    name TEXT NOT NULL,
    turn_id INTEGER NOT NULL REFERENCES turns(id),
    score_run_id INTEGER REFERENCES runs(id),
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, turn_id)
);
CREATE TABLE model_hashes (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
);
""" + ";\n".join((CHECKS_TABLE, TAGS_TABLE, RATINGS_TABLE, EMBEDDINGS_TABLE, NEIGHBOURS_TABLE,
                                  SELECTION_DEFINITIONS_TABLE, *REVIEW_TABLES, VERIFICATIONS_TABLE)) + ";"


# Schema changes, by the version they lead to. A database from an older magpie-local is
# brought up to date when opened, in one transaction.
MIGRATIONS = {
    2: ["ALTER TABLE conversations ADD COLUMN system_name TEXT",
        "ALTER TABLE turns ADD COLUMN instruction_cleanup TEXT",
        "ALTER TABLE turns ADD COLUMN raw_response TEXT"],
    3: [CHECKS_TABLE],
    4: [TAGS_TABLE],
    5: ["ALTER TABLE conversations ADD COLUMN source_id INTEGER REFERENCES conversations(id)",
        "ALTER TABLE conversations ADD COLUMN sample_index INTEGER",
        RATINGS_TABLE],
    6: [EMBEDDINGS_TABLE, NEIGHBOURS_TABLE_V6, SELECTION_DEFINITIONS_TABLE],
    7: [f"ALTER TABLE neighbours ADD COLUMN {c}" for c in NEIGHBOUR_GRAPH_COLUMNS],
    8: [*REVIEW_TABLES, "INSERT INTO turns_fts(turns_fts) VALUES ('rebuild')"],
    9: [VERIFICATIONS_TABLE],
}


RESULT_TABLES = ("scores", "tags", "ratings", "embeddings")  # one row per turn and scoring, tagging, judging
# or embedding run
DATA_KINDS = ("generate", "import", "respond")  # runs that hold conversations
REVIEW_STATES = ("accepted", "rejected", "flagged", "unreviewed")
REVIEWED = ("accepted", "not-rejected")  # what select and export can ask of a turn's latest decision


class StoreError(MagpieError, RuntimeError):
    """The database cannot be used (not ours, newer schema, unwritable, corrupt)."""


def database_error(e: sqlite3.Error) -> str:
    """One sentence for an SQLite error, saying what it means for the user's data."""
    text = str(e)
    if "full" in text or "disk I/O" in text:
        return (f"database error: {text} (is the disk full?); the batch in progress was rolled back: "
                "free some space and run the same command again to resume")
    if "locked" in text or "busy" in text:
        return "database error: the database is locked by another program; try again when it is done"
    if "malformed" in text or "not a database" in text:
        return f"database error: the file is damaged ({text}); restore it from a copy"
    if "readonly" in text:
        return "database error: the database file is read-only"
    return f"database error: {text}"


def config_key(config: dict) -> str:
    """A short stable hash of the settings that decide a run's output (finds the run to resume)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    id: int
    kind: str
    status: str
    target: int
    config: dict
    created_at: str
    backend: str = ""
    model: str = ""  # the model's name (file name without .gguf)
    model_sha256: str = ""
    model_path: str = ""

    @classmethod
    def from_row(cls, row: dict) -> Run:
        return cls(id=row["id"], kind=row["kind"], status=row["status"], target=row["target"],
                   config=json.loads(row["config"]), created_at=row["created_at"], backend=row.get("backend") or "",
                   model=row.get("model") or "", model_sha256=row.get("model_sha256") or "",
                   model_path=row.get("model_path") or "")


class Store:
    """A magpie-local database. `write=True` (commands that add data) also takes the database's
    writer lock, so a second writing process is refused with a clear message instead of racing."""

    def __init__(self, path: str | Path, *, create: bool = True, write: bool = True, check: bool = True):
        """`check=False` skips the integrity check on opening (a process that checked the file once
        and opens it again and again: the review app)."""
        self.path = Path(path)
        self.writable = write
        self._lock_fd: int | None = None
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a database file")
        if not self.path.exists():
            if not create:
                raise StoreError(f"no database at {self.path}")
            parent = self.path.resolve().parent
            if not parent.is_dir():
                raise StoreError(f"cannot create {self.path}: directory {parent} does not exist")
            if not os.access(parent, os.W_OK):
                raise StoreError(f"cannot create {self.path}: directory {parent} is not writable")
        elif not os.access(self.path.resolve().parent, os.W_OK):  # SQLite writes its -wal and -shm beside the file
            raise StoreError(f"cannot open {self.path}: its folder {self.path.resolve().parent} is not writable, and "
                             "SQLite keeps its journal files there (copy the database somewhere writable)")
        elif write and not os.access(self.path, os.W_OK):
            raise StoreError(f"cannot write to {self.path}: the file is read-only")
        if write:
            self._lock()
        try:
            self._open(create, check=check)
        except BaseException:
            self._unlock()
            raise

    def _open(self, create: bool, check: bool) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path}: {e}") from None
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        except sqlite3.DatabaseError as e:
            conn.close()
            if "malformed" in str(e):
                raise StoreError(f"{self.path} is damaged ({e}); restore it from a copy") from None
            raise StoreError(f"{self.path} is not a usable SQLite database ({e})") from None
        if app_id != APPLICATION_ID:
            conn.close()
            if tables or app_id:
                raise StoreError(f"{self.path} was not created by magpie-local; use another --db path")
            if not create:
                raise StoreError(f"{self.path} is an empty database, not a magpie-local one")
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
            self._initialise(conn)
        elif version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{self.path} was written by a newer magpie-local (schema {version}, "
                             f"this version reads up to {SCHEMA_VERSION}); upgrade magpie-local")
        else:
            if check:  # never read a damaged file as if it were sound, nor write into it and spread the damage
                try:
                    problem = conn.execute("PRAGMA quick_check").fetchone()[0]
                except sqlite3.DatabaseError as e:
                    problem = str(e)
                if problem != "ok":
                    conn.close()
                    first = [line for line in problem.splitlines() if not line.startswith("***")] or [problem]
                    raise StoreError(f"{self.path} is damaged ({first[0]}); restore it from a copy")
            if version < SCHEMA_VERSION:
                self._migrate(conn, version)
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.conn = conn

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        steps = [sql for v in range(version + 1, SCHEMA_VERSION + 1) for sql in MIGRATIONS[v]]
        try:
            conn.executescript("BEGIN; " + "; ".join(steps) + f"; PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error as e:
            conn.rollback()
            conn.close()
            raise StoreError(f"cannot upgrade {self.path} from schema {version} to {SCHEMA_VERSION}: {e}") from None

    def _initialise(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(f"BEGIN; {SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                               f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot initialise {self.path}: {e}") from None

    def _lock_path(self) -> Path:
        """The writer lock of this database file, named by the file's identity (its device and inode),
        so every name of the file (a symlink, a hard link) takes the same lock. It lives in a folder
        of this user's in the temporary directory, not beside the database: hard links to one file
        can sit in different folders. The file is made (empty, for SQLite to fill) if it is new."""
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        st = os.stat(self.path)
        folder = Path(tempfile.gettempdir()) / f"magpie-local-locks-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{st.st_dev}-{st.st_ino}.lock"

    def _lock(self) -> None:
        """An advisory lock on the database file's lock (_lock_path), held until close() or the
        process ends (even by SIGKILL)."""
        if fcntl is None:  # Windows: no advisory locks; SQLite's own locking still keeps the file sound
            return
        try:
            lock_path = self._lock_path()
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot lock {self.path} for writing: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"another magpie-local process (pid {holder}) is writing to {self.path}; "
                             "wait for it to finish or use another --db") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction, nested ones as savepoints. BEGIN IMMEDIATE takes the write lock
        first (waiting up to BUSY_TIMEOUT): a deferred transaction that reads before it writes fails
        at once, without waiting, when another program (the review page beside generate) committed
        in between."""
        if self.conn.in_transaction:
            with self.db.atomic():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()
        self._unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cut_off_count(self, run_id: int | None = None) -> int:
        """Kept turns whose response hit the token limit, in one run or in all."""
        where = "c.status = 'kept' AND t.response_finish = 'length'" + (" AND c.run_id = ?" if run_id else "")
        return self.conn.execute(f"SELECT count(*) FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                 f"WHERE {where}", [run_id] if run_id else []).fetchone()[0]

    # -- runs ---------------------------------------------------------------------------

    def create_run(self, *, kind: str, target: int, config_key: str, config: dict, model: dict,
                   backend: str, versions: dict) -> Run:
        with self._writing():
            row = dict(kind=kind, status="running", target=target, config_key=config_key,
                       config=json.dumps(config, sort_keys=True), model=model.get("name"),
                       model_path=model.get("path"), model_sha256=model.get("sha256"), backend=backend,
                       versions=json.dumps(versions, sort_keys=True), created_at=now(), updated_at=now())
            run_id = self.db["runs"].insert(row).last_pk
        return self.get_run(run_id)

    def get_run(self, run_id: int) -> Run:
        rows = list(self.db["runs"].rows_where("id = ?", [run_id]))
        if not rows:
            raise StoreError(f"no run {run_id} in {self.path}")
        return Run.from_row(rows[0])

    def find_run(self, kind: str, config_key: str) -> Run | None:
        rows = list(self.db["runs"].rows_where("kind = ? AND config_key = ?", [kind, config_key],
                                               order_by="id DESC", limit=1))
        return Run.from_row(rows[0]) if rows else None

    def set_target(self, run_id: int, target: int) -> None:
        with self._writing():
            self.db["runs"].update(run_id, {"target": target, "status": "running", "finished_at": None,
                                            "updated_at": now()})

    def finish_run(self, run_id: int) -> None:
        with self._writing():
            self.db["runs"].update(run_id, {"status": "complete", "finished_at": now(), "updated_at": now()})

    def run_counts(self, run_id: int) -> dict[str, int]:
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE status='kept'), count(*) FILTER (WHERE status='dropped'), "
            "coalesce(max(item_index) + 1, 0), count(*) FILTER (WHERE status='pending') "
            "FROM conversations WHERE run_id = ?", [run_id]).fetchone()
        batches = self.conn.execute("SELECT count(*) FROM batches WHERE run_id = ?", [run_id]).fetchone()[0]
        return {"kept": row[0], "dropped": row[1], "next_item": row[2], "batches": batches, "pending": row[3]}

    def list_runs(self) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT r.id, r.kind, r.status, r.target, r.model, r.backend, r.created_at, r.finished_at, "
            "  CASE r.kind WHEN 'score' THEN (SELECT count(*) FROM scores s WHERE s.run_id = r.id) "
            "  WHEN 'tag' THEN (SELECT count(*) FROM tags g WHERE g.run_id = r.id) "
            "  WHEN 'judge' THEN (SELECT count(*) FROM ratings g WHERE g.run_id = r.id) "
            "  WHEN 'embed' THEN (SELECT count(*) FROM embeddings g WHERE g.run_id = r.id) "
            "  ELSE (SELECT count(*) FROM conversations c WHERE c.run_id = r.id AND c.status IN ('kept', 'pending')) "
            "  END AS kept, "
            "  (SELECT count(*) FROM conversations c WHERE c.run_id = r.id AND c.status = 'dropped') AS dropped, "
            "  (SELECT coalesce(sum(completion_tokens), 0) FROM batches b WHERE b.run_id = r.id) AS tokens, "
            "  (SELECT coalesce(sum(seconds), 0) FROM batches b WHERE b.run_id = r.id) AS seconds "
            "FROM runs r ORDER BY r.id"))

    def kept_instruction_keys(self, run_id: int) -> set[str]:
        """Normalised first instructions of the run's kept (or pending) conversations (for duplicate checks)."""
        rows = self.conn.execute(
            "SELECT t.instruction FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE c.run_id = ? AND c.status IN ('kept', 'pending') AND t.turn_index = 0", [run_id])
        return {normalized(r[0]) for r in rows}

    def drop_reasons(self, run_id: int) -> dict[str, int]:
        rows = self.conn.execute("SELECT drop_reason, count(*) FROM conversations WHERE run_id = ? AND "
                                 "status = 'dropped' GROUP BY drop_reason ORDER BY count(*) DESC", [run_id])
        return {r[0] or "unknown": r[1] for r in rows}

    # -- batches ------------------------------------------------------------------------

    def commit_batch(self, run_id: int, batch: dict, conversations: Iterable[tuple[dict, list[dict]]]) -> None:
        """Store a batch and its conversations (each with its turns) in one transaction."""
        with self._writing():
            batch_index = self.conn.execute("SELECT count(*) FROM batches WHERE run_id = ?", [run_id]).fetchone()[0]
            batch_id = self.db["batches"].insert(
                dict(batch, run_id=run_id, batch_index=batch_index, committed_at=now())).last_pk
            for conversation, turns in conversations:
                conv_id = self.db["conversations"].insert(
                    dict(conversation, run_id=run_id, batch_id=batch_id, created_at=now())).last_pk
                self.db["turns"].insert_all(
                    [dict(turn, conversation_id=conv_id, turn_index=i) for i, turn in enumerate(turns)])
            self.db["runs"].update(run_id, {"updated_at": now()})

    # -- model hashes -------------------------------------------------------------------

    def cached_sha256(self, path: Path, compute) -> str:
        """sha256 of a model file or directory, cached by path, size and modification time."""
        stats = [p.stat() for p in path.iterdir() if p.is_file()] if path.is_dir() else [path.stat()]
        key = [str(path.resolve()), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        row = self.conn.execute("SELECT sha256 FROM model_hashes WHERE path=? AND size=? AND mtime_ns=?",
                                key).fetchone()
        if row:
            return row[0]
        digest = compute(path)
        with self._writing():
            self.db["model_hashes"].insert(dict(zip(["path", "size", "mtime_ns"], key), sha256=digest),
                                           replace=True)
        return digest

    # -- scoring ------------------------------------------------------------------------

    def turns_to_score(self, score_run_id: int, source_runs: list[int] | None, limit: int,
                       table: str = "scores") -> list[dict]:
        """Kept turns without a row in `table` (scores or tags) for this run, with their conversation so far."""
        assert table in RESULT_TABLES
        where = "c.status = 'kept' AND s.id IS NULL"
        params: list[Any] = [score_run_id]
        if source_runs:
            where += f" AND c.run_id IN ({', '.join('?' * len(source_runs))})"
            params += source_runs
        rows = list(self.db.query(
            "SELECT t.id, t.conversation_id, t.turn_index, t.instruction, t.input, t.response, c.system_prompt "
            "FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            f"LEFT JOIN {table} s ON s.turn_id = t.id AND s.run_id = ? "
            f"WHERE {where} ORDER BY t.id LIMIT ?", [*params, limit]))
        for row in rows:
            row["history"] = tuple(self.conn.execute(
                "SELECT instruction, response FROM turns WHERE conversation_id = ? AND turn_index < ? "
                "ORDER BY turn_index", [row["conversation_id"], row["turn_index"]]).fetchall())
        return rows

    def count_turns(self, source_runs: list[int] | None) -> int:
        where, params = "c.status = 'kept'", []
        if source_runs:
            where += f" AND c.run_id IN ({', '.join('?' * len(source_runs))})"
            params = source_runs
        return self.conn.execute(f"SELECT count(*) FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                 f"WHERE {where}", params).fetchone()[0]

    def commit_scores(self, score_run_id: int, rows: list[dict], table: str = "scores") -> None:
        """Store one batch of a scoring (or tagging) run's rows, all or nothing."""
        assert table in RESULT_TABLES
        with self._writing():
            self.db[table].insert_all([dict(r, run_id=score_run_id) for r in rows])
            self.db["runs"].update(score_run_id, {"updated_at": now()})

    def run_ids(self, kind: str) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM runs WHERE kind = ? ORDER BY id", [kind])]

    # -- verification ---------------------------------------------------------------------

    def item_indices(self, run_id: int) -> list[int]:
        """The item indices of a run's stored conversations, kept or dropped."""
        return [r[0] for r in self.conn.execute(
            "SELECT item_index FROM conversations WHERE run_id = ? ORDER BY item_index", [run_id])]

    def stored_items(self, run_id: int, items: list[int],
                     fields: tuple[str, ...]) -> dict[int, tuple[dict, list[dict]]]:
        """{item: (conversation, [turns])} as generation stored them: the conversation's status,
        drop reason and system prompt, and each turn's `fields`, in turn order."""
        out: dict[int, tuple[dict, list[dict]]] = {}
        marks = ", ".join("?" * len(items))
        for row in self.db.query(
                f"SELECT c.id, c.item_index, c.status, c.drop_reason, c.system_prompt, c.system_name "
                f"FROM conversations c WHERE c.run_id = ? AND c.item_index IN ({marks})", [run_id, *items]):
            turns = list(self.db.query(f"SELECT {', '.join(fields)} FROM turns WHERE conversation_id = ? "
                                       "ORDER BY turn_index", [row.pop("id")]))
            out[row["item_index"]] = (row, turns)
        return out

    def add_verification(self, run_id: int, items: list[int], identical: int, mismatches: list[str],
                         engine: dict) -> None:
        with self._writing():
            self.db["verifications"].insert(dict(run_id=run_id, items=json.dumps(items), identical=identical,
                                                 mismatches=json.dumps(mismatches), engine=json.dumps(engine),
                                                 checked_at=now()))

    def latest_verification(self, run_id: int) -> dict | None:
        rows = list(self.db["verifications"].rows_where("run_id = ?", [run_id], order_by="id DESC", limit=1))
        if not rows:
            return None
        row = rows[0]
        return dict(row, items=json.loads(row["items"]), mismatches=json.loads(row["mismatches"]),
                    engine=json.loads(row["engine"]))

    def latest_run(self, kind: str) -> Run | None:
        rows = list(self.db["runs"].rows_where("kind = ?", [kind], order_by="id DESC", limit=1))
        return Run.from_row(rows[0]) if rows else None

    def turns_to_check(self, runs: list[int] | None) -> list[dict]:
        """Kept turns (of `runs`, or of every data run) in store order."""
        where, params = f"c.status = 'kept' AND r.kind IN {DATA_KINDS}", []
        if runs:
            where += f" AND c.run_id IN ({', '.join('?' * len(runs))})"
            params = runs
        return list(self.db.query(
            "SELECT t.id, t.conversation_id, c.source_id, t.turn_index, t.instruction, t.input, t.response, "
            "t.response_finish "
            "FROM turns t JOIN conversations c ON c.id = t.conversation_id JOIN runs r ON r.id = c.run_id "
            f"WHERE {where} ORDER BY c.run_id, c.item_index, t.turn_index", params))

    def replace_checks(self, rows: list[dict]) -> None:
        with self._writing():
            self.db["checks"].insert_all([dict(r, checked_at=now()) for r in rows], replace=True)

    def check_counts(self) -> dict[str, tuple[int, int]]:
        """{check: (passed, failed)} over every checked turn."""
        return {r[0]: (r[1], r[2]) for r in self.conn.execute(
            "SELECT name, sum(passed), sum(1 - passed) FROM checks GROUP BY name ORDER BY name")}

    def replace_selection(self, name: str, turn_ids: list[int], score_run_id: int | None,
                          definition: dict | None = None) -> None:
        with self._writing():
            self.conn.execute("DELETE FROM selections WHERE name = ?", [name])
            self.conn.execute("DELETE FROM selection_definitions WHERE name = ?", [name])
            self.db["selections"].insert_all([dict(name=name, turn_id=t, score_run_id=score_run_id, created_at=now())
                                              for t in turn_ids])
            if definition is not None:
                self.db["selection_definitions"].insert(dict(name=name, created_at=now(),
                                                             definition=json.dumps(definition, sort_keys=True)))

    def selection_definition(self, name: str) -> dict | None:
        row = self.conn.execute("SELECT definition FROM selection_definitions WHERE name = ?", [name]).fetchone()
        return json.loads(row[0]) if row else None

    # -- reads for show, stats, select, export and report --------------------------------

    def last_run_id(self) -> int | None:
        return self.conn.execute("SELECT max(id) FROM runs").fetchone()[0]

    def conversations(self, run_id: int, status: str = "kept", limit: int | None = None) -> list[dict]:
        """A run's conversations with that status, in item order, each with its `turns` (dicts)."""
        rows = list(self.db.query(
            "SELECT id, item_index, system_name, system_prompt, drop_reason FROM conversations "
            "WHERE run_id = ? AND status = ? ORDER BY item_index LIMIT ?", [run_id, status, -1 if limit is None
                                                                             else limit]))
        for row in rows:
            row["turns"] = list(self.db.query(
                "SELECT instruction, raw_instruction, instruction_cleanup, response, response_finish FROM turns "
                "WHERE conversation_id = ? ORDER BY turn_index", [row["id"]]))
        return rows

    def kept_response_lengths(self) -> list[int]:
        """Characters of every kept turn's response."""
        return [r[0] for r in self.conn.execute(
            "SELECT length(t.response) FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE c.status = 'kept'")]

    def rows_done(self, run_id: int, table: str) -> int:
        """Rows a scoring or tagging run has committed."""
        assert table in RESULT_TABLES
        return self.conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()[0]

    def score_rows(self, score_run_id: int) -> list[dict]:
        return list(self.db.query("SELECT turn_id, ifd, truncated, skip_reason FROM scores WHERE run_id = ?",
                                  [score_run_id]))

    def tag_counts(self, tag_run_id: int, columns) -> tuple[int, dict[str, dict[str, int]]]:
        """(failed answers, {column: {value: count}}) of a tagging run; `columns` are tagging.FIELDS names."""
        failed = self.conn.execute("SELECT count(*) FROM tags WHERE run_id = ? AND error IS NOT NULL",
                                   [tag_run_id]).fetchone()[0]
        counts = {}
        for column in columns:
            assert column.isidentifier()
            counts[column] = dict(self.conn.execute(
                f"SELECT {column}, count(*) FROM tags WHERE run_id = ? AND error IS NULL GROUP BY {column}",
                [tag_run_id]).fetchall())
        return failed, counts

    def check_names(self) -> set[str]:
        """Every curation check that `curate` has stored verdicts for."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT name FROM checks")}

    def check_settings(self, name: str | None = None) -> list[str]:
        """The distinct settings (JSON) stored with the checks' verdicts, of one check or all, latest first."""
        return [r[0] for r in self.conn.execute(
            "SELECT settings FROM checks WHERE ? IS NULL OR name = ? GROUP BY settings ORDER BY max(checked_at) DESC",
            [name, name])]

    def _passing(self, checks: list[str], turn_column: str) -> tuple[str, list[str]]:
        """(SQL, params): `turn_column` passed each named check (a turn never checked does not pass)."""
        sql = " AND ".join(f"EXISTS (SELECT 1 FROM checks k WHERE k.turn_id = {turn_column} AND k.name = ? "
                           "AND k.passed = 1)" for _ in checks)
        return sql, list(checks)

    @staticmethod
    def _rated(turn_column: str) -> str:
        """SQL (params: judging run, minimum score): the turn's rating in that run is at least the minimum."""
        return f"EXISTS (SELECT 1 FROM ratings g WHERE g.turn_id = {turn_column} AND g.run_id = ? AND g.score >= ?)"

    @staticmethod
    def _spaced(turn_column: str, embed_run_id: int, min_distance: float | None,
                max_repeats: int | None) -> tuple[str, list]:
        """SQL and params: in that embedding run the turn's nearest neighbour is at least
        `min_distance` away (or it has none) and at most `max_repeats` turns lie within the radius."""
        return (f"EXISTS (SELECT 1 FROM neighbours n WHERE n.turn_id = {turn_column} AND n.run_id = ? "
                "AND (n.distance IS NULL OR n.distance >= ?) AND n.repeats <= ?)",
                [embed_run_id, min_distance or 0.0, 2**62 if max_repeats is None else max_repeats])

    def scored_turns(self, score_run_id: int, *, keep_above_1: bool = False, min_ifd: float | None = None,
                     max_ifd: float | None = None, passing: list[str] | None = None,
                     tags: list[tuple[str, list[str]]] | None = None,
                     tag_run_id: int | None = None, min_judge: float | None = None,
                     judge_run_id: int | None = None, min_distance: float | None = None,
                     max_repeats: int | None = None, embed_run_id: int | None = None,
                     reviewed: str | None = None) -> list[tuple[int, float]]:
        """(turn id, IFD) of a scoring run's scored turns, highest IFD first, filtered: IFD > 1 left out
        unless asked, IFD bounds, curation checks passed, tags ((column, values): one of the values)
        of a tagging run, an embedding run's neighbour statistics (nearest neighbour at least
        `min_distance` away, at most `max_repeats` within its radius), and the latest review
        (`reviewed`: one of REVIEWED)."""
        where, params = ["run_id = ?", "ifd IS NOT NULL"], [score_run_id]
        if not keep_above_1:
            where.append("ifd <= 1")
        if min_ifd is not None:
            where.append("ifd >= ?")
            params.append(min_ifd)
        if max_ifd is not None:
            where.append("ifd <= ?")
            params.append(max_ifd)
        if passing:
            sql, values = self._passing(passing, "scores.turn_id")
            where.append(sql)
            params += values
        if min_judge is not None:
            where.append(self._rated("scores.turn_id"))
            params += [judge_run_id, min_judge]
        if min_distance is not None or max_repeats is not None:
            sql, values = self._spaced("scores.turn_id", embed_run_id, min_distance, max_repeats)
            where.append(sql)
            params += values
        if reviewed:
            where.append(self._reviewed("scores.turn_id", reviewed))
        for column, wanted in tags or ():
            assert column.isidentifier()
            where.append(f"EXISTS (SELECT 1 FROM tags g WHERE g.turn_id = scores.turn_id AND g.run_id = ? "
                         f"AND g.{column} IN ({', '.join('?' * len(wanted))}))")
            params += [tag_run_id, *wanted]
        return [tuple(r) for r in self.conn.execute(
            f"SELECT turn_id, ifd FROM scores WHERE {' AND '.join(where)} ORDER BY ifd DESC, turn_id", params)]

    def selection_info(self, name: str) -> tuple[int | None, int]:
        """(the scoring run a selection came from, its number of turns); 0 turns: no such selection."""
        found = self.conn.execute("SELECT max(score_run_id), count(*) FROM selections WHERE name = ?",
                                  [name]).fetchone()
        return found[0], found[1]

    def export_rows(self, *, score_run_id: int | None, selection: str | None, runs: list[int] | None,
                    passing: list[str] | None, min_judge: float | None = None,
                    judge_run_id: int | None = None, min_distance: float | None = None,
                    max_repeats: int | None = None, embed_run_id: int | None = None,
                    reviewed: str | None = None) -> list[tuple]:
        """(conversation id, run id, system prompt, instruction, input, response, response finish, IFD,
        edited) of every turn of the kept conversations of generated/imported runs to export, in store
        order, the text a turn's latest revision where it was edited; filters as scored_turns, each
        holding for every turn of a conversation."""
        where, params = ["c.status = 'kept'", f"r.kind IN {DATA_KINDS}"], []
        if selection is not None:
            where.append("c.id IN (SELECT t.conversation_id FROM selections s JOIN turns t ON t.id = s.turn_id "
                         "WHERE s.name = ?)")
            params.append(selection)
        if runs:
            where.append(f"c.run_id IN ({', '.join('?' * len(runs))})")
            params += runs
        if passing:
            sql, values = self._passing(passing, "u.id")
            where.append(f"NOT EXISTS (SELECT 1 FROM turns u WHERE u.conversation_id = c.id AND NOT ({sql}))")
            params += values
        if min_judge is not None:  # every turn rated at least that
            where.append(f"NOT EXISTS (SELECT 1 FROM turns u WHERE u.conversation_id = c.id AND NOT "
                         f"{self._rated('u.id')})")
            params += [judge_run_id, min_judge]
        if min_distance is not None or max_repeats is not None:
            sql, values = self._spaced("u.id", embed_run_id, min_distance, max_repeats)
            where.append(f"NOT EXISTS (SELECT 1 FROM turns u WHERE u.conversation_id = c.id AND NOT {sql})")
            params += values
        if reviewed:
            where.append(f"NOT EXISTS (SELECT 1 FROM turns u WHERE u.conversation_id = c.id AND NOT "
                         f"{self._reviewed('u.id', reviewed)})")
        return self.conn.execute(
            "SELECT c.id, c.run_id, c.system_prompt, coalesce(v.instruction, t.instruction), "
            "CASE WHEN v.turn_id IS NULL THEN t.input ELSE v.input END, coalesce(v.response, t.response), "
            "t.response_finish, (SELECT s.ifd FROM scores s WHERE s.turn_id = t.id AND s.run_id = ?), "
            "v.turn_id IS NOT NULL FROM conversations c JOIN runs r ON r.id = c.run_id "
            f"JOIN turns t ON t.conversation_id = c.id LEFT JOIN {self.LATEST_REVISION} "
            f"WHERE {' AND '.join(where)} ORDER BY c.run_id, c.item_index, t.turn_index",
            [score_run_id, *params]).fetchall()

    def tag_value_counts(self, tag_run_id: int, column: str, conversation_ids: list[int]) -> list[tuple[str, int]]:
        """(value, count) of one tag column over the turns of these conversations, most common first."""
        assert column.isidentifier()
        return self.conn.execute(
            f"SELECT g.{column}, count(*) FROM tags g JOIN turns t ON t.id = g.turn_id WHERE g.run_id = ? "
            f"AND g.error IS NULL AND t.conversation_id IN (SELECT value FROM json_each(?)) "
            f"GROUP BY g.{column} ORDER BY count(*) DESC", [tag_run_id, json.dumps(conversation_ids)]).fetchall()

    def kept_turns(self) -> list[tuple]:
        """(turn id, instruction, response, response finish, run id, item index) of every kept turn."""
        return self.conn.execute(
            "SELECT t.id, t.instruction, t.response, t.response_finish, c.run_id, c.item_index "
            "FROM turns t JOIN conversations c ON c.id = t.conversation_id WHERE c.status = 'kept' "
            "ORDER BY t.id").fetchall()

    def ifd_by_turn(self, score_run_id: int) -> dict[int, float]:
        return dict(self.conn.execute("SELECT turn_id, ifd FROM scores WHERE run_id = ? AND ifd IS NOT NULL",
                                      [score_run_id]).fetchall())

    def tags_by_turn(self, tag_run_id: int) -> dict[int, tuple[str, str, str]]:
        return {r[0]: tuple(r[1:]) for r in self.conn.execute(
            "SELECT turn_id, task_category, input_quality, difficulty FROM tags WHERE run_id = ? AND error IS NULL",
            [tag_run_id]).fetchall()}

    # -- respond and preference pairs ---------------------------------------------------

    def instructions_to_answer(self, run_id: int) -> list[dict]:
        """The first-turn instructions of a run's kept and pending conversations, in item order:
        conversation id, system prompt, instruction, input."""
        return list(self.db.query(
            "SELECT c.id, c.system_prompt, t.instruction, t.input FROM conversations c "
            "JOIN turns t ON t.conversation_id = c.id AND t.turn_index = 0 "
            "WHERE c.run_id = ? AND c.status IN ('kept', 'pending') ORDER BY c.item_index", [run_id]))

    def answer_groups(self, run_id: int, judge_run_id: int) -> dict[int, list[dict]]:
        """A respond run's answers by the conversation they answer (in item order): each with its
        conversation and turn id, status, drop reason, instruction, input, system prompt, response (the
        latest revision's where edited), finish reason, the judging run's expected score (None if
        unrated) and the latest review state."""
        groups: dict[int, list[dict]] = {}
        for row in self.db.query(
                "SELECT c.id AS conversation_id, t.id AS turn_id, c.source_id, c.sample_index, c.status, "
                "c.drop_reason, c.system_prompt, t.instruction, t.input, coalesce(v.response, t.response) AS response, "
                "t.response_finish, g.score, (SELECT e.state FROM reviews e WHERE e.turn_id = t.id ORDER BY e.id DESC "
                "LIMIT 1) AS review FROM conversations c JOIN turns t ON t.conversation_id = c.id AND t.turn_index = 0 "
                "LEFT JOIN ratings g ON g.turn_id = t.id AND g.run_id = ? "
                f"LEFT JOIN {self.LATEST_REVISION} "
                "WHERE c.run_id = ? ORDER BY c.item_index", [judge_run_id, run_id]):
            groups.setdefault(row["source_id"], []).append(row)
        return groups

    def failed_checks(self, turn_ids: list[int], checks: list[str]) -> dict[int, str]:
        """{turn id: the first of `checks` it failed or never had} for these turns; passing ones are absent."""
        verdicts: dict[int, dict[str, tuple[int, str | None]]] = {}
        for turn_id, name, passed, reason in self.conn.execute(
                "SELECT turn_id, name, passed, reason FROM checks WHERE turn_id IN (SELECT value FROM json_each(?))",
                [json.dumps(turn_ids)]):
            verdicts.setdefault(turn_id, {})[name] = (passed, reason)
        out = {}
        for turn_id in turn_ids:
            failed = [c for c in checks if not verdicts.get(turn_id, {}).get(c, (0, None))[0]]
            if failed:
                out[turn_id] = failed[0]
        return out

    # -- embeddings and neighbours --------------------------------------------------------

    def embedding_rows(self, embed_run_id: int) -> tuple[list[int], list[bytes]]:
        """(turn ids, float16 vectors as stored) of an embedding run, in turn order."""
        rows = self.conn.execute("SELECT turn_id, vector FROM embeddings WHERE run_id = ? ORDER BY turn_id",
                                 [embed_run_id]).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def replace_neighbours(self, embed_run_id: int, rows: Iterable[dict]) -> None:
        """An embedding run's neighbour statistics, replacing the earlier ones, all or nothing."""
        with self._writing():
            self.conn.execute("DELETE FROM neighbours WHERE run_id = ?", [embed_run_id])
            self.db["neighbours"].insert_all(dict(r, run_id=embed_run_id) for r in rows)

    def neighbour_graph(self, embed_run_id: int) -> dict[int, tuple[bytes, bytes]] | None:
        """{turn id: (similar, similarity) as stored} of an embedding run; None when any turn's
        neighbours were stored without them (before schema 7)."""
        rows = self.conn.execute("SELECT turn_id, similar, similarity FROM neighbours WHERE run_id = ?",
                                 [embed_run_id]).fetchall()
        if not rows or any(r[1] is None for r in rows):
            return None
        return {r[0]: (r[1], r[2]) for r in rows}

    def neighbour_rows(self, embed_run_id: int) -> list[dict]:
        return list(self.db.query("SELECT turn_id, nearest_turn_id, distance, repeats, radius FROM neighbours "
                                  "WHERE run_id = ? ORDER BY turn_id", [embed_run_id]))

    def ratings_by_turn(self, judge_run_id: int) -> dict[int, float]:
        return dict(self.conn.execute("SELECT turn_id, score FROM ratings WHERE run_id = ?", [judge_run_id]).fetchall())

    def rating_scores(self, judge_run_id: int) -> list[float]:
        return [r[0] for r in self.conn.execute("SELECT score FROM ratings WHERE run_id = ?", [judge_run_id])]

    # -- review: decisions, revisions, the pairs table ---------------------------------------

    def add_review(self, turn_id: int, state: str, note: str | None = None) -> None:
        assert state in REVIEW_STATES
        with self._writing():
            self.conn.execute("INSERT INTO reviews (turn_id, state, note, created_at) VALUES (?, ?, ?, ?)",
                              [turn_id, state, note, now()])

    def add_revision(self, turn_id: int, instruction: str, input: str | None, response: str,
                     note: str | None = None) -> int:
        with self._writing():
            return self.conn.execute("INSERT INTO revisions (turn_id, instruction, input, response, note, created_at) "
                                     "VALUES (?, ?, ?, ?, ?, ?)", [turn_id, instruction, input, response, note,
                                                                    now()]).lastrowid

    @staticmethod
    def _reviewed(column: str, reviewed: str) -> str:
        """SQL true when the turn `column` names meets `reviewed` (REVIEWED): its latest decision is
        "accepted", or is anything but "rejected" (never reviewed and flagged included)."""
        assert reviewed in REVIEWED
        latest = f"coalesce((SELECT e.state FROM reviews e WHERE e.turn_id = {column} ORDER BY e.id DESC LIMIT 1), '')"
        return f"({latest} = 'accepted')" if reviewed == "accepted" else f"({latest} != 'rejected')"

    def turn_exists(self, turn_id: int) -> bool:
        return self.conn.execute("SELECT 1 FROM turns WHERE id = ?", [turn_id]).fetchone() is not None

    # The latest decision and revision of turn t, looked up per row through the (turn_id, id)
    # indexes: SQLite 3.40 re-runs a grouped "latest of each turn" subquery for every joined row.
    REVIEW_STATE = ("coalesce((SELECT e.state FROM reviews e WHERE e.turn_id = t.id ORDER BY e.id DESC LIMIT 1), "
                    "'unreviewed')")
    LATEST_REVISION = "revisions v ON v.id = (SELECT max(e.id) FROM revisions e WHERE e.turn_id = t.id)"
    PAIR_SORTS = {"id": "t.id", "ifd": "s.ifd", "judge": "g.score", "distance": "n.distance",
                  "length": "length(coalesce(v.response, t.response))"}

    def pair_rows(self, *, runs: dict[str, int | None], data_run: int | None = None, failed: str | None = None,
                  passed: str | None = None, min_ifd: float | None = None, max_ifd: float | None = None,
                  min_judge: float | None = None, max_judge: float | None = None, tag: tuple[str, str] | None = None,
                  min_distance: float | None = None, max_distance: float | None = None,
                  selection: str | None = None, outside_selection: str | None = None, review: str | None = None,
                  search: str | None = None, sort: str = "id", descending: bool = False, limit: int = 50,
                  offset: int = 0) -> tuple[list[dict], int]:
        """(one page of kept turns with their measures, the number of turns that pass the filters) for
        the review table. `runs` names the scoring, judging, tagging and embedding runs the measures
        come from ({"score": id, ...}; None: none); `failed`/`passed` a check name ("any" for failed:
        any check); `review` a state, "edited", or "unreviewed"; `search` an FTS5 query over the
        turns' and their revisions' text. Text is the latest revision's where the turn was edited."""
        assert sort in self.PAIR_SORTS and (tag is None or tag[0].isidentifier())
        where, params = ["c.status = 'kept'"], []
        joins = {"s": ("scores s ON s.turn_id = t.id AND s.run_id = ?", runs.get("score")),
                 "g": ("ratings g ON g.turn_id = t.id AND g.run_id = ?", runs.get("judge")),
                 "n": ("neighbours n ON n.turn_id = t.id AND n.run_id = ?", runs.get("embed")),
                 "tg": ("tags tg ON tg.turn_id = t.id AND tg.run_id = ?", runs.get("tag"))}

        def add(sql: str, *values) -> None:
            where.append(sql)
            params.extend(values)

        def between(column: str, low, high):
            if low is not None:
                add(f"{column} >= ?", low)
            if high is not None:
                add(f"{column} <= ?", high)

        if data_run is not None:
            add("c.run_id = ?", data_run)
        if failed == "any":
            add("t.id IN (SELECT turn_id FROM checks WHERE passed = 0)")
        elif failed:
            add("t.id IN (SELECT turn_id FROM checks WHERE name = ? AND passed = 0)", failed)
        if passed:
            add("t.id IN (SELECT turn_id FROM checks WHERE name = ? AND passed = 1)", passed)
        between("s.ifd", min_ifd, max_ifd)
        between("g.score", min_judge, max_judge)
        between("n.distance", min_distance, max_distance)
        if tag is not None:
            add(f"tg.{tag[0]} = ?", tag[1])
        if selection:
            add("t.id IN (SELECT turn_id FROM selections WHERE name = ?)", selection)
        if outside_selection:
            add("NOT EXISTS (SELECT 1 FROM selections z WHERE z.turn_id = t.id AND z.name = ?)", outside_selection)
        if review == "edited":
            add("t.id IN (SELECT turn_id FROM revisions)")
        elif review:  # a decided state: only reviewed turns can be in it, so look at those alone
            reviewed = "" if review == "unreviewed" else "t.id IN (SELECT turn_id FROM reviews) AND "
            add(f"{reviewed}{self.REVIEW_STATE} = ?", review)
        if search:
            add("(t.id IN (SELECT rowid FROM turns_fts WHERE turns_fts MATCH ?) OR t.id IN (SELECT e.turn_id "
                "FROM revisions e JOIN revisions_fts f ON f.rowid = e.id WHERE revisions_fts MATCH ?))", search, search)
        used = " ".join(where) + " " + self.PAIR_SORTS[sort]
        inner, inner_params, outer, outer_params = [], [], [], []
        for alias, (sql, run_id) in joins.items():
            # Sorting or filtering on a measure keeps only the turns that have it: an inner join, which
            # lets SQLite walk the measure's index in order. Finding the page needs only those.
            if re.search(rf"\b{alias}\.", used):
                inner.append(f"JOIN {sql}")
                inner_params.append(run_id)
            else:
                outer.append(f"LEFT JOIN {sql}")
                outer_params.append(run_id)
        revision = f"LEFT JOIN {self.LATEST_REVISION}"
        found = (f"FROM turns t JOIN conversations c ON c.id = t.conversation_id {' '.join(inner)} "
                 f"{revision if 'v.' in used else ''} WHERE {' AND '.join(where)}")
        total = self.conn.execute(f"SELECT count(*) {found}", [*inner_params, *params]).fetchone()[0]
        order = f"{self.PAIR_SORTS[sort]} {'DESC' if descending else 'ASC'}, t.id"
        # The page's ids first, then their measures: joins for rows an offset skips cost as much as shown ones.
        ids = [row[0] for row in self.conn.execute(f"SELECT t.id {found} ORDER BY {order} LIMIT ? OFFSET ?",
                                                   [*inner_params, *params, limit, offset])]
        shown = {row["id"]: row for row in self.db.query(
            "SELECT t.id, c.run_id, c.item_index, c.source_id, coalesce(v.instruction, t.instruction) AS instruction, "
            "coalesce(v.response, t.response) AS response, t.response_finish, s.ifd, g.score AS judge, n.distance, "
            f"n.repeats, tg.task_category, tg.input_quality, tg.difficulty, {self.REVIEW_STATE} AS state, "
            "v.id IS NOT NULL AS edited, (SELECT group_concat(k.name, ', ') FROM checks k WHERE k.turn_id = t.id "
            "AND k.passed = 0) AS failed FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            f"{' '.join('LEFT JOIN ' + sql for sql, _ in joins.values())} {revision} "
            "WHERE t.id IN (SELECT value FROM json_each(?))",
            [*(run_id for _, run_id in joins.values()), json.dumps(ids)])}
        rows = [shown[i] for i in ids]
        return rows, total

    def pair_detail(self, turn_id: int, runs: dict[str, int | None]) -> dict | None:
        """One turn with everything known of it: its conversation and run, the original and latest
        texts, the measures of `runs`, every check with its reason, the review history, the
        revisions, its most similar turns, and for an answer of a respond run its sibling answers."""
        rows = list(self.db.query(
            "SELECT t.*, c.run_id, c.item_index, c.system_prompt, c.source_id, c.sample_index, r.kind AS run_kind, "
            "r.model AS run_model FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "JOIN runs r ON r.id = c.run_id WHERE t.id = ?", [turn_id]))
        if not rows:
            return None
        pair = rows[0]
        one = lambda sql, run_id: (self.conn.execute(sql, [turn_id, run_id]).fetchone()  # noqa: E731
                                   if run_id is not None else None)
        score = one("SELECT ifd, loss_cond, loss_direct, answer_tokens FROM scores WHERE turn_id = ? AND run_id = ?",
                    runs.get("score"))
        judged = one("SELECT score, distribution FROM ratings WHERE turn_id = ? AND run_id = ?", runs.get("judge"))
        tags = one("SELECT task_category, input_quality, difficulty FROM tags WHERE turn_id = ? AND run_id = ?",
                   runs.get("tag"))
        near = one("SELECT nearest_turn_id, distance, repeats, similar, similarity FROM neighbours "
                   "WHERE turn_id = ? AND run_id = ?", runs.get("embed"))
        pair.update(ifd=score[0] if score else None, judge=judged[0] if judged else None,
                    judge_distribution=json.loads(judged[1]) if judged else None,
                    tags=dict(zip(("task_category", "input_quality", "difficulty"), tags)) if tags else None,
                    nearest=near[0] if near else None, distance=near[1] if near else None,
                    repeats=near[2] if near else None, similar_blob=(near[3], near[4]) if near else None)
        pair["checks"] = list(self.db.query("SELECT name, passed, reason FROM checks WHERE turn_id = ? ORDER BY name",
                                            [turn_id]))
        pair["reviews"] = list(self.db.query("SELECT state, note, created_at FROM reviews WHERE turn_id = ? "
                                             "ORDER BY id", [turn_id]))
        pair["revisions"] = list(self.db.query("SELECT id, instruction, input, response, note, created_at "
                                               "FROM revisions WHERE turn_id = ? ORDER BY id", [turn_id]))
        pair["siblings"] = list(self.db.query(
            "SELECT t.id, c.sample_index, coalesce((SELECT e.response FROM revisions e WHERE e.turn_id = t.id ORDER "
            "BY e.id DESC LIMIT 1), t.response) AS response, g.score AS judge, coalesce((SELECT e.state FROM reviews "
            "e WHERE e.turn_id = t.id ORDER BY e.id DESC LIMIT 1), 'unreviewed') AS state FROM conversations c JOIN "
            "turns t ON "
            "t.conversation_id = c.id AND t.turn_index = 0 LEFT JOIN ratings g ON g.turn_id = t.id AND g.run_id = ? "
            "WHERE c.source_id = ? AND c.run_id = ? AND c.status = 'kept' ORDER BY c.sample_index",
            [runs.get("judge"), pair["source_id"], pair["run_id"]])) if pair["source_id"] else []
        return pair

    def selection_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT name FROM selections ORDER BY name")]

    def turn_snippets(self, turn_ids: list[int]) -> dict[int, str]:
        """{turn id: its instruction} for these turns (neighbour links)."""
        return dict(self.conn.execute("SELECT id, instruction FROM turns WHERE id IN (SELECT value FROM json_each(?))",
                                      [json.dumps(turn_ids)]).fetchall())

    def review_counts(self, runs: list[int] | None = None) -> dict[str, int]:
        """{state: kept turns} by each turn's latest decision, and "edited": kept turns with a
        revision, over the turns of these data runs (None: all)."""
        scope = " AND t.conversation_id IN (SELECT id FROM conversations WHERE status = 'kept'" + (
            ")" if runs is None else " AND run_id IN (SELECT value FROM json_each(?)))")
        params = [] if runs is None else [json.dumps(runs)]
        counts = dict(self.conn.execute(f"SELECT {self.REVIEW_STATE} AS state, count(*) FROM turns t WHERE "
                                        f"t.id IN (SELECT turn_id FROM reviews){scope} GROUP BY state",
                                        params).fetchall())
        counts["edited"] = self.conn.execute(f"SELECT count(DISTINCT e.turn_id) FROM revisions e JOIN turns t ON "
                                             f"t.id = e.turn_id WHERE 1{scope}", params).fetchone()[0]
        return counts

    # -- imports ------------------------------------------------------------------------

    def import_run(self, *, config_key: str, config: dict, rows: list[tuple[dict, list[dict]]],
                   versions: dict) -> Run:
        """A finished import run holding `rows`, all in one transaction: a killed import leaves no
        half-imported run behind."""
        with self._writing():
            run = self.create_run(kind="import", target=len(rows), config_key=config_key, config=config, model={},
                                  backend="", versions=versions)
            kept = sum(1 for c, _ in rows if c["status"] == "kept")  # the others: instructions awaiting answers
            self.commit_batch(run.id, dict(first_item=0, n_items=len(rows), kept=kept, dropped=0,
                                           prompt_tokens=0, completion_tokens=0, seconds=0.0), rows)
            self.finish_run(run.id)
        return self.get_run(run.id)
