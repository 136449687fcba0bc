"""Prompt templates: each one defined once, as data, and rendered two ways from that data.

A :class:`Template` is a handful of format strings. :func:`render` turns a conversation into
text segments (prompt or response) for training, and :func:`chat_template` turns the same
strings into a Jinja ``chat_template`` that is written into every SFT output's tokenizer, so
``tokenizer.apply_chat_template(messages)`` (transformers, vLLM, ...) builds exactly the text
the model was trained on. ``tests/test_templates.py`` checks the two agree token for token.

Rendering, for turns 1..n of a conversation::

    [separator if turn > 1] [bos if turn == 1 or bos_every_turn] prompt   response eos
                                                                 ^ loss starts here

``prompt`` holds ``{user}`` and ``{system}``; ``{system}`` is the ``system`` block in the first
turn (empty in later turns, or when the system prompt is ""). ``prompt_with_input`` is used
when a turn carries an Alpaca ``input``; templates without one append the input to the user
text after ``input_joiner``. ``response`` holds ``{assistant}``; EOS follows every response.

Every prompt ends where SentencePiece starts a new piece (a newline, which LLaMA spells as a
byte token, or right before a space), and responses that begin with a space carry it in the
``response`` string: the prompt alone then tokenises to a prefix of prompt + response, so
what the model sees when asked to generate is what it saw in training.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from zhllama.errors import ZhllamaError

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
LLAMA2_CHINESE_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"


@dataclass(frozen=True)
class Template:
    """One prompt format. See the module docstring for how the fields are put together."""

    name: str
    description: str
    prompt: str
    response: str
    system: str = "{system}"
    default_system: str = ""
    default_system_with_input: str | None = None
    prompt_with_input: str | None = None
    input_joiner: str = "\n"
    separator: str = ""
    bos_every_turn: bool = False

    def system_for(self, system: str | None, first_input: str) -> str:
        """The system prompt a conversation gets: its own, else this template's default."""
        if system is not None:
            return system
        if first_input and self.default_system_with_input is not None:
            return self.default_system_with_input
        return self.default_system


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="alpaca",
            description="Stanford Alpaca (### Instruction / ### Input / ### Response)",
            system="{system}\n\n",
            default_system=ALPACA_SYSTEM,
            default_system_with_input=ALPACA_SYSTEM_WITH_INPUT,
            prompt="{system}### Instruction:\n{user}\n\n### Response:\n",
            prompt_with_input="{system}### Instruction:\n{user}\n\n### Input:\n{input}\n\n### Response:\n",
            response="{assistant}",
            separator="\n\n",
        ),
        Template(
            name="chinese-alpaca",
            description="Chinese-LLaMA-Alpaca (first generation): Alpaca's prompt, input appended to the instruction",
            system="{system}\n\n",
            default_system=ALPACA_SYSTEM,
            prompt="{system}### Instruction:\n{user}\n\n### Response:",
            response=" {assistant}",
            separator="\n\n",
        ),
        Template(
            name="llama2-chat",
            description="Llama-2-chat [INST] <<SYS>> format with Chinese-LLaMA-Alpaca-2's default system prompt",
            system="<<SYS>>\n{system}\n<</SYS>>\n\n",
            default_system=LLAMA2_CHINESE_SYSTEM,
            prompt="[INST] {system}{user} [/INST]",
            response=" {assistant}",
            bos_every_turn=True,
        ),
        Template(
            name="ziya",
            description="Ziya-LLaMA (<human>: / <bot>:)",
            system="{system}\n",
            prompt="{system}<human>:{user}\n<bot>:",
            response="{assistant}",
            separator="\n",
        ),
    )
}


def get_template(name: str) -> Template:
    """The template called ``name``; an unknown name lists the known ones."""
    if name not in TEMPLATES:
        raise ZhllamaError(f"unknown template '{name}'; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Segment:
    text: str
    is_response: bool


def render(template: Template, conversation, *, bos: str, eos: str) -> list[Segment]:
    """The text of ``conversation`` (a :class:`zhllama.sft.data.Conversation`) in this format,
    as alternating prompt and response segments; every response segment ends with ``eos``."""
    turns = conversation.turns
    system = template.system_for(conversation.system, turns[0].input if turns else "")
    segments = []
    for i, turn in enumerate(turns):
        head = (template.separator if i else "") + (bos if i == 0 or template.bos_every_turn else "")
        system_block = template.system.format(system=system) if i == 0 and system else ""
        if turn.input and template.prompt_with_input is not None:
            prompt = template.prompt_with_input.format(system=system_block, user=turn.user, input=turn.input)
        else:
            user = turn.user + template.input_joiner + turn.input if turn.input else turn.user
            prompt = template.prompt.format(system=system_block, user=user)
        segments.append(Segment(head + prompt, False))
        segments.append(Segment(template.response.format(assistant=turn.assistant) + eos, True))
    return segments


def render_prompt(template: Template, conversation, user: str, *, bos: str, eos: str) -> str:
    """The text that asks the model for its next answer: the conversation so far, then ``user``."""
    from zhllama.sft.data import Conversation, Turn

    asking = Conversation((*conversation.turns, Turn(user, "")), conversation.system)
    return "".join(s.text for s in render(template, asking, bos=bos, eos=eos)[:-1])


# --------------------------------------------------------------------------- Jinja


def _jinja_concat(fmt: str, fields: dict[str, str]) -> str:
    """A Python format string as a Jinja expression: literals quoted, fields mapped to Jinja."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal, ensure_ascii=False))
        if field is not None:
            parts.append(fields[field])
    return " ~ ".join(parts) or '""'


def chat_template(template: Template) -> str:
    """The Jinja ``chat_template`` that renders messages exactly as :func:`render` does.

    Messages are ``{"role": "system"|"user"|"assistant", "content": ...}``; a user message may
    carry an Alpaca ``"input"``. A leading system message replaces the default system prompt
    (an empty one removes it). Roles must alternate user/assistant, starting with the user.
    """
    user = "message['content']"
    with_input = "message['content'] ~ " + json.dumps(template.input_joiner) + " ~ message['input']"
    if template.prompt_with_input is not None:
        with_input_prompt = _jinja_concat(template.prompt_with_input, {"system": "system_block", "user": user, "input": "message['input']"})
    else:
        with_input_prompt = _jinja_concat(template.prompt, {"system": "system_block", "user": with_input})
    default_with_input = template.default_system_with_input
    lines = [
        f"{{#- zhllama template '{template.name}': {template.description} -#}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}{%- set turns = messages -%}",
    ]
    if default_with_input is not None:
        lines += [
            "{%- if turns and turns[0]['input'] is defined and turns[0]['input'] -%}",
            f"{{%- set system = {json.dumps(default_with_input, ensure_ascii=False)} -%}}",
            f"{{%- else -%}}{{%- set system = {json.dumps(template.default_system, ensure_ascii=False)} -%}}{{%- endif -%}}",
        ]
    else:
        lines.append(f"{{%- set system = {json.dumps(template.default_system, ensure_ascii=False)} -%}}")
    bos_condition = "true" if template.bos_every_turn else "loop.first"
    lines += [
        "{%- endif -%}",
        "{%- for message in turns -%}",
        "{%- if message['role'] != (loop.index0 % 2 == 0 and 'user' or 'assistant') -%}",
        "{{- raise_exception('messages must alternate user/assistant, starting with user (after an optional system message)') -}}",
        "{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        f"{{%- if not loop.first -%}}{{{{- {json.dumps(template.separator)} -}}}}{{%- endif -%}}",
        f"{{%- if {bos_condition} -%}}{{{{- bos_token -}}}}{{%- endif -%}}",
        f"{{%- set system_block = ({_jinja_concat(template.system, {'system': 'system'})}) if loop.first and system else '' -%}}",
        "{%- if message['input'] is defined and message['input'] -%}",
        f"{{{{- {with_input_prompt} -}}}}",
        "{%- else -%}",
        f"{{{{- {_jinja_concat(template.prompt, {'system': 'system_block', 'user': user})} -}}}}",
        "{%- endif -%}",
        "{%- else -%}",
        f"{{{{- {_jinja_concat(template.response, {'assistant': user})} ~ eos_token -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines)


def template_of_chat_template(text: str | None) -> str | None:
    """The zhllama template name recorded in a chat template we wrote, else None."""
    if not text:
        return None
    for name in TEMPLATES:
        if text.startswith(f"{{#- zhllama template '{name}':"):
            return name
    return None
