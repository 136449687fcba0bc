"""Do new rows start close to the base model, on every base of a family? Bits per character at step 0
and after 100 stage-1 steps, per start method, per base.

The family (bench/init_bases.py, trained once and cached by their settings): small LLaMAs trained
from scratch on 红楼梦 through byte fallback, differing in tokenizer (the real 32k LLaMA one, the
512-piece one of stories260K), depth/width and training length (100 to 1,500 steps, the longest
until its held-out loss flattens), plus the real tied stories260K (English). Each is extended
with its tokenizer merged with Chinese-LLaMA's 20k Chinese pieces (``zhllama vocab merge``) by
every start and scored on the held-out end of 红楼梦, text no base and no stage 0 ever read;
stories260K is also scored on English (Pride and Prejudice), which must not move by 1%.

Starts: ``default`` = ``zhllama extend --init-corpus SAMPLE`` (closed-form rows, then stage 0
on a sample of the training part of 红楼梦); ``closed form`` = ``extend`` with no corpus; ``mean head`` = ``--head-init mean``; ``mean`` and ``random`` = ``--init``.
The method's constants (pretrain/init.py, pretrain/stage0.py) were chosen on the bases marked "fit" and are only
reported on the others.

Run:  .venv/bin/python bench/init.py [--only NAME ...] [--starts START ...] [--stage1-steps 100] [--cache-dir DIR]
Needs ../shared/assets. Writes bench/out/init/<base>.json per base and prints the table of every
base measured so far (bench/out/init.json holds them all).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_bases import ASSETS, DEFAULT_CACHE, FAMILY, REPO, hongloumeng, stories260k, tokenizer_dir, train_base  # noqa: E402

OUT = REPO / "bench" / "out" / "init"
SCORED_PARAGRAPHS = 60  # of the 200 held out: scoring a 50k-row head on CPU is the slow part
SAMPLE_PARAGRAPHS = 2000  # the stage-0 sample: every k-th paragraph of the training part
# name -> zhllama extend flags; "default" adds --init-corpus SAMPLE
STARTS = {
    "default": [],
    "closed form": [],
    "mean head": ["--head-init", "mean"],
    "mean": ["--init", "mean"],
    "random": ["--init", "random"],
}


def zhllama(*argv) -> None:
    from zhllama.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        sys.exit(f"zhllama {' '.join(map(str, argv))} failed ({code})")


def score(model_dir: Path, texts: list[str], adapters: tuple[Path, ...] = ()) -> float:
    from zhllama.chain import load_chain
    from zhllama.pretrain import score_texts

    chain = load_chain(model_dir, list(adapters))
    return score_texts(chain.model, chain.tokenizer, texts, block_size=256, batch_size=8)["bits_per_character"]


def merged_tokenizer(cache: Path, name: str) -> Path:
    out = cache / f"merged-{name}"
    if not (out / "tokenizer.json").is_file():
        zhllama(
            "vocab", "merge", "--base", tokenizer_dir(cache, name) / "tokenizer.model",
            "--add", ASSETS / "tokenizers" / "chinese-llama" / "chinese_sp.model", "--out", out, "--overwrite",
        )  # fmt: skip
    return out


STAGE1_LR = 2e-3  # the stage-1 rate of docs/pretrain.md's tables; --stage1-lr measures another too


def stage1_key(lr: float) -> str:
    """Where a base's report keeps the figures after stage 1 at ``lr``."""
    return "after_stage1" if lr == STAGE1_LR else f"after_stage1_lr{lr:g}"


def train_stage1(work: Path, extended: Path, corpus: Path, steps: int, lr: float) -> Path:
    """Stage 1 (new rows only) from an extended model, the settings of docs/pretrain.md's table."""
    out = work / f"stage1-{extended.name}" if lr == STAGE1_LR else work / f"stage1-{extended.name}-lr{lr:g}"
    zhllama(
        "pretrain", "--stage", 1, "--model", extended, "--data", corpus, "--out", out, "--block-size", 128,
        "--max-steps", steps, "--learning-rate", lr, "--per-device-train-batch-size", 4, "--validation-split", 0,
        "--cache-dir", work / "cache", "--use-cpu", "--save-strategy", "no", "--report-to", "none",
        "--disable-tqdm", "true", "--logging-steps", 25, "--overwrite",
    )  # fmt: skip
    return out


def english_held_out() -> list[str]:
    text = (ASSETS / "corpora" / "en" / "pride_and_prejudice.txt").read_text(encoding="utf-8-sig")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 20]
    return paragraphs[-SCORED_PARAGRAPHS:]


def method_hash(start: str) -> str:
    """The hash of the code a start's figures come from: a base's saved results and extended models
    are reused only while it is unchanged (the closed-form starts do not depend on stage 0)."""
    # what computes the rows; extend.py's wiring and surgery.py's writing are held bit-exact by the tests
    files = ("init.py",) + (("stage0.py",) if start == "default" else ())
    code = b"".join((REPO / "pretrain" / f).read_bytes() for f in files)
    return hashlib.sha256(code + json.dumps(STARTS[start]).encode()).hexdigest()[:10]


def bench_base(name: str, base: Path, tokenizer: str, role: str, args, cache: Path) -> dict:
    """Step-0 and stage-1 figures of every start on one base; what an earlier run of the same
    code measured is kept (extended models stay under the cache while their code is unchanged)."""
    train, held_out = hongloumeng()
    held_out = held_out[:SCORED_PARAGRAPHS]
    work = cache / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    saved = OUT / f"{name}.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else {}
    sample = work / "init_sample.txt"
    sample.write_text("\n".join(train[:: max(1, len(train) // SAMPLE_PARAGRAPHS)]) + "\n", encoding="utf-8")
    stage1_corpus = work / "stage1.txt"  # another slice of the training part than the sample
    stage1_corpus.write_text("\n".join(train[1 :: max(1, len(train) // 400)]) + "\n", encoding="utf-8")
    merged = merged_tokenizer(cache, tokenizer)
    english = name == "stories260K"
    stage1_keys = ["after_stage1"] + sorted(k for k in previous if k.startswith("after_stage1_lr"))
    stage1_keys += [stage1_key(args.stage1_lr)] if stage1_key(args.stage1_lr) not in stage1_keys else []
    report = {"base": name, "role": role, "tokenizer": tokenizer, "methods": {}, "step0": {}, **{k: {} for k in stage1_keys},
              "stage1_steps": args.stage1_steps, "seconds": {}, "extend_figures": {}}  # fmt: skip
    same_stage1 = previous.get("stage1_steps") == args.stage1_steps
    for start in ["base", *STARTS]:
        version = "base" if start == "base" else method_hash(start)
        if previous.get("methods", {}).get(start) != version:
            continue
        report["methods"][start] = version
        for key in ["step0", "seconds", "extend_figures"] + (stage1_keys if same_stage1 else []):
            for entry in [k for k in previous.get(key, {}) if k == start or k.endswith(f" {start}")]:
                report[key][entry] = previous[key][entry]
        for key in {"base": ("english_base",), "default": ("english_default",)}.get(start, ()):
            if key in previous:
                report[key] = previous[key]

    def save() -> None:
        saved.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    clock = time.perf_counter()
    report["methods"]["base"] = "base"
    if "base" not in report["step0"]:
        report["step0"]["base"] = score(base, held_out)
    if english and "english_base" not in report:
        report["english_base"] = score(base, english_held_out())
    report["seconds"].setdefault("score base", round(time.perf_counter() - clock, 1))
    save()
    for start, flags in STARTS.items():
        if args.starts is not None and start not in args.starts:
            continue
        version = method_hash(start)
        report["methods"][start] = version
        extended = work / f"extended-{start.replace(' ', '-')}-{version}"
        corpus_flags = ["--init-corpus", sample] if start == "default" else []
        if not (extended / "zhllama.json").is_file():
            clock = time.perf_counter()
            zhllama("extend", "--model", base, "--tokenizer", merged, "--out", extended, "--overwrite", *flags, *corpus_flags)
            report["seconds"][f"extend {start}"] = round(time.perf_counter() - clock, 1)
        report["extend_figures"][start] = json.loads((extended / "zhllama.json").read_text())["figures"]
        if start not in report["step0"]:
            report["step0"][start] = score(extended, held_out)
        if english and start == "default" and "english_default" not in report:
            report["english_default"] = score(extended, english_held_out())
        save()
        after = report[stage1_key(args.stage1_lr)]
        if args.stage1_steps and start in args.stage1_starts and start not in after:
            clock = time.perf_counter()
            stage1 = train_stage1(work, extended, stage1_corpus, args.stage1_steps, args.stage1_lr)
            after[start] = score(extended, held_out, (stage1,))
            report["seconds"][f"stage 1 at {args.stage1_lr:g} {start}"] = round(time.perf_counter() - clock, 1)
            save()
    log = base / "train_log.json"
    if log.is_file():
        report["train_log"] = json.loads(log.read_text())
    return report


def print_table(reports: list[dict]) -> None:
    starts = list(STARTS)
    steps = sorted({r["stage1_steps"] for r in reports if r["after_stage1"]})
    print(f"\nbits per character on {SCORED_PARAGRAPHS} held-out paragraphs of 红楼梦 at step 0, vs base "
          f"(in brackets: after {'/'.join(map(str, steps)) or 'no'} stage-1 steps; -: not measured)")  # fmt: skip
    print(f"{'base':<24}{'role':<7}{'base':>7}" + "".join(f"{s:>20}" for s in starts))
    for r in reports:
        b = r["step0"]["base"]
        cells = []
        for s in starts:
            if s not in r["step0"]:
                cells.append(f"{'-':>20}")
                continue
            cell = f"{r['step0'][s]:.2f} {r['step0'][s] / b - 1:+.0%}"
            if s in r["after_stage1"]:
                cell += f" ({r['after_stage1'][s]:.2f})"
            cells.append(f"{cell:>20}")
        print(f"{r['base']:<24}{r['role']:<7}{b:>7.2f}" + "".join(cells))
    for key in sorted({k for r in reports for k in r if k.startswith("after_stage1_lr")}):
        print(f"\n{key.removeprefix('after_stage1_lr')} instead of {STAGE1_LR:g} as stage 1's learning rate: bits per character after it")
        for r in reports:
            if r.get(key):
                print(f"{r['base']:<24}{r['role']:<7}" + "".join(f"{s}: {v:.2f}   " for s, v in r[key].items()))
    for r in reports:
        if "english_base" in r:
            if "english_default" not in r:
                continue
            change = r["english_default"] / r["english_base"] - 1
            print(f"{r['base']}: English bits/char {r['english_base']:.4f} -> {r['english_default']:.4f} after extend ({change:+.2%})")
        if "default" in r["extend_figures"]:
            f = r["extend_figures"]["default"]
            print(f"{r['base']}: default extend {f['seconds']:.0f}s; stage 0 on {f.get('stage0_tokens', 0):,} tokens, "
                  f"cost {f.get('stage0_cost_token_forwards', 0):,} token forwards, kept step {f.get('stage0_kept_step')} "
                  f"(held-out loss per token by step {f.get('stage0_held_out_curve')})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="measure only these bases (the table shows every base measured so far)")
    parser.add_argument("--stage1-steps", type=int, default=100, help="stage-1 steps per start (0: step 0 only)")
    parser.add_argument("--stage1-lr", type=float, default=STAGE1_LR, help="stage-1 learning rate")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="trained bases and merged tokenizers, keyed by settings")
    parser.add_argument("--starts", nargs="*", default=None, choices=list(STARTS), help="measure only these starts")
    parser.add_argument("--stage1-starts", nargs="*", default=["default", "mean head", "random"], choices=list(STARTS),
                        help="the starts stage 1 trains from")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="only print the table of the bases measured so far")
    args = parser.parse_args()
    if not ASSETS.is_dir():
        sys.exit(f"needs the real assets at {ASSETS}")
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    bases = [(s.name, s.tokenizer, s.role, s) for s in FAMILY] + [("stories260K", "sp512", "report", None)]
    started = time.perf_counter()
    for name, tokenizer, role, spec in bases if not args.table else []:
        if args.only is not None and name not in args.only:
            continue
        base = stories260k(args.cache_dir) if spec is None else train_base(spec, args.cache_dir)
        bench_base(name, base, tokenizer, role, args, args.cache_dir)
    reports = [json.loads((OUT / f"{name}.json").read_text()) for name, *_ in bases if (OUT / f"{name}.json").is_file()]
    print_table(reports)
    (REPO / "bench" / "out" / "init.json").write_text(json.dumps(reports, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"\n{time.perf_counter() - started:.0f}s; reproduce: .venv/bin/python bench/init.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
