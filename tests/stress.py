"""`make stress`: kill generate, score and import with SIGKILL at random moments, resume each time.

For each command, one database goes through TRIALS rounds of "run the same command, kill it
with SIGKILL after a random delay"; after every kill the database is checked for half-written
rows, and at the end the command runs to completion and the result is compared, row by row,
with a clean run that was never killed. Lost and duplicated rows must both be 0.

    python -m tests.stress [--trials 20] [--seed 0] [--only generate,score,import]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Workloads grow with the number of trials, so that every kill lands while the command still runs.
GENERATE = ["generate", "--instruction-max-tokens", "64", "--response-max-tokens", "16", "--ctx", "256",
            "--batch-size", "2", "--parallel", "2", "-q"]
GENERATE_PER_TRIAL = 4  # pairs
SCORE = ["score", "--batch-size", "2", "-q"]
SCORE_PER_TRIAL = 6  # pairs
IMPORT_RECORDS = 60_000


def magpie(*args: str) -> list[str]:
    return [sys.executable, "-m", "magpie_local", *args]


def write_jsonl(path: Path, n: int, words: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            answer = " ".join(f"step {j} of the sum {i} + {i} gives {2 * i}." for j in range(words // 8 + 1))
            f.write(json.dumps({"instruction": f"Question {i}: what is {i} + {i}?", "input": "",
                                "output": answer}) + "\n")
    return path


def run(*args: str) -> None:
    done = subprocess.run(magpie(*args), cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()}")


def half_written(db: Path) -> int:
    """Rows that only make sense with others that are missing: any is a broken transaction."""
    conn = sqlite3.connect(db)
    try:
        if not conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'runs'").fetchone()[0]:
            return 0  # killed before the schema was created: nothing written, nothing half-written
        checks = [
            "SELECT count(*) FROM conversations c WHERE NOT EXISTS "
            "(SELECT 1 FROM turns t WHERE t.conversation_id = c.id)",
            "SELECT count(*) FROM turns t WHERE NOT EXISTS "
            "(SELECT 1 FROM conversations c WHERE c.id = t.conversation_id)",
            "SELECT count(*) FROM batches b WHERE b.n_items != "
            "(SELECT count(*) FROM conversations c WHERE c.batch_id = b.id)",
            "SELECT count(*) FROM scores s WHERE NOT EXISTS (SELECT 1 FROM turns t WHERE t.id = s.turn_id)",
            "SELECT count(*) FROM runs r WHERE r.kind = 'import' AND NOT EXISTS "
            "(SELECT 1 FROM conversations c WHERE c.run_id = r.id)",
        ]
        bad = sum(conn.execute(q).fetchone()[0] for q in checks)
        return bad + (conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok")
    finally:
        conn.close()


def content(db: Path, kind: str) -> list[tuple]:
    """What a run is meant to hold, in a comparable form."""
    conn = sqlite3.connect(db)
    try:
        if kind == "score":
            return conn.execute("SELECT s.turn_id, round(s.ifd, 9), s.answer_tokens, s.skip_reason FROM scores s "
                                "JOIN runs r ON r.id = s.run_id WHERE r.kind = 'score' ORDER BY s.turn_id").fetchall()
        return conn.execute(
            "SELECT r.kind, c.item_index, c.status, t.turn_index, t.instruction, t.response FROM conversations c "
            "JOIN runs r ON r.id = c.run_id JOIN turns t ON t.conversation_id = c.id WHERE r.kind = ? "
            "ORDER BY c.item_index, t.turn_index", [kind]).fetchall()
    finally:
        conn.close()


def compare(got: list[tuple], want: list[tuple]) -> tuple[int, int]:
    """(lost, duplicated) rows of `got` against the clean run `want`."""
    from collections import Counter

    g, w = Counter(got), Counter(want)
    return sum((w - g).values()), sum((g - w).values())


def stress(name: str, args: list[str], db: Path, clean_db: Path, trials: int, rng: random.Random,
           delay: tuple[float, float]) -> dict:
    kind = "generate" if name == "generate" else ("score" if name == "score" else "import")
    run(*args, "--db", str(clean_db))
    want = content(clean_db, kind)
    kills = finished = broken = 0
    for _ in range(trials):
        proc = subprocess.Popen(magpie(*args, "--db", str(db)), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + rng.uniform(*delay)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            kills += 1
        else:
            finished += 1
        proc.communicate()
        broken += half_written(db)
    run(*args, "--db", str(db))  # resume to the end
    got = content(db, kind)
    lost, duplicated = compare(got, want)
    return dict(command=name, trials=trials, kills=kills, finished=finished, rows=len(got), lost=lost,
                duplicated=duplicated, half_written=broken + half_written(db))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="generate,score,import")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="magpie-stress-") as tmp:
        tmp = Path(tmp)
        wanted = opts.only.split(",")
        if "generate" in wanted:
            args = [*GENERATE, "-n", str(GENERATE_PER_TRIAL * opts.trials)]
            results.append(stress("generate", args, tmp / "gen.db", tmp / "gen-clean.db", opts.trials, rng,
                                  (0.5, 4.0)))
        if "score" in wanted:  # scores an imported set of pairs of ~40 answer tokens
            data = write_jsonl(tmp / "score.jsonl", SCORE_PER_TRIAL * opts.trials, words=24)
            for name in ("score.db", "score-clean.db"):
                run("import", str(data), "--db", str(tmp / name))
            results.append(stress("score", SCORE, tmp / "score.db", tmp / "score-clean.db", opts.trials, rng,
                                  (0.5, 3.0)))
        if "import" in wanted:
            data = write_jsonl(tmp / "import.jsonl", IMPORT_RECORDS, words=8)
            results.append(stress("import", ["import", str(data)], tmp / "imp.db", tmp / "imp-clean.db",
                                  opts.trials, rng, (0.3, 4.0)))
    header = f"{'command':<10}{'trials':>7}{'kills':>7}{'done first':>11}{'rows':>7}{'lost':>6}{'duplicated':>11}" \
             f"{'half-written':>13}"
    print(header)
    for r in results:
        print(f"{r['command']:<10}{r['trials']:>7}{r['kills']:>7}{r['finished']:>11}{r['rows']:>7}{r['lost']:>6}"
              f"{r['duplicated']:>11}{r['half_written']:>13}")
    ok = all(r["lost"] == 0 and r["duplicated"] == 0 and r["half_written"] == 0 for r in results)
    print("PASS: nothing lost, nothing duplicated" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
