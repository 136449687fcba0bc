"""zhllama eval: every token scored exactly once; bits per character equal to a direct
computation; per-corpus JSON; bad input refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pretrain_fixtures import run
from zhllama.demo import tiny
from zhllama.chain import load_tokenizer
from zhllama.pretrain.evaluate import score_texts, scoring_windows


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


def test_bits_per_character_matches_a_direct_computation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["中国人民", "hello world 123", "今天天气很好。"]
    figures = score_texts(model, tokenizer, texts, block_size=512, batch_size=2)
    nll = sum(direct_nll(model, [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts)
    assert figures["nll_nats"] == pytest.approx(nll, rel=1e-4)
    assert figures["characters"] == sum(map(len, texts))
    assert figures["bits_per_character"] == pytest.approx(nll / math.log(2) / figures["characters"], rel=1e-4)
    # every token after <s> is predicted once: as many targets as text tokens
    assert figures["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert figures["perplexity"] == pytest.approx(math.exp(nll / figures["tokens"]), rel=1e-4)
    # short windows score the same tokens (with less context)
    windowed = score_texts(model, tokenizer, texts, block_size=3)
    assert windowed["tokens"] == figures["tokens"]


def test_eval_cli_reports_each_corpus_and_writes_json(tmp_path, tiny_model_dir, capsys):
    zh = tiny.write_lines(tmp_path / "zh.txt", tiny.chinese_sentences(20, seed=4))
    en = tiny.write_lines(tmp_path / "en.txt", tiny.english_sentences(20, seed=4))
    out = tmp_path / "results" / "eval.json"
    run(["eval", "--model", tiny_model_dir, "--data", zh, en, "--block-size", "64", "--json", out])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["corpora"]) == {str(zh), str(en)}
    for figures in report["corpora"].values():
        assert figures["documents"] == 20 and figures["bits_per_character"] > 0
    # byte-fallback Chinese costs a random model more tokens per character than English
    assert report["corpora"][str(zh)]["tokens_per_character"] > report["corpora"][str(en)]["tokens_per_character"]
    assert "bits/char" in capsys.readouterr().out


def test_eval_bad_input(tmp_path, tiny_model_dir, capsys):
    zh = tiny.write_lines(tmp_path / "zh.txt", ["你好"])
    run(["eval", "--model", tiny_model_dir, "--data", zh, "--block-size", "5000"], expect=1)
    assert "exceeds the model's context" in capsys.readouterr().err
    run(["eval", "--model", tiny_model_dir, "--data", tmp_path / "missing.txt"], expect=1)
    assert "missing.txt" in capsys.readouterr().err
