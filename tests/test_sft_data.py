"""Instruction data: formats recognised per record, bad records counted, truncation that
never leaves a sample without response tokens."""

from __future__ import annotations

import json

import pytest

from zhllama.errors import ZhllamaError
from zhllama.sft.data import (
    IGNORE_INDEX,
    Conversation,
    DataReport,
    Turn,
    fit_to_length,
    read_conversations,
    tokenize_conversation,
    tokenize_conversations,
)
from zhllama.sft.templates import get_template

EXPECTED = Conversation((Turn("你好", "您好！"), Turn("一加一？", "二。")), system="简短回答。")
ALPACA = {"system": "简短回答。", "history": [["你好", "您好！"]], "instruction": "一加一？", "input": "", "output": "二。"}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "简短回答。"},
        {"from": "human", "value": "你好"},
        {"from": "gpt", "value": "您好！"},
        {"from": "human", "value": "一加一？"},
        {"from": "gpt", "value": "二。"},
    ]
}
OPENAI = {
    "messages": [
        {"role": "system", "content": "简短回答。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "您好！"},
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "二。"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer_dir):
    from zhllama.chain import load_tokenizer

    return load_tokenizer(base_tokenizer_dir)


def test_every_format_gives_the_same_conversation(tmp_path):
    array = tmp_path / "mixed.json"
    array.write_text(json.dumps([ALPACA, SHAREGPT, OPENAI], ensure_ascii=False), encoding="utf-8")
    lines = tmp_path / "mixed.jsonl"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (OPENAI, SHAREGPT, ALPACA)) + "\n", encoding="utf-8")
    conversations = read_conversations([array, lines])
    assert [(c.turns, c.system) for c in conversations] == [(EXPECTED.turns, EXPECTED.system)] * 6
    assert conversations[0].source == f"{array} record 1" and conversations[5].source == f"{lines}:3"


def test_alpaca_input_stays_with_its_turn(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "翻译", "input": "你好", "output": "hello"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (conversation,) = read_conversations([path])
    assert conversation.turns == (Turn("翻译", "hello", input="你好"),) and conversation.system is None


def test_bad_records_are_counted_with_their_first_location(tmp_path):
    records = [
        {"instruction": "no answer"},
        {"instruction": "empty answer", "output": "  "},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"text": "pretraining text"},
        ["not", "an", "object"],
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no answer either"},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    report = DataReport()
    conversations = read_conversations([path], report)
    assert len(conversations) == 1 and report.records == 8
    assert report.skipped["no response ('output' missing)"] == 2
    assert report.first_skipped_at["no response ('output' missing)"] == f"{path} record 1"
    assert report.skipped["empty response"] == 1
    assert report.skipped["roles do not alternate user/assistant ending with assistant"] == 2
    assert report.first_skipped_at["roles do not alternate user/assistant ending with assistant"] == f"{path} record 3"
    assert report.skipped["unknown format (no 'instruction', 'conversations' or 'messages')"] == 1
    assert report.skipped["record is not a JSON object"] == 1


def test_no_usable_record_is_one_line_error(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"instruction": "q"}\n{"instruction": "r"}\n', encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"no usable instruction records .*2 no response \('output' missing\) \(first: .*none.jsonl:1\)"):
        read_conversations([path])


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"broken.jsonl:2: malformed JSON"):
        read_conversations([path])


def test_turns_are_dropped_whole_to_fit(tokenizer):
    template = get_template("llama2-chat")
    conversation = Conversation(tuple(Turn(f"第{i}个问题是什么？", "这是一个比较长的回答。" * 3) for i in range(4)))
    ids, labels, turn_ends = tokenize_conversation(conversation, template, tokenizer)
    budget = turn_ends[2] + 3  # room for three turns and a bit of the fourth
    cut_ids, cut_labels, outcome = fit_to_length(ids, labels, turn_ends, budget)
    assert outcome == "turns dropped"
    assert cut_ids == ids[: turn_ends[2]] and cut_labels[-1] == tokenizer.eos_token_id


def test_long_response_is_cut_but_never_to_nothing(tokenizer):
    template = get_template("alpaca")
    conversation = Conversation((Turn("写一首长诗。", "床前明月光，疑是地上霜。" * 20),))
    ids, labels, turn_ends = tokenize_conversation(conversation, template, tokenizer)
    prompt_length = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    cut_ids, cut_labels, outcome = fit_to_length(ids, labels, turn_ends, prompt_length + 10)
    assert outcome == "response cut" and len(cut_ids) == prompt_length + 10
    assert sum(label != IGNORE_INDEX for label in cut_labels) == 10
    # a budget that leaves fewer than MIN_RESPONSE_TOKENS of the answer: dropped, not trained on
    assert fit_to_length(ids, labels, turn_ends, prompt_length + 2)[2] == "too long"
    assert fit_to_length(ids, labels, turn_ends, prompt_length - 5)[2] == "too long"


def test_tokenize_conversations_reports_what_truncation_did(tokenizer):
    template = get_template("ziya")
    short = Conversation((Turn("你好", "您好"),))
    long_prompt = Conversation((Turn("很长的问题" * 40, "答"),))
    long_answer = Conversation((Turn("问题", "很长的回答" * 40),))
    special = Conversation((Turn("print </s>", "ok"),), source="x.json record 4")
    report = DataReport()
    samples = tokenize_conversations([short, long_prompt, long_answer, special], template, tokenizer, 48, report)
    assert len(samples) == 2 and report.dropped_too_long == 1 and report.responses_cut_to_fit == 1
    assert report.first_skipped_at == {"text contains a special token (<s>/</s>/<unk>)": "x.json record 4"}
    for sample in samples:
        assert len(sample["input_ids"]) <= 48
        assert any(label != IGNORE_INDEX for label in sample["labels"])
    assert report.label_tokens == sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in samples)
