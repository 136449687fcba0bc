"""``zhllama demo``: the whole pipeline on a built-in tiny default, in about a minute on a CPU.

Every step runs the real command through :func:`zhllama.cli.run_command` with the argv a user
would type, so the demo exercises the same parsing, validation, Trainer setup and output
directories as the shell recipes. The steps run in this one process rather than as nine
``zhllama`` sub-processes: importing torch and transformers costs several seconds each time,
which would be a large share of the demo's budget on a small machine. Each step's equivalent shell
command is printed before it runs and collected in ``WORKDIR/commands.sh``.

The figures of the closing summary are read back from what the steps wrote: each output
directory's ``zhllama.json`` and ``metrics.jsonl`` and the ``vocab stats`` JSON report.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.chain import TOKENIZER_FILES
from zhllama.errors import ZhllamaError
from zhllama.options import Command, at_least, check, option
from zhllama.outdir import check_output_target, copy_files
from zhllama.provenance import read_manifest, write_manifest

# The tiny default: sizes picked so the whole demo takes about a minute on two CPU cores.
CHINESE_LINES = 3000  # vocab training and continued pretraining corpus
HELDOUT_LINES = 300  # corpus for the before/after tokenizer statistics
INSTRUCTIONS = 1200  # SFT records
FACT_REPEATS = 10  # copies of each fact in the pretraining corpus
CHINESE_VOCAB_SIZE = 3000
BLOCK_SIZE = 64
SFT_SEQ_LENGTH = 96
CHAT_PROMPT = "中国的首都是哪里？"
TEMPLATE = "llama2-chat"


@dataclass
class DemoOptions:
    workdir: Path = option(Path("demo-run"), help="directory for every step's output; the merged model ends in WORKDIR/merged")
    overwrite: bool = option(False, help="replace the outputs of an earlier demo in WORKDIR")
    base_model: Path | None = option(
        None, help="run on your own LLaMA-architecture model directory instead of the built-in tiny one"
    )
    base_tokenizer: Path | None = option(
        None, help="the base model's tokenizer (directory or tokenizer.model; default: the one in --base-model)"
    )
    train_steps: int = option(100, help="optimizer steps of each pretraining stage (SFT runs twice as many)")
    seed: int = option(0, help="seed for data generation and training")
    threads: int = option(
        1, help="torch CPU threads; the tiny default runs fastest on one (its matrices are too small to split)"
    )

    def __post_init__(self) -> None:
        problems = []
        if self.base_tokenizer is not None and self.base_model is None:
            problems.append("--base-tokenizer needs --base-model (the built-in default brings its own tokenizer)")
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            problems.append(f"--base-model {self.base_model}: no config.json; expected a Hugging Face model directory")
        if self.base_tokenizer is not None and not Path(self.base_tokenizer).exists():
            problems.append(f"--base-tokenizer {self.base_tokenizer}: no such file or directory")
        at_least(problems, "--train-steps", self.train_steps, 1)
        at_least(problems, "--threads", self.threads, 1)
        check(problems)


@dataclass
class StepResult:
    name: str
    seconds: float
    output: str = ""


@dataclass
class Demo:
    """The state of one demo run: where things go and what each step reported."""

    options: DemoOptions
    work: Path = field(init=False)
    results: list[StepResult] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    total_steps: int = 0

    def __post_init__(self) -> None:
        self.work = Path(self.options.workdir)

    def path(self, name: str) -> Path:
        return self.work / name

    def step(self, title: str, fn) -> StepResult:
        """Run one step with a progress header and its wall time."""
        number = len(self.results) + 1
        print(f"\n== [{number}/{self.total_steps}] {title}", flush=True)
        start = time.perf_counter()
        output = fn() or ""
        result = StepResult(title, time.perf_counter() - start, output)
        self.results.append(result)
        print(f"== [{number}/{self.total_steps}] {title}: done in {result.seconds:.1f} s", flush=True)
        return result

    def command(self, title: str, *calls: tuple[str, list], capture: bool = False) -> StepResult:
        """One step running ``zhllama NAME ARGV`` for each (name, argv) call, in this process,
        exactly as the shell would parse it; ``capture`` keeps a copy of what they print."""
        from zhllama.cli import run_command

        calls = tuple((name, [str(a) for a in argv]) for name, argv in calls)
        lines = [shlex.join(["zhllama", *name.split(), *argv]) for name, argv in calls]
        self.commands += lines

        def run() -> str:
            tee = _Tee(sys.stdout)
            for line, (name, argv) in zip(lines, calls):
                print(f"$ {line}", flush=True)
                with contextlib.redirect_stdout(tee) if capture else contextlib.nullcontext():
                    run_command(name, argv)
            return tee.captured.getvalue()

        return self.step(title, run)


class _Tee(io.TextIOBase):
    """Print through to the terminal and keep a copy (for the chat answer in the summary)."""

    def __init__(self, terminal) -> None:
        self.terminal = terminal
        self.captured = io.StringIO()

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.terminal.flush()
        return self.captured.write(text)

    def flush(self) -> None:
        self.terminal.flush()


# --------------------------------------------------------------------------- the built-in data


def write_demo_data(data_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The demo's corpora and instructions, generated offline.

    The Chinese corpus is sentences of jieba's frequent words plus, a few times each, the
    questions and answers of :data:`zhllama.demo.tiny.CHINESE_FACTS` (real corpora carry the
    knowledge SFT later asks for); the instructions ask those questions, so the tiny model's
    chat answer is a sentence it has learnt rather than noise.
    """
    from zhllama.demo import tiny

    facts = [question + answer for question, answer in tiny.CHINESE_FACTS] * FACT_REPEATS
    corpus = tiny.chinese_sentences(CHINESE_LINES, seed=seed + 1) + facts
    random.Random(seed).shuffle(corpus)
    return {
        "chinese": tiny.write_lines(data_dir / "zh.txt", corpus),
        "heldout": tiny.write_lines(data_dir / "zh_heldout.txt", tiny.chinese_sentences(HELDOUT_LINES, seed=seed + 2)),
        "instructions": tiny.write_json(data_dir / "instructions.json", tiny.fact_records(INSTRUCTIONS, seed=seed + 3)),
    }


def write_tiny_base(model_dir: Path, seed: int = 0) -> list[float]:
    """A tiny LLaMA-style tokenizer and model, briefly pretrained on mixed English/Chinese text
    (Chinese reaches it through byte fallback, as with LLaMA). Returns the pretraining losses."""
    from zhllama.demo import tiny

    if model_dir.exists():  # an earlier demo's base; may hold links to a user's model files
        shutil.rmtree(model_dir)
    tokenizer_dir = tiny.write_base_tokenizer(model_dir.with_name(model_dir.name + "_tokenizer"), seed=seed)
    tiny.write_tiny_llama(model_dir, tokenizer_dir, seed=seed)
    shutil.rmtree(tokenizer_dir)  # the model directory holds a copy of every tokenizer file
    texts = tiny.english_sentences(3000, seed=seed + 5) + tiny.chinese_sentences(1500, seed=seed + 6)
    return tiny.pretrain_tiny_llama(model_dir, texts, steps=150, seed=seed)


def prepare_user_base(options: DemoOptions, view: Path) -> Path:
    """The user's base model as a directory with exact HF tokenizer files beside the weights.

    A model directory that already holds ``tokenizer.json`` (and no separate
    ``--base-tokenizer``) is used as it is. Otherwise (e.g. llama2.c conversions with only
    ``tokenizer.model``) ``view`` gets symbolic links to the model's files plus the tokenizer,
    with its ``tokenizer.json`` written by the vocab stage's exact converter; the user's
    directories are never written to.
    """
    from zhllama.vocab.hf import save_hf_tokenizer

    model_dir = Path(options.base_model)
    source = Path(options.base_tokenizer or model_dir)
    if source == model_dir and (model_dir / "tokenizer.json").is_file():
        return model_dir
    sp_model = source / "tokenizer.model" if source.is_dir() else source
    if not sp_model.is_file():
        raise ZhllamaError(f"{source}: no tokenizer.model; pass --base-tokenizer with the base model's SentencePiece model")
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in TOKENIZER_FILES:
            (view / path.name).symlink_to(path.resolve())
    if source.is_dir() and (source / "tokenizer.json").is_file():
        copy_files(TOKENIZER_FILES, source, view)
    else:
        shutil.copy2(sp_model, view / "tokenizer.model")
        save_hf_tokenizer(view / "tokenizer.model", view)
    return view


# --------------------------------------------------------------------------- the pipeline


def run_demo(options: DemoOptions) -> dict:
    """Run the whole pipeline on a built-in tiny default (or --base-model) and print a summary.

    vocab train, vocab merge, vocab stats, extend, eval, pretrain stage 1 and 2, sft, merge
    --verify and chat, each through the same command-line path as the shell; the final merged
    model is left at WORKDIR/merged. Returns the summary (also in WORKDIR/zhllama.json).
    """
    work = Path(options.workdir)
    if work.is_dir() and any(work.iterdir()) and not options.overwrite:
        raise ZhllamaError(f"{work}: demo directory exists and is not empty; pass --overwrite to run the demo again in it")
    check_output_target(work, overwrite=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(options.threads)
    demo = Demo(options)
    demo.total_steps = 13  # the demo.step / demo.command calls below
    start = time.perf_counter()
    data: dict[str, Path] = {}
    base_losses: list[float] = []

    def prepare() -> None:
        data.update(write_demo_data(demo.path("data"), options.seed))
        print(f"wrote {data['chinese']}, {data['heldout']}, {data['instructions']}")
        if options.base_model is None:
            base_losses.extend(write_tiny_base(demo.path("base"), options.seed))
            data["base"] = demo.path("base")
            print(f"tiny base model: {data['base']} (pretraining loss {base_losses[0]:.2f} -> {base_losses[-1]:.2f})")
        else:
            data["base"] = prepare_user_base(options, demo.path("base"))
            print(f"base model: {data['base']}")

    demo.step("make the built-in data" + (" and tiny base model" if options.base_model is None else ""), prepare)
    answer = run_pipeline(demo, data)

    summary = collect_summary(demo, data["base"], base_losses, answer, time.perf_counter() - start)
    header = [
        "#!/usr/bin/env bash",
        f"# The commands zhllama demo ran, in order, on the data and base model it made in {work}/data",
        f"# and {work}/base. Replay from the directory the demo ran in, with zhllama on PATH",
        f"# (e.g. after: source .venv/bin/activate): bash {work}/commands.sh",
        "set -euo pipefail",
    ]
    (work / "commands.sh").write_text("\n".join(header + demo.commands) + "\n", encoding="utf-8")
    write_manifest(work, command="demo", options=options, figures=summary)
    print_summary(summary)
    return summary


def run_pipeline(demo: Demo, data: dict[str, Path]) -> str:
    """Steps 2..13: every pipeline command on the demo's data, then the report across the
    stages (WORKDIR/report.png); returns the chat answer.

    Learning rates are far above the recipes' LLaMA-7B values because the model is tiny and
    each stage has only ``--train-steps`` steps; everything else is the commands' defaults.
    """
    options, base = demo.options, data["base"]
    steps, overwrite = options.train_steps, ["--overwrite"]
    training = ["--per-device-train-batch-size", 8, "--logging-steps", max(1, steps // 6),
                "--save-strategy", "no", "--report-to", "none", "--seed", options.seed]  # fmt: skip
    blocks = ["--block-size", BLOCK_SIZE, "--cache-dir", demo.path("cache")]
    sp_dir, tokenizer, extended = demo.path("chinese_sp"), demo.path("tokenizer"), demo.path("extended")
    stage1, stage2, sft, merged = demo.path("stage1"), demo.path("stage2"), demo.path("sft"), demo.path("merged")
    chain = ["--adapter", stage1, "--adapter", stage2]

    def evaluate(model: Path, name: str, adapters: tuple = ()) -> tuple[str, list]:
        json_file = demo.path(f"eval_{name}.json")
        return "eval", ["--model", model, *adapters, "--data", data["heldout"], "--block-size", BLOCK_SIZE, "--json", json_file]

    demo.command("vocab train", ("vocab train", [data["chinese"], "--out", sp_dir, "--vocab-size", CHINESE_VOCAB_SIZE, *overwrite]))
    demo.command(
        "vocab merge", ("vocab merge", ["--base", base, "--add", sp_dir / "chinese_sp.model", "--out", tokenizer, *overwrite])
    )
    stats = ["--tokenizer", base, "--tokenizer", tokenizer, data["heldout"], "--json", demo.path("vocab_stats.json")]
    demo.command("vocab stats (before/after)", ("vocab stats", stats))
    extend_argv = ["--model", base, "--tokenizer", tokenizer, "--out", extended, "--init-corpus", data["chinese"], *overwrite]
    demo.command("extend", ("extend", extend_argv))  # closed-form rows, then stage 0 on the Chinese corpus
    demo.command("eval base and extended (before training)", evaluate(base, "base"), evaluate(extended, "extended"))
    stage1_argv = ["--stage", 1, "--model", extended, "--data", data["chinese"], "--out", stage1, *blocks,
                   "--max-steps", steps, "--learning-rate", "1e-3", *training, *overwrite]  # fmt: skip
    demo.command("pretrain stage 1 (new rows)", ("pretrain", stage1_argv))
    stage2_argv = ["--stage", 2, "--model", extended, "--adapter", stage1, "--data", data["chinese"], "--out", stage2, *blocks,
                   "--max-steps", steps, "--learning-rate", "1e-3", "--lora-r", 8, "--lora-alpha", 16, *training, *overwrite]  # fmt: skip
    demo.command("pretrain stage 2 (LoRA + rows)", ("pretrain", stage2_argv))
    demo.command("eval after pretraining", evaluate(extended, "pretrained", tuple(chain)))
    sft_argv = ["--model", extended, *chain, "--data", data["instructions"], "--template", TEMPLATE, "--out", sft,
                "--max-seq-length", SFT_SEQ_LENGTH, "--max-steps", steps * 2, "--learning-rate", "5e-3",
                "--lora-r", 16, "--lora-alpha", 32, *training, *overwrite]  # fmt: skip
    demo.command("sft", ("sft", sft_argv))
    merge_argv = ["--model", extended, *chain, "--adapter", sft, "--out", merged, "--verify", *overwrite]
    demo.command("merge --verify", ("merge", merge_argv), evaluate(merged, "merged"))
    # no repetition penalty: the answer's "。" also appears in the prompt and must not be penalised
    chat_argv = ["--model", merged, "--prompt", CHAT_PROMPT, "--max-new-tokens", 24, "--greedy", "--repetition-penalty", 1.0]
    answer = demo.command("chat (merged model)", ("chat", chat_argv), capture=True).output.strip()
    report_argv = [base, tokenizer, extended, stage1, stage2, sft, merged, "--eval", "--data", f"zh={data['heldout']}",
                   "--block-size", BLOCK_SIZE, "--png", demo.path("report.png"), "--json", demo.path("report.json")]  # fmt: skip
    demo.command("report (every stage side by side)", ("report", report_argv))
    return answer


# --------------------------------------------------------------------------- the summary


def weight_bytes(directory: Path) -> int:
    """Bytes of the weight files (safetensors) in an adapter or model directory."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def tokens_per_han(stats_json: Path, tokenizers: list[Path]) -> list[float | None]:
    """Tokens per Han character of each tokenizer, from a ``vocab stats --json`` report."""
    report = json.loads(stats_json.read_text(encoding="utf-8"))
    found: list[float | None] = []
    for tokenizer in tokenizers:
        values = [
            row.get("tokens_per_han_char")
            for row in report
            if Path(str(row.get("tokenizer", ""))).resolve() == tokenizer.resolve()
        ]
        found.append(values[0] if values else None)
    return found


def bits_per_character(eval_json: Path) -> float | None:
    """Bits per character of the (one) corpus in a ``zhllama eval --json`` report."""
    corpora = json.loads(eval_json.read_text(encoding="utf-8"))["corpora"]
    return next(iter(corpora.values()))["bits_per_character"] if corpora else None


def collect_summary(demo: Demo, base_tokenizer: Path, base_losses: list[float], answer: str, total_seconds: float) -> dict:
    """The figures of the closing table, read back from what the steps wrote."""
    work = demo.work
    before, after = tokens_per_han(work / "vocab_stats.json", [base_tokenizer, work / "tokenizer"])
    merge_figures = (read_manifest(work / "tokenizer") or {}).get("figures", {})
    stages = {}
    for name in ("stage1", "stage2", "sft"):
        figures = (read_manifest(work / name) or {}).get("figures", {})
        stages[name] = {
            "loss_start": figures.get("first_loss"),
            "loss_end": figures.get("last_loss"),
            "eval_loss_before": figures.get("eval_loss_before"),
            "eval_loss": figures.get("eval_loss"),
            "adapter_bytes": weight_bytes(work / name),
        }
    merged_manifest = read_manifest(work / "merged") or {}
    return {
        "tokens_per_han_char": {"base": before, "merged": after},
        "vocab": {"base": merge_figures.get("base_pieces"), "merged": merge_figures.get("merged_pieces")},
        "base_pretraining_loss": [base_losses[0], base_losses[-1]] if base_losses else None,
        "bits_per_character": {name: bits_per_character(work / f"eval_{name}.json") for name in ("base", "extended", "pretrained", "merged")},
        "stages": stages,
        "merged": {
            "path": str((work / "merged").resolve()),
            "bytes": weight_bytes(work / "merged"),
            "verify_max_logit_diff": merged_manifest.get("figures", {}).get("max_logit_diff"),
        },
        "chat": {"prompt": CHAT_PROMPT, "answer": answer},
        "seconds": {r.name: round(r.seconds, 1) for r in demo.results},
        "total_seconds": round(total_seconds, 1),
    }


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def print_summary(summary: dict) -> None:
    per_han = summary["tokens_per_han_char"]
    vocab = summary["vocab"]
    lines = [
        "",
        "=" * 72,
        "zhllama demo: summary",
        "=" * 72,
        f"vocabulary                 {_fmt(vocab['base'], 'd')} -> {_fmt(vocab['merged'], 'd')} pieces",
        f"tokens per Han character   {_fmt(per_han['base'])} (base) -> {_fmt(per_han['merged'])} (merged)",
    ]
    if summary["base_pretraining_loss"]:
        start, end = summary["base_pretraining_loss"]
        lines.append(f"tiny base pretraining      loss {start:.3f} -> {end:.3f} (mixed English/Chinese, byte fallback)")
    bits = summary["bits_per_character"]
    lines.append(
        f"bits per character         base {_fmt(bits['base'])} | extended, before training {_fmt(bits['extended'])} | "
        f"after stage 1+2 {_fmt(bits['pretrained'])} | merged (after SFT) {_fmt(bits['merged'])}   (held-out Chinese)"
    )
    # the validation loss is measured on the same held-out blocks before and after a stage; the
    # training loss of the first and last logging windows comes from different batches
    lines += ["", f"{'stage':<10} {'validation loss before':>23} {'after':>7} {'train loss first':>17} {'last':>7} {'adapter':>10}"]
    for name, stage in summary["stages"].items():
        lines.append(
            f"{name:<10} {_fmt(stage['eval_loss_before']):>23} {_fmt(stage['eval_loss']):>7} "
            f"{_fmt(stage['loss_start']):>17} {_fmt(stage['loss_end']):>7} {_size(stage['adapter_bytes']):>10}"
        )
    merged = summary["merged"]
    lines += [
        "",
        f"merged model               {merged['path']} ({_size(merged['bytes'])}, "
        f"max |logit diff| vs chain {_fmt(merged['verify_max_logit_diff'], '.2e')})",
        f"chat                       {summary['chat']['prompt']} -> {summary['chat']['answer'] or '-'}",
        "",
        f"{'step':<40} {'seconds':>8}",
    ]
    lines += [f"{name:<40} {seconds:>8.1f}" for name, seconds in summary["seconds"].items()]
    lines += [f"{'total':<40} {summary['total_seconds']:>8.1f}", "=" * 72]
    print("\n".join(lines), flush=True)


demo = Command(DemoOptions, run_demo)
