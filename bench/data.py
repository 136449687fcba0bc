"""Corpus → packed blocks throughput: the cached ``datasets`` pipeline against a baseline that
tokenises one line at a time, and the cache hit on a second run.

The corpus is 红楼梦 (../shared/assets) repeated ``--repeat`` times, or generated Chinese text
when the assets are absent. Tokenizer: the merged LLaMA + Chinese-LLaMA vocabulary (made with
``zhllama vocab merge``), or the built-in tiny one without assets.

Run:  .venv/bin/python bench/data.py [--repeat 4] [--num-proc 2] [--block-size 512]
Writes bench/out/data.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


def make_tokenizer(work: Path) -> Path:
    from zhllama.demo import tiny
    from zhllama.cli import main

    if not ASSETS.is_dir():
        return tiny.write_base_tokenizer(work / "tokenizer")
    argv = [
        "vocab", "merge", "--base", str(ASSETS / "tokenizers" / "llama" / "tokenizer.model"),
        "--add", str(ASSETS / "tokenizers" / "chinese-llama" / "chinese_sp.model"), "--out", str(work / "tokenizer"),
    ]  # fmt: skip
    if main(argv) != 0:
        sys.exit("vocab merge failed")
    return work / "tokenizer"


def make_corpus(work: Path, repeat: int) -> Path:
    from zhllama.demo import tiny

    if ASSETS.is_dir():
        text = (ASSETS / "corpora" / "zh" / "hongloumeng.txt").read_text(encoding="utf-8")
    else:
        text = "\n".join(tiny.chinese_sentences(20000, seed=0)) + "\n"
    path = work / "corpus.txt"
    path.write_text(text * repeat, encoding="utf-8")
    return path


def baseline(corpus: Path, tokenizer, block_size: int) -> tuple[int, int]:
    """One line at a time through the tokenizer, packed in a Python list: (blocks, tokens)."""
    buffer: list[int] = []
    blocks = 0
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            buffer += [tokenizer.bos_token_id, *tokenizer.encode(line.rstrip("\n"), add_special_tokens=False), tokenizer.eos_token_id]
            while len(buffer) >= block_size:
                del buffer[:block_size]
                blocks += 1
    return blocks, blocks * block_size


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    from zhllama.chain import load_tokenizer
    from zhllama.pretrain.data import build_blocks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus to concatenate")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=512)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-data-"))
    try:
        tokenizer_dir = make_tokenizer(work)
        tokenizer = load_tokenizer(tokenizer_dir)
        corpus = make_corpus(work, args.repeat)
        megabytes = corpus.stat().st_size / 1e6

        (base_blocks, base_tokens), base_s = timed(lambda: baseline(corpus, tokenizer, args.block_size))
        rows = [("one line at a time (baseline)", base_s, base_blocks, base_tokens)]
        for num_proc in sorted({1, args.num_proc}):
            cache = work / f"cache-{num_proc}"
            (blocks, info), seconds = timed(
                lambda: build_blocks([corpus], tokenizer, tokenizer_dir, block_size=args.block_size, num_proc=num_proc, cache_dir=cache)
            )
            rows.append((f"datasets pipeline, --num-proc {num_proc}", seconds, info.blocks, info.tokens_in_blocks))
        (blocks, info), hit_s = timed(
            lambda: build_blocks([corpus], tokenizer, tokenizer_dir, block_size=args.block_size, num_proc=args.num_proc, cache_dir=cache)
        )
        assert info.cache_hit
        rows.append(("second run (cache hit)", hit_s, info.blocks, info.tokens_in_blocks))

        print(f"corpus: {megabytes:.1f} MB ({args.repeat} x 红楼梦), block size {args.block_size}, tokenizer {len(tokenizer):,} pieces")
        print(f"{'method':<34}{'seconds':>9}{'MB/s':>9}{'tokens/s':>12}{'blocks':>9}")
        table = []
        for name, seconds, n_blocks, tokens in rows:
            print(f"{name:<34}{seconds:>9.2f}{megabytes / seconds:>9.2f}{tokens / seconds:>12,.0f}{n_blocks:>9,}")
            table.append({"method": name, "seconds": seconds, "mb_per_s": megabytes / seconds, "tokens_per_s": tokens / seconds, "blocks": n_blocks})
        report = {"command": "python bench/data.py " + " ".join(sys.argv[1:]), "settings": vars(args), "corpus_mb": megabytes, "rows": table}
        out = REPO / "bench" / "out" / "data.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"\nreproduce: .venv/bin/python bench/data.py {' '.join(sys.argv[1:])}   (wrote {out.relative_to(REPO)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
