"""Pre-query template derivation on real chat templates, and the sandbox."""

import pytest

from magpie_local import registry
from magpie_local.gguf import read_gguf
from magpie_local.templates import ChatFormat, TemplateError, render

from .conftest import TEMPLATES, template

EXPECTED_PRE_QUERY = {
    "Qwen-Qwen2.5-7B-Instruct": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"),
    "meta-llama-Llama-3.1-8B-Instruct": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
    "meta-llama-Llama-3.3-70B-Instruct": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
    "microsoft-Phi-3.5-mini-instruct": "<|user|>\n",
    "google-gemma-2-2b-it": "<bos><start_of_turn>user\n",
    "mistralai-Mistral-Nemo-Instruct-2407": "<s>[INST]",
    "Qwen-Qwen3-0.6B": "<|im_start|>user\n",
}
BOS = {"meta-llama-Llama-3.1-8B-Instruct": "<|begin_of_text|>",
       "meta-llama-Llama-3.3-70B-Instruct": "<|begin_of_text|>",
       "google-gemma-2-2b-it": "<bos>", "mistralai-Mistral-Nemo-Instruct-2407": "<s>"}
EOS = {"mistralai-Mistral-Nemo-Instruct-2407": "</s>", "microsoft-Phi-3.5-mini-instruct": "<|endoftext|>"}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRE_QUERY))
def test_pre_query_of_known_families(name):
    fmt = ChatFormat(template(name), bos_token=BOS.get(name, ""), eos_token=EOS.get(name, ""))
    assert fmt.pre_query == EXPECTED_PRE_QUERY[name]


def test_default_model_smollm2_chatml(default_model):
    info = read_gguf(default_model)
    fmt = ChatFormat(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    assert fmt.pre_query == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                             "<|im_end|>\n<|im_start|>user\n")
    assert fmt.stops == ["<|im_end|>", "<|im_start|>"]  # BOS is <|im_start|>, EOS <|im_end|> in this file
    assert fmt.response_prompt("Hi?").endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")


def test_system_prompt_goes_before_the_user_turn():
    fmt = ChatFormat(template("Qwen-Qwen2.5-7B-Instruct"))
    expected = "<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\n"
    assert fmt.instruction_prompt("You write Python.") == expected


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.jinja")), ids=lambda p: p.stem)
def test_every_real_template_round_trips_or_refuses(path):
    """prefix + instruction + the rest == the template's own rendering, for the first and a later
    turn, or a clear refusal."""
    source = path.read_text()
    try:
        fmt = ChatFormat(source, bos_token="<BOS>", eos_token="<EOS>", family=registry.detect(source))
    except TemplateError as e:
        assert str(e), "a refusal must say why"
        return
    first, second = "How do I sort a list in Python?", "And in reverse order?"

    def full(messages):
        text = render(source, messages, add_generation_prompt=True, bos_token="<BOS>", eos_token="<EOS>",
                      enable_thinking=False)
        return text + (fmt.family.skip_reasoning if fmt.family else "")

    assert fmt.response_prompt(first) == full([{"role": "user", "content": first}])
    assert fmt.response_prompt(first).startswith(fmt.pre_query + first)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": "Use sorted(xs)."}]
    later = fmt.instruction_prompt(history=history)
    assert later.startswith(fmt.pre_query + first)
    assert fmt.response_prompt(second, history=history) == full([*history, {"role": "user", "content": second}])
    assert fmt.response_prompt(second, history=history).startswith(later + second)
    assert fmt.stops, "every derived format must know where a turn ends"


HOSTILE = {
    "python internals": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__ }}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "syntax error": "{% for m in messages %}",
    "mutating": "{% set x = [] %}{{ x.append(1) }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_are_refused(name):
    with pytest.raises(TemplateError):
        ChatFormat(HOSTILE[name])


def test_template_without_user_content_is_refused():
    with pytest.raises(TemplateError, match="does not include the user's message"):
        ChatFormat("{% for m in messages %}<turn>{% endfor %}")


def test_strftime_now_is_pinned_by_the_run_clock():
    from datetime import datetime, timezone

    fmt = ChatFormat(template("meta-llama-Llama-3.2-3B-Instruct"), bos_token="<|begin_of_text|>",
                     now=datetime(2025, 3, 4, tzinfo=timezone.utc))
    assert "Today Date: 04 Mar 2025" in fmt.pre_query
