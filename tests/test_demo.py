"""``zhllama demo``: option checks, the built-in data, and the whole pipeline end to end.

The end-to-end test runs the real demo (fewer training steps than the default) and then loads
the merged model in a separate Python process that never imports zhllama, the way a user of
the published checkpoint would: plain ``AutoModelForCausalLM`` / ``AutoTokenizer``, generate,
and ``apply_chat_template`` producing the format the model was trained on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zhllama import cli
from zhllama.demo.run import tokens_per_han, write_demo_data
from zhllama.provenance import read_manifest

DEMO_STEPS = "20"  # optimizer steps per pretraining stage in the end-to-end tests


def test_base_tokenizer_needs_base_model(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path / "w"), "--base-tokenizer", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zhllama: error: --base-tokenizer needs --base-model") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_base_model_must_be_a_model_directory(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path / "w"), "--base-model", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_refuses_a_non_empty_workdir_without_overwrite(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "notes.txt").write_text("mine", encoding="utf-8")
    assert cli.main(["demo", "--workdir", str(work)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_demo_data_is_chinese_and_valid(tmp_path):
    paths = write_demo_data(tmp_path)
    lines = paths["chinese"].read_text(encoding="utf-8").splitlines()
    han = sum("\u4e00" <= ch <= "\u9fff" for line in lines for ch in line)
    assert len(lines) > 1000 and han / sum(map(len, lines)) > 0.8
    records = json.loads(paths["instructions"].read_text(encoding="utf-8"))
    assert all(r["instruction"] and r["output"] for r in records)
    heldout = set(paths["heldout"].read_text(encoding="utf-8").splitlines())
    assert len(heldout & set(lines)) < len(heldout) // 10  # mostly unseen text for the statistics


def test_summary_readers(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps([{"tokenizer": str(tmp_path / "a"), "tokens_per_han_char": 1.7}]), encoding="utf-8")
    assert tokens_per_han(stats, [tmp_path / "a", tmp_path / "b"]) == [1.7, None]


# --------------------------------------------------------------------------- end to end

LOAD_WITHOUT_ZHLLAMA = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    messages = [{"role": "user", "content": "二加三等于几？"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    conversation = messages + [{"role": "assistant", "content": "二加三等于五。"}]
    print(json.dumps({
        "zhllama_imported": any(name == "zhllama" or name.startswith("zhllama.") for name in sys.modules),
        "new_tokens": out.shape[1] - prompt_ids.shape[1],
        "answer": tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True),
        "chat_text": tokenizer.apply_chat_template(conversation, tokenize=False),
        "chat_ids": tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"],
        "vocab_rows": model.get_input_embeddings().weight.shape[0],
        "tokenizer_size": len(tokenizer),
    }, ensure_ascii=False))
    """
)


def load_without_zhllama(merged: Path) -> dict:
    """Load and run the merged model in a fresh interpreter that never imports zhllama."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_ZHLLAMA, str(merged)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=merged.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_format(merged: Path) -> tuple[str, list[int]]:
    """The text and ids the SFT stage trains on for the conversation the subprocess renders."""
    from zhllama.chain import load_tokenizer
    from zhllama.sft.data import conversation_from_record, tokenize_conversation
    from zhllama.sft.templates import get_template, render

    template = get_template(read_manifest(merged)["template"])
    conversation = conversation_from_record({"instruction": "二加三等于几？", "input": "", "output": "二加三等于五。"})
    tokenizer = load_tokenizer(merged)
    text = "".join(s.text for s in render(template, conversation, bos=tokenizer.bos_token, eos=tokenizer.eos_token))
    ids, _, _ = tokenize_conversation(conversation, template, tokenizer)
    return text, ids


def run_demo(work: Path, *extra: str) -> dict:
    assert cli.main(["demo", "--workdir", str(work), "--train-steps", DEMO_STEPS, *extra]) == 0
    return read_manifest(work)["figures"]


def check_summary(figures: dict, work: Path) -> None:
    per_han = figures["tokens_per_han_char"]
    assert per_han["merged"] < per_han["base"]  # the merged vocabulary encodes Chinese in fewer tokens
    assert figures["vocab"]["merged"] > figures["vocab"]["base"]
    bits = figures["bits_per_character"]
    assert bits["extended"] < bits["base"]  # stage 0 (on the demo's corpus) starts the new rows below the base
    for name in ("stage1", "stage2", "sft"):
        stage = figures["stages"][name]
        assert math.isfinite(stage["loss_start"]) and math.isfinite(stage["loss_end"]), name
        # pretraining validates on held-out blocks. Stage 1 trains the same rows as extend's stage 0
        # did on the same small corpus, so it must keep what stage 0 found; stage 2 must improve
        if name == "stage1":
            assert stage["eval_loss"] < stage["eval_loss_before"] * 1.005, name
        elif name == "stage2":
            assert stage["eval_loss"] < stage["eval_loss_before"], name
        assert stage["adapter_bytes"] > 0, name
        assert (work / name / "adapter_config.json").is_file()
    assert figures["merged"]["path"] == str((work / "merged").resolve())
    assert figures["merged"]["verify_max_logit_diff"] is not None
    assert figures["chat"]["answer"]
    assert set(figures["seconds"]) >= {"vocab train", "vocab merge", "extend", "sft", "merge --verify"}
    commands = (work / "commands.sh").read_text(encoding="utf-8").splitlines()
    assert [c.split()[1] for c in commands if c.startswith("zhllama ")] == [
        "vocab", "vocab", "vocab", "extend", "eval", "eval", "pretrain", "pretrain", "eval", "sft", "merge", "eval", "chat",
        "report",
    ]  # fmt: skip
    assert (work / "report.png").stat().st_size > 0
    report = json.loads((work / "report.json").read_text(encoding="utf-8"))
    assert len(report["stages"]) == 7


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    work = tmp_path / "demo-run"
    figures = run_demo(work)
    check_summary(figures, work)
    # the tiny base was pretrained, and stage 1 trained only the new rows: a much smaller adapter
    start, end = figures["base_pretraining_loss"]
    assert end < start
    assert figures["stages"]["stage1"]["adapter_bytes"] < figures["stages"]["stage2"]["adapter_bytes"]

    loaded = load_without_zhllama(work / "merged")
    assert not loaded["zhllama_imported"]
    assert loaded["new_tokens"] > 0
    assert loaded["vocab_rows"] >= loaded["tokenizer_size"] == figures["vocab"]["merged"]
    text, ids = training_format(work / "merged")
    assert loaded["chat_text"] == text
    assert loaded["chat_ids"] == ids


@pytest.mark.slow
@pytest.mark.real_assets
def test_demo_on_stories260k(assets, tmp_path):
    """A real pretrained model with tied embeddings and only a tokenizer.model beside it."""
    work = tmp_path / "demo-stories"
    figures = run_demo(work, "--base-model", str(assets / "models" / "stories260K"))
    check_summary(figures, work)
    # the asset has only tokenizer.model: the demo works on a view of it with tokenizer.json written
    assert (work / "base" / "tokenizer.json").is_file() and (work / "base" / "model.safetensors").is_symlink()
    assert not (assets / "models" / "stories260K" / "tokenizer.json").exists()
    assert figures["base_pretraining_loss"] is None
    assert load_without_zhllama(work / "merged")["new_tokens"] > 0
