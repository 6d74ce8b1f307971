"""Property-based tests: untrusted datasets and chat templates never crash magpie-local."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magpie_local import registry
from magpie_local.importers import RecordError, parse_record, read_dataset
from magpie_local.templates import ChatFormat, TemplateError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30)
role = st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool", "", 3, None])
message_lists = st.lists(st.fixed_dictionaries({"from": role, "value": st.one_of(st.text(max_size=30), json_values)}),
                         max_size=6)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"instruction": st.one_of(st.text(max_size=30), json_values),
                           "output": st.one_of(st.text(max_size=30), json_values)},
                          optional={"input": st.one_of(st.text(max_size=30), json_values)}),
    st.builds(lambda m: {"conversations": m}, message_lists),
    st.builds(lambda m: {"messages": [{"role": x["from"], "content": x["value"]} for x in m]}, message_lists),
)


@SETTINGS
@given(records)
def test_any_json_record_is_parsed_or_refused_with_a_reason(obj):
    try:
        record = parse_record(obj, "line 1")
    except RecordError as e:
        assert str(e)
        return
    assert record.turns and all(isinstance(t["instruction"], str) and isinstance(t["response"], str)
                                for t in record.turns)


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=80), records.map(lambda r: json.dumps(r).encode())), max_size=12))
def test_any_file_is_read_record_by_record(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
        try:
            good, errors = read_dataset(path)
        except RecordError as e:  # only for whole-file problems
            assert str(e)
            return
        assert all(record.turns for record in good)
        assert all(e.startswith(("line ", "record ")) for e in errors)


FRAGMENTS = st.sampled_from([
    "{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{ m['role'] }}", "<|im_start|>",
    "<|im_end|>\n", "{% if add_generation_prompt %}", "{% endif %}", "{{ bos_token }}", "[INST] ", " [/INST]",
    "{{ raise_exception('no') }}", "{% if m['role'] == 'system' %}", "{{ messages[0]['content'] }}",
    "{{ ''.__class__ }}", "{% set x = 1 %}", "{{ x }}", "\n", "user", "{{", "}}", "{%", "%}",
    "{% for i in range(3) %}{{ i }}{% endfor %}", "{{ m.content | trim }}", "{{ strftime_now('%Y') }}",
])


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.lists(FRAGMENTS, max_size=14).map("".join)))
def test_any_template_gives_a_format_or_a_template_error(source):
    registry.detect(source)  # never raises
    try:
        fmt = ChatFormat(source, bos_token="<s>", eos_token="</s>")
    except TemplateError as e:
        assert str(e)
        return
    prompt = fmt.response_prompt("Hello?")
    assert prompt.startswith(fmt.pre_query + "Hello?")
