"""The review app in a real browser: Playwright driving headless Chromium (Debian's package, through
executable_path; .ci/run and `make install` install it). Load, filter, search, sort, review from the
keyboard, edit, then an export that honours the review; hostile stored text never runs (a dialog
fails the test, as does any console error, a Content-Security-Policy refusal included).

MAGPIE_LOCAL_SCREENSHOTS=docs/images also writes the screenshots the docs show."""

import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import magpie_local.api as api
from magpie_local.review import serve

from .conftest import HOSTILE_ANSWERS, sql

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium (.ci/run), so there a missing browser fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="Chromium is not installed (make install / .ci/run install it)")


@pytest.fixture(scope="module")
def chromium():
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (make install does it as root)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def served(review_db):
    server = serve(review_db)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=10)


class Watched:
    """A page whose every dialog, page error and console error is kept, to fail the test."""

    def __init__(self, page):
        self.page, self.problems = page, []
        page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))

    def check(self):
        assert self.page.evaluate("window.pwned") is None
        assert self.problems == []


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    watched = Watched(context.new_page())
    watched.page.set_default_timeout(15_000)
    yield watched
    context.close()


def shoot(page, name: str, tmp_path: Path, full_page: bool = False) -> None:
    """A screenshot, looked at by whoever changes the page; with MAGPIE_LOCAL_SCREENSHOTS, kept for the docs."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    if folder := os.environ.get("MAGPIE_LOCAL_SCREENSHOTS"):
        shutil.copyfile(path, Path(folder) / name)


def test_review_from_the_keyboard_then_export(served, page, review_db, tmp_path):
    p = page.page
    p.goto(served.url)
    assert p.locator("h1").inner_text() == "review.db"
    assert "19 kept pairs" in p.locator("#counts").inner_text()
    assert p.locator(".plots svg").count() >= 5  # IFD, judge, distance, repeats, lengths, tags
    shoot(p, "review-dashboard.png", tmp_path, full_page=True)

    p.click("header >> text=pairs")
    expect(p.locator("#table tbody tr.row")).to_have_count(19)
    cut = sql(review_db, "SELECT count(*) FROM checks WHERE name = 'cut_off' AND passed = 0")[0][0]
    p.select_option("select[name=failed]", "cut_off")  # htmx asks for the table anew
    expect(p.locator("#count")).to_have_text(re.compile(rf"^{cut} pairs "))
    expect(p.locator("#table tbody tr.row")).to_have_count(cut)
    assert "failed=cut_off" in p.url
    p.select_option("select[name=failed]", "")
    p.keyboard.press("/")
    p.keyboard.type("quokka")
    p.keyboard.press("Enter")
    expect(p.locator("#count")).to_have_text(re.compile(r"^1 pair "))
    assert "Rottnest" in p.locator("#table tbody tr.row").inner_text()

    p.goto(served.address + "/pairs")
    p.click("th >> text=IFD")
    expect(p.locator("thead")).to_contain_text("IFD ↑")
    ifd = sql(review_db, "SELECT turn_id FROM scores ORDER BY ifd, turn_id")
    shown = [int(x) for x in p.locator("#table tbody tr.row td:first-child a").all_inner_texts()]
    assert shown == [t for (t,) in ifd]
    shoot(p, "review-table.png", tmp_path)

    for key in ("j", "j", "j", "k"):
        p.keyboard.press(key)
    assert p.locator("tr.selected td:first-child a").inner_text() == str(shown[2])
    p.keyboard.press("Enter")
    p.wait_for_url(f"**/pairs/{shown[2]}?**")
    p.keyboard.press("a")
    p.wait_for_selector("#state.accepted")
    p.keyboard.press("e")
    assert p.locator("#edit").is_visible()
    p.fill("#edit textarea[name=response]", "Edited by hand, with **emphasis**.")
    p.click("#save")
    p.wait_for_selector("#response strong")
    expect(p.locator("#edit")).to_be_hidden()  # the form closes on the saved text
    assert "revision" in p.locator("#edited").inner_text()
    p.keyboard.press("n")
    p.wait_for_url(f"**/pairs/{shown[3]}?**")
    p.keyboard.press("r")
    p.wait_for_selector("#state.rejected")
    p.keyboard.press("n")
    p.wait_for_url(f"**/pairs/{shown[4]}?**")
    p.keyboard.press("f")
    p.keyboard.type("needs a source")
    p.keyboard.press("Enter")
    p.wait_for_selector("#state.flagged")
    assert "needs a source" in p.locator("#review").inner_text()
    p.keyboard.press("p")  # keys work again once the note is sent
    p.wait_for_url(f"**/pairs/{shown[3]}?**")
    p.keyboard.press("Escape")
    p.wait_for_url("**/pairs?sort=ifd")
    assert [r for r in p.locator("#table tbody tr.row .state").all_inner_texts() if r != "unreviewed"] == \
        ["accepted", "edited", "rejected", "flagged"]
    page.check()

    assert sql(review_db, "SELECT turn_id, state, note FROM reviews ORDER BY id") == [
        (shown[2], "accepted", None), (shown[3], "rejected", None), (shown[4], "flagged", "needs a source")]
    accepted = api.export(review_db, tmp_path / "accepted", reviewed="accepted", include_cut_off=True)
    assert accepted.conversations == 1
    record = (tmp_path / "accepted" / "data.jsonl").read_text()
    assert "Edited by hand, with **emphasis**." in record  # the revision, not the generated answer
    api.export(review_db, tmp_path / "kept", reviewed="not-rejected", include_cut_off=True)
    rejected = sql(review_db, "SELECT response FROM turns WHERE id = ?", [shown[3]])[0][0]
    assert rejected not in (tmp_path / "kept" / "data.jsonl").read_text()


def test_a_pair_shows_its_measures_and_preference(served, page, review_db, tmp_path):
    p = page.page
    judged = dict(sql(review_db, "SELECT turn_id, score FROM ratings"))
    sources = {}
    for turn, source in sql(review_db, "SELECT t.id, c.source_id FROM turns t JOIN conversations c ON "
                                       "c.id = t.conversation_id WHERE c.run_id = 2 AND c.status = 'kept'"):
        sources.setdefault(source, []).append(turn)
    turn = next(ts[0] for ts in sources.values() if len({judged[t] for t in ts}) == 2)
    p.goto(served.url)
    p.goto(f"{served.address}/pairs/{turn}")
    assert p.locator(".preference article").count() == 2
    assert p.locator(".preference .chosen").is_visible() and p.locator(".preference .rejected").is_visible()
    measures = p.locator("aside dl").inner_text()
    assert "IFD" in measures and f"{judged[turn]:.2f}" in measures
    checked = sql(review_db, "SELECT count(*) FROM checks WHERE turn_id = ?", [turn])[0][0]
    assert checked == 8  # length, cut_off, repetition, refusal, disclaimer, pii, secrets, duplicate
    assert p.locator("ul.checks li").count() == checked and p.locator("ol.similar li").count() >= 1
    shoot(p, "review-pair.png", tmp_path, full_page=True)
    p.click("ol.similar li a >> nth=0")  # the nearest neighbours are links
    p.wait_for_url("**/pairs/*")
    page.check()


def test_hostile_text_is_shown_and_never_run(served, page, review_db):
    p = page.page
    p.goto(served.url)
    hostile = [t for (t,) in sql(review_db, "SELECT id FROM turns WHERE instruction LIKE 'Hostile answer%' "
                                            "ORDER BY id")]
    for turn in hostile:
        p.goto(f"{served.address}/pairs/{turn}")
        answer = p.locator("#response")
        assert answer.locator("script, img, svg, iframe, a[href^='javascript'], [onerror], [onload]").count() == 0
        assert "alert(" in answer.inner_text()  # the text is there, as text
    p.goto(f"{served.address}/pairs?q=hostile")
    expect(p.locator("#table tbody tr.row")).to_have_count(len(HOSTILE_ANSWERS))
    # Text typed into the edit form comes back through htmx as sanitized HTML too.
    p.goto(f"{served.address}/pairs/{hostile[0]}")
    p.keyboard.press("e")
    p.fill("#edit textarea[name=instruction]", "<img src=x onerror=\"window.pwned=2\">")
    p.fill("#edit textarea[name=response]", HOSTILE_ANSWERS[0] + " <script>window.pwned = 3</script>")
    p.click("#save")
    p.wait_for_selector("#edited")
    assert p.locator("#texts img, #texts script").count() == 0
    p.reload()
    assert "window.pwned = 3" in p.locator("#response").inner_text()
    page.check()
