"""Preference pairs: records in either supported format become one pair type, then token ids.

Formats, recognised per record (a file may mix them; JSON arrays or JSON lines):

* trl: ``prompt``, ``chosen``, ``rejected``. Each is a string, or a message list
  ``[{"role": ..., "content": ...}]``: the prompt's ends with a user message (an optional system
  message first, earlier turns alternating), ``chosen`` / ``rejected`` hold one assistant message.
* LLaMA-Factory's ShareGPT preference format: ``conversations`` = ``[{"from", "value"}...]``
  ending with the human turn, ``chosen`` / ``rejected`` = ``{"from": "gpt", "value": ...}``,
  optional ``system``.

A pair is the prompt conversation (system, earlier turns, the last user message) and two
answers. It is rendered by the same template code as ``zhllama sft``
(:func:`zhllama.sft.data.conversation_from_record` normalises it, :func:`zhllama.sft.data.tokenize_conversation`
tokenises it), so DPO trains on exactly the text SFT trained on and ``chat`` builds; only the
last answer is a completion, every earlier turn belongs to the prompt.

An empty or missing ``chosen`` / ``rejected`` is an error naming the file and record; a pair
whose answers are identical carries no preference and is skipped and counted, as are records
SFT would skip (roles that do not alternate, a special token in the text, ...). Pairs longer
than ``--max-length`` are truncated prompt-first: the prompt keeps BOS and its last
``--max-prompt-length`` tokens (also when it alone is longer than ``--max-length``: real
multi-turn pairs often are), then the answers are cut to fit; both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from zhllama.args import Options
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, option
from zhllama.sft.data import (
    IGNORE_INDEX,
    Conversation,
    DataReport,
    SkipRecord,
    Turn,
    conversation_from_record,
    read_records,
    special_texts,
    tokenize_conversation,
)
from zhllama.sft.templates import TEMPLATES, Template, get_template

IDENTICAL = "chosen identical to rejected"


@dataclass(frozen=True)
class PreferencePair:
    """A prompt conversation (its last turn's answer left empty) and the two answers to it."""

    prompt: Conversation
    chosen: str
    rejected: str
    source: str = ""

    def conversation(self, answer: str) -> Conversation:
        *earlier, last = self.prompt.turns
        return Conversation((*earlier, Turn(last.user, answer, last.input)), self.prompt.system, self.source)


@dataclass
class PreferenceReport(DataReport):
    """What reading and tokenising preference data found (written into zhllama.json)."""

    pairs: int = 0
    prompts_truncated: int = 0
    answers_truncated: int = 0

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "records": self.records,
            "pairs": self.pairs,
            "skipped_records": dict(self.skipped),
            "first_skipped_at": self.first_skipped_at,
            "prompts_truncated": self.prompts_truncated,
            "answers_truncated": self.answers_truncated,
        }


def _answer(record: dict, key: str, where: str) -> str:
    """The text of ``chosen`` / ``rejected``: a string, ``{from, value}`` or one assistant message."""
    value = record.get(key)
    if isinstance(value, list):
        answers = [m for m in value if isinstance(m, dict) and str(m.get("role", m.get("from", ""))).lower() != "system"]
        value = answers[0] if len(answers) == 1 else None
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str) or not value.strip():
        state = "missing" if key not in record else "empty or not text"
        raise ZhllamaError(f"{where}: '{key}' is {state}; every pair needs a non-empty chosen and rejected answer")
    return value


def _sft_record(record: dict, answer: str) -> dict:
    """The record as SFT's reader takes it, with ``answer`` as the last response."""
    if "conversations" in record:
        return {"conversations": [*record["conversations"], {"from": "gpt", "value": answer}], "system": record.get("system")}
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": answer}], "system": record.get("system")}
    if isinstance(prompt, str):
        return {"instruction": prompt, "output": answer, "system": record.get("system")}
    raise SkipRecord("no prompt ('prompt' or 'conversations')")


def pair_from_record(record: object, where: str = "") -> PreferencePair:
    """Normalise one preference record; raises :class:`SkipRecord` or, for a missing answer, ZhllamaError."""
    if not isinstance(record, dict):
        raise SkipRecord("record is not a JSON object")
    if "chosen" not in record and "rejected" not in record:
        raise SkipRecord("not a preference pair (no 'chosen'/'rejected')")
    chosen, rejected = _answer(record, "chosen", where), _answer(record, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise SkipRecord(IDENTICAL)
    conversation = conversation_from_record(_sft_record(record, chosen), where)
    *earlier, last = conversation.turns
    prompt = Conversation((*earlier, Turn(last.user, "", last.input)), conversation.system, where)
    return PreferencePair(prompt, chosen, rejected, where)


def read_pairs(paths: Sequence[str | Path], report: PreferenceReport | None = None) -> list[PreferencePair]:
    """Every usable pair in ``paths``; skips are counted in ``report``."""
    report = report if report is not None else PreferenceReport()
    pairs = read_records(paths, pair_from_record, report)
    if not pairs:
        detail = report.skipped_summary() or "the files hold no records"
        raise ZhllamaError(f"no usable preference pairs in {', '.join(map(str, paths))}: {detail}")
    return pairs


def check_template_tokens(tokenizer, tokenizer_dir) -> None:
    """Templates write BOS and EOS as text; a tokenizer without them cannot render a pair."""
    missing = [name for name in ("bos_token", "eos_token") if not getattr(tokenizer, name, None)]
    if missing:
        raise ZhllamaError(
            f"tokenizer {tokenizer_dir} has no {' and no '.join(missing)}, which the templates need; "
            "use the chain's tokenizer from 'zhllama vocab merge' or set them in its tokenizer_config.json"
        )


def split_last_answer(conversation: Conversation, template: Template, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer is the last turn's response and its EOS."""
    ids, labels, turn_ends = tokenize_conversation(conversation, template, tokenizer)
    begin = turn_ends[-2] if len(turn_ends) > 1 else 0
    start = next(i for i in range(begin, len(ids)) if labels[i] != IGNORE_INDEX)
    return ids[:start], ids[start:]


def tokenize_pair(pair: PreferencePair, template: Template, tokenizer) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair, untruncated."""
    prompt, chosen = split_last_answer(pair.conversation(pair.chosen), template, tokenizer)
    prompt_again, rejected = split_last_answer(pair.conversation(pair.rejected), template, tokenizer)
    # the templates end prompts on a piece boundary, so both prompts agree; if an answer's first
    # piece ever merged across it, the differing tail belongs to the answers
    shared = next((i for i, (a, b) in enumerate(zip(prompt, prompt_again)) if a != b), min(len(prompt), len(prompt_again)))
    return {"prompt_ids": prompt[:shared], "chosen_ids": prompt[shared:] + chosen, "rejected_ids": prompt_again[shared:] + rejected}


def fit_pair(row: dict, *, max_length: int, max_prompt_length: int, bos_id: int | None, report: PreferenceReport) -> dict:
    """Truncate prompt-first so prompt + the longer answer fit ``max_length`` tokens."""
    prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return row
    if len(prompt) > max_prompt_length:
        keep_bos = bool(prompt) and prompt[0] == bos_id
        prompt = prompt[:1] * keep_bos + prompt[len(prompt) - (max_prompt_length - keep_bos) :]
        report.prompts_truncated += 1
    room = max_length - len(prompt)
    if max(len(chosen), len(rejected)) > room:
        chosen, rejected = chosen[:room], rejected[:room]
        report.answers_truncated += 1
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    template: Template,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    report: PreferenceReport,
) -> list[dict]:
    """Token rows of every pair that can be trained on, each at most ``max_length`` tokens per answer."""
    specials = special_texts(tokenizer)
    rows = []
    for pair in pairs:
        texts = [pair.prompt.system or "", pair.chosen, pair.rejected] + [x for t in pair.prompt.turns for x in (t.user, t.input)]
        if any(special in text for text in texts for special in specials):
            report.skip("text contains a special token (" + "/".join(specials) + ")", pair.source)
            continue
        row = tokenize_pair(pair, template, tokenizer)
        rows.append(fit_pair(row, max_length=max_length, max_prompt_length=max_prompt_length, bos_id=tokenizer.bos_token_id, report=report))
    report.pairs += len(rows)
    return rows


@dataclass(kw_only=True)
class PairDataArgs(Options):
    """Preference pairs to train on and to hold out, and how they are rendered and cut."""

    data: list[Path] = option(help="preference pairs: trl {prompt, chosen, rejected} or ShareGPT preference records, .json/.jsonl")
    validation_data: list[Path] = option(default_factory=list, help="held-out pairs: reported before and after training")
    template: str = option(help=f"prompt template (the one the SFT adapter was trained with): {', '.join(TEMPLATES)}")
    max_length: int = option(512, help="longest prompt + answer in tokens; longer pairs are truncated prompt-first")
    max_prompt_length: int = option(256, help="tokens a truncated prompt keeps (its end, after BOS)")

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.template not in TEMPLATES:
            found.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        at_least(found, "--max-length", self.max_length, 8)
        at_least(found, "--max-prompt-length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
            found.append(f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length ({self.max_length})")
        found += [f"--data {p}: no such file" for p in self.data if not p.is_file()]
        found += [f"--validation-data {p}: no such file" for p in self.validation_data if not p.is_file()]
        return found


@dataclass
class PairData:
    """Token rows of the training and held-out pairs, and the report of how they were made."""

    train: list[dict]
    validation: list[dict]
    report: PreferenceReport


def read_pair_files(options: PairDataArgs) -> tuple[list[PreferencePair], list[PreferencePair], PreferenceReport]:
    """Read (and so check) every pair before any weights are loaded."""
    report = PreferenceReport()
    train = read_pairs(options.data, report)
    held_out = read_pairs(options.validation_data, report) if options.validation_data else []
    return train, held_out, report


def tokenize_pair_files(options: PairDataArgs, pairs, held_out, report: PreferenceReport, chain) -> PairData:
    """Token rows of the pairs read by :func:`read_pair_files`, in the chain's tokenizer."""
    check_template_tokens(chain.tokenizer, chain.tokenizer_dir)
    template = get_template(options.template)
    kwargs = {"max_length": options.max_length, "max_prompt_length": options.max_prompt_length, "report": report}
    train = tokenize_pairs(pairs, template, chain.tokenizer, **kwargs)
    validation = tokenize_pairs(held_out, template, chain.tokenizer, **kwargs) if held_out else []
    if not train:
        raise ZhllamaError(f"no training pair left in {', '.join(map(str, options.data))}: {report.skipped_summary()}")
    return PairData(train, validation, report)


def write_pair_manifest(out_dir, command: str, options: PairDataArgs, figures: dict, report: PreferenceReport, data: PairData, chain, **counts) -> None:
    """``zhllama.json`` of a preference stage: its figures (``counts`` such as before/after),
    the pairs it read, the template and the chain. A preference loss has no perplexity."""
    from zhllama.provenance import write_manifest

    figures.pop("eval_perplexity", None)
    figures.update(data=report.as_dict(), train_pairs=len(data.train), validation_pairs=len(data.validation), **counts)
    write_manifest(
        out_dir,
        command=command,
        options=options,
        inputs={"data": list(options.data), "validation_data": list(options.validation_data)},
        figures=figures,
        template=options.template,
        chain=chain.describe(),
    )


def set_pad_token(tokenizer) -> int:
    """A pad id for batching (masked out everywhere, so any id that never ends a text will do).

    Not EOS: a reward model reads its score at the last token that is not padding, and every
    answer ends with EOS. The tokenizer files we save are copied from the chain, so this does
    not leak into them.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.pad_token_id
