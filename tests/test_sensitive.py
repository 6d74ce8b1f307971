"""Personal data and secrets (the pii and secrets checks, export --redact): every kind is found in the
formats people write it in, look-alikes are not, and a flagged pair is left out or exported redacted
with the card counting what was replaced."""

import json

import pytest

import magpie_local.api as api
from magpie_local.api.settings import resolve_passing
from magpie_local.sensitive import find, reasons, redact
from magpie_local.store import Store

from .conftest import cli, imported, sql

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu3aumRLe8y9ZVJ\n"
       "-----END RSA PRIVATE KEY-----")
# (text, kind, the part that must be replaced). Card and IBAN numbers are the issuers' published test
# numbers; the national identifiers are the formats' documented examples (valid checksums).
FOUND = [
    ("Write to jane.doe@gmail.com for details.", "email", "jane.doe@gmail.com"),
    ("Contact: r.müller+news@posteo.de", "email", "r.müller+news@posteo.de"),
    ("Call +1 415-555-0132 after 5pm.", "phone", "+1 415-555-0132"),
    ("Phone: (415) 555-2671", "phone", "(415) 555-2671"),
    ("Anytown, CA 98765\n(415) 555-1234 | Résumé", "phone", "(415) 555-1234"),
    ("Our London office: 020 7946 0958.", "phone", "020 7946 0958"),
    ("Berlin: +49 30 901820", "phone", "+49 30 901820"),
    ("The server at 8.8.4.4 answered.", "ip_address", "8.8.4.4"),
    ("Connect to 2607:f8b0:4005:80a::200e now", "ip_address", "2607:f8b0:4005:80a::200e"),
    ("Visa 4111 1111 1111 1111, exp 12/28", "credit_card", "4111 1111 1111 1111"),
    ("Mastercard 5500-0000-0000-0004", "credit_card", "5500-0000-0000-0004"),
    ("Pay to IBAN DE89 3704 0044 0532 0130 00 today", "iban", "DE89 3704 0044 0532 0130 00"),
    ("IBAN: GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
    ("My SSN is 536-22-1234.", "national_id", "536-22-1234"),
    ("NHS number 943 476 5919", "national_id", "943 476 5919"),
    ("DNI 12345678Z", "national_id", "12345678Z"),
    ("Il codice fiscale è RSSMRA85T10A562S", "national_id", "RSSMRA85T10A562S"),
    ("Aadhaar: 2345 6789 0124", "national_id", "2345 6789 0124"),
    ("PESEL 44051401359", "national_id", "44051401359"),
    ("AWS key AKIAIOSFODNN7EXAMPLE in the config", "api_key", "AKIAIOSFODNN7EXAMPLE"),
    ("Keys:\nAKIAIOSFODNN7EXAMPLE\n", "api_key", "AKIAIOSFODNN7EXAMPLE"),
    ("export GITHUB_TOKEN=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", "api_key",
     "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"),
    ("Slack: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "api_key",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "api_key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9l"
     "IiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c", "api_key",
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIy"
     "fQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
    ("DATABASE_URL=postgres://admin:S3cr3tx9@db.internal:5432/app", "url_credentials", "admin:S3cr3tx9"),
    ("Here is the key:\n" + PEM + "\nKeep it safe.", "private_key", PEM),
]

# Numbers and strings shaped like the above that identify nobody and unlock nothing.
NOT_FOUND = [
    "Your order number is 123-456-7890.",
    "Order #4111-1111-1111-1112 has shipped.",  # fails the Luhn check
    "Order no. 4111 1111 1111 1111",  # passes it, but is named an order
    "Upgrade to version 1.2.3.4, or v2.10.1 at least; Python 3.11.7.",
    "ISBN 978-3-16-148410-0", "ISBN 0-306-40615-2", "ISBN-10: 0306406152",
    "The war lasted from 1939 to 1945; pi is 3.14159265358979.",
    "Call (555) 123-4567 for the fictional hotline.",
    "Bind to 0.0.0.0/0, then 127.0.0.1, 192.168.1.1 and 203.0.113.7.",  # networks, private, documentation
    "Mail john.smith@example.com or test@mail.example.",  # reserved example domains
    "postgres://user:password@localhost/db and https://admin:<password>@host",  # placeholders
    'api_key = "YOUR_API_KEY"  # sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    "Request id 123e4567-e89b-12d3-a456-426614174000",  # a UUID's tail passes a checksum by chance
    "Generate a 10-character PIN code.\n\n7466503489",  # passes the NHS checksum, but nothing says NHS
    "The binary is 0111111100101110101111000001010",
    "Pad it: 1111111111",
]


@pytest.mark.parametrize("text, kind, secret", FOUND, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(FOUND)])
def test_every_kind_is_found_and_replaced_by_its_placeholder(text, kind, secret):
    assert [f.kind for f in find(text)] == [kind]
    redacted, counts = redact(text)
    placeholder = {"email": "<EMAIL>"}.get(kind, f"<{kind.upper()}>")
    assert redacted == text.replace(secret, placeholder) and counts == {kind: 1}
    check = "pii" if kind in ("email", "phone", "ip_address", "credit_card", "iban", "national_id") else "secrets"
    assert reasons(text)[check] == f"{check}: 1 {kind}"


@pytest.mark.parametrize("text", NOT_FOUND)
def test_look_alikes_are_not_found(text):
    assert find(text) == [] and redact(text) == (text, {})


def test_several_findings_are_counted_and_the_rest_of_the_text_kept():
    text = ("Email ana@posteo.de or bob@gmail.com, call +44 20 7946 0958.\n"
            "Token: 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. Thanks!")
    assert reasons(text) == {"pii": "pii: 2 email, 1 phone", "secrets": "secrets: 1 api_key"}
    assert redact(text)[0] == "Email <EMAIL> or <EMAIL>, call <PHONE>.\nToken: <API_KEY>. Thanks!"


def test_generate_passing_takes_the_new_checks():
    assert resolve_passing("pii,secrets", None) == ("pii", "secrets")
    assert {"pii", "secrets"} <= set(resolve_passing("all", None))


@pytest.fixture
def data_db(tmp_path):
    records = [{"instruction": "Draft a reply to my landlord.", "output": "Dear Mr Smith, reach me at "
                "jane.doe@gmail.com or +1 415-555-0132. Best, Jane"},
               {"instruction": "How do I call the API?", "input": "key AKIAIOSFODNN7EXAMPLE",
                "output": "Pass the key in the header."},
               {"instruction": "Name three primary colors.", "output": "Red, yellow and blue."}]
    return imported(tmp_path, records)


def test_curate_flags_export_leaves_out_or_redacts_and_the_card_counts(data_db, tmp_path):
    done = cli("curate", "--db", str(data_db))
    assert done.returncode == 0, done.stderr
    assert sorted(sql(data_db, "SELECT name, reason FROM checks WHERE passed = 0")) == [
        ("pii", "pii: 1 email, 1 phone"), ("secrets", "secrets: 1 api_key")]
    out = tmp_path / "out"
    assert cli("export", "--db", str(data_db), "--passing", "all", "--out", str(out)).returncode == 0
    kept = [json.loads(line)["messages"][0]["content"] for line in (out / "data.jsonl").read_text().splitlines()]
    assert kept == ["Name three primary colors."]
    assert "flagged pii 1 of 3 turns, secrets 1 of 3 turns; flagged pairs are left out (pii, secrets)" in \
        (out / "README.md").read_text()

    redacted = tmp_path / "redacted"
    done = cli("export", "--db", str(data_db), "--passing", "all", "--redact", "--out", str(redacted))
    assert done.returncode == 0, done.stderr
    assert "redacted: 1 email, 1 phone, 1 api_key" in done.stderr
    rows = [json.loads(line)["messages"] for line in (redacted / "data.jsonl").read_text().splitlines()]
    assert [m[1]["content"] for m in rows][0] == "Dear Mr Smith, reach me at <EMAIL> or <PHONE>. Best, Jane"
    assert rows[1][0]["content"] == "How do I call the API?\n\nkey <API_KEY>"
    card = (redacted / "README.md").read_text()
    assert "replaced by typed placeholders (`--redact`): 1 email (`<EMAIL>`), 1 phone (`<PHONE>`), " \
           "1 api_key (`<API_KEY>`)" in card
    assert "jane.doe" not in card + (redacted / "data.jsonl").read_text()
    # The database keeps the text as generated; only the export is redacted.
    assert sql(data_db, "SELECT count(*) FROM turns WHERE response LIKE '%jane.doe@gmail.com%'") == [(1,)]
    api.report(data_db, tmp_path / "report.html")
    assert "<tr><td>pii</td><td>2</td><td>1</td></tr>" in (tmp_path / "report.html").read_text()


def test_dpo_pairs_are_redacted_too(tmp_path):
    """A hand-made respond run and its ratings (real store, no model): both answers name a person's address."""
    def turn(text):
        return dict(instruction="Where can I write to Ana?", input=None, response=text, response_finish="stop",
                    response_tokens=1, response_prompt_tokens=1, instruction_tokens=None,
                    instruction_prompt_tokens=None)

    db = tmp_path / "p.db"
    with Store(db) as store:
        store.import_run(config_key="s", config={}, versions={}, rows=[
            (dict(item_index=0, status="kept", drop_reason=None, system_prompt=None), [turn("?")])])
        run = store.create_run(kind="respond", target=2, config_key="r", config={"respond": {}}, model={},
                               backend="llamacpp", versions={})
        answers = ["Write to ana@posteo.de.", "Try ana@posteo.de or 8.8.4.4."]
        store.commit_batch(run.id, dict(first_item=0, n_items=2, kept=2, dropped=0, prompt_tokens=0,
                                        completion_tokens=0, seconds=0),
                           [(dict(item_index=k, status="kept", drop_reason=None, system_prompt=None, source_id=1,
                                  sample_index=k), [turn(a)]) for k, a in enumerate(answers)])
        judge = store.create_run(kind="judge", target=2, config_key="j", config={}, model={}, backend="", versions={})
        turn_ids = [r[0] for r in store.conn.execute("SELECT t.id FROM turns t JOIN conversations c ON "
                                                     "c.id = t.conversation_id WHERE c.run_id = ?", [run.id])]
        store.commit_scores(judge.id, [dict(turn_id=t, score=s, distribution="[]", mass=1.0)
                                       for t, s in zip(turn_ids, [4.0, 2.0])], table="ratings")
    done = api.export(db, tmp_path / "dpo", format="dpo", redact=True)
    assert done.redacted == {"email": 2, "ip_address": 1}
    pair = json.loads((tmp_path / "dpo" / "data.jsonl").read_text())
    assert pair["chosen"][0]["content"] == "Write to <EMAIL>."
    assert pair["rejected"][0]["content"] == "Try <EMAIL> or <IP_ADDRESS>."
    assert "2 email (`<EMAIL>`), 1 ip_address (`<IP_ADDRESS>`)" in (tmp_path / "dpo" / "README.md").read_text()
