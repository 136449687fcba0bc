"""Benchmark: our vocabulary merge vs Chinese-LLaMA's (49,953 pieces) vs LLaMA, on the real assets.

Merges ``tokenizers/llama/tokenizer.model`` with ``tokenizers/chinese-llama/chinese_sp.model``
exactly as ``zhllama vocab merge`` does, then measures each tokenizer (SentencePiece, no BOS):

- pieces;
- tokens per character on the ruozhiba outputs and on 红楼梦, tokens per Han character on 红楼梦
  (``sum(len(sp.encode(line))) / sum(len(line))`` over non-empty lines);
- English lines (Frankenstein, Pride and Prejudice, Alpaca) that encode differently from LLaMA;
- added pieces BPE can never produce (a piece's own text does not encode to the piece);
- lines of all asset corpora where the HF tokenizer disagrees with SentencePiece: the one our
  ``save_hf_tokenizer`` writes, and the one transformers builds from a bare ``tokenizer.model``.

    .venv/bin/python bench/vocab.py [--assets DIR]

Prints a table and writes bench/out/vocab.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ASSETS = HERE.parent.parent / "shared" / "assets"


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line]


def _records(path: Path, *fields: str) -> list[str]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [line for r in records for f in fields for line in r[f].split("\n") if line]


def load_corpora(assets: Path) -> dict[str, list[str]]:
    return {
        "frankenstein": _lines(assets / "corpora/en/frankenstein.txt"),
        "pride_and_prejudice": _lines(assets / "corpora/en/pride_and_prejudice.txt"),
        "alpaca_en": _records(assets / "sft/alpaca_en_demo.json", "instruction", "input", "output"),
        "hongloumeng": _lines(assets / "corpora/zh/hongloumeng.txt"),
        "libai_article": _lines(assets / "corpora/zh/libai_article.txt"),
        "ruozhiba_outputs": _records(assets / "sft/ruozhiba_qa2449_zh.json", "output"),
        "ruozhiba_prompts": _records(assets / "sft/ruozhiba_qa2449_zh.json", "instruction", "input"),
    }


def hf_disagreement(hf, sp, corpora: dict[str, list[str]]) -> int:
    total = 0
    for lines in corpora.values():
        hf_ids = hf(lines, add_special_tokens=False, verbose=False)["input_ids"]
        total += sum(a != b for a, b in zip(hf_ids, sp.encode(lines)))
    return total


def transformers_own_conversion(model: Path, workdir: Path):
    """What ``AutoTokenizer.from_pretrained`` makes of a directory holding only tokenizer.model."""
    from transformers import AutoTokenizer

    bare = Path(tempfile.mkdtemp(prefix="bare-", dir=workdir))
    shutil.copyfile(model, bare / "tokenizer.model")
    return AutoTokenizer.from_pretrained(str(bare))


def measure(name: str, model_dir: Path, base_pieces: int, corpora, llama_sp, workdir: Path) -> dict:
    from zhllama.chain import load_tokenizer
    from zhllama.vocab import is_han_char, load_sp_model, load_sp_proto
    from zhllama.vocab.merge import isolated_encodings

    sp = load_sp_model(model_dir)
    proto = load_sp_proto(model_dir)
    added = [p.piece for p in proto.pieces[base_pieces:]]
    hlm = corpora["hongloumeng"]
    hlm_tokens = sum(map(len, sp.encode(hlm)))
    english = [line for key in ("frankenstein", "pride_and_prejudice", "alpaca_en") for line in corpora[key]]
    return {
        "tokenizer": name,
        "pieces": len(proto.pieces),
        "ruozhiba_tokens_per_char": sum(map(len, sp.encode(corpora["ruozhiba_outputs"])))
        / sum(map(len, corpora["ruozhiba_outputs"])),
        "hongloumeng_tokens_per_char": hlm_tokens / sum(map(len, hlm)),
        "hongloumeng_tokens_per_han_char": hlm_tokens / sum(is_han_char(ch) for line in hlm for ch in line),
        "english_lines_changed": sum(a != b for a, b in zip(sp.encode(english), llama_sp.encode(english))),
        "english_lines": len(english),
        "unreachable_added_pieces": sum(seg != [p] for p, seg in zip(added, isolated_encodings(proto, added))),
        "hf_sp_disagreeing_lines_ours": hf_disagreement(load_tokenizer(model_dir), sp, corpora),
        "hf_sp_disagreeing_lines_transformers": hf_disagreement(
            transformers_own_conversion(model_dir / "tokenizer.model", workdir), sp, corpora
        ),
        "lines_checked": sum(map(len, corpora.values())),
    }


def format_rows(rows: list[dict]) -> str:
    columns = [
        ("tokenizer", "tokenizer", "{}"),
        ("pieces", "pieces", "{:,}"),
        ("ruozhiba tok/char", "ruozhiba_tokens_per_char", "{:.4f}"),
        ("红楼梦 tok/char", "hongloumeng_tokens_per_char", "{:.4f}"),
        ("红楼梦 tok/Han", "hongloumeng_tokens_per_han_char", "{:.4f}"),
        ("EN lines changed", "english_lines_changed", "{:,}"),
        ("unreachable", "unreachable_added_pieces", "{:,}"),
        ("HF≠SP (ours)", "hf_sp_disagreeing_lines_ours", "{:,}"),
        ("HF≠SP (transformers)", "hf_sp_disagreeing_lines_transformers", "{:,}"),
    ]
    table = [[title for title, _, _ in columns]] + [[fmt.format(r[key]) for _, key, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="the shared assets directory")
    args = parser.parse_args(argv)
    if not args.assets.is_dir():
        print(f"bench/vocab.py: assets not found at {args.assets}", file=sys.stderr)
        return 1

    from zhllama.vocab import MergeOptions, load_sp_model, merge_tokenizers, save_hf_tokenizer

    started = time.time()
    corpora = load_corpora(args.assets)
    llama_model = args.assets / "tokenizers/llama/tokenizer.model"
    llama_sp = load_sp_model(llama_model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = merge_tokenizers(
            MergeOptions(base=llama_model, add=[args.assets / "tokenizers/chinese-llama/chinese_sp.model"], out=work / "ours")
        )
        ours = report.out
        for name, model in (("llama", llama_model), ("chinese-llama", args.assets / "tokenizers/chinese-llama/chinese_llama_49953.model")):
            save_hf_tokenizer(model, work / name)
        rows = [
            measure("zhllama merge", ours, 32000, corpora, llama_sp, work),
            measure("Chinese-LLaMA 49953", work / "chinese-llama", 32000, corpora, llama_sp, work),
            measure("LLaMA", work / "llama", 32000, corpora, llama_sp, work),
        ]
    ours_row, theirs_row = rows[0], rows[1]
    summary = {
        "merge_report": report.__dict__,
        "ruozhiba_vs_chinese_llama": ours_row["ruozhiba_tokens_per_char"] / theirs_row["ruozhiba_tokens_per_char"] - 1,
        "hongloumeng_vs_chinese_llama": ours_row["hongloumeng_tokens_per_char"] / theirs_row["hongloumeng_tokens_per_char"] - 1,
        "seconds": round(time.time() - started, 1),
    }
    print(format_rows(rows))
    print(
        f"\nours vs Chinese-LLaMA tokens/char: ruozhiba {summary['ruozhiba_vs_chinese_llama']:+.2%}, "
        f"红楼梦 {summary['hongloumeng_vs_chinese_llama']:+.2%}; merge report: {report.__dict__}"
    )
    out = HERE / "out" / "vocab.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, **summary}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}\nreproduce: .venv/bin/python bench/vocab.py --assets {args.assets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
