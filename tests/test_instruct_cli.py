"""zhllama instruct on bad input: one line on stderr, exit 1, no traceback, no --out written,
and the records an earlier run kept still in the work file (docs/errors.md, "Instruction data")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from instruct_fixtures import StubServer, unused_port

from zhllama.cli import main
from zhllama.instruct.generate import work_file_for

KEPT = {"instruction": "一条先前保留的指令", "input": "", "output": "保留"}
PREVIOUS_COUNTS = {"reply_counts": {"candidates": 1, "dropped": {}}}
FAST = ["--request-timeout", "0.5", "--retry-backoff", "0.01", "--max-retries", "2", "--concurrency", "1"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def api(url: str, out: Path, *extra: str) -> list[str]:
    return ["instruct", "--api-base", url, "--api-model", "m", "--out", str(out), "--num-instructions", "5", *FAST, *extra]


def model_without_tokenizer(tmp: Path) -> Path:
    """A model directory with its config and weights file but no tokenizer (refused before loading)."""
    bare = tmp / "bare_model"
    bare.mkdir()
    write(bare / "config.json", json.dumps({"model_type": "llama"}))
    (bare / "model.safetensors").write_bytes(b"")
    return bare


# case id -> (argv builder(tmp, stub_url), the error line with TMP for the test directory)
CASES = {
    "seed-missing": (
        lambda tmp, url: api(url, tmp / "o.json", "--seed-tasks", str(tmp / "nowhere.jsonl")),
        "TMP/nowhere.jsonl: no such seed-task file (give --seed-tasks a seed_tasks.jsonl or Alpaca JSON file)",
    ),
    "seed-malformed-json": (
        lambda tmp, url: api(url, tmp / "o.json", "--seed-tasks", str(write(tmp / "s.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n'))),
        "TMP/s.jsonl:2: malformed JSON: Expecting property name enclosed in double quotes (column 22)",
    ),
    "seed-without-output": (
        lambda tmp, url: api(url, tmp / "o.json", "--seed-tasks", str(write(tmp / "s.jsonl", '{"instruction": "a", "instances": [{"input": ""}]}\n'))),
        "TMP/s.jsonl:1: seed task field 'output' is missing, expected a string",
    ),
    "seed-empty": (
        lambda tmp, url: api(url, tmp / "o.json", "--seed-tasks", str(write(tmp / "s.jsonl", "\n"))),
        "TMP/s.jsonl: no seed tasks in the file",
    ),
    "num-instructions-zero": (
        lambda tmp, url: [*api(url, tmp / "o.json"), "--num-instructions", "0"],
        "--num-instructions must be at least 1, got 0",
    ),
    "num-instructions-negative": (
        lambda tmp, url: [*api(url, tmp / "o.json"), "--num-instructions", "-3"],
        "--num-instructions must be at least 1, got -3",
    ),
    "no-generator": (
        lambda tmp, url: ["instruct", "--out", str(tmp / "o.json"), "--num-instructions", "5"],
        "give either --api-base URL --api-model NAME (an endpoint) or --model DIR (a local chain)",
    ),
    "api-base-not-url": (
        lambda tmp, url: api("localhost:8000/v1", tmp / "o.json"),
        "--api-base must be an http:// or https:// URL (got 'localhost:8000/v1')",
    ),
    "out-is-directory": (
        lambda tmp, url: api(url, tmp),
        "--out TMP is a directory; give a file name such as TMP/instructions.json",
    ),
    "out-exists": (
        lambda tmp, url: api(url, write(tmp / "o.json", "[]")),
        "TMP/o.json: output file exists (and no work file o.work.jsonl to continue); pass --overwrite to replace it",
    ),
    "work-file-corrupt": (
        lambda tmp, url: (write(tmp / "o.work.jsonl", json.dumps(KEPT) + "\n[1, 2]\n"), api(url, tmp / "o.json"))[1],
        "TMP/o.work.jsonl:2: not a line written by zhllama instruct (a record with instruction, input and output, "
        "or reply_counts); move the file away or pass --overwrite to start over",
    ),
    "api-unreachable": (
        lambda tmp, url: api(f"http://127.0.0.1:{unused_port()}/v1", tmp / "o.json"),
        "http://127.0.0.1:PORT/v1/chat/completions: cannot connect: Connection refused (after 3 attempts); "
        "check that the server is up and --api-base",
    ),
    "api-always-500": (
        lambda tmp, url: api(url, tmp / "o.json"),
        "URL/chat/completions: HTTP 500 Internal Server Error: internal error (after 3 attempts); check that the server is up and --api-base",
    ),
    "api-answers-html": (
        lambda tmp, url: api(url, tmp / "o.json"),
        "URL/chat/completions: the endpoint answered non-JSON ('<html><body>Welcome to nginx!</body></html>'); "
        "is --api-base an OpenAI-compatible base URL (usually ending in /v1)?",
    ),
    "api-key-rejected": (
        lambda tmp, url: api(url, tmp / "o.json"),
        "URL/chat/completions: HTTP 401 Unauthorized: Incorrect API key provided: Bearer ***; set $OPENAI_API_KEY",
    ),
    "api-wrong-route": (
        lambda tmp, url: api(url.removesuffix("/v1") + "/v2", tmp / "o.json"),
        "URL2/chat/completions: HTTP 404 Not Found: no such route; check --api-base and --api-model",
    ),
    "model-without-tokenizer": (
        lambda tmp, url: ["instruct", "--model", str(model_without_tokenizer(tmp)),
                              "--out", str(tmp / "o.json"), "--num-instructions", "5"],  # fmt: skip
        "TMP/bare_model: no tokenizer (tokenizer.json or tokenizer.model) in the model or its adapters",
    ),
}
FAULTS = {"api-always-500": ["500"] * 3, "api-answers-html": ["html"], "api-key-rejected": ["401"]}
# cases that reach the generator: an earlier run's work file must come out of them unchanged
AFTER_START = {"api-unreachable", "api-always-500", "api-answers-html", "api-key-rejected", "api-wrong-route", "model-without-tokenizer"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_1(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-never-shown")
    build, expected = CASES[case]
    out = tmp_path / "o.json"
    previous = json.dumps(KEPT, ensure_ascii=False) + "\n" + json.dumps(PREVIOUS_COUNTS) + "\n"
    if case in AFTER_START:
        write(work_file_for(out), previous)
    with StubServer(FAULTS.get(case, ())) as stub:
        argv = build(tmp_path, stub.url)
        code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("zhllama")]
    assert code == 1
    assert "Traceback" not in err and len(lines) == 1
    port = argv[argv.index("--api-base") + 1].split(":")[2].split("/")[0] if case == "api-unreachable" else ""
    shown = lines[0].replace(str(tmp_path), "TMP").replace(stub.url.removesuffix("/v1") + "/v2", "URL2").replace(stub.url, "URL")
    assert shown == "zhllama: error: " + expected.replace("PORT", port)
    if case != "out-exists":
        assert not out.exists()
    if case in AFTER_START:
        assert work_file_for(out).read_text(encoding="utf-8") == previous
