"""The generation prompt, and reading tasks back out of a model's reply.

A prompt (:func:`build_prompt`) states the requirements for new tasks (in Chinese or in
English), shows the sampled examples as a JSON array of ``{instruction, input, output}`` and
asks for a JSON array of new ones. The wording is zhllama's own; the recipe (requirements,
a handful of examples, "now write N more") is self-instruct's and Alpaca's.

:func:`parse_reply` accepts what models actually answer:

* a JSON array of objects, bare or inside a Markdown code fence, possibly cut off by the token
  limit (every complete object before the cut is kept, the cut one counts as malformed);
* Alpaca's numbered text, ``1. Instruction: ... / 1. Input: ... / 1. Output: ...`` (also with
  the Chinese labels 指令 / 输入 / 输出), ``<noinput>`` meaning no input.

Anything else is an unparseable reply; an array element that is not an object with string
``instruction`` and ``output`` is a malformed record. Both are counted, never fatal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from zhllama.errors import ZhllamaError

from .seeds import Task

LANGUAGES = ("zh", "en")

_REQUIREMENTS = {
    "zh": (
        "请为训练中文指令模型编写 {count} 个新的任务，每个任务包括指令（instruction）、输入（input）和回答（output）。要求：\n"
        "1. 指令要多样，不要重复相同的动词和句式；\n"
        "2. 任务类型要多样，例如开放式写作、分类、信息抽取、改写、数学推理、翻译、文言文、常识问答等；\n"
        "3. 指令用中文写，一到两句话，可以是问句，也可以是祈使句；\n"
        "4. 不是每个任务都需要输入；需要时，输入要给出具体的内容（不超过一百字），不要写占位符；不需要时输入为空字符串；\n"
        "5. 模型只能处理文字：不要要求生成或读取图片、音频、视频或文件，也不要要求上网或执行现实中的动作；\n"
        "6. 回答要正确、完整、贴合指令，不超过两百字。\n\n"
        "示例：\n{examples}\n\n"
        "请只输出一个 JSON 数组，包含 {count} 个对象，每个对象有 \"instruction\"、\"input\"、\"output\" 三个字段，不要输出其他内容。"
    ),
    "en": (
        "Write {count} new tasks for training an instruction-following model. Each task has an instruction, "
        "an input and an output. Requirements:\n"
        "1. Vary the instructions: do not repeat the same verbs or sentence patterns;\n"
        "2. Vary the kinds of task: open-ended writing, classification, extraction, rewriting, math reasoning, "
        "translation, common-sense questions and so on;\n"
        "3. Write each instruction in English, in one or two sentences, as a question or an imperative;\n"
        "4. Not every task needs an input; when one does, give real content (under 100 words), never a placeholder; "
        "otherwise the input is an empty string;\n"
        "5. The model only handles text: do not ask it to create or read images, audio, video or files, to browse "
        "the web or to act in the world;\n"
        "6. The output must be correct, complete and answer the instruction, in under 150 words.\n\n"
        "Examples:\n{examples}\n\n"
        'Answer with one JSON array of {count} objects with the fields "instruction", "input" and "output", and nothing else.'
    ),
}


def build_prompt(examples: list[Task], count: int, language: str) -> str:
    """The prompt asking for ``count`` new tasks like ``examples``."""
    if language not in _REQUIREMENTS:
        raise ZhllamaError(f"unknown language '{language}'; choose one of {', '.join(LANGUAGES)}")
    shown = json.dumps([t.as_record() for t in examples], ensure_ascii=False, indent=1)
    return _REQUIREMENTS[language].format(count=count, examples=shown)


@dataclass
class ParsedReply:
    """The tasks read from one reply, and how many pieces of it could not be read."""

    tasks: list[Task] = field(default_factory=list)
    malformed: int = 0
    unparseable: bool = False


_ARRAY_OF_OBJECTS = re.compile(r"\[\s*(?=\{)")  # not any "[": prose holds brackets too
_FENCE = re.compile(r"```[A-Za-z]*\s*\n(.*?)(?:```|\Z)", re.S)
_LABEL = re.compile(r"^[ \t#*]*(\d+)\s*[.、．:)）]\s*(instruction|input|output|指令|输入|输出)\s*[:：]", re.I | re.M)
_FIELD = {"instruction": "instruction", "指令": "instruction", "input": "input", "输入": "input", "output": "output", "输出": "output"}
_NO_INPUT = {"<noinput>", "<no input>", "noinput", "<无输入>", "无输入", "无", "none", "n/a", "（无）", "(无)"}


def _task_of(item: object) -> Task | None:
    if not isinstance(item, dict):
        return None
    instruction, output, given = item.get("instruction"), item.get("output"), item.get("input", "")
    given = "" if given is None else given
    if not all(isinstance(v, str) for v in (instruction, output, given)):
        return None
    given = given.strip()
    return Task(instruction.strip(), "" if given.lower() in _NO_INPUT else given, output.strip())


def _json_items(text: str) -> tuple[list[object], bool] | None:
    """The elements of the first JSON array in ``text`` and whether it was cut off, or None."""
    start = _ARRAY_OF_OBJECTS.search(text)
    if start is None:
        return None
    decoder, pos, items = json.JSONDecoder(), start.end(), []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            return (items, True) if items else None
        if text[pos] == "]":
            return items, False
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return (items, True) if items else None
        items.append(item)


def _numbered_tasks(text: str) -> ParsedReply | None:
    labels = list(_LABEL.finditer(text))
    if not labels:
        return None
    parsed, current = ParsedReply(), None
    for label, following in zip(labels, labels[1:] + [None]):
        end = following.start() if following is not None else len(text)
        value = text[label.end() : end].strip().removesuffix("###").strip()
        name = _FIELD[label.group(2).lower()]
        if name == "instruction":
            if current is not None:
                parsed.malformed += 1  # an instruction without its output
            current = {"instruction": value}
            continue
        if current is None:
            parsed.malformed += 1
            continue
        current[name] = value
        if name == "output":
            task = _task_of(current)
            if task is None:
                parsed.malformed += 1
            else:
                parsed.tasks.append(task)
            current = None
    if current is not None:
        parsed.malformed += 1
    return parsed


def parse_reply(text: str) -> ParsedReply:
    """The tasks in one model reply (see the module docstring for what is accepted)."""
    fenced = _FENCE.search(text)
    for candidate in ([fenced.group(1)] if fenced else []) + [text]:
        found = _json_items(candidate)
        if found is None:
            continue
        items, cut = found
        parsed = ParsedReply(malformed=int(cut))
        for item in items:
            task = _task_of(item)
            if task is None:
                parsed.malformed += 1
            else:
                parsed.tasks.append(task)
        return parsed
    numbered = _numbered_tasks(text)
    return numbered if numbered is not None and (numbered.tasks or numbered.malformed) else ParsedReply(unparseable=True)
