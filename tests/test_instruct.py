"""zhllama instruct end to end: against an OpenAI-compatible server on 127.0.0.1 (planted
near-duplicates, a malformed reply, HTTP 500 / 429 and a timeout), killed and resumed, against
local tiny models, and its output trained on by zhllama sft."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from instruct_fixtures import PLANTED_DROPS, PLANTED_KEPT, StubServer, fresh_task

from zhllama.cli import main
from zhllama.instruct import InstructOptions, generate_instructions
from zhllama.instruct.generate import REPLY_COUNTS, manifest_file_for, work_file_for

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-never-written-0123456789"
FAST = ["--request-timeout", "0.5", "--retry-backoff", "0.01"]


def api_argv(stub: StubServer, out: Path, n: int, *extra: str) -> list[str]:
    return ["instruct", "--api-base", stub.url, "--api-model", "stub-model", "--out", str(out), "--num-instructions", str(n), *FAST, *extra]


def work_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in work_file_for(out).read_text(encoding="utf-8").splitlines()]


def fresh_instructions(count: int) -> set[str]:
    return {fresh_task(i)["instruction"] for i in range(count)}


def test_stub_run_retries_faults_and_counts_every_planted_drop(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "zh.json"
    with StubServer(["500", "timeout", "429"], slow_s=1.0) as stub:
        options = InstructOptions(
            api_base=stub.url, api_model="stub-model", out=out, num_instructions=12, concurrency=1,
            request_timeout=0.5, retry_backoff=0.01,
        )  # fmt: skip
        result = generate_instructions(options)
    # 3 faulty requests retried, then content replies 0..3 (planted) and 4.. (3 fresh each) until 12 are kept
    planted_kept = sum(PLANTED_KEPT.values())
    replies = len(PLANTED_KEPT) + -(-(12 - planted_kept) // 3)
    assert stub.requests == 3 + replies
    assert result.requests == replies and result.kept == 12 and result.resumed_from == 0
    expected_drops = sum((Counter(d) for d in PLANTED_DROPS.values()), Counter())
    assert result.dropped == dict(expected_drops)
    records = json.loads(out.read_text(encoding="utf-8"))
    assert len(records) == 12 and {r["instruction"] for r in records} <= fresh_instructions(stub.fresh_count)
    assert len({r["instruction"] for r in records}) == 12
    # the work file: each kept record, then one counts line per reply
    lines = work_lines(out)
    assert [line for line in lines if REPLY_COUNTS not in line] == records
    assert len([line for line in lines if REPLY_COUNTS in line]) == replies
    manifest = json.loads(manifest_file_for(out).read_text(encoding="utf-8"))
    assert manifest["command"] == "instruct"
    assert manifest["figures"]["kept"] == 12 and manifest["figures"]["dropped"] == dict(expected_drops)
    assert manifest["generator"]["api_base"] == stub.url and manifest["generator"]["api_key_from"] == "OPENAI_API_KEY"
    assert manifest["sampling"]["temperature"] == 1.0 and "sha256" in manifest["inputs"]["seed_tasks"]
    # the key went to the server and nowhere else
    assert set(stub.authorization) == {f"Bearer {SECRET}"}
    assert stub.paths == ["/v1/chat/completions"] * stub.requests
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text(encoding="utf-8"), path
    assert "kept 12 of 12 instructions" in result.summary() and "2 similar to a kept or seed instruction" in result.summary()


def test_prompts_show_seeds_then_kept_tasks_and_ask_in_the_language(tmp_path):
    out = tmp_path / "en.json"
    with StubServer() as stub:
        assert main(api_argv(stub, out, 8, "--concurrency", "1", "--language", "en", "--tasks-per-prompt", "4")) == 0
    first, later = stub.bodies[0]["messages"][0]["content"], stub.bodies[-1]["messages"][0]["content"]
    assert "4 objects" in first and stub.bodies[0]["model"] == "stub-model"
    kept = json.loads(out.read_text(encoding="utf-8"))
    assert not any(r["instruction"] in first for r in kept)  # nothing kept yet: seeds only
    assert sum(r["instruction"] in later for r in kept) == 2  # --generated-per-prompt 2 (default)


def test_completions_endpoint_and_concurrent_requests_reach_the_count_without_duplicates(tmp_path):
    out = tmp_path / "many.json"
    with StubServer(reply=lambda index, fresh: json.dumps([fresh(), fresh(), fresh()], ensure_ascii=False), delay_s=0.05) as stub:
        assert main(api_argv(stub, out, 40, "--api-completions", "--concurrency", "4", "--tasks-per-prompt", "3")) == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    assert len(records) == 40 and len({r["instruction"] for r in records}) == 40
    assert set(stub.paths) == {"/v1/completions"} and all("prompt" in body for body in stub.bodies)
    # in-flight requests never exceed what the missing tasks need: at most 14 requests for 40 at 3 each
    assert stub.requests <= 14


def test_killed_run_resumes_from_the_work_file_and_a_larger_count_extends_it(tmp_path):
    out = tmp_path / "resume.json"
    with StubServer(reply=lambda index, fresh: json.dumps([fresh(), fresh()], ensure_ascii=False), delay_s=0.15) as stub:
        argv = api_argv(stub, out, 20, "--concurrency", "1", "--tasks-per-prompt", "2")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "zhllama", *argv], env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            if work_file_for(out).is_file() and len(work_lines(out)) >= 6:  # 2 replies: 4 records + 2 counts
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()
        before = [line for line in work_lines(out) if REPLY_COUNTS not in line]
        requests_before = len(work_lines(out)) - len(before)
        assert 4 <= len(before) < 20
        with open(work_file_for(out), "a", encoding="utf-8") as fh:
            fh.write('{"instruction": "半行')  # a kill in the middle of a write
        assert main(argv) == 0
        records = json.loads(out.read_text(encoding="utf-8"))
        assert len(records) == 20 and records[: len(before)] == before
        assert len({r["instruction"] for r in records}) == 20
        manifest = json.loads(manifest_file_for(out).read_text(encoding="utf-8"))["figures"]
        assert manifest["resumed_from"] == len(before)
        assert manifest["requests"] == requests_before + manifest["requests_this_run"]
        # the same --out with a larger count continues again; the first 20 stay as they were
        assert main(api_argv(stub, out, 26, "--concurrency", "1", "--tasks-per-prompt", "2")) == 0
    extended = json.loads(out.read_text(encoding="utf-8"))
    assert len(extended) == 26 and extended[:20] == records


def test_overwrite_starts_over(tmp_path):
    out = tmp_path / "again.json"
    with StubServer() as stub:
        assert main(api_argv(stub, out, 3, "--concurrency", "1")) == 0
        first = json.loads(out.read_text(encoding="utf-8"))
        assert main(api_argv(stub, out, 3, "--concurrency", "1", "--overwrite")) == 0
    second = json.loads(out.read_text(encoding="utf-8"))
    assert len(second) == 3 and not {r["instruction"] for r in first} & {r["instruction"] for r in second}
    assert len([line for line in work_lines(out) if REPLY_COUNTS not in line]) == 3


# ---------------------------------------------------------------------------- local model chain


def english_seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seed_en.jsonl"
    path.write_text(json.dumps({"instruction": "Name a primary color.", "input": "", "output": "Red."}) + "\n", encoding="utf-8")
    return path


LOCAL_FLAGS = ["--template", "alpaca", "--language", "en", "--seeds-per-prompt", "1", "--generated-per-prompt", "0", "--tasks-per-prompt", "1"]
MEMORISED = [{"instruction": "Count to three.", "input": "", "output": "1 2 3"}]


def test_local_random_model_runs_the_loop_and_counts_its_garbage(tmp_path, tiny_model_dir, capsys, one_torch_thread):
    out = tmp_path / "local.json"
    argv = ["instruct", "--model", str(tiny_model_dir), "--seed-tasks", str(english_seed_file(tmp_path)), "--out", str(out),
            "--num-instructions", "2", "--max-requests", "2", "--batch-size", "2", "--max-tokens", "16", *LOCAL_FLAGS]  # fmt: skip
    assert main(argv) == 1
    assert "no instruction kept after 2 requests (2 unparseable reply)" in capsys.readouterr().err
    assert work_lines(out) == [{REPLY_COUNTS: {"candidates": 0, "dropped": {"unparseable reply": 1}}}] * 2
    assert not out.exists()


@pytest.fixture(scope="module")
def memorising_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model trained to answer the one-seed English prompt with MEMORISED as JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhllama.instruct.prompts import build_prompt
    from zhllama.instruct.seeds import Task
    from zhllama.outdir import copy_files
    from zhllama.sft.data import Conversation
    from zhllama.sft.templates import get_template, render_prompt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompt = build_prompt([Task("Name a primary color.", "", "Red.")], 1, "en")
    text = render_prompt(get_template("alpaca"), Conversation(()), prompt, bos=tokenizer.bos_token, eos=tokenizer.eos_token)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(json.dumps([{"instruction": "Count to three.", "output": "1 2 3"}]) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("memorising")
    model.save_pretrained(str(out))
    copy_files(["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"], tiny_model_dir, out)
    return out


@pytest.mark.slow
def test_local_model_generates_in_batches_and_its_repeats_are_exact_duplicates(tmp_path, memorising_model_dir, one_torch_thread):
    out = tmp_path / "local.json"
    options = InstructOptions(
        model=memorising_model_dir, seed_tasks=english_seed_file(tmp_path), out=out, num_instructions=2, max_requests=3,
        batch_size=2, max_tokens=64, temperature=0.0, template="alpaca", language="en", seeds_per_prompt=1,
        generated_per_prompt=0, tasks_per_prompt=1,
    )  # fmt: skip
    result = generate_instructions(options)
    # batch 1: two prompts, the same greedy answer: kept once, then an exact duplicate; batch 2: one more duplicate
    assert json.loads(out.read_text(encoding="utf-8")) == MEMORISED
    assert (result.kept, result.requests, result.candidates) == (1, 3, 3)
    assert result.dropped == {"exact duplicate": 2}
    assert "stopped at the request limit" in result.summary()
    manifest = json.loads(manifest_file_for(out).read_text(encoding="utf-8"))
    assert manifest["chain"]["model"] == str(memorising_model_dir.resolve())
    assert manifest["generator"]["prompt_format"] == "alpaca" and manifest["generator"]["batch_size"] == 2


@pytest.mark.slow
def test_sft_trains_on_the_generated_file(tmp_path, tiny_model_dir, one_torch_thread):
    data = tmp_path / "generated.json"
    with StubServer() as stub:
        assert main(api_argv(stub, data, 16, "--concurrency", "2")) == 0
    adapter = tmp_path / "adapter"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--template", "alpaca", "--out", str(adapter),
            "--max-steps", "3", "--per-device-train-batch-size", "4", "--save-strategy", "no", "--disable-tqdm", "true",
            "--report-to", "none"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((adapter / "zhllama.json").read_text(encoding="utf-8"))
    assert manifest["figures"]["global_step"] == 3
    assert manifest["figures"]["data"]["records"] == 16 and manifest["figures"]["data"]["conversations"] == 16
    assert (adapter / "adapter_model.safetensors").is_file()
