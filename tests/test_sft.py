"""End to end: ``zhllama sft`` on tiny models (self-made data and the real ruozhiba records),
packing without attention across samples, ``zhllama chat`` on the result (adapter chain and
merged model), and bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys

import pytest
import torch

from zhllama.cli import main
from zhllama.sft.templates import chat_template, get_template

TRAINING = ["--per-device-train-batch-size", "8", "--logging-steps", "5", "--save-strategy", "no", "--disable-tqdm", "true", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    from zhllama.demo import tiny

    return tiny.write_json(tmp_path_factory.mktemp("sft_data") / "instructions.json", tiny.instruction_records(400))


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_model_dir, instructions):
    out = tmp_path_factory.mktemp("sft") / "adapter"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(instructions), "--template", "llama2-chat", "--out", str(out),
            "--max-seq-length", "160", "--validation-split", "0.1", "--max-steps", "60", "--learning-rate", "5e-3", *TRAINING]  # fmt: skip
    torch.set_num_threads(1)
    assert main(argv) == 0
    return out


def manifest(directory):
    return json.loads((directory / "zhllama.json").read_text(encoding="utf-8"))


def lora_parameter_count(model_dir, r: int, targets) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    )


def test_sft_writes_a_self_describing_adapter(sft_dir, tiny_model_dir):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "zhllama.json", "metrics.jsonl", "loss.png"):  # fmt: skip
        assert (sft_dir / name).is_file(), name
    recorded = manifest(sft_dir)
    assert recorded["template"] == "llama2-chat" and recorded["command"] == "sft"
    figures = recorded["figures"]
    assert figures["last_loss"] < figures["first_loss"] - 0.5, figures
    assert math.isfinite(figures["eval_loss"]) and figures["eval_loss"] < figures["eval_loss_before"]
    assert figures["data"]["records"] == 400 and figures["validation_samples"] == 40
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # the tiny base has no new rows: only LoRA trains
    assert figures["trainable_params"] == lora_parameter_count(tiny_model_dir, 8, targets)
    jinja = chat_template(get_template("llama2-chat"))
    assert json.loads((sft_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == jinja
    assert (sft_dir / "chat_template.jinja").read_text(encoding="utf-8") == jinja


def test_saved_tokenizer_rebuilds_the_training_ids(sft_dir, instructions):
    from zhllama.chain import load_tokenizer
    from zhllama.sft.data import read_conversations, tokenize_conversation

    tokenizer = load_tokenizer(sft_dir)
    conversation = read_conversations([instructions])[0]
    turn = conversation.turns[0]
    user = turn.user + "\n" + turn.input if turn.input else turn.user
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": turn.assistant}]
    ids, _, _ = tokenize_conversation(conversation, get_template("llama2-chat"), tokenizer)
    assert tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"] == ids


def greedy_answer(model_dir, adapters, prompt: str, max_new_tokens: int) -> str:
    """What transformers alone answers, through the chat template saved with the model."""
    from zhllama.chain import load_chain

    chain = load_chain(model_dir, adapters)
    ids = chain.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)["input_ids"]
    with torch.no_grad():
        out = chain.model.eval().generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
    return chain.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_chat_prompt_answers_in_the_recorded_template(sft_dir, tiny_model_dir, capsys):
    prompt = "二加三等于几？"
    argv = ["chat", "--model", str(tiny_model_dir), "--adapter", str(sft_dir), "--prompt", prompt, "--max-new-tokens", "12", "--greedy"]
    assert main(argv) == 0
    answer = capsys.readouterr().out
    assert answer.endswith("\n")
    assert answer[:-1] == greedy_answer(tiny_model_dir, [sft_dir], prompt, 12)


def test_chat_on_the_merged_model_uses_the_copied_template(sft_dir, tiny_model_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(sft_dir), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["chat", "--model", str(merged), "--prompt", "你好", "--max-new-tokens", "8", "--greedy"]) == 0
    from_merged = capsys.readouterr().out
    assert main(["chat", "--model", str(tiny_model_dir), "--adapter", str(sft_dir), "--prompt", "你好", "--max-new-tokens", "8", "--greedy"]) == 0
    assert from_merged == capsys.readouterr().out


def test_interactive_chat_keeps_history_until_reset(sft_dir, tiny_model_dir, monkeypatch, capsys):
    from zhllama.sft import chat as chat_module

    asked = []

    def fake_generate(chain, input_ids, options, stream):
        asked.append(chain.tokenizer.decode(input_ids))
        stream.write(f"answer {len(asked)}\n")
        return f"answer {len(asked)}"

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("第一问\n第二问\n/reset\n第三问\n/exit\n不会被读到\n"))
    last = chat_module.chat(chat_module.ChatOptions(model=tiny_model_dir, adapter=[sft_dir]))
    assert last == "answer 3" and len(asked) == 3
    assert "第一问" in asked[1] and "answer 1" in asked[1] and "第二问" in asked[1]
    assert "第一问" not in asked[2] and asked[2].count("[INST]") == 1
    assert "<<SYS>>" in asked[0]  # llama2-chat's default system prompt, from the recorded template
    assert capsys.readouterr().out == "answer 1\nanswer 2\nanswer 3\n"


def test_raw_completion_has_no_template(tiny_model_dir, capsys):
    """--raw continues the text itself (<s> + its tokens), like LLaMA's text-completion example."""
    from zhllama.chain import load_chain

    assert main(["chat", "--model", str(tiny_model_dir), "--raw", "--prompt", "Once upon", "--max-new-tokens", "5", "--greedy"]) == 0
    printed = capsys.readouterr().out
    chain = load_chain(tiny_model_dir)
    ids = chain.tokenizer("Once upon")["input_ids"]
    assert ids[0] == chain.tokenizer.bos_token_id and len(ids) > 1
    with torch.no_grad():
        out = chain.model.eval().generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, repetition_penalty=1.1)
    assert printed == chain.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) + "\n"


def test_packed_rows_attend_within_each_sample(tiny_model_dir, base_tokenizer_dir):
    """Samples packed into rows (position ids restarting, padding as its own block) give the
    logits and the loss each sample gets alone, with eager and sdpa attention."""
    from transformers import AutoModelForCausalLM

    from zhllama.demo import tiny
    from zhllama.chain import load_tokenizer
    from zhllama.sft.data import Conversation, Turn, pack_samples, tokenize_conversations
    from zhllama.sft.train import data_collator

    tokenizer = load_tokenizer(base_tokenizer_dir)
    conversations = [Conversation((Turn(r["instruction"], r["output"], r["input"]),)) for r in tiny.instruction_records(7)]
    samples = tokenize_conversations(conversations, get_template("ziya"), tokenizer, 128)
    rows = pack_samples(samples, 128)
    assert 1 < len(rows) < len(samples) and all(len(r["input_ids"]) <= 128 for r in rows)
    batch = data_collator(tokenizer, packing=True)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(rows)
    tokens = sum(len(s["input_ids"]) for s in samples)
    assert sorted(sum((r["input_ids"] for r in rows), [])) == sorted(sum((s["input_ids"] for s in samples), []))
    for implementation in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=implementation).eval()
        model.config.use_cache = False  # as sft_chain sets it
        with torch.no_grad():
            packed = model(**batch)
            logits = {}
            for i, row in enumerate(rows):
                starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
                for a, b in zip(starts, starts[1:]):
                    logits[tuple(row["input_ids"][a:b])] = packed.logits[i, a:b]
            assert sum(len(k) for k in logits) == tokens
            label_tokens = loss_sum = 0
            for sample in samples:
                alone = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]]))
                torch.testing.assert_close(logits[tuple(sample["input_ids"])], alone.logits[0], atol=1e-5, rtol=1e-4)
                n = sum(label != -100 for label in sample["labels"][1:])
                label_tokens, loss_sum = label_tokens + n, loss_sum + alone.loss.item() * n
            assert packed.loss.item() == pytest.approx(loss_sum / label_tokens, rel=1e-5)


def test_sft_trains_new_rows_with_packing(tiny_model_dir, instructions, tmp_path):
    """A chain with new rows (as 'zhllama extend' records them) trains LoRA plus those rows."""
    from safetensors import safe_open

    extended = tmp_path / "extended"
    shutil.copytree(tiny_model_dir, extended)
    (extended / "zhllama.json").write_text(json.dumps({"command": "extend", "figures": {"base_vocab_size": 990}}), encoding="utf-8")
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(extended), "--data", str(instructions), "--template", "ziya", "--out", str(out),
            "--packing", "--max-seq-length", "64", "--max-steps", "10", "--learning-rate", "3e-3", *TRAINING]  # fmt: skip
    assert main(argv) == 0
    figures = manifest(out)["figures"]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert figures["trainable_params"] == lora_parameter_count(tiny_model_dir, 8, targets) + 2 * 10 * 64
    assert figures["last_loss"] < figures["first_loss"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        token_rows = [fh.get_tensor(k).shape for k in fh.keys() if "trainable_tokens" in k]
    assert sorted(token_rows) == [(10, 64), (10, 64)]


@pytest.mark.real_assets
def test_sft_on_ruozhiba_lowers_held_out_loss(assets, tiny_model_dir, tmp_path):
    data = json.loads((assets / "sft/ruozhiba_qa2449_zh.json").read_text(encoding="utf-8"))[:300]
    path = tmp_path / "ruozhiba300.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(path), "--template", "chinese-alpaca", "--out", str(out),
            "--max-seq-length", "256", "--validation-split", "0.1", "--max-steps", "30", "--learning-rate", "5e-3", *TRAINING]  # fmt: skip
    assert main(argv) == 0
    figures = manifest(out)["figures"]
    assert figures["data"]["records"] == 300
    assert figures["last_loss"] < figures["first_loss"]
    assert math.isfinite(figures["eval_loss"]) and figures["eval_loss"] < figures["eval_loss_before"]


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": "a", "output": ""}\n', encoding="utf-8")
    out = tmp_path / "out"
    base = ["sft", "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1", *TRAINING]
    cases = [
        (["--data", str(good), "--template", "vicuna"], "unknown template 'vicuna'; known templates: alpaca, chinese-alpaca, llama2-chat, ziya"),
        (["--data", str(broken), "--template", "alpaca"], f"{broken}:2: malformed JSON"),
        (["--data", str(empty), "--template", "alpaca"], "no usable instruction records"),
        (["--data", str(good), "--template", "alpaca", "--max-seq-length", "8"], "no training sample fits --max-seq-length 8"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("zhllama: error: ") and message in err[-1], err
        assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_sft_data_weights_mix_the_sources(tiny_model_dir, tmp_path):
    """General + domain instructions by weight: the realised share is recorded, seeded."""
    from zhllama.demo import tiny

    general = tiny.write_json(tmp_path / "general.json", tiny.instruction_records(300, seed=1))
    domain = tiny.write_json(tmp_path / "domain.json", tiny.fact_records(300, seed=2))
    out = tmp_path / "mixed"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(general), "--data", str(domain), "--data-weights", "3", "1",
            "--template", "alpaca", "--out", str(out), "--max-seq-length", "256", "--validation-split", "0.1",
            "--max-steps", "2", "--lora-r", "4", *TRAINING]  # fmt: skip
    assert main(argv) == 0
    figures = manifest(out)["figures"]
    sources = figures["mix"]["sources"]
    assert sources[str(general)]["share"] == pytest.approx(0.75, abs=0.05)
    assert sources[str(general)]["examples"] == sources[str(general)]["available"] == 270  # first_exhausted: general ran out
    assert figures["train_samples"] == sum(s["examples"] for s in sources.values())
    assert figures["validation_samples"] == 60  # 10% of each source, unweighted
    assert set(figures["validation"]["held_out"]) == {"loss_before", "loss_after", "bits_per_char_before", "bits_per_char_after"}


def test_bad_weights_fail_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from zhllama.args import ChainArgs

    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    out = tmp_path / "out"

    def no_loading(self):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(ChainArgs, "load", no_loading)
    base = ["sft", "--model", str(tiny_model_dir), "--template", "alpaca", "--out", str(out), "--max-steps", "1", *TRAINING]
    for extra, message in [
        (["--data", str(good), str(good), "--data-weights", "1"], "one weight per --data source: 2 source(s), 1 weight(s)"),
        (["--data", str(good), str(good), "--data-weights", "1", "-1"], "must not be negative"),
        (["--data", str(good), str(good), "--data-weights", "0", "0"], "all zero"),
    ]:
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("zhllama: error: ") and message in err[-1], err
        assert not out.exists()
    out.mkdir()  # an existing --out is found before the model loads
    (out / "adapter_model.safetensors").write_bytes(b"earlier run")
    assert main(base + ["--data", str(good)]) == 1
    assert "exists" in capsys.readouterr().err
