"""Decoding controls (penalties, DRY, first-token bans, loop stops), presets and `generate --passing`.

The logic is tested on its own first; then on the real default model: the same bytes whatever
--parallel and after a SIGKILL + resume with penalties and DRY on, bad values refused before the
database exists, and --passing delivering exactly -n passing pairs.
"""

import json
import sqlite3
from dataclasses import replace

import pytest

import magpie_local as ml
from magpie_local.backends.base import Sampling, first_loop, loops
from magpie_local.curate import Bounds, check_turn
from magpie_local.generate import GenerateSettings
from magpie_local.store import config_key

from .conftest import cli, run_rows, sigkill_after_a_batch

PENALISED = ["--response", "repeat_penalty=1.15", "--response", "frequency_penalty=0.1",
             "--response", "dry_multiplier=0.8", "--response", "stop_loops=true",
             "--instruction", "repeat_penalty=1.05", "--instruction", "min_p=0.05"]


# -- logic ---------------------------------------------------------------------------------

def test_controls_at_their_defaults_leave_old_run_keys_unchanged():
    # A run stored before the controls existed: its settings as asdict() wrote them then.
    old = {"seed": 0, "instruction": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 128},
           "response": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 512},
           "system_prompts": [], "language": None, "turns": 1, "keep_thinking": False, "template": "auto"}
    settings = GenerateSettings.from_dict(old)
    assert json.loads(json.dumps(settings.decisive())) == old
    assert config_key({"settings": settings.decisive()}) == config_key({"settings": old})
    magpie = GenerateSettings(instruction=ml.PRESETS["magpie"][0], response=ml.PRESETS["magpie"][1])
    assert json.loads(json.dumps(magpie.decisive())) == old  # --preset magpie makes the same runs as before


def test_controls_that_are_on_are_part_of_the_settings_and_round_trip():
    s = Sampling(temperature=0.0, repeat_penalty=1.1, dry_multiplier=0.8, ban_first=("#",), stop_loops=True)
    d = s.decisive()
    assert d["repeat_penalty"] == 1.1 and d["dry_multiplier"] == 0.8 and d["ban_first"] == ["#"]
    assert "dry_base" not in d and "frequency_penalty" not in d
    assert Sampling.from_dict(json.loads(json.dumps(d))) == s
    assert Sampling().decisive() != d
    settings = GenerateSettings(passing=("cut_off",))
    assert GenerateSettings.from_dict(json.loads(json.dumps(settings.decisive()))) == settings


@pytest.mark.parametrize("field,value,phrase", [
    ("repeat_penalty", 0.0, "repeat-penalty"), ("repeat_penalty", -1.0, "repeat-penalty"),
    ("frequency_penalty", -3.0, "frequency-penalty"), ("presence_penalty", 2.5, "presence-penalty"),
    ("min_p", 1.5, "min-p"), ("min_p", -0.1, "min-p"), ("dry_multiplier", -0.5, "dry-multiplier"),
    ("dry_base", 0.5, "dry-base"), ("top_k", -1, "top-k"), ("dry_allowed_length", 0, "dry-allowed-length")])
def test_out_of_range_values_are_named(field, value, phrase):
    problems = replace(Sampling(), **{field: value}).problems()
    assert len(problems) == 1 and phrase in problems[0]
    assert Sampling().problems() == []


def test_loop_detection():
    prose = list(range(100))
    assert not loops(prose) and first_loop(prose) is None
    loop = prose[:20] + [7, 8, 9, 10, 11] * 3
    assert loops(loop)
    assert first_loop(loop + [7, 8, 9]) == len(loop)  # where a per-token check would have stopped
    assert not loops(prose[:20] + [7, 8, 9, 10, 11] * 2)  # two repeats are not a loop
    assert not loops([1, 2, 1, 2, 1, 2])  # periods under four tokens are left alone
    assert loops([5] * 40 + list(range(50, 60)) * 3)


def test_family_default_bans_llama_31_markdown_headers_only():
    from magpie_local import registry

    llama = registry.get("llama-3")
    assert llama.default_bans("... Cutting Knowledge Date: December 2023 ...") == ("#", "##", "###", "####")
    assert llama.default_bans("{{ '<|start_header_id|>' }}") == ()  # Llama 3.0: no ban
    assert registry.get("chatml").default_bans("anything") == ()


def test_capabilities_refuse_what_a_backend_cannot_do():
    from magpie_local.backends import capabilities

    dry = GenerateSettings(response=Sampling(temperature=0.0, dry_multiplier=0.8))
    with pytest.raises(ml.UsageError, match="response dry is not available on the mlx backend"):
        ml.api.check_sampling(dry, "mlx")
    ml.api.check_sampling(dry, "llamacpp")
    ban = GenerateSettings(instruction=Sampling(ban_first=("#",)))
    with pytest.raises(ml.UsageError, match="instruction ban-first is not available on the server backend"):
        ml.api.check_sampling(ban, "server")
    assert capabilities("llamacpp").grammar and not capabilities("mlx").grammar


def test_presets_leave_out_what_a_backend_cannot_apply():
    inst, resp = ml.api.sampling_preset("default", "mlx")
    assert resp.dry_multiplier == 0 and resp.repeat_penalty == ml.PRESETS["default"][1].repeat_penalty
    assert resp.stop_loops and inst == ml.PRESETS["default"][0]
    assert ml.api.sampling_preset("default", "llamacpp") == ml.PRESETS["default"]
    assert ml.api.sampling_preset("magpie", "mlx") == ml.PRESETS["magpie"]


def test_server_requests_carry_each_control_under_the_servers_names():
    from magpie_local.backends.server import sampling_payload

    off = sampling_payload(Sampling())
    assert off["repeat_penalty"] == off["repetition_penalty"] == 1.0 and "dry_multiplier" not in off
    on = sampling_payload(Sampling(repeat_penalty=1.1, repeat_last_n=32, dry_multiplier=0.8, min_p=0.05, top_k=40))
    assert on["repetition_penalty"] == on["repeat_penalty"] == 1.1 and on["repeat_last_n"] == 32
    assert on["dry_multiplier"] == 0.8 and on["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    assert on["min_p"] == 0.05 and on["top_k"] == 40


def test_server_completions_are_cut_where_they_start_to_loop():
    import httpx

    from magpie_local.backends.base import Request
    from magpie_local.backends.server import ServerBackend

    from .test_server_logic import Vocab

    def reply(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        text = "Intro. " + "abcd" * 10
        return httpx.Response(200, json={"choices": [{"text": text, "finish_reason": "length"}],
                                         "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 47}})

    be = ServerBackend(["http://a:8000"], Vocab(), served_model="m", transport=httpx.MockTransport(reply))
    try:
        [looped, plain] = be.complete([Request("q", Sampling(max_tokens=47, stop_loops=True), seed=0),
                                       Request("q", Sampling(max_tokens=47), seed=0)])
    finally:
        be.close()
    assert looped.finish_reason == "loop" and looped.text == "Intro. " + "abcd" * 3
    assert looped.completion_tokens == len(looped.text)
    assert plain.finish_reason == "length" and plain.text == "Intro. " + "abcd" * 10


# -- the real default model ----------------------------------------------------------------

@pytest.mark.slow
def test_penalties_and_dry_give_the_same_bytes_at_any_parallel(tmp_path):
    runs = {}
    for parallel in (1, 8):
        db = tmp_path / f"p{parallel}.db"
        r = cli("generate", "-n", "6", "--db", str(db), "--parallel", str(parallel), "--batch-size", "2",
                "--instruction-max-tokens", "48", "--response-max-tokens", "64", "-q", *PENALISED)
        assert r.returncode == 0, r.stderr
        runs[parallel] = run_rows(db)
    assert runs[1] == runs[8]
    conn = sqlite3.connect(tmp_path / "p1.db")
    settings = json.loads(conn.execute("SELECT config FROM runs").fetchone()[0])["settings"]
    conn.close()
    assert settings["response"]["repeat_penalty"] == 1.15 and settings["response"]["dry_multiplier"] == 0.8
    assert settings["instruction"]["min_p"] == 0.05


@pytest.mark.slow
def test_penalties_change_greedy_answers(backend):
    from magpie_local.backends.base import Request

    prompt = "<|im_start|>user\nList the days of the week.<|im_end|>\n<|im_start|>assistant\n"
    plain, penalised = backend.complete([
        Request(prompt, Sampling(temperature=0.0, max_tokens=64), seed=1),
        Request(prompt, Sampling(temperature=0.0, max_tokens=64, repeat_penalty=1.5, dry_multiplier=1.0), seed=1)])
    assert plain.text != penalised.text  # the chain really holds the penalties
    banned = backend.complete([Request(prompt, Sampling(temperature=0.0, max_tokens=4), seed=1)])[0]
    first = backend.tokenize(banned.text, add_bos=False, special=False)[0]
    again = backend.complete([Request(prompt, Sampling(temperature=0.0, max_tokens=4,
                                                       ban_first=(backend.detokenize([first]),)), seed=1)])[0]
    assert backend.tokenize(again.text, add_bos=False, special=False)[0] != first


@pytest.mark.slow
def test_sigkill_and_resume_with_penalties_give_the_uninterrupted_run(tmp_path):
    args = ["generate", "-n", "10", "--batch-size", "2", "--parallel", "4", "--instruction-max-tokens", "48",
            "--response-max-tokens", "64", "-q", *PENALISED]
    whole = tmp_path / "whole.db"
    assert cli(*args, "--db", str(whole)).returncode == 0
    killed = tmp_path / "killed.db"
    sigkill_after_a_batch(args, killed)
    partial = len(run_rows(killed))
    assert partial < len(run_rows(whole))  # it was killed before the end
    r = cli(*args, "--db", str(killed))
    assert r.returncode == 0, r.stderr
    assert run_rows(killed) == run_rows(whole)


@pytest.mark.slow
def test_passing_counts_only_pairs_that_pass(tmp_path):
    db = tmp_path / "passing.db"
    # The paper's greedy responses on the small model: many loop (repetition) or run to the limit (cut_off).
    r = cli("generate", "-n", "3", "--db", str(db), "--preset", "magpie", "--response-max-tokens", "120",
            "--passing", "all", "-q")
    assert r.returncode == 0, r.stderr
    rows = run_rows(db)
    kept = [row for row in rows if row[1] == "kept"]
    assert len(kept) == 3
    for _, _, _, instruction, response, finish in kept:
        verdicts = check_turn({"instruction": instruction, "response": response, "response_finish": finish}, Bounds())
        assert not any(verdicts.values())
    failed = [row for row in rows if (row[2] or "").startswith("failed check:")]
    assert failed, "some greedy responses fail cut_off or repetition"
    assert all(row[4] for row in failed)  # failing pairs are stored, with their responses
    out = tmp_path / "out"
    assert cli("export", "--db", str(db), "--out", str(out)).returncode == 0
    assert len((out / "data.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_bad_decoding_values_are_refused_before_the_database_exists(tmp_path):
    db = tmp_path / "never.db"
    for args, phrase in [(["--response", "repeat_penalty=-1"], "response repeat-penalty must be above 0"),
                         (["--instruction", "min_p=1.5"], "instruction min-p must be in [0, 1]"),
                         (["--response", "frequency_penalty=-9"], "frequency-penalty must be in [-2, 2]"),
                         (["--instruction", "ban_first=no such token here"], "is not one token"),
                         (["--response", "dry_multiplier=abc"], "is not a valid float"),
                         (["--response", "colour=red"], "takes KEY=VALUE with KEY one of"),
                         (["--preset", "fancy"], "unknown preset 'fancy'"),
                         (["--passing", "near_duplicate"], "generate --passing takes"),
                         (["--backend", "mlx", "--response", "dry_multiplier=0.5"], "not available on the mlx")]:
        r = cli("generate", "-n", "2", "--db", str(db), *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], (args, r.stderr)
        assert not db.exists()


@pytest.mark.slow
def test_python_api_generates_with_a_preset_and_reads_back(tmp_path):
    db = tmp_path / "api.db"
    inst, resp = ml.PRESETS["default"]
    settings = ml.GenerateSettings(instruction=replace(inst, max_tokens=48), response=replace(resp, max_tokens=64))
    seen = []
    result = ml.generate(db, 3, settings, progress=ml.Progress(item=seen.append))
    assert result.counts["kept"] == 3 and result.made == 3 and result.tokens > 0
    assert sum(seen) == 3 and len(seen) == result.counts["kept"] + result.counts["dropped"]
    again = ml.generate(db, 3, settings)
    assert again.status == "already-complete" and again.run.id == result.run.id
    assert ml.GenerateSettings.from_dict(result.run.config["settings"]) == settings
