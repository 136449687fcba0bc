"""Preference tuning on a real model: reward margin and pair accuracy before and after
``zhllama dpo`` and ``zhllama rm``, on training pairs and on held-out pairs.

The chain is built the way a user builds one: stories260K (a real 260K-parameter LLaMA) with a
merged tokenizer (its 512 pieces + a small Chinese SentencePiece model trained on 红楼梦, by
``zhllama vocab train`` / ``vocab merge``), ``zhllama extend``, then a short ``zhllama sft`` on
LLaMA-Factory's English Alpaca demo. ``dpo_en_demo.json`` (300 pairs) is split, seeded, into
training and held-out pairs; ``zhllama dpo`` and ``zhllama rm`` train on the chain + SFT adapter.

DPO's figures: the implicit reward ``beta * (log pi - log pi_ref)`` of each answer (0 for every
pair before training, since the policy starts as the reference) and the policy's own
log-probability preference ``log pi(chosen) - log pi(rejected)``. RM's: the reward head's score.
A pair is accurate when chosen scores strictly higher.

Run:  .venv/bin/python bench/dpo.py [--steps 60] [--held-out 60] [--threads 2] [--json bench/out/dpo.json]
Needs ../shared/assets. About 35 minutes of wall time on a shared, loaded 2-core machine
(most of it waiting for a core); ``seconds`` in the JSON has the phases.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TRAINING = ["--per-device-train-batch-size", "8", "--save-strategy", "no", "--disable-tqdm", "true", "--seed", "0", "--overwrite"]


def zhllama(*argv) -> None:
    from zhllama.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        sys.exit(f"zhllama {' '.join(map(str, argv))} failed ({code})")


def build_chain(work: Path, sft_steps: int) -> tuple[Path, Path]:
    """stories260K, extended with a merged tokenizer, and a short SFT on top: (extended, sft adapter)."""
    lines = (ASSETS / "corpora" / "zh" / "hongloumeng.txt").read_text(encoding="utf-8").splitlines()
    corpus = work / "zh.txt"
    corpus.write_text("\n".join(line for line in lines[:3000] if line.strip()), encoding="utf-8")
    zhllama("vocab", "train", corpus, "--out", work / "zh_sp", "--vocab-size", 6000, "--overwrite")
    zhllama("vocab", "merge", "--base", ASSETS / "models" / "stories260K", "--add", work / "zh_sp" / "chinese_sp.model",
            "--out", work / "tokenizer", "--overwrite")  # fmt: skip
    zhllama("extend", "--model", ASSETS / "models" / "stories260K", "--tokenizer", work / "tokenizer", "--out", work / "extended", "--overwrite")
    zhllama("sft", "--model", work / "extended", "--data", ASSETS / "sft" / "alpaca_en_demo.json", "--template", "alpaca",
            "--out", work / "sft", "--max-seq-length", 128, "--max-steps", sft_steps, "--learning-rate", "2e-3",
            "--logging-steps", max(1, sft_steps // 4), *TRAINING)  # fmt: skip
    return work / "extended", work / "sft"


def split_pairs(work: Path, held_out: int) -> tuple[Path, Path]:
    records = json.loads((ASSETS / "preference" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    random.Random(0).shuffle(records)
    train, validation = work / "pairs_train.json", work / "pairs_heldout.json"
    train.write_text(json.dumps(records[held_out:], ensure_ascii=False), encoding="utf-8")
    validation.write_text(json.dumps(records[:held_out], ensure_ascii=False), encoding="utf-8")
    return train, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="dpo and rm steps (batch 8)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=192, help="dpo/rm --max-length (prompts keep half)")
    parser.add_argument("--held-out", type=int, default=60, help="pairs held out of the 300")
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--rm-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "dpo.json")
    args = parser.parse_args()
    if not ASSETS.is_dir():
        sys.exit(f"needs the real assets at {ASSETS}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zhllama-bench-dpo") as tmp:
        work = Path(tmp)
        extended, sft = build_chain(work, args.sft_steps)
        train, validation = split_pairs(work, args.held_out)
        common = ["--model", extended, "--adapter", sft, "--data", train, "--validation-data", validation, "--template", "alpaca",
                  "--max-length", args.max_length, "--max-prompt-length", args.max_length // 2, "--max-steps", args.steps,
                  "--logging-steps", max(1, args.steps // 6), "--eval-strategy", "steps", "--eval-steps", max(1, args.steps // 2),
                  *TRAINING]  # fmt: skip
        phase = time.perf_counter()
        zhllama("dpo", *common, "--out", work / "dpo", "--learning-rate", args.dpo_lr, "--beta", "0.1")
        dpo_seconds = time.perf_counter() - phase
        phase = time.perf_counter()
        zhllama("rm", *common, "--out", work / "rm", "--learning-rate", args.rm_lr)
        rm_seconds = time.perf_counter() - phase
        dpo = json.loads((work / "dpo" / "zhllama.json").read_text(encoding="utf-8"))["figures"]
        rm = json.loads((work / "rm" / "zhllama.json").read_text(encoding="utf-8"))["figures"]
    rows = []
    for split in ("train", "validation"):
        zero = {"margin": 0.0, "accuracy": 0.0}
        rows.append(("dpo implicit reward", split, zero, dpo["after"][split]["reward"]))
        rows.append(("dpo log-prob preference", split, dpo["before"][split]["logp"], dpo["after"][split]["logp"]))
        rows.append(("rm reward", split, rm["before"][split]["reward"], rm["after"][split]["reward"]))
    print(f"\n{'figure':<26} {'pairs':<15} {'margin before':>13} {'after':>9} {'accuracy before':>16} {'after':>7}")
    for name, split, before, after in rows:
        label = f"{split} ({dpo['after'][split]['reward']['pairs']})"
        print(f"{name:<26} {label:<15} {before['margin']:>+13.4f} {after['margin']:>+9.4f} {before['accuracy']:>16.1%} {after['accuracy']:>7.1%}")
    print(f"truncated: {dpo['data']['prompts_truncated']} prompts, {dpo['data']['answers_truncated']} answer pairs "
          f"(--max-length {args.max_length}); dpo {dpo_seconds:.0f}s, rm {rm_seconds:.0f}s, total {time.perf_counter() - started:.0f}s")  # fmt: skip
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [{"figure": n, "split": s, "before": b, "after": a} for n, s, b, a in rows],
        "dpo": {k: dpo[k] for k in ("global_step", "first_loss", "last_loss", "eval_loss_before", "eval_loss", "data")},
        "rm": {k: rm[k] for k in ("global_step", "first_loss", "last_loss", "eval_loss_before", "eval_loss")},
        "seconds": {"dpo": round(dpo_seconds, 1), "rm": round(rm_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
