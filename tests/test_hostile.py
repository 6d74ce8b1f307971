"""What a hostile user or file sends: huge numbers, NaN, unwritable outputs, lone surrogates, templates
that loop or grow without end, a second writer through another name of the file, oversized records,
terminal escapes. Each gives one clear line and a non-zero exit (or bounded time and inert output),
and no stored byte changes."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from magpie_local.store import Store

from .conftest import REPO, as_unprivileged_root, cli, cli_as
from .gguf_writer import write_gguf
from .test_cli import SMALL, _error_line

HUGE = "99999999999999999999999"


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    """A database holding one generate run of 2 pairs, a scoring run and a selection."""
    db = tmp_path_factory.mktemp("hostile") / "m.db"
    assert cli("generate", "--db", str(db), "-n", "2", *SMALL).returncode == 0
    assert cli("score", "--db", str(db), "-q").returncode == 0
    assert cli("select", "--db", str(db), "--top-k", "1").returncode == 0
    return db


def _copy(db, tmp_path):
    target = tmp_path / "copy.db"
    shutil.copy(db, target)
    return target


def _refused(args, db, contains=None):
    """The command gives one error line and exit 2, and leaves every byte of `db` as it was."""
    before = db.read_bytes()
    line = _error_line(cli(*args, "--db", str(db)))
    assert db.read_bytes() == before
    if contains:
        assert contains in line, line
    return line


@pytest.mark.parametrize("args", [
    ["generate", "-n", HUGE, *SMALL], ["respond", "--run", "1", "-k", HUGE], ["respond", "--run", HUGE],
    ["show", "--limit", HUGE], ["show", "--run", HUGE], ["generate", "-n", "1", "--resume", HUGE],
    ["select", "--score-run", HUGE, "--top-k", "1"], ["export", "--run", HUGE, "--out", "x"],
    ["stats", "--score-run", HUGE], ["generate", "-n", "3", "--seed", "-" + HUGE, *SMALL],
    ["select", "--top-k", HUGE], ["report", "--sample", HUGE], ["score", "--batch-size", HUGE],
    ["generate", "-n", "3", "--response", "repeat_last_n=" + HUGE, *SMALL],
], ids=lambda a: " ".join(a[:3]))
def test_huge_integers_are_one_line_errors(args, small_db, tmp_path):
    line = _refused(args, _copy(small_db, tmp_path))
    assert "out of range" in line or "between -2^63 and 2^63" in line or "no run" in line, line


@pytest.mark.parametrize("args", [
    ["generate", "-n", "3", "--instruction", "temperature=nan", *SMALL],
    ["generate", "-n", "3", "--response-temperature", "inf", *SMALL],
    ["generate", "-n", "3", "--instruction", "top_p=-inf", *SMALL],
    ["respond", "--run", "1", "--temperature", "nan"],
    ["select", "--min-ifd", "nan"], ["select", "--top", "nan"], ["export", "--out", "x", "--split", "nan"],
    ["curate", "--max-repetition", "nan"], ["embed", "--radius", "inf"],
], ids=lambda a: " ".join(a[:4]))
def test_nan_and_infinity_are_refused(args, small_db, tmp_path):
    line = _refused(args, _copy(small_db, tmp_path))
    assert any(w in line for w in ("finite", "between", "must be in")), line


@pytest.mark.parametrize("args, contains", [
    (["generate", "-n", "3", "--threads", "0", *SMALL], "--threads must be at least 1"),
    (["generate", "-n", "3", "--threads", "-2", *SMALL], "--threads must be at least 1"),
    (["curate", "--min-chars", "-1"], "--min-chars must be at least 0"),
    (["curate", "--min-chars", "500", "--max-chars", "10"], "--max-chars at least --min-chars"),
    (["select", "--name", "", "--top-k", "1"], "--name must not be empty"),
    (["select", "--name", "  ", "--top-k", "1"], "--name must not be empty"),
    (["select", "--min-ifd", "0.9", "--max-ifd", "0.1"], "is above --max-ifd"),
    (["show", "--limit", "-1"], "--limit must be at least 0"),
])
def test_out_of_range_options_are_refused(args, contains, small_db, tmp_path):
    _refused(args, _copy(small_db, tmp_path), contains)


def test_a_refused_select_keeps_the_selection(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    _refused(["select", "--min-ifd", "0.9", "--max-ifd", "0.1"], db)
    with Store(db, create=False, write=False) as store:
        assert store.selection_info("selected")[1] == 1  # the selection made in the fixture is still there


def test_writing_files_fails_with_one_line(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    for args in (["export", "--include-cut-off", "--out", "/proc/magpie-x"],
                 ["report", "--out", "/proc/magpie-x.html"]):
        line = _refused(args, db, "cannot write")
        assert "Traceback" not in line
    r = cli("models", "convert", "--to", "f16", "--out", "/proc/magpie-x.gguf")  # after its progress line
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: cannot write /proc/magpie-x.gguf")
    assert "Traceback" not in r.stderr
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        prefix = as_unprivileged_root()
        for args in (["export", "--include-cut-off", "--db", str(db), "--out", str(readonly)],
                     ["report", "--db", str(db), "--out", str(readonly / "r.html")],
                     ["models", "convert", "--to", "f16", "--out", str(readonly / "m.gguf")]):
            r = cli_as(prefix, *args)
            errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
            assert r.returncode == 2 and len(errors) == 1 and "permission denied" in errors[0], r.stderr
            assert "Traceback" not in r.stderr and r.stderr.strip().endswith(errors[0])
        assert list(readonly.iterdir()) == []  # no temporary file left behind
    finally:
        readonly.chmod(0o700)


def test_a_full_disk_while_exporting_is_one_line_and_leaves_no_half_file(tmp_path):
    import resource

    data = tmp_path / "data.jsonl"  # 200 KB of pairs: the export outgrows the limit, SQLite's own files do not
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "word " * 400}) + "\n"
                            for i in range(100)))
    db = tmp_path / "m.db"
    assert cli("import", str(data), "--db", str(db)).returncode == 0
    out = tmp_path / "out"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([sys.executable, "-m", "magpie_local", "export", "--db", str(db), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=small_files)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot write" in lines[0], r.stderr
    assert [p.name for p in out.iterdir()] == []  # neither a half file nor a temporary one


def test_a_folder_without_write_permission(small_db, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "m.db"
    shutil.copy(small_db, db)
    folder.chmod(0o500)
    try:
        prefix = as_unprivileged_root()
        for args in (["score", "--db", str(db)], ["runs", "--db", str(db)], ["generate", "-n", "3", "--db", str(db)]):
            r = cli_as(prefix, *args)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            assert "is not writable" in lines[0] and "not a usable SQLite database" not in lines[0], lines[0]
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("record", [
    {"instruction": "bad \ud800 surrogate", "output": "x"},
    {"messages": [{"role": "user", "content": "a \udfff"}, {"role": "assistant", "content": "b"}]},
    {"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "\ud83d alone"}]},
    {"text": "\udc80 question"},
], ids=["alpaca", "messages", "sharegpt", "instructions"])
def test_a_lone_surrogate_is_a_skipped_record(record, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"instruction": "fine", "output": "yes"}) + "\n")
    db = tmp_path / "m.db"
    r = cli("import", str(path), "--db", str(db))
    assert r.returncode == 0 and "not valid Unicode" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "1 conversations" in r.stdout
    strict = cli("import", str(path), "--db", str(tmp_path / "strict.db"), "--strict")
    assert strict.returncode == 2 and "not valid Unicode" in _error_line(strict)


def test_a_lone_surrogate_on_the_command_line(tmp_path):
    db = tmp_path / "m.db"
    r = subprocess.run([sys.executable, "-m", "magpie_local", "generate", "--db", str(db), "-n", "1",
                        "--system-prompt", b"bad \xff byte".decode("utf-8", "surrogateescape"), *SMALL],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "not valid Unicode" in _error_line(r)
    assert not db.exists()


LOOPS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loop over a long string": "{% for c in ('ab' * 400000) %}{% for d in range(100000) %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}
GROWTH = {
    "multiplication": "{{ 'A' * 1000000000 }}",
    "doubling": "{% set ns = namespace(s='A') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "replace": "{% set ns = namespace(s='AA') %}{% for i in range(60) %}{% set ns.s = ns.s.replace('A', ns.s) %}"
               "{% endfor %}",
    "center": "{{ 'A'.center(2000000000) }}",
    "list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "join": "{% set ns = namespace(s='AB') %}{% for i in range(40) %}{% set ns.s = ns.s|join(ns.s) %}{% endfor %}",
}
TAIL = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize("name", sorted(LOOPS) + sorted(GROWTH))
def test_hostile_templates_are_bounded_in_time_and_memory(name, tmp_path):
    """`templates detect --template FILE` and `generate --model` on a GGUF carrying the template: both
    end within the time bound plus start-up, with one line; the renderer's memory is capped, so none
    of this grows this process (tests/test_templates.py checks the renderer's cap directly)."""
    source = (LOOPS | GROWTH)[name] + TAIL
    path = tmp_path / "t.jinja"
    path.write_text(source)
    started = time.monotonic()
    line = _error_line(cli("templates", "detect", "--template", str(path)))
    assert time.monotonic() - started < 30 and "chat template" in line, line
    model = write_gguf(tmp_path / "hostile.gguf", {"general.architecture": "llama", "tokenizer.chat_template": source})
    db = tmp_path / "m.db"
    started = time.monotonic()
    line = _error_line(cli("generate", "--db", str(db), "-n", "1", "--model", str(model)))
    assert time.monotonic() - started < 30 and "chat template" in line, line
    assert not db.exists()


def test_the_writer_lock_follows_the_file_not_its_name(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    (tmp_path / "symlink.db").symlink_to(db)
    os.link(db, tmp_path / "hardlink.db")
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    os.link(db, sub / "other-name.db")
    holder = Store(db)  # this process writes through the first name
    try:
        for name in (tmp_path / "symlink.db", tmp_path / "hardlink.db", sub / "other-name.db"):
            line = _error_line(cli("generate", "--db", str(name), "-n", "3", *SMALL))
            assert "another magpie-local process" in line, line
    finally:
        holder.close()
    holder = Store(sub / "other-name.db")  # and the other way round
    try:
        assert "another magpie-local process" in _error_line(cli("score", "--db", str(db)))
    finally:
        holder.close()


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "instructions"])
@pytest.mark.parametrize("container", ["jsonl", "array"])
def test_records_over_the_size_limit_are_skipped_in_every_format(fmt, container, tmp_path):
    from magpie_local.importers import MAX_RECORD_BYTES

    def record(size):
        text = "x" * size
        return {"alpaca": {"instruction": "q", "output": text},
                "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": text}]},
                "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]},
                "instructions": {"instruction": text}}[fmt]

    records = [record(10), record(MAX_RECORD_BYTES - 200), record(MAX_RECORD_BYTES + 1), record(6 * MAX_RECORD_BYTES)]
    path = tmp_path / f"data.{'jsonl' if container == 'jsonl' else 'json'}"
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    db = tmp_path / "m.db"
    started = time.monotonic()
    r = cli("import", str(path), "--db", str(db))
    assert r.returncode == 0, r.stderr
    where = "line" if container == "jsonl" else "record"
    assert r.stderr.count("larger than 8 MiB") == 2 and f"{where} 3:" in r.stderr and f"{where} 4:" in r.stderr
    assert "2 conversations" in r.stdout
    show = cli("show", "--db", str(db), "--limit", "5")
    assert show.returncode == 0 and time.monotonic() - started < 60
    assert len(show.stdout) < 60_000  # the long record is shown cut, with how much more there is
    if fmt != "instructions":
        assert "more characters" in show.stdout
    if fmt == "alpaca" and container == "array":  # and the report stays small
        page = tmp_path / "r.html"
        assert cli("report", "--db", str(db), "--out", str(page)).returncode == 0
        assert page.stat().st_size < 1_000_000 and "more characters)" in page.read_text()


ESCAPES = {
    "CSI clear screen": "\x1b[2J\x1b[H",
    "OSC window title": "\x1b]0;pwned\x07",
    "OSC 8 hyperlink": "\x1b]8;;https://example.com\x1b\\click\x1b]8;;\x1b\\",
    "DCS": "\x1bP1$t\x1b\\",
    "C1 CSI": "\x9b2J",
    "bell and backspace": "\x07\x08\x08",
    "bidi override": "\u202eevil",
}


def test_show_prints_stored_text_inert_and_unchanged(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    stored = "Hi :smile: [bold]x[/bold] " + "".join(ESCAPES.values())
    conn = sqlite3.connect(db)
    conn.execute("UPDATE turns SET response = ? WHERE id = (SELECT min(t.id) FROM turns t JOIN conversations c "
                 "ON c.id = t.conversation_id WHERE c.status = 'kept')", [stored])
    conn.execute("UPDATE runs SET model = ? WHERE id = 1", ["\x1b]0;title\x07[red]model"])
    conn.commit()
    conn.close()
    for args in (["show", "--run", "1", "--limit", "1"], ["runs"], ["stats"]):
        r = cli(*args, "--db", str(db))
        assert r.returncode == 0, r.stderr
        printed = r.stdout + r.stderr
        assert not any(c in printed for c in "\x1b\x07\x08\x9b\u202e"), (args, printed)
    shown = cli("show", "--run", "1", "--limit", "1", "--db", str(db))
    assert shown.returncode == 0, shown.stderr
    shown = shown.stdout
    assert ":smile:" in shown and "[bold]x[/bold]" in shown and "\\x1b[2J" in shown and "\\u202eevil" in shown
    assert "\\x1b]0;title\\x07[red]model" in cli("runs", "--db", str(db)).stdout


def test_the_dataset_card_is_inert_markdown(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET model = ? WHERE id = 1", ['"><img src=x onerror=alert(1)>'])
    conn.commit()
    conn.close()
    r = cli("export", "--include-cut-off", "--db", str(db), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "<img" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card


def test_sigterm_exits_143(tmp_path):
    db = tmp_path / "m.db"
    proc = subprocess.Popen([sys.executable, "-m", "magpie_local", "generate", "--db", str(db), "-n", "200",
                             "--batch-size", "1", *SMALL], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (db.exists() and db.stat().st_size > 0):
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr


def test_db_help_says_which_commands_create_the_file():
    def help_text(command):  # the --db option's own help
        text = " ".join(cli(command, "--help").stdout.split())
        return text[text.index("--db <path>"):][:120]

    assert "created if missing" in help_text("generate") and "created if missing" in help_text("import")
    for command in ("score", "show", "export", "respond", "select"):
        assert "created if missing" not in help_text(command), command


def test_a_garbled_database_is_refused_by_every_reader(small_db, tmp_path):
    db = _copy(small_db, tmp_path)
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    data = bytearray(db.read_bytes())
    for page in range(1, len(data) // 4096):  # garble every page but the header page
        data[page * 4096 + 8: page * 4096 + 200] = b"\xff" * 192
    db.write_bytes(bytes(data))
    for args in (["runs"], ["show"], ["stats"], ["export", "--out", str(tmp_path / "o")],
                 ["report", "--out", str(tmp_path / "r.html")]):
        r = cli(*args, "--db", str(db))
        assert r.returncode == 2 and "damaged" in _error_line(r), (args, r.stdout, r.stderr)
    assert db.read_bytes() == bytes(data)
