"""How well do new rows start? Bits per character at step 0 for base, subword-mean, mean, random.

A small LLaMA is first trained for a few minutes on Chinese text (红楼梦) with the base LLaMA
tokenizer, which reads most Chinese characters as UTF-8 byte pieces. It is then extended with
the merged tokenizer (LLaMA + Chinese-LLaMA's 20k Chinese pieces, made with ``zhllama vocab
merge``) by each ``--init`` method and scored, untrained, on held-out chapters. Bits per
character are comparable across tokenizers; the goal is ``subword-mean`` within 10% of the
base model and far ahead of ``random``. ``subword-mean`` runs twice: with its default LM head
(``--head-init logprob``) and with head rows averaged like the input rows (``--head-init
mean``). ``--stage1-steps N`` also trains stage 1 (new rows only) for N steps from each start
and scores again, to show which start trains best. It also measures the stage-1 adapter (new
rows only) against Chinese-LLaMA's way (whole embedding + LM head) on this model and for
LLaMA-7B shapes.

Time (2 idle CPU cores, about 4 minutes; ~3 more per variant with --stage1-steps 100) goes to
training the base (~1 min), to the logprob head's pass over the new pieces (~30 s) and to five
scoring passes over the held-out text with a 32k/49.5k-row LM head (~35 s each);
``seconds_by_phase`` in the JSON has the breakdown.

Run:  .venv/bin/python bench/init.py [--steps 150] [--batch-size 8] [--hidden 128] [--stage1-steps 100]
Needs ../shared/assets (LLaMA tokenizer, Chinese-LLaMA SentencePiece model, 红楼梦).
Writes bench/out/init.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
# name -> zhllama extend flags
VARIANTS = {
    "subword-mean": ["--init", "subword-mean"],
    "subword-mean, mean head": ["--init", "subword-mean", "--head-init", "mean"],
    "mean": ["--init", "mean"],
    "random": ["--init", "random"],
}


def zhllama(*argv) -> None:
    from zhllama.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        sys.exit(f"zhllama {' '.join(map(str, argv))} failed ({code})")


def chapters(text: str) -> list[str]:
    """红楼梦 as paragraphs (one document each)."""
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= 20]


def build_base(work: Path, paragraphs: list[str], steps: int, batch_size: int, hidden: int, layers: int) -> Path:
    from zhllama.demo import tiny
    from zhllama.vocab.hf import save_hf_tokenizer

    tokenizer_dir = work / "llama_tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(ASSETS / "tokenizers" / "llama" / "tokenizer.model", tokenizer_dir)
    model_dir = tiny.write_tiny_llama(work / "base", tokenizer_dir, hidden_size=hidden, layers=layers)
    started = time.perf_counter()
    losses = tiny.pretrain_tiny_llama(model_dir, paragraphs, steps=steps, block_size=128, batch_size=batch_size, learning_rate=3e-3)
    print(f"base model: {steps} steps in {time.perf_counter() - started:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return model_dir


def score(model_dir: Path, texts: list[str], adapters: tuple[Path, ...] = ()) -> dict:
    from zhllama.chain import load_chain
    from zhllama.pretrain import score_texts

    chain = load_chain(model_dir, list(adapters))
    return score_texts(chain.model, chain.tokenizer, texts, block_size=256, batch_size=8)


def adapter_sizes(work: Path, extended: Path, corpus: Path) -> dict:
    """Stage-1 adapter bytes: new rows only vs whole matrices (Chinese-LLaMA), a few steps each."""
    sizes = {}
    for rows in ("new", "all"):
        out = work / f"stage1-{rows}"
        zhllama(
            "pretrain", "--stage", 1, "--model", extended, "--data", corpus, "--out", out, "--train-embeddings", rows,
            "--block-size", 128, "--max-steps", 2, "--validation-split", 0, "--cache-dir", work / "cache",
            "--use-cpu", "--disable-tqdm", "true", "--overwrite",
        )  # fmt: skip
        sizes[rows] = (out / "adapter_model.safetensors").stat().st_size
    return sizes


def train_stage1(work: Path, extended: Path, corpus: Path, steps: int) -> Path:
    """Stage 1 (new rows only) from an extended model, the settings of docs/pretrain.md's table."""
    out = work / f"stage1-from-{extended.name}"
    zhllama(
        "pretrain", "--stage", 1, "--model", extended, "--data", corpus, "--out", out, "--block-size", 128,
        "--max-steps", steps, "--learning-rate", 2e-3, "--per-device-train-batch-size", 8, "--validation-split", 0,
        "--cache-dir", work / "cache", "--use-cpu", "--save-strategy", "no", "--report-to", "none",
        "--disable-tqdm", "true", "--logging-steps", 25, "--overwrite",
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of the base model")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks of 128 tokens per step")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=200, help="paragraphs held out for scoring")
    parser.add_argument("--stage1-steps", type=int, default=0, help="also train stage 1 this many steps per start and score again")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temporary directory)")
    args = parser.parse_args()
    if not ASSETS.is_dir():
        sys.exit(f"needs the real assets at {ASSETS}")
    torch.manual_seed(0)
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="zhllama-bench-init-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        run(args, work, started)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, started: float) -> None:
    paragraphs = chapters((ASSETS / "corpora" / "zh" / "hongloumeng.txt").read_text(encoding="utf-8"))
    train, held_out = paragraphs[: -args.held_out], paragraphs[-args.held_out :]
    base = build_base(work, train, args.steps, args.batch_size, args.hidden, args.layers)
    merged = work / "merged"
    zhllama(
        "vocab", "merge", "--base", ASSETS / "tokenizers" / "llama" / "tokenizer.model",
        "--add", ASSETS / "tokenizers" / "chinese-llama" / "chinese_sp.model", "--out", merged,
    )  # fmt: skip

    timings = {"train base": time.perf_counter() - started}
    clock = time.perf_counter()
    results = {"base (LLaMA tokenizer)": score(base, held_out)}
    timings["score base"] = time.perf_counter() - clock
    corpus = work / "train.txt"
    corpus.write_text("\n".join(train[:400]) + "\n", encoding="utf-8")
    trained = {}
    for name, flags in VARIANTS.items():
        extended = work / ("extended-" + name.replace(", ", "-").replace(" ", "-"))
        clock = time.perf_counter()
        zhllama("extend", "--model", base, "--tokenizer", merged, "--out", extended, *flags)
        timings[f"extend {name}"] = time.perf_counter() - clock
        clock = time.perf_counter()
        results[name] = score(extended, held_out)
        timings[f"score {name}"] = time.perf_counter() - clock
        if args.stage1_steps:
            clock = time.perf_counter()
            stage1 = train_stage1(work, extended, corpus, args.stage1_steps)
            trained[name] = score(extended, held_out, (stage1,))
            timings[f"stage 1 {name}"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sizes = adapter_sizes(work, work / "extended-subword-mean", corpus)
    timings["stage-1 adapters"] = time.perf_counter() - clock
    figures = json.loads((work / "extended-subword-mean" / "zhllama.json").read_text())["figures"]
    base_bpc = results["base (LLaMA tokenizer)"]["bits_per_character"]

    first = next(iter(VARIANTS))
    print(f"\nbits per character on {len(held_out)} held-out paragraphs of 红楼梦 ({results[first]['characters']:,} characters), step 0")
    after = f"{'after ' + str(args.stage1_steps) + ' steps':>17}" if trained else ""
    print(f"{'model':<26}{'tokens/char':>12}{'perplexity':>12}{'bits/char':>11}{'vs base':>9}{after}")
    for name, r in results.items():
        line = (f"{name:<26}{r['tokens_per_character']:>12.3f}{r['perplexity']:>12.2f}{r['bits_per_character']:>11.3f}"
                f"{r['bits_per_character'] / base_bpc - 1:>+9.1%}")  # fmt: skip
        if name in trained:
            line += f"{trained[name]['bits_per_character']:>17.3f}"
        print(line)
    new_rows, hidden = figures["new_rows"], figures["hidden_size"]
    llama7b = {"new_rows": 49953 - 32000, "rows": 49953, "hidden": 4096}
    ratio_7b = llama7b["new_rows"] / llama7b["rows"]
    print(f"\nstage-1 adapter, this model ({new_rows:,} new rows x {hidden}): new rows {sizes['new']:,} bytes, "
          f"whole matrices {sizes['all']:,} bytes (x{sizes['all'] / sizes['new']:.2f})")  # fmt: skip
    print(f"LLaMA-7B shapes (32000 -> 49953 rows, hidden 4096, untied, fp16): new rows "
          f"{llama7b['new_rows'] * 4096 * 2 * 2 / 2**20:,.0f} MiB vs whole matrices {llama7b['rows'] * 4096 * 2 * 2 / 2**20:,.0f} MiB "
          f"(ratio {ratio_7b:.3f}, x{1 / ratio_7b:.2f} smaller)")  # fmt: skip
    report = {
        "command": "python bench/init.py " + " ".join(sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "held_out_paragraphs": len(held_out),
        "results": results,
        "after_stage1": trained,
        "extend_figures": figures,
        "stage1_adapter_bytes": sizes,
        "llama7b_adapter_ratio": ratio_7b,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_phase": {k: round(v, 1) for k, v in timings.items()},
    }
    print("\ntime: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {report['seconds']:.0f}s")
    out = REPO / "bench" / "out" / "init.json"
    out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"\nreproduce: .venv/bin/python bench/init.py {' '.join(sys.argv[1:])}   (wrote {out.relative_to(REPO)})")


if __name__ == "__main__":
    main()
