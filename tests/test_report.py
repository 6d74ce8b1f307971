"""`magpie-local report`: a self-contained page that renders in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

from .conftest import cli

HOSTILE = "Explain <script>alert('x')</script> & <b>tags</b> in HTML."


@pytest.fixture(scope="module")
def report_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    records = [{"instruction": q, "output": f"Here is a short answer about {q.lower()}"}
               for q in ("What is the capital of France?", "Write a haiku about rain.", "Solve 2x = 10.",
                         "Name three primary colours.", HOSTILE)]
    (folder / "pairs.json").write_text(json.dumps(records))
    db = folder / "r.db"
    for args in (("import", str(folder / "pairs.json")), ("score", "-q"), ("tag", "-q")):
        done = cli(*args, "--db", str(db))
        assert done.returncode == 0, done.stderr
    return db


def test_report_is_one_self_contained_page(report_db, tmp_path):
    out = tmp_path / "report.html"
    done = cli("report", "--db", str(report_db), "--out", str(out))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.count("<svg") == 6  # IFD, two lengths, three tags
    assert page.count("<details>") == 5 and "IFD (scoring run 2)" in page and "task category (tagging run 3)" in page
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # data is escaped
    assert not re.search(r"(src|href)=\"?https?:", page)  # nothing is fetched
    assert cli("report", "--db", str(tmp_path / "none.db"), "--out", str(out)).returncode == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report_db, tmp_path):
    out = tmp_path / "report.html"
    assert cli("report", "--db", str(report_db), "--out", str(out)).returncode == 0
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run([*chromium, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 6 and dom.stdout.count("<details>") == 5 and "<rect" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*chromium, f"--screenshot={shot}", "--window-size=1100,1800", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
