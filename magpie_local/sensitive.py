"""Personal data and secrets in text: found, named by kind, and replaced by typed placeholders.

The `pii` check runs presidio-analyzer's recognisers on their own (patterns with checksums, Google's
phonenumbers for phones; no NLP model, nothing downloaded): e-mail addresses, phone numbers, IP
addresses, payment cards (Luhn), IBANs (mod 97) and national identifiers, most with a checksum. The
`secrets` check runs detect-secrets' plugins for formats that are secrets by shape (AWS, GitHub,
GitLab, Slack, Stripe, OpenAI ... keys and tokens, JWTs, private keys, URLs with a password); its
entropy and keyword plugins are left out, since answers are full of hashes and of `password = ...`
in example code.

What identifies nobody is not a finding: addresses at reserved example domains (example.com,
.test), private, loopback and documentation IP ranges, numbers after "version", "ISBN", "order"
and the like, and placeholder passwords (`<password>`, `${PASS}`, `password`).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "iban", "national_id")
SECRET_KINDS = ("api_key", "private_key", "url_credentials")
PRESIDIO_KINDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "IP_ADDRESS": "ip_address",
                  "CREDIT_CARD": "credit_card", "IBAN_CODE": "iban"}  # any other entity is a national id
NATIONAL_IDS = ("UsSsnRecognizer", "NhsRecognizer", "UkNinoRecognizer", "EsNifRecognizer", "EsNieRecognizer",
                "ItFiscalCodeRecognizer", "InAadhaarRecognizer", "PlPeselRecognizer", "AuTfnRecognizer",
                "FiPersonalIdentityCodeRecognizer", "SePersonnummerRecognizer", "TrNationalIdRecognizer",
                "SgFinRecognizer", "KrRrnRecognizer")
DIGIT = re.compile(r"\d")
CONTEXT_CHARS = 60  # how far before a national identifier its name must be ("SSN", "codice fiscale")
LONG_TOKEN = re.compile(r"[\w+/=.:-]{11,}")
PHONE_WORDS = re.compile(r"\b(?:phone|telephone|tel|cell|mobile|call|fax|whatsapp)\b", re.IGNORECASE)
MIN_SCORE = 0.5  # presidio's weakest patterns (a bare 9-digit number as an SSN) score below it
# A number after one of these words is an identifier of a thing, not a person.
NOT_PERSONAL = re.compile(r"(?:\b(?:version|ver|v|isbn(?:-1[03])?|issn|order|invoice|tracking|serial|build|"
                          r"model|part|sku|ref|ticket|case|doi|arxiv)\b\W{0,3}(?:no\.?|number|#)?\W{0,3})\Z",
                          re.IGNORECASE)
RESERVED_DOMAIN = re.compile(r"(?:^|\.)(?:example\.(?:com|net|org)|example|test|invalid|localhost)$", re.IGNORECASE)
PLACEHOLDER_PASSWORD = re.compile(r"(?i)(?:your[_-]?|my[_-]?)?(?:pass(?:word)?|passwd|pwd|secret|token|"
                                  r"x+|\*+|\.\.\.|changeme)")
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----.*?"
                       r"(?:-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Finding:
    kind: str  # one of PII_KINDS or SECRET_KINDS
    start: int
    end: int

    @property
    def placeholder(self) -> str:
        return "<" + ("EMAIL" if self.kind == "email" else self.kind.upper()) + ">"


def find(text: str) -> list[Finding]:
    """The personal data and secrets in `text`, in order, none overlapping (where two recognisers claim
    the same characters, the more certain and then the longer finding stays)."""
    kept: list[Finding] = []
    for _, f in sorted([*_personal(text), *_secrets(text)], key=lambda c: (-c[0], c[1].start - c[1].end)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def reasons(text: str) -> dict[str, str | None]:
    """{"pii": reason or None, "secrets": reason or None} for a turn's text, e.g. "pii: 2 email, 1 phone"."""
    counts = Counter(f.kind for f in find(text))
    out = {}
    for check, kinds in (("pii", PII_KINDS), ("secrets", SECRET_KINDS)):
        found = ", ".join(f"{counts[k]} {k}" for k in kinds if counts[k])
        out[check] = f"{check}: {found}" if found else None
    return out


def redact(text: str) -> tuple[str, Counter]:
    """`text` with each finding replaced by its typed placeholder (<EMAIL>, <PHONE>, <API_KEY> ...),
    and how many of each kind were replaced."""
    findings = find(text)
    parts, at = [], 0
    for f in findings:
        parts += [text[at:f.start], f.placeholder]
        at = f.end
    return "".join(parts) + text[at:], Counter(f.kind for f in findings)


def _personal(text: str):
    digits = len(DIGIT.findall(text))
    for recognizer, gate, context in _recognizers():
        if not (gate.search(text) if gate else digits >= 6):  # cheap tests first: most answers hold no number
            continue
        for r in recognizer.analyze(text, recognizer.supported_entities, None):
            value = text[r.start:r.end]
            weak = r.score < MIN_SCORE and r.entity_type != "PHONE_NUMBER"
            if weak or NOT_PERSONAL.search(text[max(0, r.start - 40):r.start]) or _glued(text, r.start, r.end):
                continue
            needs_word = context is not None and (r.entity_type != "PHONE_NUMBER" or value.isdigit())
            if needs_word and not context.search(text[max(0, r.start - CONTEXT_CHARS):r.start]):
                continue
            kind = PRESIDIO_KINDS.get(r.entity_type, "national_id")
            if kind == "email" and RESERVED_DOMAIN.search(value.rsplit("@", 1)[-1]):
                continue
            if kind == "ip_address" and not _public_ip(value):
                continue
            yield r.score, Finding(kind, r.start, r.end)


def _glued(text: str, start: int, end: int) -> bool:
    """Whether the span is part of a longer token (the tail of a UUID, a hash, a word)."""
    before, after = text[max(0, start - 2):start], text[end:end + 2]
    return bool(re.search(r"\w\Z|\w[-._/]\Z", before) or re.match(r"\w|[-_/]\w", after))


def _public_ip(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).is_global
    except ValueError:  # a network (10.0.0.0/8) or a near miss: not one machine
        return False


def _secrets(text: str):
    from detect_secrets.filters.heuristic import is_templated_secret

    # Cheap tests first, as for personal data: every key and token is a run of 11 or more characters
    # with a digit in it; most answers hold none.
    tokens = any(any(c.isdigit() for c in token) for token in LONG_TOKEN.findall(text))
    for plugin in _plugins():
        kind = {"Private Key": "private_key", "Basic Auth Credentials": "url_credentials"}.get(plugin.secret_type,
                                                                                              "api_key")
        if not {"private_key": "PRIVATE KEY" in text or "PuTTY" in text,
                "url_credentials": "://" in text and "@" in text}.get(kind, tokens):
            continue
        for value in set(plugin.analyze_string(text)):
            if kind == "url_credentials" and (is_templated_secret(value) or PLACEHOLDER_PASSWORD.fullmatch(value)):
                continue
            for match in re.finditer(re.escape(value), text):
                start, end = match.start(), match.end()
                # The plugins give part of what to hide: the whole token, the URL's user and
                # password, the private key's whole block.
                if kind == "api_key":
                    start = re.search(r"[\w.+/-]*\Z", text[:start]).start()  # "=" only as padding, after
                    end += re.match(r"[\w.+/=-]*", text[end:]).end()
                    end -= len(text[start:end]) - len(text[start:end].rstrip("."))
                elif kind == "url_credentials":
                    start = text.rfind("://", 0, start) + 3
                    end = text.find("@", end)
                else:
                    start, end = next(((b.start(), b.end()) for b in PEM_BLOCK.finditer(text)
                                       if b.start() <= start < b.end()), (start, end))
                yield 1.0, Finding(kind, start, end)


@cache
def _recognizers() -> list:
    import tldextract
    from presidio_analyzer import predefined_recognizers as p

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled suffix list, never fetched

    class OfflineEmailRecognizer(p.EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    # Each with a test its matches cannot fail (None: six digits or more), to skip it on most texts,
    # and the words a match must follow: a national identifier its name (bare, a 10-digit PIN passes
    # the NHS checksum one time in eleven). Phones need the strict grouping of the number's own country
    # (looser, order numbers and ISBN-10s read as Brazilian or Indian numbers), and a bare run of
    # digits needs a word such as "phone" or "call" before it.
    ids = [getattr(p, name)() for name in NATIONAL_IDS]
    return [(OfflineEmailRecognizer(), re.compile("@"), None),
            (p.PhoneRecognizer(leniency=2), re.compile(r"\d(?:[\s().+/-]{0,4}\d){6}"), PHONE_WORDS),
            (p.IpRecognizer(), re.compile(r"\d\.\d+\.\d|:[0-9A-Fa-f]{0,4}:"), None),
            (p.CreditCardRecognizer(), None, None), (p.IbanRecognizer(), None, None),
            *((r, None, re.compile(r"\b(?:" + "|".join(map(re.escape, r.context)) + r")\b", re.IGNORECASE))
              for r in ids)]


@cache
def _plugins() -> list:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    noisy = {"Base64 High Entropy String", "Hex High Entropy String", "Secret Keyword", "Public IP (ipv4)"}
    return [cls() for name, cls in sorted(get_mapping_from_secret_type_to_class().items()) if name not in noisy]
