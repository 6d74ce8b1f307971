"""Known chat-model families: what a chat template alone cannot tell.

The main path derives everything from the model's own Jinja template (see templates.py).
A family entry adds what the template cannot say: stop strings beyond the template's
markers, a canonical template for model files that carry none, and, for a few families,
the Magpie reference implementation's choice to use a plainer template than the model's
own (Llama-3.1+ injects a dated system block; Qwen2 injects a default system prompt that
the reference leaves out, while it keeps Qwen2.5's).

The canonical templates below are the Hugging Face templates of the named models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LLAMA_3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI_3 = (
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = 'A chat between a curious user and an "
    "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s "
    "questions.' %}{% set loop_messages = messages %}{% endif %}{{ system_message + '\n\n' }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n\n' }}{% endif %}")
DEEPSEEK_V2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    fingerprints: tuple[str, ...] = ()  # all must occur in a template's source for it to match
    excludes: tuple[str, ...] = ()  # none may occur
    template: str | None = None  # canonical template: for files without one, or `--template NAME`
    prefer_registry_template: str = ""  # non-empty: why the canonical template replaces the model's own
    extra_stops: tuple[str, ...] = ()
    thinking: bool = False  # reasons before answering (<think> blocks, analysis channel)
    skip_reasoning: str = ""  # appended to the generation prompt to skip reasoning, where no template flag does
    examples: tuple[str, ...] = field(default=())  # models of this family
    # Token texts the first instruction token may not be (by default), where the model's own
    # template contains `bans_when` (empty: always); they are kept in the run's settings.
    first_token_bans: tuple[str, ...] = ()
    bans_when: str = ""

    def default_bans(self, model_template: str | None) -> tuple[str, ...]:
        if not self.bans_when or self.bans_when in (model_template or ""):
            return self.first_token_bans
        return ()


FAMILIES: tuple[Family, ...] = (
    Family("gpt-oss", "OpenAI harmony format (analysis and final channels)", ("<|channel|>", "<|start|>"),
           extra_stops=("<|return|>", "<|call|>"), thinking=True, skip_reasoning="<|channel|>final<|message|>",
           examples=("openai/gpt-oss-20b",)),
    Family("deepseek-r1", "DeepSeek-R1 and its distills (thinking)", ("<｜Assistant｜>", "<think>"),
           thinking=True, examples=("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",)),
    Family("deepseek-v2", "DeepSeek-V2 / Coder-V2 'User: ... Assistant:'", ("'User: '", "Assistant:", "bos_token"),
           excludes=("'System: '",),
           template=DEEPSEEK_V2, extra_stops=("<|EOT|>", "<｜User｜>", "<｜Assistant｜>"),
           examples=("deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",)),
    Family("qwen3", "ChatML with thinking (Qwen3, QwQ, SmolLM3)", ("<|im_start|>", "<think>"), thinking=True,
           extra_stops=("<|endoftext|>",), examples=("Qwen/Qwen3-0.6B", "Qwen/QwQ-32B", "HuggingFaceTB/SmolLM3-3B")),
    Family("qwen2.5", "ChatML with Qwen2.5's default system prompt (kept, as the reference does)",
           ("<|im_start|>", "You are Qwen, created by Alibaba Cloud"), extra_stops=("<|endoftext|>",),
           examples=("Qwen/Qwen2.5-7B-Instruct",)),
    Family("qwen2", "ChatML with Qwen2's default system prompt", ("<|im_start|>", "You are a helpful assistant."),
           template=CHATML, extra_stops=("<|endoftext|>",),
           prefer_registry_template="the reference leaves out Qwen2's default system prompt",
           examples=("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen1.5-7B-Chat")),
    Family("chatml", "ChatML (<|im_start|>role ... <|im_end|>)", ("<|im_start|>",), template=CHATML,
           extra_stops=("<|endoftext|>",), examples=("HuggingFaceTB/SmolLM2-135M-Instruct", "01-ai/Yi-1.5-34B-Chat")),
    Family("llama-3", "Llama 3, 3.1, 3.2, 3.3", ("<|start_header_id|>",), template=LLAMA_3,
           extra_stops=("<|end_of_text|>",),
           prefer_registry_template="the reference uses the plain Llama-3 format, "
                                    "without Llama-3.1's dated system block",
           examples=("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
           # The Magpie reference bans markdown headers as Llama-3.1's first instruction token (its
           # instructions otherwise often open with one); 3.1+ templates carry the dated system block.
           first_token_bans=("#", "##", "###", "####"), bans_when="Cutting Knowledge Date"),
    Family("gemma", "Gemma 1.1, 2 and 3 (no system turn)", ("<start_of_turn>",), template=GEMMA,
           extra_stops=("<start_of_turn>",), examples=("google/gemma-2-2b-it",)),
    Family("gemma-4", "Gemma 4", ("<|turn>",), examples=("google/gemma-4-31B-it",)),
    Family("phi-4", "Phi-4 (<|im_sep|>)", ("<|im_sep|>",), examples=("microsoft/phi-4",)),
    Family("phi-3", "Phi-3 and Phi-3.5", ("<|user|>", "<|end|>"), template=PHI_3,
           extra_stops=("</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"),
           examples=("microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-3-mini-128k-instruct")),
    Family("granite", "IBM Granite 3.x / 4", ("<|start_of_role|>",), examples=("ibm-granite/granite-3.3-2b-instruct",)),
    Family("llama-2", "Llama 2 chat ([INST] with <<SYS>>)", ("[INST]", "<<SYS>>"), template=LLAMA_2,
           extra_stops=("<unk>",), examples=("meta-llama/Llama-2-7b-chat-hf",)),
    Family("mistral", "Mistral [INST] formats (v0.3, Nemo, Small)", ("[INST]",), template=MISTRAL,
           extra_stops=("[INST]", "[/INST]"), examples=("mistralai/Mistral-7B-Instruct-v0.3",)),
    Family("vicuna", "Vicuna v1.1 'USER: ... ASSISTANT:'", ("USER: ", "ASSISTANT:"), template=VICUNA,
           extra_stops=("<unk>", "USER:", "ASSISTANT:"), examples=("lmsys/vicuna-7b-v1.5",)),
    Family("alpaca", "Alpaca-style '### Instruction: ... ### Response:'", ("### Instruction",), template=ALPACA,
           extra_stops=("<unk>", "### Instruction", "### Response"), examples=("NousResearch/Nous-Hermes-llama-2-7b",)),
)
BY_NAME = {f.name: f for f in FAMILIES}


def detect(source: str) -> Family | None:
    """The first family whose fingerprints all occur in the template's source, if any."""
    for family in FAMILIES:
        if all(fp in source for fp in family.fingerprints) and not any(x in source for x in family.excludes):
            return family
    return None


def get(name: str) -> Family:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown template family {name!r}; known: {', '.join(BY_NAME)}") from None


# Special-token markers written out in a template's structural text: <|eot_id|>, <｜User｜>,
# <end_of_turn>, <|turn>, [INST], </s>. Used as stop strings beside the family's own.
MARKER = re.compile(r"<\|[^<>|\s]{1,48}\|>|<｜[^｜\s]{1,48}｜>|<\|?/?[A-Za-z_][\w.:]{0,47}\|?>|\[/?[A-Z_]{2,24}\]")


THINKING_MARKERS = {"<think>", "</think>", "[THINK]", "[/THINK]"}  # reasoning is cleaned up, not stopped at


def markers(text: str) -> list[str]:
    return [m for m in dict.fromkeys(MARKER.findall(text)) if m not in THINKING_MARKERS]
