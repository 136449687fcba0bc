"""Benchmark: `zhllama merge` (streaming, shard by shard) vs peft's merge_and_unload on the whole model.

Builds a random LLaMA of about 1 GB in fp32 saved in 100 MB shards and a rank-8 LoRA on every
linear layer, then runs, each in its own process (peak RSS from wait4's rusage):

- `zhllama merge --model BASE --adapter LORA --out OUT --dtype float32 --max-shard-size 100MB`
- the usual way: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
- `zhllama merge --help` and a process that only imports torch/transformers/peft: each side's
  RSS before it does any work (the interpreter and libraries), subtracted to get its working set

and checks the two merged checkpoints hold the same tensors. Goal: zhllama's working set under
3 x the largest shard + the adapter, and no slower than peft. Each command runs --rounds times,
interleaved (the machine may be shared); medians of wall and CPU time are reported.

    .venv/bin/python bench/merge.py [--workdir DIR] [--keep]

Prints a table and writes bench/out/merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARD = "100MB"
SHARD_BYTES = 100 * 10**6

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="%s")
""" % SHARD

IMPORTS_ONLY = "import torch, transformers, peft, safetensors"


def build_inputs(work: Path) -> tuple[Path, Path]:
    """A random ~1 GB fp32 LLaMA in 100 MB shards, and a rank-8 LoRA on all its linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.demo.tiny import write_base_tokenizer

    base, adapter = work / "base", work / "lora"
    if (base / "tokenizer.model").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(base), max_shard_size=SHARD)
    write_base_tokenizer(base)  # a model directory carries its tokenizer (1000 pieces fit 32000 rows)
    lora = LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False,  # random B too, so the delta is not zero
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    get_peft_model(model, lora).save_pretrained(str(adapter))
    return base, adapter


def measure(argv: list[str]) -> dict:
    """Run ``argv``; wall seconds and the child's peak RSS (MB, from wait4)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{stderr.decode(errors='replace')[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def summarize(runs: list[dict]) -> dict:
    """Median wall and CPU time, highest peak RSS, over repeated runs."""
    def median(key):
        values = sorted(r[key] for r in runs)
        return round(values[len(values) // 2], 2)

    return {"seconds": median("seconds"), "cpu_seconds": median("cpu_seconds"),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1), "runs": len(runs)}


def same_tensors(a: Path, b: Path) -> float:
    """Max |difference| between two checkpoints' tensors (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def locate(directory: Path) -> dict[str, Path]:
        found = {}
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                found.update({k: path for k in fh.keys()})
        return found

    left, right = locate(a), locate(b)
    if left.keys() != right.keys():
        sys.exit(f"the merged checkpoints hold different tensors: {sorted(left.keys() ^ right.keys())[:5]}")
    worst = 0.0
    for name in left:
        with safe_open(str(left[name]), framework="pt") as fa, safe_open(str(right[name]), framework="pt") as fb:
            worst = max(worst, (fa.get_tensor(name) - fb.get_tensor(name)).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the model (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each command (medians are reported)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_inputs(args.workdir)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="zhllama-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # built in a child process: a forked child's peak RSS counts the parent's memory at fork
        # time, so this process must stay small while it measures
        subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(work)], check=True)
        base, adapter = work / "base", work / "lora"
        shards = sorted(base.glob("*.safetensors"))
        model_mb = sum(p.stat().st_size for p in shards) / 1e6
        shard_mb = max(p.stat().st_size for p in shards) / 1e6
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
        zhllama = Path(sys.executable).with_name("zhllama")
        commands = {
            "imports": [sys.executable, "-c", IMPORTS_ONLY],
            "startup": [str(zhllama), "merge", "--help"],
            "zhllama": [str(zhllama), "merge", "--model", str(base), "--adapter", str(adapter), "--out", str(work / "merged_zhllama"),
                        "--dtype", "float32", "--max-shard-size", SHARD, "--overwrite"],
            "peft": [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "merged_peft")],
        }
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for round_ in range(args.rounds):  # interleaved, so load from other processes hits both alike
            for name, argv in commands.items():
                runs[name].append(measure(argv))
                print(f"round {round_ + 1}: {name} {runs[name][-1]['seconds']:.1f} s", file=sys.stderr)
        imports, startup, ours, theirs = (summarize(runs[name]) for name in commands)
        max_diff = same_tensors(work / "merged_zhllama", work / "merged_peft")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    budget_mb = 3 * shard_mb + adapter_mb
    result = {
        "model_mb": round(model_mb, 1),
        "largest_shard_mb": round(shard_mb, 1),
        "adapter_mb": round(adapter_mb, 1),
        "imports_only": imports,
        "zhllama_startup": startup,
        "zhllama_merge": ours,
        "peft_merge_and_unload": theirs,
        "zhllama_rss_above_startup_mb": round(ours["peak_rss_mb"] - startup["peak_rss_mb"], 1),
        "peft_rss_above_imports_mb": round(theirs["peak_rss_mb"] - imports["peak_rss_mb"], 1),
        "goal_rss_mb": round(budget_mb, 1),
        "max_abs_diff_vs_peft": max_diff,
        "command": f"HF_HUB_OFFLINE=1 .venv/bin/python bench/merge.py --rounds {args.rounds}",
        "cpu_threads": os.cpu_count(),
    }
    result["memory_goal_met"] = result["zhllama_rss_above_startup_mb"] < budget_mb
    result["speed_goal_met"] = ours["seconds"] <= theirs["seconds"]
    import platform

    result["load_average_after"] = os.getloadavg()
    result["machine"] = platform.platform()
    rows = [  # (label, figures, the process's RSS before it does any work)
        ("imports only (torch, transformers, peft)", imports, imports),
        ("zhllama merge --help (startup)", startup, startup),
        ("zhllama merge (streaming)", ours, startup),
        ("peft merge_and_unload + save_pretrained", theirs, imports),
    ]
    print(f"model {model_mb:.0f} MB fp32 in {len(shards)} shards (largest {shard_mb:.0f} MB), rank-8 LoRA {adapter_mb:.1f} MB")
    print(f"{'median of ' + str(args.rounds) + ' runs':44} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12} {'above startup':>14}")
    for label, figures, startup_figures in rows:
        print(f"{label:44} {figures['seconds']:>8.1f} {figures['cpu_seconds']:>7.1f} {figures['peak_rss_mb']:>12.0f} "
              f"{figures['peak_rss_mb'] - startup_figures['peak_rss_mb']:>14.0f}")
    print(f"goal: RSS above startup < 3 x largest shard + adapter = {budget_mb:.0f} MB -> {'met' if result['memory_goal_met'] else 'NOT met'}; "
          f"no slower than peft -> {'met' if result['speed_goal_met'] else 'NOT met'}")
    print(f"max |merged zhllama - merged peft| = {max_diff:.3g}")
    print(f"reproduce: {result['command']}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "merge.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
