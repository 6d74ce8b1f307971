"""The Python API page's examples run as written, on the real default model, and the API's
functions do what their commands do."""

import re
from pathlib import Path

import pytest

import magpie_local as ml

from .conftest import REPO

DOC = REPO / "docs" / "python-api.md"


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # one namespace: later examples use earlier results
    printed = capsys.readouterr().out
    assert "response min-p must be in [0, 1]" in printed  # the errors example
    assert not Path("never-made.db").exists()
    assert (tmp_path / "exported" / "data.jsonl").is_file()
    assert "(Checked by hand.)" in (tmp_path / "reviewed" / "data.jsonl").read_text()  # the revision


@pytest.mark.slow
def test_api_pipeline_import_curate_score_select_export(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "Name a primary colour.", "output": "Red is a primary colour."},'
                    ' {"instruction": "What is 2 + 2?", "output": "2 + 2 is 4."},'
                    ' {"instruction": "Say hi.", "output": "Hi!"}, {"broken": true}]')
    db = tmp_path / "d.db"
    skipped = []
    imported = ml.api.import_file(db, data, on_skipped=skipped.extend)
    assert imported.records == 3 and len(imported.malformed) == 1 == len(skipped)
    assert ml.api.import_file(db, data).status == "already-imported"
    counts = ml.api.curate(db)
    assert counts["length"] == (3, 0) and counts["duplicate"] == (3, 0)
    run = ml.api.score(db, prompt_format="alpaca", weights="file")
    assert run.kind == "score" and run.status == "complete"
    chosen = ml.api.select(db, "best", top_k=2, keep_above_1=True, passing="all")
    assert len(chosen.turn_ids) == 2 and chosen.eligible == 3
    done = ml.api.export(db, tmp_path / "out", selection="best")
    assert done.conversations == 2 and done.files == {"data.jsonl": 2} and done.card.is_file()
    with pytest.raises(ml.MagpieError, match="already holds"):
        ml.api.export(db, tmp_path / "out", selection="best")
