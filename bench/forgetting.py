"""How much English does teaching Chinese cost, and how much English replay buys it back?

The real English-only stories260K (karpathy's TinyStories model) is extended with a Chinese
vocabulary (a SentencePiece model trained on 红楼梦 by ``zhllama vocab train``, merged by
``zhllama vocab merge``), then trained stage 1 (new rows) and stage 2 (LoRA + rows) on 红楼梦
with 0 %, 10 % and 25 % of the blocks drawn from English (``--data zh --data en --data-weights``).
The English is the base model's own samples (sampled from BOS at temperature 1, so it is
in-domain for the model); the English evaluation text is other samples, drawn with another
seed and checked to share no document with the replay text. Both languages are scored by the
runs themselves (``--validation-data zh=... --validation-data en=...``: bits per character
before training and after each stage, from zhllama.json).

Goal (issue 13): with replay, English bits/char within 2 % of the extended model's, or at most
half the zh-only run's loss of English, while Chinese keeps at least 80 % of the zh-only gain.

Run:  .venv/bin/python bench/forgetting.py [--steps 100] [--replay 0 0.1 0.25] [--workdir DIR]
Needs ../shared/assets (stories260K, 红楼梦). The tokenizer, the extended model, the sampled
English, the token blocks and every stage's run (named by a hash of its command) are cached in --workdir (default $ZHLLAMA_CACHE/bench-forgetting
or ~/.cache/zhllama/bench-forgetting), so a rerun only trains. Writes bench/out/forgetting.json
and bench/out/forgetting.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
BASE = ASSETS / "models" / "stories260K"
HONGLOUMENG = ASSETS / "corpora" / "zh" / "hongloumeng.txt"
OUT = REPO / "bench" / "out"


def zhllama(*argv) -> None:
    from zhllama.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        sys.exit(f"zhllama {' '.join(map(str, argv))} failed ({code})")


def sample_english(count: int, seed: int, max_new_tokens: int) -> list[str]:
    """``count`` stories the base model writes from BOS (temperature 1, no top-k), one line each."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(BASE)).eval()
    sp = spm.SentencePieceProcessor(model_file=str(BASE / "tokenizer.model"))
    torch.manual_seed(seed)
    stories: list[str] = []
    with torch.no_grad():
        while len(stories) < count:
            start = torch.full((100, 1), model.config.bos_token_id)
            out = model.generate(start, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=model.config.eos_token_id, pad_token_id=0)  # fmt: skip
            for row in out[:, 1:].tolist():
                ids = [i for i in row[: row.index(2)] if i > 2] if 2 in row else [i for i in row if i > 2]
                text = " ".join(sp.decode(ids).split())
                if len(text) >= 80:
                    stories.append(text)
    return stories[:count]


def chinese_paragraphs() -> list[str]:
    return [line.strip() for line in HONGLOUMENG.read_text(encoding="utf-8").splitlines() if len(line.strip()) >= 20]


def prepare(work: Path, args) -> dict:
    """Tokenizer, extended model and the four text files, built once per setting."""
    files = {name: work / f"{name}.txt" for name in ("zh_train", "zh_eval", "en_replay", "en_eval")}
    extended = work / "extended"
    if (extended / "zhllama.json").is_file() and all(p.is_file() for p in files.values()):
        return {"extended": extended, **files}
    if not all(p.is_file() for p in files.values()):
        paragraphs = chinese_paragraphs()
        files["zh_train"].write_text("\n".join(paragraphs[: -args.zh_eval]) + "\n", encoding="utf-8")
        files["zh_eval"].write_text("\n".join(paragraphs[-args.zh_eval :]) + "\n", encoding="utf-8")
        replay = sample_english(args.en_replay, seed=1, max_new_tokens=args.story_tokens)
        evaluation = sample_english(args.en_eval, seed=2, max_new_tokens=args.story_tokens)
        evaluation = [s for s in evaluation if s not in set(replay)]  # held apart: no evaluation story is trained on
        files["en_replay"].write_text("\n".join(replay) + "\n", encoding="utf-8")
        files["en_eval"].write_text("\n".join(evaluation) + "\n", encoding="utf-8")
    zhllama("vocab", "train", files["zh_train"], "--out", work / "zh_sp", "--vocab-size", args.zh_vocab, "--overwrite")
    zhllama("vocab", "merge", "--base", BASE, "--add", work / "zh_sp" / "chinese_sp.model", "--out", work / "tokenizer", "--overwrite")
    zhllama("extend", "--model", BASE, "--tokenizer", work / "tokenizer", "--out", extended, "--overwrite")
    return {"extended": extended, **files}


def train_stage(work: Path, inputs: dict, stage: int, replay: float, args, adapter: Path | None) -> Path:
    """One stage's run, reused when the same command already ran (its directory is named by it)."""
    data = ["--data", inputs["zh_train"]]
    if replay:
        data += ["--data", inputs["en_replay"], "--data-weights", 1 - replay, replay]
    argv = [
        "pretrain", "--stage", stage, "--model", inputs["extended"], *(["--adapter", adapter] if adapter else []), *data,
        "--validation-data", f"zh={inputs['zh_eval']}", "--validation-data", f"en={inputs['en_eval']}",
        "--block-size", args.block_size, "--cache-dir", work / "blocks",
        "--max-steps", args.steps, "--learning-rate", args.lr1 if stage == 1 else args.lr2, "--warmup-steps", 0,
        "--per-device-train-batch-size", args.batch_size,
        "--logging-steps", max(1, args.steps // 10), "--save-strategy", "no", "--use-cpu", "--disable-tqdm", "true", "--seed", 0,
    ]  # fmt: skip
    digest = hashlib.sha256(" ".join(map(str, argv)).encode()).hexdigest()[:10]
    out = work / f"replay{round(replay * 100)}-stage{stage}-{digest}"
    if not (out / "zhllama.json").is_file():
        zhllama(*argv, "--out", out, "--overwrite")
    return out


def figures_of(run: Path) -> dict:
    return json.loads((run / "zhllama.json").read_text(encoding="utf-8"))["figures"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.1, 0.25], help="shares of English blocks")
    parser.add_argument("--steps", type=int, default=100, help="training steps per stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr1", type=float, default=2e-2, help="stage-1 learning rate")
    parser.add_argument("--lr2", type=float, default=2e-3, help="stage-2 learning rate")
    parser.add_argument("--zh-vocab", type=int, default=5000, help="pieces of the Chinese SentencePiece model (above the 4,157 distinct characters)")
    parser.add_argument("--zh-eval", type=int, default=60, help="红楼梦 paragraphs held out (the last ones)")
    parser.add_argument("--en-replay", type=int, default=600, help="sampled English stories to replay")
    parser.add_argument("--en-eval", type=int, default=100, help="sampled English stories to evaluate on")
    parser.add_argument("--story-tokens", type=int, default=160, help="longest sampled story, in tokens")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than the idle cores slows a model this small down)")
    args = parser.parse_args()
    if not BASE.is_dir() or not HONGLOUMENG.is_file():
        sys.exit(f"needs the real assets under {ASSETS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    data_settings = {k: getattr(args, k) for k in ("zh_vocab", "zh_eval", "en_replay", "en_eval", "story_tokens")}
    key = hashlib.sha256(json.dumps(data_settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("ZHLLAMA_CACHE", Path.home() / ".cache" / "zhllama"))
    work = (args.workdir or cache / "bench-forgetting") / key
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    inputs = prepare(work, args)
    prepared = time.perf_counter() - started
    runs: dict[float, dict] = {}
    for replay in args.replay:
        stage1 = train_stage(work, inputs, 1, replay, args, None)
        stage2 = train_stage(work, inputs, 2, replay, args, stage1)
        runs[replay] = {"stage 1": figures_of(stage1), "stage 2": figures_of(stage2)}
    report = summarise(runs, args, inputs)
    report.update(
        command="python bench/forgetting.py " + " ".join(sys.argv[1:]),
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        seconds={
            "prepare (cached after the first run)": round(prepared, 1),
            "training, all runs (as they ran, from their zhllama.json)": round(
                sum(f["train_runtime_s"] for stages in runs.values() for f in stages.values()), 1
            ),
            "this invocation": round(time.perf_counter() - started, 1),
        },
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "forgetting.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    plot(report, OUT / "forgetting.png")
    print(f"\ntime: {report['seconds']}\nreproduce: .venv/bin/python bench/forgetting.py {' '.join(sys.argv[1:])}"
          f"   (wrote bench/out/forgetting.json, bench/out/forgetting.png)")  # fmt: skip


def summarise(runs: dict[float, dict], args, inputs: dict) -> dict:
    """The table rows, printed, and the goal checked after stage 2."""
    first = next(iter(runs.values()))["stage 1"]["validation"]
    extended = {lang: first[lang]["bits_per_char_before"] for lang in ("en", "zh")}
    zh_only = runs.get(0.0)
    rows = [{"replay": None, "stage": "extended", "en": extended["en"], "zh": extended["zh"], "en_share": None}]
    for replay, stages in runs.items():
        for stage, figures in stages.items():
            shares = figures.get("mix", {}).get("sources", {})
            rows.append({
                "replay": replay, "stage": stage,
                "en": figures["validation"]["en"]["bits_per_char_after"], "zh": figures["validation"]["zh"]["bits_per_char_after"],
                "en_share": shares.get(str(inputs["en_replay"]), {}).get("share", 0.0),
            })  # fmt: skip
    print(f"\nbits per character after each stage ({args.steps} steps of {args.batch_size} x {args.block_size} tokens per stage)")
    print(f"{'English replay':>15}{'stage':>10}{'en share':>10}{'en bits/char':>14}{'vs extended':>13}{'zh bits/char':>14}{'zh gain':>9}{'of zh-only':>12}{'zh vs zh-only':>15}")
    for row in rows:
        zh_gain = extended["zh"] - row["zh"]
        reference = None
        if zh_only and row["replay"] is not None:
            reference = extended["zh"] - zh_only[row["stage"]]["validation"]["zh"]["bits_per_char_after"]
        row["en_vs_extended"] = row["en"] / extended["en"] - 1
        row["zh_vs_zh_only"] = row["zh"] / zh_only[row["stage"]]["validation"]["zh"]["bits_per_char_after"] - 1 if reference else None
        row["zh_gain_of_zh_only"] = zh_gain / reference if reference else None
        replay = "-" if row["replay"] is None else f"{row['replay']:.0%}"
        share = "-" if row["en_share"] is None else f"{row['en_share']:.1%}"
        kept = "-" if row["zh_gain_of_zh_only"] is None else f"{row['zh_gain_of_zh_only']:.0%}"
        versus = "-" if row["zh_vs_zh_only"] is None else f"{row['zh_vs_zh_only']:+.1%}"
        print(f"{replay:>15}{row['stage']:>10}{share:>10}{row['en']:>14.4f}{row['en_vs_extended']:>+13.1%}{row['zh']:>14.4f}"
              f"{zh_gain:>9.3f}{kept:>12}{versus:>15}")  # fmt: skip
    goals = {}
    if zh_only:
        zh_only_en_loss = zh_only["stage 2"]["validation"]["en"]["bits_per_char_after"] - extended["en"]
        for row in rows:
            if row["stage"] != "stage 2" or not row["replay"]:
                continue
            en_ok = row["en_vs_extended"] <= 0.02 or row["en"] - extended["en"] <= 0.5 * zh_only_en_loss
            zh_ok = (row["zh_gain_of_zh_only"] or 0) >= 0.8
            goals[f"{row['replay']:.0%}"] = {"english": en_ok, "chinese": zh_ok, "met": en_ok and zh_ok}
        print("\ngoal after stage 2 (English within 2% of the extended model or at most half the zh-only loss of English; "
              "Chinese >= 80% of the zh-only gain): " + ", ".join(f"{k} replay {'met' if v['met'] else 'NOT met'}" for k, v in goals.items()))  # fmt: skip
    return {"extended": extended, "rows": rows, "goals": goals}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["extended", "stage 1", "stage 2"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, lang, title in ((axes[0], "en", "English (base model's own stories)"), (axes[1], "zh", "Chinese (Hongloumeng, held out)")):
        for replay in sorted({r["replay"] for r in report["rows"] if r["replay"] is not None}):
            values = [report["extended"][lang]] + [r[lang] for r in report["rows"] if r["replay"] == replay]
            ax.plot(stages, values, "o-", label=f"{replay:.0%} English replay")
        ax.set_title(title)
        ax.set_ylabel("bits per character" + (" (log scale)" if lang == "zh" else ""))
        if lang == "zh":
            ax.set_yscale("log")  # stage 1's fall from the untrained start would flatten the rest
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
