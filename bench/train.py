"""Training speed and memory: stage 1, stage 2 and SFT, done three ways on the same model and data.

- ``zhllama``: the real ``zhllama pretrain --stage 1|2`` and ``zhllama sft`` commands (stage 1
  trains the new embedding/LM-head rows only; stage 2 and SFT add LoRA on every projection;
  rows through peft trainable tokens).
- ``chinese-llama``: Chinese-LLaMA-Alpaca's way: whole embedding and LM-head matrices train
  (stage 1: those matrices alone; stage 2 / SFT: LoRA + peft ``modules_to_save=["embed_tokens",
  "lm_head"]``, which trains and saves full copies).
- ``plain``: a plain ``transformers.Trainer`` that trains every parameter (no peft).

Each run is its own process (so peak memory is its own), with the same TrainingArguments
(batch, steps, learning rate; bf16 mixed precision on CUDA, float32 on CPU; no gradient
checkpointing unless ``--gradient-checkpointing``). tokens/s is measured from the end of the
first step to the end of the last (the first step's warm-up left out), counting input tokens
(SFT: non-padding tokens). Peak memory is the process's peak resident set on CPU, and the peak
of allocated GPU memory during training on CUDA. MFU (CUDA) is 6 x parameters x tokens/s over
the GPU's bf16 peak (``--peak-tflops``; H100/H200 989).

Run:  .venv/bin/python bench/train.py [--hidden 256] [--layers 4] [--steps 8] [--batch-size 4] [--block-size 256]
      .venv/bin/python bench/train.py --model EXTENDED_DIR --corpus FILE --sft-data FILE.json   (your own model)
Without --model it builds one: a random LLaMA of --hidden/--layers with the LLaMA tokenizer,
extended with Chinese-LLaMA's 20k pieces (``zhllama vocab merge`` + ``extend``), trained on
红楼梦 and ruozhiba (needs ../shared/assets). Writes bench/out/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ZHLLAMA_ASSETS", REPO.parent / "shared" / "assets"))
WAYS = ("zhllama", "chinese-llama", "plain")
STAGES = ("stage1", "stage2", "stage2-4bit", "sft")
DEFAULT_STAGES = ("stage1", "stage2", "sft")
# config.json shapes: LLaMA-2-7B's and a ~1B LLaMA's (TinyLlama-1.1B), with fewer layers when asked
SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    return next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)


# ---------------------------------------------------------------- measuring one run (a worker process)


class StepTimer:
    """A TrainerCallback recording time, tokens seen and memory at every step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                outer.rss_at_start = current_rss_mib()

            def on_step_end(self, args, state, control, **kwargs):
                outer.steps.append((time.perf_counter(), state.num_input_tokens_seen))

        self.callback, self.steps, self.rss_at_start = Callback(), [], 0.0

    def figures(self) -> dict:
        import resource

        import torch

        (t0, n0), (t1, n1) = self.steps[0], self.steps[-1]
        figures = {"steps": len(self.steps), "tokens_per_second": round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None}
        if torch.cuda.is_available():
            figures["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        figures["rss_at_train_start_mib"] = round(self.rss_at_start, 1)
        return figures


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def install_timer() -> StepTimer:
    """Every Trainer made in this process (zhllama's AdapterTrainer too) gets the timer."""
    from transformers import Trainer

    timer, original = StepTimer(), Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(timer.callback)

    Trainer.__init__ = init
    return timer


def training_values(spec: dict, out: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "output_dir": str(out), "max_steps": spec["steps"], "per_device_train_batch_size": spec["batch_size"],
        "learning_rate": 2e-4, "save_strategy": "no", "report_to": "none", "logging_steps": 1, "seed": 0,
        "disable_tqdm": True, "use_cpu": not cuda, "bf16": cuda, "gradient_checkpointing": spec["gradient_checkpointing"],
        "include_num_input_tokens_seen": "non_padding" if spec["stage"] == "sft" else True, "remove_unused_columns": False,
    }  # fmt: skip


def zhllama_argv(spec: dict, out: Path) -> list[str]:
    common = ["--model", spec["model"], "--out", str(out), "--overwrite"]
    flags = {k: v for k, v in training_values(spec, out).items() if k not in ("output_dir", "remove_unused_columns", "include_num_input_tokens_seen")}
    for key, value in flags.items():
        common += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    if spec["stage"] == "sft":
        length = str(max(spec["block_size"], 128))  # room for the template around short answers
        return ["sft", "--data", spec["sft_data"], "--template", "chinese-alpaca", "--max-seq-length", length, *common]
    stage, four_bit = spec["stage"][5], spec["stage"].endswith("4bit")
    return ["pretrain", "--stage", stage, "--data", spec["corpus"], "--block-size", str(spec["block_size"]),
            "--validation-split", "0", "--cache-dir", spec["cache_dir"], *(["--load-in-4bit"] if four_bit else []), *common]  # fmt: skip


def other_way(spec: dict, out: Path) -> tuple[int, int]:
    """Train the Chinese-LLaMA or plain way with transformers.Trainer; (trainable, total) parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from zhllama.args import ALL_LINEAR
    from zhllama.chain import load_chain
    from zhllama.training import parameter_counts

    chain = load_chain(spec["model"])
    model = chain.model
    model.config.use_cache = False
    if spec["stage"] == "sft":
        from zhllama.sft.templates import get_template
        from zhllama.sft.train import build_sft_data, data_collator

        from datasets import Dataset

        length = max(spec["block_size"], 128)
        data = build_sft_data([Path(spec["sft_data"])], get_template("chinese-alpaca"), chain.tokenizer, max_seq_length=length)
        train_dataset, collator = Dataset.from_list(data.train), data_collator(chain.tokenizer, packing=False)
    else:
        from zhllama.pretrain.data import build_blocks, collate_blocks

        train_dataset, _ = build_blocks([spec["corpus"]], chain.tokenizer, chain.tokenizer_dir, block_size=spec["block_size"], cache_dir=spec["cache_dir"])
        collator = collate_blocks
    if spec["way"] == "chinese-llama" and spec["stage"] == "stage1":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    elif spec["way"] == "chinese-llama":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_LINEAR,
                            modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, config)
    if spec["gradient_checkpointing"]:
        model.enable_input_require_grads()
    args = TrainingArguments(**training_values(spec, out))
    Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator).train()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return parameter_counts(model)


def worker(spec: dict) -> dict:
    timer = install_timer()
    with tempfile.TemporaryDirectory(prefix="zhllama-bench-train-") as scratch:
        out = Path(scratch) / "out"
        start = time.perf_counter()
        if spec["way"] == "zhllama":
            from zhllama.cli import main

            if main(zhllama_argv(spec, out)) != 0:
                raise SystemExit(f"zhllama {spec['stage']} failed")
            figures = json.loads((out / "zhllama.json").read_text(encoding="utf-8"))["figures"]
            trainable, total = figures["trainable_params"], figures["total_params"]
        else:
            trainable, total = other_way(spec, out)
        result = {"way": spec["way"], "stage": spec["stage"], "trainable_params": trainable, "total_params": total,
                  **timer.figures(), "command_wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    import torch

    if torch.cuda.is_available() and result["tokens_per_second"]:
        from zhllama.accel import estimate_parameters, read_model_config

        # the model's own parameters (a 4-bit layer's packed storage would count half of them)
        parameters = estimate_parameters(read_model_config(spec["model"]))
        peak = spec.get("peak_tflops") or peak_tflops(torch.cuda.get_device_name(0))
        result["device"] = torch.cuda.get_device_name(0)
        if peak:
            result["mfu"] = round(6 * parameters * result["tokens_per_second"] / (peak * 1e12), 4)
    return result


# ---------------------------------------------------------------- building the model and running the table


def tiny_inputs(work: Path) -> tuple[Path, Path, Path, Path]:
    """The built-in tiny default instead of the assets: a 1000-piece LLaMA-style tokenizer, a
    Chinese SentencePiece model trained here, generated Chinese text and instructions."""
    from zhllama.cli import main
    from zhllama.demo import tiny

    base_tokenizer = tiny.write_base_tokenizer(work / "tiny_tokenizer") / "tokenizer.model"
    corpus = tiny.write_lines(work / "zh.txt", tiny.chinese_sentences(2000, seed=7))
    if main(["vocab", "train", str(corpus), "--out", str(work / "zh_sp"), "--vocab-size", "2000"]) != 0:
        raise SystemExit("zhllama vocab train failed")
    sft_data = tiny.write_json(work / "sft.json", tiny.instruction_records(200, seed=0))
    return base_tokenizer, work / "zh_sp" / "chinese_sp.model", corpus, sft_data


def build_model(work: Path, hidden: int, layers: int, shape: str | None = None, head_init: str = "mean", tiny: bool = False) -> dict:
    """A random LLaMA (``shape``'s or ``hidden``'s size, ``layers`` layers, bf16), extended with
    Chinese-LLaMA's pieces by ``--head-init head_init`` (timed); the corpus; the SFT data.
    ``tiny``: the built-in tiny default's tokenizers and data instead (no assets needed)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.cli import main
    from zhllama.vocab.hf import save_hf_tokenizer

    needed = [ASSETS / p for p in ("tokenizers/llama/tokenizer.model", "tokenizers/chinese-llama/chinese_sp.model",
                                   "corpora/zh/hongloumeng.txt", "sft/ruozhiba_qa2449_zh.json")]  # fmt: skip
    needed = list(tiny_inputs(work)) if tiny else needed
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"missing assets {', '.join(missing)}; pass --model/--corpus/--sft-data, or set ZHLLAMA_ASSETS")
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "tokenizer.model").write_bytes(needed[0].read_bytes())
    save_hf_tokenizer(base / "tokenizer.model", base)
    torch.manual_seed(0)
    size = SHAPES[shape] if shape else {"hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 8 * 8, "num_attention_heads": max(1, hidden // 64)}
    vocab_size = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model")).get_piece_size()
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **size)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(base))
    seconds = {}
    for argv in (["vocab", "merge", "--base", str(base), "--add", str(needed[1]), "--out", str(work / "merged")],
                 ["extend", "--model", str(base), "--tokenizer", str(work / "merged"), "--out", str(work / "extended"), "--head-init", head_init]):  # fmt: skip
        start = time.perf_counter()
        if main(argv) != 0:
            raise SystemExit(f"zhllama {argv[0]} failed")
        seconds[argv[0]] = round(time.perf_counter() - start, 1)
    print(f"built: vocab merge {seconds['vocab']} s, extend --head-init {head_init} {seconds['extend']} s", file=sys.stderr)
    return {"model": str(work / "extended"), "corpus": str(needed[2]), "sft_data": str(needed[3]), "extend_s": seconds["extend"]}


def table(rows: list[dict]) -> str:
    columns = ["stage", "way", "trainable_params", "tokens_per_second", "peak_rss_mib", "peak_gpu_mib", "mfu", "command_wall_s", "refused"]
    columns = [c for c in columns if any(c in row for row in rows)]
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:,}" if isinstance(row.get(c), int) else str(row.get(c, "")) for c in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an extended model directory (default: build one)")
    parser.add_argument("--corpus", help="pretraining corpus (with --model)")
    parser.add_argument("--sft-data", help="instruction data (with --model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a published model's layer shape (default: --hidden)")
    parser.add_argument("--head-init", default="mean", choices=("mean", "logprob"), help="extend's LM-head init (timed)")
    parser.add_argument("--tiny-vocab", action="store_true", help="the built-in tiny tokenizers and data (no assets; fast)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 peak, for MFU (default: known GPUs)")
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES,
                        help="stage2-4bit: stage 2 with --load-in-4bit (zhllama only; on CPU its refusal is checked)")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "train.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("BENCH_RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    cuda = torch.cuda.is_available()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="zhllama-bench-train-") as scratch:
        work = Path(scratch)
        inputs = ({"model": args.model, "corpus": args.corpus, "sft_data": args.sft_data} if args.model
                  else build_model(work, args.hidden, args.layers, args.shape, args.head_init, args.tiny_vocab))  # fmt: skip
        for stage in args.stages:
            for way in args.ways if stage != "stage2-4bit" else ["zhllama"]:
                spec = {**inputs, "way": way, "stage": stage, "steps": args.steps, "batch_size": args.batch_size,
                        "block_size": args.block_size, "gradient_checkpointing": args.gradient_checkpointing,
                        "cache_dir": str(work / "cache"), "peak_tflops": args.peak_tflops}  # fmt: skip
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True)
                lines = [l for l in done.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
                if stage == "stage2-4bit" and not cuda:
                    refusal = [l for l in done.stderr.splitlines() if l.startswith("zhllama: error: --load-in-4bit needs a CUDA GPU")]
                    if done.returncode == 0 or len(refusal) != 1:
                        raise SystemExit(f"stage2-4bit on CPU was not refused in one line:\n{done.stderr[-3000:]}")
                    rows.append({"way": way, "stage": stage, "refused": refusal[0]})
                    print(f"{stage} {way}: refused on CPU, as it must be: {refusal[0]}", file=sys.stderr, flush=True)
                    continue
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{way} {stage} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(lines[-1].removeprefix("BENCH_RESULT ")))
                for line in done.stderr.splitlines():  # the stages print their choice as a notice on stderr
                    if line.startswith("acceleration: "):
                        print(f"{stage} {way}: {line}", file=sys.stderr, flush=True)
                print(f"{stage} {way}: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows))
    settings = {k: getattr(args, k) for k in ("shape", "hidden", "layers", "steps", "batch_size", "block_size", "gradient_checkpointing", "model", "head_init")}
    settings["extend_s"] = inputs.get("extend_s")
    if "extend_s" in inputs:
        print(f"extend --head-init {args.head_init}: {inputs['extend_s']} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
