"""Instruction data: records in any supported format become one conversation type, then
token ids with labels.

Formats, recognised per record (a file may mix them):

* Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system`` and ``history``
  (earlier ``[instruction, output]`` pairs).
* ShareGPT: ``conversations`` = ``[{"from": "human"|"gpt"|"system", "value": ...}, ...]``.
* OpenAI: ``messages`` = ``[{"role": "user"|"assistant"|"system", "content": ...}, ...]``.

Files are JSON arrays or JSON lines (:func:`zhllama.corpus.read_json_records`; malformed JSON
is an error naming the file and line). A record that cannot become a conversation (no
response, roles that do not alternate, wrong types, ...) is skipped and counted by reason,
with the first place each reason was seen; when nothing is left that is an error.

Tokenisation (:func:`tokenize_conversation`) encodes the whole rendered text in one call, as
``apply_chat_template`` does, so training ids equal chat-template ids. Labels come from the
character offsets of each token: a token that overlaps a response segment (response + EOS) is
a label, every other token is -100.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from zhllama.corpus import read_json_records
from zhllama.errors import ZhllamaError
from zhllama.sft.templates import Template, render

IGNORE_INDEX = -100
USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}
# A response cut by truncation keeps at least this many tokens (or all of a shorter one);
# a sample that cannot is dropped rather than trained on with (almost) no label.
MIN_RESPONSE_TOKENS = 4


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message (plus an optional Alpaca ``input``) and the answer."""

    user: str
    assistant: str
    input: str = ""


@dataclass(frozen=True)
class Conversation:
    """A system prompt (None: the template's default) and one or more turns."""

    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""


class SkipRecord(Exception):
    """A record that cannot be trained on; ``reason`` is the counted category."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataReport:
    """What reading and tokenising the data found (written into zhllama.json)."""

    files: list[str] = field(default_factory=list)
    records: int = 0
    conversations: int = 0
    turns: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped_at: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    turns_dropped_to_fit: int = 0
    responses_cut_to_fit: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped_at.setdefault(reason, where)

    def skipped_summary(self) -> str:
        return "; ".join(f"{n} {reason} (first: {self.first_skipped_at[reason]})" for reason, n in self.skipped.most_common())

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "records": self.records,
            "conversations": self.conversations,
            "turns": self.turns,
            "skipped_records": dict(self.skipped),
            "first_skipped_at": self.first_skipped_at,
            "samples": self.samples,
            "samples_with_turns_dropped_to_fit": self.turns_dropped_to_fit,
            "samples_with_response_cut_to_fit": self.responses_cut_to_fit,
            "dropped_too_long": self.dropped_too_long,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
        }


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SkipRecord(f"{what} is not a string")
    return value


def _alpaca(record: dict) -> Conversation:
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
        raise SkipRecord("'history' is not a list of [instruction, output] pairs")
    turns = [Turn(_text(q, "history instruction"), _text(a, "history output")) for q, a in history]
    if "output" not in record or record["output"] is None:
        raise SkipRecord("no response ('output' missing)")
    turns.append(Turn(_text(record["instruction"], "'instruction'"), _text(record["output"], "'output'"), _text(record.get("input") or "", "'input'")))
    system = record.get("system")
    return Conversation(tuple(turns), None if system is None else _text(system, "'system'"))


def _messages(messages: object, role_key: str, text_key: str, system: object) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise SkipRecord("empty or non-list conversation")
    if not all(isinstance(m, dict) for m in messages):
        raise SkipRecord("conversation entry is not an object")
    if str(messages[0].get(role_key, "")).lower() == "system":
        system, messages = messages[0].get(text_key), messages[1:]
    roles = []
    for m in messages:
        role = str(m.get(role_key, "")).lower()
        if role not in USER_ROLES | ASSISTANT_ROLES:
            raise SkipRecord(f"unsupported role '{role}'" if role != "system" else "system message after the first")
        roles.append("user" if role in USER_ROLES else "assistant")
    if not roles or len(roles) % 2 or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise SkipRecord("roles do not alternate user/assistant ending with assistant")
    texts = [_text(m.get(text_key), f"'{text_key}'") for m in messages]
    turns = tuple(Turn(texts[i], texts[i + 1]) for i in range(0, len(texts), 2))
    return Conversation(turns, None if system is None else _text(system, "'system'"))


def conversation_from_record(record: object, where: str = "") -> Conversation:
    """Normalise one record (Alpaca, ShareGPT or OpenAI style); raises :class:`SkipRecord`."""
    if not isinstance(record, dict):
        raise SkipRecord("record is not a JSON object")
    if "conversations" in record:
        conversation = _messages(record["conversations"], "from", "value", record.get("system"))
    elif "messages" in record:
        conversation = _messages(record["messages"], "role", "content", record.get("system"))
    elif "instruction" in record:
        conversation = _alpaca(record)
    else:
        raise SkipRecord("unknown format (no 'instruction', 'conversations' or 'messages')")
    if any(not t.assistant.strip() for t in conversation.turns):
        raise SkipRecord("empty response")
    if any(not t.user.strip() and not t.input.strip() for t in conversation.turns):
        raise SkipRecord("empty instruction")
    return Conversation(conversation.turns, conversation.system, where)


def read_records(paths: Sequence[str | Path], parse, report) -> list:
    """``parse(record, where)`` of every record in the JSON / JSONL ``paths``; the records it
    skips (:class:`SkipRecord`) are counted in ``report`` (its ``files``, ``records``, ``skip``)."""
    parsed = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ZhllamaError(f"{path}: no such data file")
        report.files.append(str(path))
        for where, record in read_json_records(path):
            report.records += 1
            try:
                parsed.append(parse(record, where))
            except SkipRecord as e:
                report.skip(e.reason, where)
    return parsed


def read_conversations(paths: Sequence[str | Path], report: DataReport | None = None) -> list[Conversation]:
    """Every usable conversation in ``paths``; skips are counted in ``report``."""
    report = report if report is not None else DataReport()
    conversations = read_records(paths, conversation_from_record, report)
    report.conversations = len(conversations)
    report.turns = sum(len(c.turns) for c in conversations)
    if not conversations:
        detail = report.skipped_summary() or "the files hold no records"
        raise ZhllamaError(f"no usable instruction records in {', '.join(report.files)}: {detail}")
    return conversations


def special_texts(tokenizer) -> list[str]:
    return [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) if t]


def tokenize_conversation(conversation: Conversation, template: Template, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and the token index where each turn ends (after its EOS).

    The text is encoded in one piece without added special tokens (the template writes BOS and
    EOS as text), which is what ``apply_chat_template(..., tokenize=True)`` does.
    """
    segments = render(template, conversation, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token)
    spans, start = [], 0
    for segment in segments:
        if segment.is_response:
            spans.append((start, start + len(segment.text)))
        start += len(segment.text)
    encoding = tokenizer("".join(s.text for s in segments), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels, turn_ends, span = [], [], 0
    for i, (token_id, (begin, end)) in enumerate(zip(ids, offsets)):
        while span < len(spans) and begin >= spans[span][1]:
            span += 1
        inside = span < len(spans) and end > spans[span][0] and begin < spans[span][1]
        labels.append(token_id if inside else IGNORE_INDEX)
        if inside and end == spans[span][1]:
            turn_ends.append(i + 1)
    return ids, labels, turn_ends


def fit_to_length(ids: list[int], labels: list[int], turn_ends: list[int], max_length: int) -> tuple[list[int], list[int], str]:
    """Cut a sample to ``max_length`` tokens without leaving it without response tokens.

    Whole turns are dropped from the end first; if even the first turn is too long its
    response is cut, as long as at least ``MIN_RESPONSE_TOKENS`` of it remain. Returns the
    ids, labels and what was done: "fits", "turns dropped", "response cut" or "too long".
    """
    if len(ids) <= max_length:
        return ids, labels, "fits"
    fitting = [end for end in turn_ends if end <= max_length]
    if fitting:
        return ids[: fitting[-1]], labels[: fitting[-1]], "turns dropped"
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    response_length = turn_ends[0] - first_label
    if max_length - first_label >= min(MIN_RESPONSE_TOKENS, response_length):
        return ids[:max_length], labels[:max_length], "response cut"
    return [], [], "too long"


def tokenize_conversations(
    conversations: Iterable[Conversation], template: Template, tokenizer, max_length: int, report: DataReport | None = None
) -> list[dict]:
    """``{"input_ids", "labels"}`` samples, each at most ``max_length`` tokens with labels."""
    report = report if report is not None else DataReport()
    specials = special_texts(tokenizer)
    samples = []
    outcomes = Counter()
    for conversation in conversations:
        texts = [conversation.system or ""] + [x for t in conversation.turns for x in (t.user, t.input, t.assistant)]
        if any(special in text for text in texts for special in specials):
            # The tokenizer would read "</s>" in the text as the real EOS token.
            report.skip("text contains a special token (" + "/".join(specials) + ")", conversation.source)
            continue
        ids, labels, turn_ends = tokenize_conversation(conversation, template, tokenizer)
        ids, labels, outcome = fit_to_length(ids, labels, turn_ends, max_length)
        outcomes[outcome] += 1
        if outcome == "too long":
            continue
        samples.append({"input_ids": ids, "labels": labels})
        report.tokens += len(ids)
        report.label_tokens += sum(label != IGNORE_INDEX for label in labels)
    report.samples = len(samples)
    report.turns_dropped_to_fit += outcomes["turns dropped"]
    report.responses_cut_to_fit += outcomes["response cut"]
    report.dropped_too_long += outcomes["too long"]
    return samples


def pack_samples(samples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack samples into rows of at most ``max_length`` tokens (first fit, longest first).

    Each row carries ``position_ids`` that restart at 0 for every sample it holds: LLaMA's
    attention in transformers reads a restart as a sample boundary and builds a block-diagonal
    causal mask (when no attention mask and no KV cache are given), so no sample sees another.
    """
    rows: list[dict] = []
    for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
        length = len(sample["input_ids"])
        row = next((r for r in rows if len(r["input_ids"]) + length <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += sample["input_ids"]
        row["labels"] += sample["labels"]
        row["position_ids"] += list(range(length))
    return rows
