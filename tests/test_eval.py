"""zhllama eval on corpora: every token scored exactly once; bits per character and per byte
equal to a direct computation; corpora named NAME=CORPUS (a bare path named as written) in
the table and the JSON; bad input refused with one line and nothing written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pretrain_fixtures import run
from zhllama.demo import tiny
from zhllama.chain import load_tokenizer
from zhllama.evaluate.perplexity import named_corpora, score_texts, scoring_windows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("length,block", [(1, 4), (2, 4), (4, 4), (5, 4), (23, 8), (24, 8), (100, 2)])
def test_windows_predict_every_token_once(length, block):
    ids = list(range(length))
    windows = scoring_windows(ids, block)
    targets = [t for w in windows for t in w[1:]]
    assert targets == ids[1:]
    assert all(2 <= len(w) <= block for w in windows if length > 1)


def direct_nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()


def test_bits_per_character_and_byte_match_a_direct_computation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["中国人民", "hello world 123", "今天天气很好。"]
    figures = score_texts(model, tokenizer, texts, block_size=512, batch_size=2)
    nll = sum(direct_nll(model, [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts)
    assert figures["nll_nats"] == pytest.approx(nll, rel=1e-4)
    assert figures["characters"] == sum(map(len, texts)) == 4 + 15 + 7
    # a Han character is three UTF-8 bytes: 10 of them, plus 15 ASCII bytes, plus "。" (3)
    assert figures["bytes"] == 10 * 3 + 15 + 3
    assert figures["bits_per_character"] == pytest.approx(nll / math.log(2) / figures["characters"], rel=1e-4)
    assert figures["bits_per_byte"] == pytest.approx(nll / math.log(2) / figures["bytes"], rel=1e-4)
    # every token after <s> is predicted once: as many targets as text tokens
    assert figures["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert figures["tokens_per_character"] == pytest.approx(figures["tokens"] / figures["characters"])
    assert figures["perplexity"] == pytest.approx(math.exp(nll / figures["tokens"]), rel=1e-4)
    # short windows score the same tokens (with less context)
    windowed = score_texts(model, tokenizer, texts, block_size=3)
    assert windowed["tokens"] == figures["tokens"]


def test_named_corpora(tmp_path):
    (tmp_path / "a=b.txt").write_text("x\n", encoding="utf-8")
    named, problems = named_corpora(["zh=zh/", "en=data/en.txt", str(tmp_path / "a=b.txt"), "plain.txt"])
    assert problems == []
    # a path holding '=' that exists, or a '/' before the '=', is a bare corpus named as written
    assert named == {"zh": "zh/", "en": "data/en.txt", str(tmp_path / "a=b.txt"): str(tmp_path / "a=b.txt"), "plain.txt": "plain.txt"}
    _, problems = named_corpora(["=zh.txt", "zh=", "en=a.txt", "en=b.txt"])
    assert len(problems) == 3
    assert "empty name" in problems[0] and "no corpus" in problems[1] and "'en' is given twice" in problems[2]


def test_eval_cli_reports_each_named_corpus_and_writes_json(tmp_path, tiny_model_dir, capsys):
    zh = tiny.write_lines(tmp_path / "zh.txt", tiny.chinese_sentences(20, seed=4))
    en = tiny.write_lines(tmp_path / "en.txt", tiny.english_sentences(20, seed=4))
    out = tmp_path / "results" / "eval.json"
    run(["eval", "--model", tiny_model_dir, "--data", f"zh={zh}", "--data", en, "--block-size", "64", "--json", out])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert list(report["corpora"]) == ["zh", str(en)]
    assert report["corpora"]["zh"]["corpus"] == str(zh)
    assert set(report["inputs"]) == {"zh", str(en)} and report["inputs"]["zh"][0]["sha256"]
    for figures in report["corpora"].values():
        assert figures["documents"] == 20 and figures["bits_per_character"] > 0
    zh_figures, en_figures = report["corpora"]["zh"], report["corpora"][str(en)]
    # byte-fallback Chinese costs a random model more tokens per character than English
    assert zh_figures["tokens_per_character"] > en_figures["tokens_per_character"]
    # English text is ASCII (one byte per character); Chinese is three bytes per Han character
    assert en_figures["bits_per_byte"] == pytest.approx(en_figures["bits_per_character"])
    assert zh_figures["bits_per_byte"] < zh_figures["bits_per_character"] / 2
    printed = capsys.readouterr().out
    assert "bits/char" in printed and "bits/byte" in printed and "\nzh " in printed


def test_eval_bad_input(tmp_path, tiny_model_dir, capsys):
    zh = tiny.write_lines(tmp_path / "zh.txt", ["你好"])
    out = tmp_path / "eval.json"
    cases = [
        (["--data", zh, "--block-size", "5000"], "exceeds the model's context"),
        (["--data", tmp_path / "missing.txt"], "missing.txt"),
        (["--data", f"={zh}"], "empty name before '='"),
        (["--data", f"zh={zh}", f"zh={zh}"], "'zh' is given twice"),
        ([], "give --data NAME=CORPUS and/or --benchmark"),
        (["--data", zh, "--harness"], "--harness scores benchmark questions"),
    ]
    for argv, message in cases:
        run(["eval", "--model", tiny_model_dir, *argv, "--json", out], expect=1)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("zhllama: error: ") and message in last, last
        assert not out.exists()
