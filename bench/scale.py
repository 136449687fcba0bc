"""Benchmark: every offline step on LLaMA-2-7B and 13B shaped checkpoints, memory and time per step.

For each shape (and checkpoint format) it writes a random bf16 checkpoint with the real 32k
LLaMA tokenizer, in shards of --shard-size, tensor by tensor (safetensors) or one shard at a
time (``.bin``), then runs each step as its own process:

- ``zhllama vocab merge`` (the real Chinese SentencePiece model added);
- ``zhllama extend --head-init mean`` (the logprob head's base-model pass is the training
  engineer's GPU measurement: hours on two CPU cores), then checks every tensor but the
  embedding and head bit-identical to the base, and the base rows of those too;
- a random rank-8 LoRA on every projection, then ``zhllama merge --verify``;
- ``zhllama export gguf --outtype bf16``.

While a step runs its /proc/PID/status is read every 0.1 s: peak RssAnon (the process's own
memory) and RssFile (mapped files, which the kernel can drop and re-read); getrusage gives the
bytes it really read from and wrote to the disk, and the load average is recorded before and
after it. The disk's own speed is measured before each step by copying the largest shard of its
input to a fresh file, cold: the source dropped from the page cache first (POSIX_FADV_DONTNEED),
the copy fsynced and dropped after; the step's input is dropped too, so neither is flattered by
pages a previous step left cached. Goal per step: RssAnon under 3 x the largest shard + the new
embedding and head + 1 GiB, and wall time under 3 x the time of reading and writing the step's
bytes once at that copy speed. Every file it writes is deleted as soon as no later step needs
it; ``df`` is checked before each step and the run stops cleanly if the disk is too full (or on
SIGTERM).

    .venv/bin/python bench/scale.py --shape 7b --format safetensors [--shape 13b --format bin ...]

Prints a table and writes bench/out/scale.json (its rows for what was measured replaced, the
others kept). ``--steps verify`` (or ``vocab,extend,verify,gguf``, comma-separated) measures only
those steps; the ones a measured step needs still run, unmeasured. ``--shape tiny`` runs the same steps on a toy
shape in seconds (to check the script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ASSETS = REPO.parent / "shared" / "assets"
LLAMA_TOKENIZER = ASSETS / "tokenizers" / "llama" / "tokenizer.model"
CHINESE_SP = ASSETS / "tokenizers" / "chinese-llama" / "chinese_sp.model"
GIB = 2**30
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class DiskFull(RuntimeError):
    pass


def llama_config(shape: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
        "num_key_value_heads": SHAPES[shape]["num_attention_heads"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
        **SHAPES[shape],
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """LLaMA's tensors in the order transformers saves them."""
    h, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        shapes += [(p + m + ".weight", (inner, h) if m in ("mlp.gate_proj", "mlp.up_proj") else (h, inner) if m == "mlp.down_proj" else (h, h)) for m in LINEAR]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def write_checkpoint(out: Path, shape: str, shard_bytes: int, fmt: str) -> Path:
    """A random bf16 LLaMA checkpoint with the real tokenizer, written without holding the model."""
    import torch

    from zhllama.merge.checkpoint import ShardWriter, TensorInfo, plan_shards
    from zhllama.vocab.hf import save_hf_tokenizer

    out.mkdir(parents=True)
    config = llama_config(shape)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(LLAMA_TOKENIZER, out / "tokenizer.model")
    save_hf_tokenizer(out / "tokenizer.model", out)
    generator = torch.Generator().manual_seed(0)

    def make(name: str, dims: tuple[int, ...]) -> torch.Tensor:
        if len(dims) == 1:
            return torch.ones(dims, dtype=torch.bfloat16)
        return torch.empty(dims, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    shards = plan_shards([TensorInfo(n, s, torch.bfloat16) for n, s in tensor_shapes(config)], shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        if fmt == "safetensors":
            writer = ShardWriter(out / shard.filename, shard)
            for info in shard.tensors:
                writer.write(info.name, make(info.name, info.shape))
            writer.close()
            name = shard.filename
        else:  # torch.save needs the shard's dict: one shard in memory at a time
            name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            torch.save({info.name: make(info.name, info.shape) for info in shard.tensors}, out / name)
        weight_map.update({info.name: name for info in shard.tensors})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(s.nbytes for s in shards)
    (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def write_lora(base: Path, out: Path, rank: int = 8) -> Path:
    """A random rank-r LoRA on every projection of ``base``, saved as peft saves one."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from zhllama.chain import model_fingerprint
    from zhllama.provenance import write_manifest

    config = json.loads((base / "config.json").read_text())
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[m.split(".")[1] for m in LINEAR]).save_pretrained(str(out))
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, dims in tensor_shapes(config):
        if len(dims) == 2 and "layers" in name:
            stem = "base_model.model." + name.removesuffix(".weight")
            tensors[stem + ".lora_A.weight"] = torch.randn(rank, dims[1], generator=generator) / math.sqrt(dims[1])
            tensors[stem + ".lora_B.weight"] = torch.randn(dims[0], rank, generator=generator) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"))
    write_manifest(out, command="pretrain", options={}, chain={"model_fingerprint": model_fingerprint(base)})
    return out


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def largest_file(path: Path) -> int:
    return max(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))


def check_disk(work: Path, needed: int, margin: int = 3 * GIB) -> None:
    free = shutil.disk_usage(work).free
    if free < needed + margin:
        raise DiskFull(f"only {free / GIB:.1f} GiB free on {work}, the next step needs {needed / GIB:.1f} GiB + {margin / GIB:.0f}")


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of ``path`` (a file, or every file under a directory),
    so the next read of it comes from the disk, as it would after a reboot."""
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped: write them first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_speed(source: Path, work: Path) -> float:
    """Bytes per second of reading and writing a file once: ``source`` dropped from the page cache
    first (read from the disk), a fresh target fsynced and dropped after (written to the disk)."""
    target = work / "copy-speed.tmp"
    target.unlink(missing_ok=True)
    drop_cache(source)
    started = time.perf_counter()
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    drop_cache(target)
    target.unlink()
    return source.stat().st_size / seconds


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Step:
    shape: str
    fmt: str
    name: str
    wall_s: float
    cpu_s: float  # user + system: on a shared machine the wall time also holds others' load
    rss_anon_gib: float
    rss_file_gib: float
    read_bytes: int
    written_bytes: int
    anon_goal_gib: float
    time_goal_s: float | None  # None: the step moves too few bytes for the disk to be its limit
    disk_read_bytes: int  # what the kernel really read from / wrote to the disk for it (getrusage blocks)
    disk_written_bytes: int
    load_before: list[float]  # os.getloadavg(): 1, 5, 15 minutes
    load_after: list[float]

    def row(self) -> str:
        anon = "ok" if self.rss_anon_gib <= self.anon_goal_gib else "OVER"
        wall = "n/a" if self.time_goal_s is None else f"{'ok' if self.wall_s <= self.time_goal_s else 'OVER'}, goal {self.time_goal_s:.0f}"
        return (f"| {self.shape} | {self.fmt} | {self.name} | {self.wall_s:.0f} s ({wall}) | {self.cpu_s:.0f} s | "
                f"{self.rss_anon_gib:.2f} GiB ({anon}, goal {self.anon_goal_gib:.1f}) | {self.rss_file_gib:.2f} GiB | "
                f"{self.disk_read_bytes / GIB:.1f} / {self.disk_written_bytes / GIB:.1f} GiB | "
                f"{self.load_before[0]:.1f} → {self.load_after[0]:.1f} |")


def _sample(pid: int, peaks: dict, done: threading.Event) -> None:
    while not done.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        except (OSError, ValueError):
            pass
        done.wait(0.1)


RUNNING: list[subprocess.Popen] = []  # the step in progress, stopped with the benchmark


def _stop(signum, frame) -> None:
    for proc in RUNNING:
        proc.terminate()
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through the clean-up below


def run_step(argv: list[str], log) -> tuple[float, float, dict]:
    """Run ``python -m zhllama ARGV``; its wall time, CPU time and peaks: RssAnon/RssFile, and the
    bytes it read from and wrote to the disk (``DiskRead``/``DiskWritten``, from getrusage's blocks)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "zhllama", *argv], stdout=log, stderr=log, env=env)
    RUNNING[:] = [proc]
    peaks, done = {}, threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, done), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    RUNNING.clear()
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"zhllama {' '.join(argv)} exited {code}; see the log")
    peaks["DiskRead"], peaks["DiskWritten"] = usage.ru_inblock * 512, usage.ru_oublock * 512
    return wall, usage.ru_utime + usage.ru_stime, peaks


def check_identical(base: Path, extended: Path) -> dict:
    """Every base tensor bit-identical in the extended checkpoint (the vocabulary matrices: their base rows)."""
    import torch

    from zhllama.merge.checkpoint import Checkpoint

    new = Checkpoint(extended)
    same = differ = 0
    for name, tensor in Checkpoint(base).iter_tensors():
        other = new.read([name])[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            other = other[: tensor.shape[0]]
        if other.shape == tensor.shape and torch.equal(other.view(torch.int16), tensor.view(torch.int16)):
            same += 1
        else:
            differ += 1
    return {"identical_tensors": same, "differing_tensors": differ}


STEPS = {"vocab": "vocab merge", "extend": "extend", "verify": "merge --verify", "gguf": "export gguf bf16"}


def bench_shape(shape: str, fmt: str, work: Path, shard_bytes: int, results: list, facts: dict, log, steps: set[str] = frozenset(STEPS)) -> None:
    root = work / f"{shape}-{fmt}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base, tokenizer, extended, lora, merged, gguf = (root / n for n in ("base", "tokenizer", "extended", "lora", "merged", "model.gguf"))
    config = llama_config(shape)
    model_bytes = sum(math.prod(s) * 2 for _, s in tensor_shapes(config))
    key = f"{shape}-{fmt}"
    try:
        check_disk(work, model_bytes)
        started = time.perf_counter()
        write_checkpoint(base, shape, shard_bytes, fmt)
        facts[key] = {"write_checkpoint_s": round(time.perf_counter() - started, 1), "model_gib": round(du(base) / GIB, 2)}
        shard = largest_file(base)
        facts[key]["copy_mb_s"] = {}

        def step(name: str, argv: list[str], read: int, written_of, new_matrices: int = 0) -> None:
            if name not in {STEPS[s] for s in steps}:  # not measured, only run for the steps after it
                run_step(argv, log)
                return
            # the disk's speed just before the step (the machine is shared: it varies); the step's
            # input is dropped from the page cache like the copy's, so both read from the disk
            speed = None
            if read > GIB:
                source = Path(argv[argv.index("--model") + 1])
                speed = copy_speed(max((p for p in source.iterdir() if p.suffix in (".safetensors", ".bin")), key=lambda p: p.stat().st_size), work)
                facts[key]["copy_mb_s"][name] = round(speed / 1e6)
                drop_cache(source)
            before = load()
            wall, cpu, peaks = run_step(argv, log)
            written = written_of()
            goal_anon = (3 * shard + new_matrices + GIB) / GIB
            results.append(Step(shape, fmt, name, round(wall, 1), round(cpu, 1), round(peaks.get("RssAnon", 0) / GIB, 2),
                                round(peaks.get("RssFile", 0) / GIB, 2), read, written, round(goal_anon, 2),
                                round(3 * (read + written) / (2 * speed), 1) if speed else None,
                                peaks["DiskRead"], peaks["DiskWritten"], before, load()))
            print(results[-1].row(), flush=True)

        step("vocab merge", ["vocab", "merge", "--base", str(base), "--add", str(CHINESE_SP), "--out", str(tokenizer)], 0, lambda: du(tokenizer))
        check_disk(work, model_bytes)
        rows = json.loads((tokenizer / "zhllama.json").read_text()).get("figures", {}).get("merged_pieces") or 50000
        new_matrices = 2 * math.ceil(rows / 64) * 64 * config["hidden_size"] * 2
        step("extend", ["extend", "--model", str(base), "--tokenizer", str(tokenizer), "--out", str(extended), "--head-init", "mean"],
             du(base), lambda: du(extended), new_matrices)
        if "extend" in steps:
            facts[key].update(check_identical(base, extended))
            facts[key]["extended_shards"] = sorted(p.name for p in extended.glob("*.safetensors"))
            print(f"{key}: unchanged tensors {facts[key]}", flush=True)
        shutil.rmtree(base)
        if fmt == "bin" or not steps & {"verify", "gguf"}:
            return  # the .bin run measures the conversion; the later steps read safetensors either way
        write_lora(extended, lora)
        check_disk(work, du(extended))
        # the base once (verify runs on the merge's stream) and its embedding and head again (the chain's)
        step("merge --verify", ["merge", "--model", str(extended), "--adapter", str(lora), "--out", str(merged), "--verify"],
             du(extended) + new_matrices, lambda: du(merged), new_matrices)
        if "verify" in steps:
            manifest = json.loads((merged / "zhllama.json").read_text())
            facts[key]["verify_max_logit_diff"] = manifest["figures"]["max_logit_diff"]
            facts[key]["verify_tolerance"] = manifest["figures"]["logit_tolerance"]
        shutil.rmtree(extended)
        if "gguf" not in steps:
            return
        check_disk(work, du(merged))
        step("export gguf bf16", ["export", "gguf", "--model", str(merged), "--out", str(gguf), "--outtype", "bf16"],
             du(merged), lambda: du(gguf))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def merged_results(earlier: dict, results: list[Step], facts: dict) -> dict:
    """The results file with this run's rows in place of the same shape, format and step's old
    ones (in the old order, new ones after) and its facts over the old ones of each shape."""
    new = {(s.shape, s.fmt, s.name): vars(s) for s in results}
    rows = [new.pop((r["shape"], r["fmt"], r["name"]), r) for r in earlier.get("steps", [])] + list(new.values())
    def over(old: dict, new: dict) -> dict:  # nested dicts (each step's copy speed) merged too
        return {**old, **{k: over(old.get(k) or {}, v) if isinstance(v, dict) else v for k, v in new.items()}}

    return {"steps": rows, "facts": over(earlier.get("facts", {}), facts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeat; pairs with --format)")
    parser.add_argument("--format", action="append", choices=("safetensors", "bin"), help="checkpoint format of each --shape")
    parser.add_argument("--shard-size", default="2GiB", help="base checkpoint shard size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/zhllama-scale"), help="scratch directory (deleted)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"steps to measure, comma-separated ({', '.join(STEPS)}); the steps a later one needs still run, unmeasured")
    parser.add_argument("--json", type=Path, default=HERE / "out" / "scale.json",
                        help="results file; rows of the shapes, formats and steps measured now replace their old rows, the others stay")
    args = parser.parse_args()
    import signal

    signal.signal(signal.SIGTERM, _stop)
    shapes = args.shape or ["7b"]
    formats = args.format or ["safetensors"] * len(shapes)
    if len(formats) != len(shapes):
        parser.error("give one --format per --shape")
    from zhllama.merge.checkpoint import parse_size

    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        parser.error(f"--steps: unknown {', '.join(sorted(steps - set(STEPS)))}; choose from {', '.join(STEPS)}")
    shard_bytes = parse_size(args.shard_size) if not shapes == ["tiny"] else 2 * 10**6
    args.work.mkdir(parents=True, exist_ok=True)
    results: list[Step] = []
    facts: dict = {}
    earlier = json.loads(args.json.read_text()) if args.json.is_file() else {"steps": [], "facts": {}}
    status = 0
    with open(args.work / "steps.log", "a") as log:
        print("| shape | format | step | wall time | CPU time | peak RssAnon | peak RssFile | disk read / written | load (1 min) before → after |\n"
              "|---|---|---|---|---|---|---|---|---|", flush=True)
        for shape, fmt in zip(shapes, formats):
            try:
                bench_shape(shape, fmt, args.work, shard_bytes, results, facts, log, steps)
            except (DiskFull, RuntimeError) as error:
                print(f"{shape}-{fmt}: stopped: {error}", flush=True)
                status = 1
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(merged_results(earlier, results, facts), indent=2) + "\n")
    print(json.dumps(facts, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
