"""The benchmarks' published prompts, character for character, and CMMLU's rule for shots
that do not fit.

* CMMLU (``src/mp_utils.py``): ``以下是关于{学科}的单项选择题，请直接给出正确答案的选项。\\n\\n``, then each
  shot as ``题目：{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：{answer}\\n\\n`` and the question in
  the same form ending at ``答案是：``; the answer letter follows directly.
* C-Eval (its README's answer-only prompt, as Chinese-LLaMA-Alpaca-2's ``scripts/ceval`` builds
  it): ``以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n``, then
  ``{question}\\nA. {A}\\n...\\nD. {D}\\n答案：{answer}\\n\\n`` per shot, the question ending at ``答案：``.
* MMLU (hendrycks/test ``evaluate.py``): ``The following are multiple choice questions (with
  answers) about {subject}.\\n\\n``, then ``{question}\\nA. {A}\\n...\\nD. {D}\\nAnswer: {answer}\\n\\n``
  per shot, the question ending at ``Answer:``; the scored continuation is `` A`` (with its space).

With a chat template (``--with-template``) the whole prompt is the user's turn of that template
and the continuation is the template's response holding the letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from zhllama.evaluate.benchmarks import LETTERS, Question


@dataclass(frozen=True)
class PromptStyle:
    header: str  # {name}: the subject as the benchmark spells it
    question: str  # {question}, {A}..{D}
    shot_answer: str  # what follows a shot's question: {answer}
    continuation: str  # the scored text: {letter}


OPTIONS = "\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n"
STYLES = {
    "cmmlu": PromptStyle("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：{question}" + OPTIONS + "答案是：", "{answer}\n\n", "{letter}"),
    "ceval": PromptStyle("以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n", "{question}" + OPTIONS + "答案：", "{answer}\n\n", "{letter}"),
    "mmlu": PromptStyle(
        "The following are multiple choice questions (with answers) about {name}.\n\n",
        "{question}" + OPTIONS + "Answer:",
        " {answer}\n\n",
        " {letter}",
    ),
}


def format_question(style: PromptStyle, question: Question) -> str:
    return style.question.format(question=question.question, **dict(zip(LETTERS, question.choices)))


def format_shot(style: PromptStyle, question: Question) -> str:
    return format_question(style, question) + style.shot_answer.format(answer=question.answer)


@dataclass(frozen=True)
class Prompt:
    context: str
    continuations: dict[str, str]  # letter -> scored text
    shots: int  # shots kept


def build_prompt(
    style: PromptStyle,
    subject_name: str,
    question: Question,
    shots: list[str],
    shot_tokens: list[int],
    *,
    fits: Callable[[str, dict[str, str]], bool],
    template=None,
) -> Prompt:
    """The prompt for one question with as many of ``shots`` as ``fits`` allows.

    ``shot_tokens`` are the shots' token counts. While the prompt does not fit, every shot of
    the greatest token count is dropped, as CMMLU's ``gen_prompt`` does (ties go together).
    """
    kept = list(range(len(shots)))
    while True:
        context = style.header.format(name=subject_name) + "".join(shots[i] for i in kept) + format_question(style, question)
        continuations = {letter: style.continuation.format(letter=letter) for letter in LETTERS}
        if template is not None:
            context, continuations = wrap_in_template(template, context)
        if not kept or fits(context, continuations):
            return Prompt(context, continuations, len(kept))
        longest = max(shot_tokens[i] for i in kept)
        kept = [i for i in kept if shot_tokens[i] != longest]


def wrap_in_template(template, prompt: str) -> tuple[str, dict[str, str]]:
    """``prompt`` as the user's turn of a chat template; each letter as the start of its reply."""
    from zhllama.sft.data import Conversation
    from zhllama.sft.templates import render_prompt

    # BOS is added as a token id by the scorer, so the template's text starts without it
    context = render_prompt(template, Conversation((), None), prompt, bos="", eos="")
    return context, {letter: template.response.format(assistant=letter) for letter in LETTERS}
