"""The registry and detection reproduce the Magpie reference's model configs.

The vectors below are copied from the reference implementation's configs (MIT; the copy in
../shared/reference/magpie_model_configs.json), one per distinct configuration. Each is
checked against what `chat_format_for` derives from the real chat template (from the
llama-cpp-python sdist) where we have one, else from the family's canonical template.

Deviations, each on purpose:
- Reference strings were decoded from token ids by sentencepiece tokenizers, which print a
  space after `<s>` (`<s> [INST] `; tokenized again, that space is an extra token the
  template never puts there). Prompts are compared with BOS and that space removed, and BOS
  is checked separately (our tokenizer adds it where the vocabulary says so).
- Gemma-2's reference pre-query ends in a blank line (`user\\n\\n`) although its template is
  the same as Gemma-1.1's (`user\\n`); we follow the template, so Gemma-2 matches Gemma-1.1.
- "stop_tokens_assistant" (the bare word "assistant") is an optional early-stop in the
  reference that also cuts instructions which merely mention an assistant; we do not use it.
"""

import json
from pathlib import Path

import pytest

from magpie_local import registry
from magpie_local.prompts import TASKS
from magpie_local.templates import TemplateError, chat_format_for

from .conftest import TEMPLATES

VOCABS = json.loads((Path(__file__).parent / "data" / "vocab_markers.json").read_text())
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
QWEN2_TEMPLATE = (  # Qwen/Qwen2-7B-Instruct's tokenizer_config.json chat_template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def real(name):
    return (TEMPLATES / f"{name}.jinja").read_text()


# name: (model's template or None, bos, eos, tokenizer adds BOS, vocab, reference vector)
CASES = {
    "Meta-Llama-3.1-8B-Instruct": (
        real("meta-llama-Llama-3.1-8B-Instruct"), "<|begin_of_text|>", "<|eot_id|>", False, "llama-bpe",
        {"pre_query_template": "<|begin_of_text|>" + LLAMA3_USER, "mt_append_template": LLAMA3_USER,
         "stop_tokens": ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
         "stop_token_ids": [128009, 128001, 128006, 128007],
         "pre_query_template_with_system_prompt": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
         + VICUNA_SYSTEM + "<|eot_id|>" + LLAMA3_USER}),
    "Llama-3.3-70B-Instruct": (
        real("meta-llama-Llama-3.3-70B-Instruct"), "<|begin_of_text|>", "<|eot_id|>", False, "llama-bpe",
        {"pre_query_template": "<|begin_of_text|>" + LLAMA3_USER, "mt_append_template": LLAMA3_USER,
         "stop_tokens": ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
         "stop_token_ids": [128009, 128001, 128006, 128007]}),
    "Qwen2-7B-Instruct": (
        QWEN2_TEMPLATE, "", "<|im_end|>", False, "qwen2",
        {"pre_query_template": "<|im_start|>user\n", "stop_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
         "stop_token_ids": [151643, 151644, 151645],
         "pre_query_template_with_system_prompt":  # from Qwen2-Math's entry
         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"}),
    "Qwen2.5-7B-Instruct": (
        real("Qwen-Qwen2.5-7B-Instruct"), "", "<|im_end|>", False, "qwen2",
        {"pre_query_template": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
         "assistant.<|im_end|>\n<|im_start|>user\n", "stop_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
         "stop_token_ids": [151643, 151644, 151645]}),
    "Mistral-7B-Instruct-v0.3": (
        None, "<s>", "</s>", True, None,
        {"pre_query_template": "<s> [INST] ", "stop_tokens": ["<s>", "</s>", "[INST]", "[/INST]"]}),
    "gemma-1.1-7b-it": (
        real("google-gemma-2-2b-it"), "<bos>", "<eos>", False, None,
        {"pre_query_template": "<bos><start_of_turn>user\n",
         "stop_tokens": ["<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]}),
    "Phi-3.5-mini-instruct": (
        real("microsoft-Phi-3.5-mini-instruct"), "<s>", "<|endoftext|>", True, "phi-3",
        {"pre_query_template": "<s> <|user|>\n",
         "stop_tokens": ["</s>", "<s>", "<unk>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
         "stop_token_ids": [2, 1, 0, 32000, 32001, 32006, 32007, 32010]}),
    "Phi-3-small-128k-instruct": (
        None, "<|endoftext|>", "<|endoftext|>", True, None,
        {"pre_query_template": "<|endoftext|><|user|>\n",
         "stop_tokens": ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]}),
    "Llama-2-7b-chat-hf": (
        None, "<s>", "</s>", True, "llama-spm",
        {"pre_query_template": "<s> [INST] ", "stop_tokens": ["</s>", "<s>", "<unk>"], "stop_token_ids": [2, 1, 0]}),
    "vicuna-7b-v1.5": (
        None, "<s>", "</s>", True, "llama-spm",
        {"pre_query_template": VICUNA_SYSTEM + "\n\nUSER: ", "stop_tokens": ["</s>", "<s>", "<unk>"],
         "stop_token_ids": [2, 1, 0]}),
    "Nous-Hermes-llama-2-7b": (
        None, "<s>", "</s>", True, "llama-spm",
        {"pre_query_template": "### Instruction:\n\n", "stop_tokens": ["</s>", "<s>", "<unk>"],
         "stop_token_ids": [2, 1, 0]}),
    "Yi-1.5-34B-Chat": (
        None, "<|startoftext|>", "<|im_end|>", True, None,
        {"pre_query_template": "<|startoftext|><|im_start|>user\n",
         "stop_tokens": ["<|startoftext|>", "<|endoftext|>", "<|im_end|>"]}),
    "DeepSeek-Coder-V2-Lite-Instruct": (
        None, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True, None,
        {"pre_query_template": "<｜begin▁of▁sentence｜>User: ",
         "stop_tokens": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>", "<｜User｜>",
                         "<｜Assistant｜>"]}),
}
# Models whose files carry no template of a family we know are named by family (as users do with --template).
FAMILY_FOR = {"Mistral-7B-Instruct-v0.3": "mistral", "Phi-3-small-128k-instruct": "phi-3",
              "Llama-2-7b-chat-hf": "llama-2", "vicuna-7b-v1.5": "vicuna", "Nous-Hermes-llama-2-7b": "alpaca",
              "Yi-1.5-34B-Chat": "chatml", "DeepSeek-Coder-V2-Lite-Instruct": "deepseek-v2"}


def fmt_for(name, **kw):
    source, bos, eos, _, _, _ = CASES[name]
    return chat_format_for(source, template=FAMILY_FOR.get(name, "auto"), bos_token=bos, eos_token=eos, **kw)


def seen_by_model(text, bos, adds_bos):
    """The prompt as tokens see it: the tokenizer's BOS in front where it adds one."""
    return bos + text if adds_bos and bos and not text.startswith(bos) else text


def without_bos(text, bos):
    return text[len(bos):].removeprefix(" ") if bos and text.startswith(bos) else text


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_pre_query_and_stops(name):
    source, bos, eos, adds_bos, vocab, ref = CASES[name]
    fmt = fmt_for(name)
    ours = seen_by_model(fmt.pre_query, bos, adds_bos)
    ref_pre = ref["pre_query_template"]
    assert without_bos(ours, bos) == without_bos(ref_pre, bos)
    if ref_pre.startswith(bos):  # reference strings without BOS got it from the HF tokenizer, as ours do here
        assert ours.startswith(bos)
    assert set(ref["stop_tokens"]) <= set(fmt.stops), set(ref["stop_tokens"]) - set(fmt.stops)
    if "mt_append_template" in ref:
        assert fmt.user_header == ref["mt_append_template"]
    if "pre_query_template_with_system_prompt" in ref:
        with_system = seen_by_model(fmt.instruction_prompt(VICUNA_SYSTEM if "Llama" in name else
                                                           "You are a helpful assistant."), bos, adds_bos)
        assert with_system == ref["pre_query_template_with_system_prompt"]
    if vocab:
        ids = VOCABS[vocab]["tokens"]
        assert {ids[t] for t in ref["stop_tokens"]} == set(ref["stop_token_ids"])
        assert set(ref["stop_token_ids"]) <= {ids[t] for t in fmt.stops if t in ids}


@pytest.mark.parametrize("task", ["math", "code", "translation"])
def test_reference_task_prompts(task):
    ref = {  # Llama-3.1's pre_query_template_<task>: the system prompt is the reference's own text
        "math": "You are an AI assistant designed to provide helpful, step-by-step guidance on solving math problems.",
        "code": "You are an AI assistant designed to provide helpful, step-by-step guidance on coding problems.",
        "translation": "You are an AI assistant specifically designed to provide accurate and contextually "
                       "appropriate translations."}[task]
    fmt = fmt_for("Meta-Llama-3.1-8B-Instruct")
    prompt = fmt.instruction_prompt(TASKS[task])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + ref)
    assert prompt.endswith(TASKS[task] + "<|eot_id|>" + LLAMA3_USER)


def test_gemma_2_follows_its_template_not_the_reference_blank_line():
    fmt = fmt_for("gemma-1.1-7b-it")
    assert fmt.pre_query == "<bos><start_of_turn>user\n"  # the reference's Gemma-2 entry has "user\n\n"
    with pytest.raises(TemplateError, match="no system turn"):
        fmt.check_system("Be brief.")


def test_model_keeps_its_own_template_when_asked():
    source = real("meta-llama-Llama-3.1-8B-Instruct")
    own = chat_format_for(source, template="model", bos_token="<|begin_of_text|>")
    assert "Cutting Knowledge Date" in own.pre_query and own.origin == "model"
    assert chat_format_for(source, bos_token="<|begin_of_text|>").origin.startswith("registry:llama-3")


DETECTED = {
    "Qwen-Qwen3-0.6B": "qwen3", "Qwen-QwQ-32B": "qwen3", "HuggingFaceTB-SmolLM3-3B": "qwen3",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "deepseek-r1",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1",
    "openai-gpt-oss-120b": "gpt-oss", "google-gemma-2-2b-it": "gemma", "google-gemma-4-31B-it": "gemma-4",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "Mistral-Small-3.2-24B-Instruct-2506": "mistral",
    "ibm-granite-granite-3.3-2B-Instruct": "granite", "ibm-granite-granite-4.0": "granite",
    "meta-llama-Llama-3.2-3B-Instruct": "llama-3", "microsoft-Phi-3.5-mini-instruct": "phi-3",
    "Qwen-Qwen2.5-7B-Instruct": "qwen2.5", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "chatml",
    "llama-cpp-rwkv-world": None, "deepseek-ai-DeepSeek-V3.1": "deepseek-r1",
}


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_detection_of_families_the_reference_lacks(name):
    family = registry.detect(real(name))
    assert (family.name if family else None) == DETECTED[name]


def test_thinking_models_answer_without_reasoning_by_default():
    qwen3 = chat_format_for(real("Qwen-Qwen3-0.6B"))
    assert qwen3.response_prompt("Hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = chat_format_for(real("Qwen-Qwen3-0.6B"), keep_thinking=True)
    assert thinking.response_prompt("Hi").endswith("<|im_start|>assistant\n")
    oss = chat_format_for(real("openai-gpt-oss-120b"))
    assert oss.response_prompt("Hi").endswith("<|start|>assistant<|channel|>final<|message|>")
    assert "<|return|>" in oss.stops
    with pytest.raises(TemplateError, match="not supported for gpt-oss"):
        chat_format_for(real("openai-gpt-oss-120b"), keep_thinking=True)


def test_template_choice_errors_are_clear(tmp_path):
    with pytest.raises(TemplateError, match="no chat template"):
        chat_format_for(None)
    with pytest.raises(TemplateError, match="unknown template family 'nope'"):
        chat_format_for(None, template="nope")
    with pytest.raises(TemplateError, match="no canonical template"):
        chat_format_for(None, template="qwen3")
    with pytest.raises(TemplateError, match="cannot read"):
        chat_format_for(None, template=str(tmp_path / "absent.jinja"))
    custom = tmp_path / "mine.jinja"
    custom.write_text(registry.CHATML)
    assert chat_format_for(None, template=str(custom)).pre_query == "<|im_start|>user\n"
