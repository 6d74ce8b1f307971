"""Reviewing by hand (api/reviewing.py, the review app, select/export --reviewed) on a database the
real default model made (conftest.review_source): the table's filters, sorts and search against
SQL of their own, decisions and revisions that keep the history, exports that honour them, the
app's token, host and escaping, and the command kept safe from kill and from a writer beside it.
The browser's side is tests/test_review_browser.py."""

import json
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import httpx
import pytest
from starlette.testclient import TestClient

import magpie_local.api as api
from magpie_local.errors import UsageError
from magpie_local.review import create_app

from .conftest import HOSTILE_ANSWERS, REPO, cli, sql


def kept_ids(db) -> list[int]:
    return [r[0] for r in sql(db, "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                  "WHERE c.status = 'kept' ORDER BY t.id")]


def table(db, **filters) -> list[dict]:
    """Every row the table shows for these filters, page after page."""
    rows, page = [], 1
    while True:
        found = api.pairs(db, api.PairFilters(**filters, page=page), size=4)
        rows += found.rows
        if page >= found.pages:
            assert len(rows) == found.total
            return rows
        page += 1


def test_the_table_filters_sorts_and_pages(review_source):
    db = review_source
    every = kept_ids(db)
    assert len(every) == 19 and [r["id"] for r in table(db)] == every  # pages cover each pair once, in order
    assert {r["id"] for r in table(db, run=3)} == {i for (i,) in sql(
        db, "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id WHERE c.run_id = 3")}
    score_run = sql(db, "SELECT max(id) FROM runs WHERE kind = 'score'")[0][0]
    ifd = dict(sql(db, "SELECT turn_id, ifd FROM scores WHERE run_id = ?", [score_run]))
    by_ifd = table(db, sort="ifd", descending=True)
    assert [r["id"] for r in by_ifd] == sorted(ifd, key=lambda t: (-ifd[t], t))
    middle = sorted(ifd.values())[5], sorted(ifd.values())[12]
    assert {r["id"] for r in table(db, min_ifd=middle[0], max_ifd=middle[1])} == \
        {t for t, v in ifd.items() if middle[0] <= v <= middle[1]}
    judged = dict(sql(db, "SELECT turn_id, score FROM ratings"))
    assert {r["id"] for r in table(db, min_judge=3)} == {t for t, s in judged.items() if s >= 3}
    cut = {i for (i,) in sql(db, "SELECT turn_id FROM checks WHERE name = 'cut_off' AND passed = 0")}
    assert cut and {r["id"] for r in table(db, failed="cut_off")} == cut
    assert {r["id"] for r in table(db, failed="any")} == cut  # the only check any pair failed here
    assert {r["id"] for r in table(db, passed="cut_off")} == set(every) - cut
    assert all("cut_off" in r["failed"] for r in table(db, failed="cut_off"))
    category = sql(db, "SELECT task_category, count(*) FROM tags GROUP BY 1 ORDER BY 2 DESC")[0]
    assert len(table(db, tag=f"task_category={category[0]}")) == category[1]
    distance = dict(sql(db, "SELECT turn_id, distance FROM neighbours"))
    assert [r["id"] for r in table(db, sort="distance")] == sorted(distance, key=lambda t: (distance[t], t))
    lengths = {r["id"]: len(r["response"]) for r in table(db)}
    assert [len(r["response"]) for r in table(db, sort="length", descending=True)] == \
        sorted(lengths.values(), reverse=True)


def test_full_text_search_takes_words_not_syntax(review_db):
    db = review_db
    quokka = table(db, q="quokka")
    assert len(quokka) == 1 and "Rottnest" in quokka[0]["response"]
    assert len(table(db, q="zebra stripes")) == 1  # every word, in the instruction or the response
    assert table(db, q="quokka zebra") == []
    for syntax in ('"', "AND", "NEAR(", "*", "quokka OR", "col:x", "^", "-"):
        table(db, q=syntax)  # FTS5 syntax in the box is searched for as text, never an error
    turn = quokka[0]["id"]
    api.revise(db, turn, "Describe a wombat.", "A wombat is a burrowing marsupial.")
    assert [r["id"] for r in table(db, q="wombat")] == [turn]  # revisions are searched too
    assert table(db, q="wombat")[0]["response"] == "A wombat is a burrowing marsupial."


def test_decisions_and_revisions_keep_the_history(review_db):
    db = review_db
    turn = kept_ids(db)[0]
    original = sql(db, "SELECT instruction, response FROM turns WHERE id = ?", [turn])[0]
    api.review(db, turn, "accepted")
    api.review(db, turn, "flagged", "check the arithmetic")
    assert table(db, review="flagged")[0]["id"] == turn and table(db, review="accepted") == []
    api.review(db, turn, "unreviewed")  # taken back
    assert turn in {r["id"] for r in table(db, review="unreviewed")}
    assert [r["state"] for r in api.pair(db, turn)["reviews"]] == ["accepted", "flagged", "unreviewed"]
    first = api.revise(db, turn, "Edited question?", "Edited answer.", note="clearer")
    second = api.revise(db, turn, "Edited question?", "Edited again.")
    assert second > first
    shown = api.pair(db, turn)
    assert [v["response"] for v in shown["revisions"]] == ["Edited answer.", "Edited again."]
    assert (shown["instruction"], shown["response"]) == original  # the generated text is never changed
    assert sql(db, "SELECT instruction, response FROM turns WHERE id = ?", [turn])[0] == original
    assert table(db, review="edited")[0]["response"] == "Edited again."
    for bad in (lambda: api.review(db, turn, "maybe"), lambda: api.review(db, 10**6, "accepted"),
                lambda: api.revise(db, turn, "", "x"), lambda: api.revise(db, turn, "q", "a\x00b"),
                lambda: api.revise(db, turn, "q", "\ud800"), lambda: api.pairs(db, api.PairFilters(sort="x")),
                lambda: api.pairs(db, api.PairFilters(tag="colour=red")),
                lambda: api.PairFilters.from_query({"min_ifd": "lots"})):
        with pytest.raises(UsageError):
            bad()
    assert len(api.pair(db, turn)["reviews"]) == 3 and len(api.pair(db, turn)["revisions"]) == 2


def test_export_and_select_honour_the_reviews(review_db, tmp_path):
    db = review_db
    imported = [i for (i,) in sql(db, "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                      "WHERE c.run_id = 3 ORDER BY t.id")]
    good, bad, edited = imported[5], imported[6], imported[4]
    api.review(db, good, "accepted")
    api.review(db, bad, "rejected")
    api.review(db, edited, "accepted")
    api.revise(db, edited, "A fixed question?", "A fixed answer.")

    done = cli("export", "--db", str(db), "--run", "3", "--reviewed", "accepted", "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "a" / "data.jsonl").read_text().splitlines()]
    texts = [[m["content"] for m in r["messages"]] for r in records]
    good_text = sql(db, "SELECT instruction, response FROM turns WHERE id = ?", [good])[0]
    assert sorted(texts) == sorted([["A fixed question?", "A fixed answer."], list(good_text)])
    card = (tmp_path / "a" / "README.md").read_text()
    assert "2 accepted, 1 rejected, 0 flagged; 1 edited" in card and "--reviewed accepted" in card
    assert "1 exported turns are a reviewer's revision" in card

    done = cli("export", "--db", str(db), "--run", "3", "--reviewed", "not-rejected", "--out", str(tmp_path / "n"))
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "n" / "data.jsonl").read_text().splitlines()
    bad_text = sql(db, "SELECT response FROM turns WHERE id = ?", [bad])[0][0]
    assert len(lines) == 6 and not any(json.loads(x)["messages"][1]["content"] == bad_text for x in lines)
    plain = cli("export", "--db", str(db), "--run", "3", "--out", str(tmp_path / "all"))
    assert plain.returncode == 0 and len((tmp_path / "all" / "data.jsonl").read_text().splitlines()) == 7

    chosen = api.select(db, "mine", reviewed="accepted", keep_above_1=True)
    assert sorted(chosen.turn_ids) == sorted([good, edited])
    assert bad not in api.select(db, "others", reviewed="not-rejected", keep_above_1=True).turn_ids
    refused = cli("export", "--db", str(db), "--reviewed", "maybe", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and refused.stderr.startswith("error: --reviewed takes accepted or not-rejected")


def test_preference_pairs_honour_the_reviews(review_db, tmp_path):
    db = review_db
    judged = dict(sql(db, "SELECT turn_id, score FROM ratings"))
    groups = {}
    for turn, source, sample in sql(db, "SELECT t.id, c.source_id, c.sample_index FROM turns t JOIN conversations c "
                                        "ON c.id = t.conversation_id WHERE c.run_id = 2 AND c.status = 'kept'"):
        groups.setdefault(source, []).append((turn, sample))
    source, answers = next((s, a) for s, a in groups.items() if len({judged[t] for t, _ in a}) == 2)
    best = max(answers, key=lambda a: (judged[a[0]], -a[1]))[0]
    shown = api.pair(db, best)
    assert shown["preference"][0]["id"] == best  # the page shows the pair export would make
    args = ["export", "--db", str(db), "--format", "dpo", "--min-margin", "0", "--include-cut-off"]
    assert cli(*args, "--out", str(tmp_path / "before")).returncode == 0
    api.revise(db, best, shown["instruction"], "A reviewer's better answer.")
    api.review(db, best, "rejected")
    done = cli(*args, "--reviewed", "not-rejected", "--out", str(tmp_path / "after"))
    assert done.returncode == 0, done.stderr
    before = [json.loads(x) for x in (tmp_path / "before" / "data.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (tmp_path / "after" / "data.jsonl").read_text().splitlines()]
    assert len(after) == len(before) - 1  # a rejected answer is never chosen, and its instruction had two
    assert not any(r["chosen"][0]["content"] == "A reviewer's better answer." for r in after)
    api.review(db, best, "accepted")
    done = cli(*args, "--reviewed", "accepted", "--out", str(tmp_path / "accepted"))
    assert done.returncode == 0, done.stderr
    accepted = [json.loads(x) for x in (tmp_path / "accepted" / "data.jsonl").read_text().splitlines()]
    assert [r["chosen"][0]["content"] for r in accepted] == ["A reviewer's better answer."]  # the revision


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def dangerous(page: str) -> list[str]:
    """What in `page` a browser would run: scripts other than the app's own files, event-handler
    attributes, javascript: URLs, frames, inline styles."""
    parser = Tags()
    parser.feed(page)
    found = []
    for tag, attrs in parser.tags:
        if tag == "script" and attrs.get("src") not in ("/static/htmx.min.js", "/static/review.js"):
            found.append(f"script {attrs}")
        if tag in ("iframe", "object", "embed", "frame", "base", "meta") and not (
                tag == "meta" and ("charset" in attrs or attrs.get("name") in ("viewport", "htmx-config"))):
            found.append(tag)
        for name, value in attrs.items():
            if name.startswith("on") or name == "style" or "javascript:" in (value or "").replace(" ", "").lower():
                found.append(f"{tag} {name}={value}")
    return found


@pytest.fixture
def client(review_db):
    app = create_app(review_db, token="the-token")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def test_the_app_needs_its_token_and_its_host(client, review_db):
    assert client.get("/").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    entered = client.get("/pairs?token=the-token&review=unreviewed", follow_redirects=False)
    assert entered.status_code == 303 and entered.headers["location"] == "/pairs?review=unreviewed"
    assert "HttpOnly" in entered.headers["set-cookie"] and "SameSite=strict" in entered.headers["set-cookie"]
    page = client.get("/pairs")
    assert page.status_code == 200 and "19 pairs" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    turn = kept_ids(review_db)[0]
    assert client.post(f"/pairs/{turn}/review", data={"state": "accepted"}).status_code == 403  # no header
    assert sql(review_db, "SELECT count(*) FROM reviews") == [(0,)]
    done = client.post(f"/pairs/{turn}/review", data={"state": "accepted"}, headers={"X-Magpie-Token": "the-token"})
    assert done.status_code == 200 and 'class="state accepted"' in done.text
    assert sql(review_db, "SELECT turn_id, state FROM reviews") == [(turn, "accepted")]
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 is not answered.
    assert client.get("/pairs", headers={"Host": "evil.example"}).status_code == 400
    bad = client.post(f"/pairs/{turn}/review", data={"state": "maybe"},
                      headers={"X-Magpie-Token": "the-token", "HX-Request": "true"})
    assert bad.status_code == 400 and bad.headers["HX-Retarget"] == "#message" and "a review is one of" in bad.text
    assert client.get("/pairs?min_ifd=lots").status_code == 400
    assert client.get("/pairs/999999").status_code == 400


def test_stored_text_is_shown_never_run(client, review_db):
    client.get("/?token=the-token")
    hostile = [i for (i,) in sql(review_db, "SELECT id FROM turns WHERE instruction LIKE 'Hostile answer%' "
                                            "ORDER BY id")]
    assert len(hostile) == len(HOSTILE_ANSWERS)
    for turn in hostile:
        page = client.get(f"/pairs/{turn}").text
        assert dangerous(page) == [], turn
        assert "alert(" in page  # shown as text
    api.revise(review_db, hostile[0], "<script>alert('q')</script>", HOSTILE_ANSWERS[1] + HOSTILE_ANSWERS[2])
    for page in (client.get(f"/pairs/{hostile[0]}").text, client.get("/pairs?q=hostile").text,
                 client.get("/pairs").text, client.get("/").text):
        assert dangerous(page) == []
    assert '<code class="language-html">' in client.get(f"/pairs/{hostile[4]}").text  # code stays code


def test_the_command_survives_kill_and_a_writer_beside_it(review_db, default_model, tmp_path):
    """`magpie-local review` while `generate` writes to the same database: every decision the page
    was answered for is on disk after SIGKILL, and generate's run is whole."""
    server = subprocess.Popen([sys.executable, "-m", "magpie_local", "review", "--db", str(review_db),
                               "--no-browser"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert url, line + server.stderr.read()
        address, token = url.groups()
        writer = subprocess.Popen([sys.executable, "-m", "magpie_local", "generate", "-n", "6", "--db",
                                   str(review_db), "--response-max-tokens", "48", "-q"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        answered, turns = [], kept_ids(review_db)
        with httpx.Client(base_url=address, cookies={"magpie_review": token},
                          headers={"X-Magpie-Token": token}, timeout=60) as web:
            while writer.poll() is None or len(answered) < 12:  # decisions all the while generate writes
                turn = turns[len(answered) % len(turns)]
                state = ("accepted", "rejected", "flagged")[len(answered) % 3]
                reply = web.post(f"/pairs/{turn}/review", data={"state": state, "note": f"n{len(answered)}"})
                assert reply.status_code == 200, reply.text
                answered.append((turn, state, f"n{len(answered)}"))
                assert web.get("/pairs", params={"sort": "ifd", "q": "answer"}).status_code == 200
        assert writer.returncode == 0, writer.stderr.read()
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        server.kill()
    assert sql(review_db, "SELECT turn_id, state, note FROM reviews ORDER BY id") == answered
    assert sql(review_db, "SELECT status FROM runs WHERE kind = 'generate'") == [("complete",)]
    during = sql(review_db, "SELECT count(*) FROM reviews e, runs r WHERE r.kind = 'generate' AND "
                            "e.created_at BETWEEN r.created_at AND r.finished_at")[0][0]
    assert during > 0
    assert sql(review_db, "PRAGMA integrity_check") == [("ok",)]


def test_the_command_refuses_bad_input_in_one_line(tmp_path, review_db):
    for args, message in ((["--db", str(tmp_path / "absent.db")], "no database at"),
                          (["--db", str(review_db), "--port", "70000"], "--port"),
                          (["--db", str(review_db), "--host", "256.1.1.1"], "cannot listen on 256.1.1.1")):
        done = cli("review", "--no-browser", *args, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    # Another host is allowed, with a warning that the page is reachable from elsewhere.
    server = subprocess.Popen([sys.executable, "-m", "magpie_local", "review", "--db", str(review_db),
                               "--no-browser", "--host", "0.0.0.0"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "http://0.0.0.0:" in server.stdout.readline()
        time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGINT)
        _, errors = server.communicate(timeout=30)
    assert "Warning: listening on 0.0.0.0" in errors and server.returncode == 0
