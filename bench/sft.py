"""SFT with the built-in tiny model: held-out loss before and after tuning, and training speed
with and without --packing, on the real ruozhiba instructions and on short self-made ones.

    .venv/bin/python bench/sft.py [--records 2449] [--steps 150] [--threads 1] [--json bench/sft.json]

Needs ../shared/assets (sft/ruozhiba_qa2449_zh.json). Runs the real ``zhllama sft`` command
(template chinese-alpaca, --max-seq-length 512, batch 8, --validation-split 0.1 = the held-back
slice, seeded) on a random tiny LLaMA (hidden 64, 2 layers, the 1000-piece base tokenizer, which
spells most Chinese characters as 3 byte tokens) and prints a table. samples/s counts
instruction samples (a packed row holds several).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUOZHIBA = REPO.parent / "shared" / "assets" / "sft" / "ruozhiba_qa2449_zh.json"


def run_sft(name: str, model: Path, data: Path, out: Path, *, steps: int, packing: bool) -> dict:
    from zhllama.cli import main

    argv = ["sft", "--model", str(model), "--data", str(data), "--template", "chinese-alpaca", "--out", str(out),
            "--max-seq-length", "512", "--validation-split", "0.1", "--max-steps", str(steps), "--learning-rate", "3e-3",
            "--per-device-train-batch-size", "8", "--logging-steps", str(max(1, steps // 10)), "--save-strategy", "no",
            "--disable-tqdm", "true", "--seed", "0", "--overwrite"]  # fmt: skip
    if packing:
        argv.append("--packing")
    start = time.perf_counter()
    if main(argv) != 0:
        sys.exit("zhllama sft failed")
    wall = time.perf_counter() - start
    figures = json.loads((out / "zhllama.json").read_text(encoding="utf-8"))["figures"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    epochs = max(entry.get("epoch", 0) for entry in metrics)
    return {
        "data": name,
        "packing": packing,
        "steps": figures["global_step"],
        "train_samples": figures["train_samples"],
        "validation_samples": figures["validation_samples"],
        "eval_loss_before": round(figures["eval_loss_before"], 4),
        "eval_loss_after": round(figures["eval_loss"], 4),
        "first_train_loss": round(figures["first_loss"], 4),
        "last_train_loss": round(figures["last_loss"], 4),
        "train_runtime_s": figures["train_runtime_s"],
        "samples_per_second": round(epochs * figures["train_samples"] / figures["train_runtime_s"], 1),
        "tokens_per_second": figures.get("tokens_per_second"),
        "command_wall_s": round(wall, 1),
        "skipped_or_dropped": figures["data"]["dropped_too_long"] + sum(figures["data"]["skipped_records"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2449, help="use the first N ruozhiba records")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not RUOZHIBA.is_file():
        sys.exit(f"{RUOZHIBA}: not found (the real assets live beside the repository as ../shared/assets)")
    torch.set_num_threads(args.threads)

    from zhllama.demo import tiny

    with tempfile.TemporaryDirectory(prefix="zhllama-bench-sft") as tmp:
        work = Path(tmp)
        records = json.loads(RUOZHIBA.read_text(encoding="utf-8"))[: args.records]
        data = tiny.write_json(work / "ruozhiba.json", records)
        tokenizer = tiny.write_base_tokenizer(work / "tokenizer")
        model = tiny.write_tiny_llama(work / "model", tokenizer)
        short = tiny.write_json(work / "short.json", tiny.instruction_records(2000))
        rows = [
            run_sft(name, model, path, work / f"sft-{name}-{packing}", steps=args.steps, packing=packing)
            for name, path in (("ruozhiba", data), ("self-made short", short))
            for packing in (False, True)
        ]

    columns = list(rows[0])
    print(f"zhllama sft, tiny LLaMA (hidden 64, 2 layers), {len(records)} ruozhiba / 2000 self-made records, {args.threads} thread(s)")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        args.json.write_text(json.dumps({"records": len(records), "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
