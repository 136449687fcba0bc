"""zhllama instruct end to end: the stub endpoint, a local model, then zhllama sft on the output;
and how fast the ROUGE-L filter is against large pools.

    .venv/bin/python bench/instruct.py [--num-instructions 200] [--local-model DIR] [--sft-steps 20] [--threads 1]

1. starts the OpenAI-compatible stub of tests/instruct_fixtures.py on 127.0.0.1 (an HTTP 500, a
   timeout and a 429 first; planted near-duplicates, a malformed reply, ...) and runs
   ``zhllama instruct --api-base ... --concurrency 4`` for ``--num-instructions``;
2. runs ``zhllama instruct --model ...`` on ``--local-model`` (e.g. ``demo-run/merged`` after
   ``zhllama demo``; default: a random tiny LLaMA with the built-in base tokenizer), 4 requests
   in one batch; a model that cannot follow the prompt keeps nothing, and that is reported;
3. runs ``zhllama sft`` for ``--sft-steps`` on what step 1 wrote (template alpaca, the tiny LLaMA);
4. times :class:`TaskFilter` per candidate instruction against pools of 1,000 and 10,000 kept
   Chinese instructions.

Prints each command, its summary and a table; writes bench/out/instruct.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from instruct_fixtures import StubServer  # noqa: E402

from zhllama.cli import run_command  # noqa: E402
from zhllama.errors import ZhllamaError  # noqa: E402


def command(name: str, argv: list[str]):
    print(f"\n$ zhllama {name} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
        result = run_command(name, argv)
    except ZhllamaError as e:
        print(f"zhllama: error: {e}")
        return e, time.perf_counter() - start
    if hasattr(result, "summary"):
        print(result.summary())
    return result, time.perf_counter() - start


def filter_speed(pool_size: int, candidates: int = 200) -> float:
    """Milliseconds per candidate against ``pool_size`` kept instructions of 8-30 Chinese characters."""
    from zhllama.demo import tiny
    from zhllama.instruct.filters import TaskFilter
    from zhllama.instruct.seeds import Task

    sentences = tiny.chinese_sentences(pool_size + candidates, seed=3)
    rng = random.Random(0)
    pool = TaskFilter()
    for text in sentences[:pool_size]:
        pool.add(Task(text[: rng.randint(8, 30)], "", "x"))
    pool.reason_to_drop(Task("预热一次：导入 numpy", "", "x"))
    start = time.perf_counter()
    for text in sentences[pool_size:]:
        pool.reason_to_drop(Task(text[: rng.randint(8, 30)], "", "x"))
    return 1000 * (time.perf_counter() - start) / candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-instructions", type=int, default=200)
    parser.add_argument("--local-model", type=Path, default=None)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from zhllama.demo import tiny

    torch.set_num_threads(args.threads)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "alpaca_zh.json"
        with StubServer(["500", "timeout", "429"], slow_s=1.0) as stub:
            argv = ["--api-base", stub.url, "--api-model", "stub", "--out", str(data), "--num-instructions",
                    str(args.num_instructions), "--concurrency", "4", "--request-timeout", "0.5", "--retry-backoff", "0.05"]  # fmt: skip
            result, seconds = command("instruct", argv)
            figures["stub"] = {"kept": result.kept, "requests": result.requests, "http_requests": stub.requests,
                               "tasks_examined": result.candidates, "dropped": result.dropped, "seconds": round(seconds, 2)}  # fmt: skip

        tiny_model = tiny.write_tiny_llama(work / "tiny", tiny.write_base_tokenizer(work / "tokenizer"))
        local_model = args.local_model or tiny_model
        local_out = work / "local.json"
        argv = ["--model", str(local_model), "--out", str(local_out), "--num-instructions", "8", "--max-requests", "4",
                "--seeds-per-prompt", "1", "--tasks-per-prompt", "2", "--batch-size", "4", "--max-tokens", "128"]  # fmt: skip
        if args.local_model is None:  # the 1000-piece base tokenizer spells Chinese in bytes: an English prompt fits
            argv += ["--template", "alpaca", "--language", "en"]
        local, seconds = command("instruct", argv)
        work_lines = [json.loads(line) for line in local_out.with_name("local.work.jsonl").read_text(encoding="utf-8").splitlines()]
        counts = [line["reply_counts"] for line in work_lines if "reply_counts" in line]
        dropped = Counter()
        for reply in counts:
            dropped.update(reply["dropped"])
        figures["local"] = {"model": str(local_model), "requests": len(counts), "kept": len(work_lines) - len(counts),
                            "dropped": dict(dropped), "seconds": round(seconds, 2),
                            "error": str(local) if isinstance(local, ZhllamaError) else None}  # fmt: skip

        argv = ["--model", str(tiny_model), "--data", str(data), "--template", "alpaca", "--out", str(work / "sft"),
                "--max-steps", str(args.sft_steps), "--per-device-train-batch-size", "8", "--learning-rate", "3e-3",
                "--logging-steps", str(max(1, args.sft_steps // 4)), "--save-strategy", "no", "--disable-tqdm", "true",
                "--report-to", "none"]  # fmt: skip
        sft, seconds = command("sft", argv)
        metrics = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        figures["sft"] = {"records": sft["data"]["records"], "steps": sft["global_step"], "first_loss": losses[0],
                          "last_loss": losses[-1], "seconds": round(seconds, 2)}  # fmt: skip

    figures["filter_ms_per_candidate"] = {str(n): round(filter_speed(n), 3) for n in (1000, 10000, 50000)}
    print("\n| run | figures |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {json.dumps(value, ensure_ascii=False)} |")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "instruct.json").write_text(json.dumps(figures, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
