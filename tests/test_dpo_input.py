"""Preference data: the formats read alike and render like SFT; bad pairs and bad options
end as one line naming the file and record, with nothing written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from preference_fixtures import preference_records

from zhllama.cli import main
from zhllama.errors import ZhllamaError
from zhllama.preference.data import (
    IDENTICAL,
    PreferenceReport,
    check_template_tokens,
    fit_pair,
    read_pairs,
    tokenize_pair,
    tokenize_pairs,
)
from zhllama.sft.data import Conversation, Turn, tokenize_conversation
from zhllama.sft.templates import get_template


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer_dir):
    from zhllama.chain import load_tokenizer

    return load_tokenizer(base_tokenizer_dir)


def write(tmp_path, records, name="pairs.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_three_formats_give_the_same_pair(tmp_path):
    question, right, wrong = "三加四等于几？", "等于七。", "等于八。"
    records = [
        {"prompt": question, "chosen": right, "rejected": wrong},
        {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": right}],
         "rejected": [{"role": "assistant", "content": wrong}]},
        {"conversations": [{"from": "human", "value": question}], "chosen": {"from": "gpt", "value": right},
         "rejected": {"from": "gpt", "value": wrong}},
    ]  # fmt: skip
    pairs = read_pairs([write(tmp_path, records)])
    assert len({(p.prompt.turns, p.prompt.system, p.chosen, p.rejected) for p in pairs}) == 1


def test_pair_tokens_are_the_sft_tokens_and_history_is_prompt(tmp_path, tokenizer):
    template = get_template("llama2-chat")
    records = [r for r in preference_records(6) if isinstance(r.get("prompt"), list) and len(r["prompt"]) > 2]
    pair = read_pairs([write(tmp_path, records[:1])])[0]
    row = tokenize_pair(pair, template, tokenizer)
    ids, labels, _ = tokenize_conversation(pair.conversation(pair.chosen), template, tokenizer)
    assert row["prompt_ids"] + row["chosen_ids"] == ids
    assert "你好！" in tokenizer.decode(row["prompt_ids"])  # the earlier answer is context, not a completion
    assert labels[len(row["prompt_ids"]) :] == row["chosen_ids"] and tokenizer.decode(row["chosen_ids"][-1:]) == tokenizer.eos_token


def test_identical_answers_are_skipped_and_counted(tmp_path):
    records = preference_records(4)
    records[1] = {"prompt": "你好", "chosen": "你好！", "rejected": "你好！"}
    report = PreferenceReport()
    assert len(read_pairs([write(tmp_path, records)], report)) == 3
    assert report.skipped[IDENTICAL] == 1 and report.first_skipped_at[IDENTICAL].endswith("record 2")
    with pytest.raises(ZhllamaError, match="no usable preference pairs.*chosen identical to rejected"):
        read_pairs([write(tmp_path, [records[1]], "same.json")])


@pytest.mark.parametrize("broken, message", [({"rejected": None}, "'rejected' is empty"), ({"chosen": ""}, "'chosen' is empty"),
                                             ({"chosen": "drop"}, "'chosen' is missing")])  # fmt: skip
def test_missing_or_empty_answer_names_file_and_record(tmp_path, broken, message):
    records = preference_records(3)
    records[2] = {k: v for k, v in {**records[2], **broken}.items() if v != "drop"}
    path = write(tmp_path, records)
    with pytest.raises(ZhllamaError, match=f"{path} record 3: {message}"):
        read_pairs([path])


def test_truncation_is_prompt_first_and_counted():
    report = PreferenceReport()
    row = {"prompt_ids": [1, *range(10, 30)], "chosen_ids": list(range(40, 50)), "rejected_ids": list(range(50, 54))}
    cut = fit_pair(row, max_length=24, max_prompt_length=8, bos_id=1, report=report)
    assert cut["prompt_ids"] == [1, *range(23, 30)] and cut["chosen_ids"] == row["chosen_ids"] and cut["rejected_ids"] == row["rejected_ids"]
    assert (report.prompts_truncated, report.answers_truncated) == (1, 0)
    short = {**row, "prompt_ids": [1, 10, 11, 12, 13]}
    cut = fit_pair(short, max_length=12, max_prompt_length=8, bos_id=1, report=report)
    assert cut["prompt_ids"] == short["prompt_ids"] and cut["chosen_ids"] == list(range(40, 47)) and cut["rejected_ids"] == row["rejected_ids"]
    assert (report.prompts_truncated, report.answers_truncated) == (1, 1)
    cut = fit_pair(row, max_length=16, max_prompt_length=8, bos_id=1, report=report)  # a prompt longer than --max-length
    assert cut["prompt_ids"] == [1, *range(23, 30)] and cut["chosen_ids"] == list(range(40, 48)) and cut["rejected_ids"] == row["rejected_ids"]
    assert (report.prompts_truncated, report.answers_truncated) == (2, 2)


def test_tokenizer_without_template_tokens_is_refused():
    with pytest.raises(ZhllamaError, match="tok has no eos_token"):
        check_template_tokens(SimpleNamespace(bos_token="<s>", eos_token=None), "tok")


def one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zhllama")]  # not progress bars
    assert len(lines) == 1, lines
    return lines[0]


def test_a_long_multi_turn_prompt_keeps_bos_and_its_end(tmp_path, tokenizer):
    records = [{"prompt": [{"role": "user", "content": "很长的问题" * 200}, {"role": "assistant", "content": "好的。"},
                           {"role": "user", "content": "最后的问题"}], "chosen": "好。", "rejected": "不好。"}]  # fmt: skip
    report = PreferenceReport()
    (row,) = tokenize_pairs(read_pairs([write(tmp_path, records)]), get_template("alpaca"), tokenizer,
                            max_length=300, max_prompt_length=150, report=report)  # fmt: skip
    assert len(row["prompt_ids"]) == 150 and row["prompt_ids"][0] == tokenizer.bos_token_id
    assert "最后的问题" in tokenizer.decode(row["prompt_ids"]) and report.prompts_truncated == 1 and report.answers_truncated == 0


def test_bad_options_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = write(tmp_path, preference_records(2))
    base = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--template", "alpaca", "--out", str(tmp_path / "o")]
    assert main([*base, "--loss-type", "kto"]) == 1
    assert "--loss-type" in one_line_error(capsys)
    assert main([*base, "--max-length", "64"]) == 1
    assert "--max-prompt-length (256) must be below --max-length (64)" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    from zhllama.preference.dpo import DPOOptions

    with pytest.raises(ZhllamaError, match="unknown --loss-type 'kto'.*--beta must be positive"):
        DPOOptions(model=tiny_model_dir, data=[data], template="alpaca", out=tmp_path / "o", loss_type="kto", beta=0)
