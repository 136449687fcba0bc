"""The family of base models bench/init.py extends: trained once, cached by their settings.

Each base is a small LLaMA trained from scratch on 红楼梦 (all but the held-out paragraphs at the
end of the book) through its tokenizer's byte fallback, or the real stories260K. A trained base
is saved under ``CACHE/<name>-<hash of its settings>/`` with ``train_log.json`` (the held-out
loss curve, so one can see whether it flattened); a rerun with the same settings loads it.

Run alone to train (or check) the whole family:  .venv/bin/python bench/init_bases.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TOKENIZERS = {
    "llama32k": ASSETS / "tokenizers" / "llama" / "tokenizer.model",
    "sp512": ASSETS / "models" / "stories260K" / "tokenizer.model",
}
STORIES260K = ASSETS / "models" / "stories260K"
DEFAULT_CACHE = Path.home() / ".cache" / "zhllama" / "bench-init"
HELD_OUT_PARAGRAPHS = 200


@dataclass(frozen=True)
class BaseSpec:
    """How one base of the family is built (every field is part of its cache key)."""

    name: str
    tokenizer: str  # a key of TOKENIZERS
    hidden: int
    layers: int
    steps: int
    block_size: int
    batch_size: int
    learning_rate: float = 3e-3
    seed: int = 0
    # "fit": constants of the method were chosen on it; "report": only measured
    role: str = "report"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


FAMILY = (
    BaseSpec("llama32k-h128-l2-s100", "llama32k", hidden=128, layers=2, steps=100, block_size=128, batch_size=8, role="fit"),
    BaseSpec("sp512-h64-l2-s100", "sp512", hidden=64, layers=2, steps=100, block_size=128, batch_size=8, role="fit"),
    # the held-out style of issue 14: hidden 128, 4 layers, GQA, context 1024, 1,500 steps
    BaseSpec("sp512-h128-l4-s1500", "sp512", hidden=128, layers=4, steps=1500, block_size=256, batch_size=4),
    BaseSpec("llama32k-h64-l4-s1000", "llama32k", hidden=64, layers=4, steps=1000, block_size=128, batch_size=4),
)


def hongloumeng() -> tuple[list[str], list[str]]:
    """红楼梦 paragraphs (one document each): training part and the held-out end of the book."""
    text = (ASSETS / "corpora" / "zh" / "hongloumeng.txt").read_text(encoding="utf-8")
    paragraphs = [line.strip() for line in text.splitlines() if len(line.strip()) >= 20]
    return paragraphs[:-HELD_OUT_PARAGRAPHS], paragraphs[-HELD_OUT_PARAGRAPHS:]


def tokenizer_dir(cache: Path, name: str) -> Path:
    """A directory holding the base tokenizer and its exact HF files."""
    from zhllama.vocab.hf import save_hf_tokenizer

    out = cache / f"tokenizer-{name}"
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TOKENIZERS[name], out / "tokenizer.model")
        save_hf_tokenizer(out / "tokenizer.model", out)
    return out


def token_blocks(sp, texts: list[str], block_size: int):
    import torch

    ids: list[int] = []
    for line in sp.encode(texts):
        ids += [sp.bos_id(), *line, sp.eos_id()]
    return torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)


def held_out_loss(model, blocks) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = sum(float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks) / len(blocks)
    model.train()
    return loss


def train_base(spec: BaseSpec, cache: Path, log=print) -> Path:
    """The trained base of ``spec`` (trained now unless cached)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    from zhllama.demo import tiny
    from zhllama.outdir import copy_files

    out = cache / f"{spec.name}-{spec.key()}"
    if (out / "train_log.json").is_file():
        return out
    tokenizers = tokenizer_dir(cache, spec.tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizers / "tokenizer.model"))
    train, held_out = hongloumeng()
    blocks = token_blocks(sp, train, spec.block_size)
    eval_blocks = token_blocks(sp, held_out, spec.block_size)[:16]
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(tiny.tiny_llama_config(sp.get_piece_size(), hidden_size=spec.hidden, layers=spec.layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(spec.seed)
    curve, started = [], time.perf_counter()
    every = max(1, spec.steps // 10)
    for step in range(spec.steps):
        batch = blocks[torch.randint(len(blocks), (spec.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if (step + 1) % every == 0 or step + 1 == spec.steps:
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4), "held_out_loss": round(held_out_loss(model, eval_blocks), 4)})
            log(f"{spec.name}: step {step + 1}/{spec.steps} {curve[-1]} {time.perf_counter() - started:.0f}s")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    copy_files(["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"], tokenizers, tmp)
    record = {"spec": asdict(spec), "seconds": round(time.perf_counter() - started, 1), "curve": curve}
    (tmp / "train_log.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def stories260k(cache: Path) -> Path:
    """The real stories260K with the exact HF tokenizer files beside it (it ships tokenizer.model only)."""
    from zhllama.vocab.hf import save_hf_tokenizer

    out = cache / "stories260K"
    if not (out / "tokenizer.json").is_file():
        tmp = cache / "stories260K.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(STORIES260K, tmp)
        save_hf_tokenizer(tmp / "tokenizer.model", tmp)
        tmp.rename(out)
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", nargs="*", default=None, help="names of the bases to train")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for spec in FAMILY:
        if args.only is None or spec.name in args.only:
            print(f"{spec.name}: {train_base(spec, args.cache_dir, log=lambda m: print(m, flush=True))}", flush=True)


if __name__ == "__main__":
    main()
