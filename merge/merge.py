"""``zhllama merge``: bake a base model plus an ordered adapter chain into one checkpoint.

The flow: check every input (directories, the base each adapter was made for, every adapter
tensor against the base tensor it changes) → plan the output shards → stream the base shard
by shard, applying each adapter's edits in chain order in fp32 → write config, tokenizer and
manifest → optionally verify against peft and export GGUF. Everything goes to a temporary
sibling of ``--out`` that is renamed only at the end.

Peak memory is one base shard (read through a memory map) plus the adapters plus one tensor
in fp32: the output is streamed to disk tensor by tensor (see :mod:`zhllama.merge.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from zhllama.chain import (
    DTYPES,
    TOKENIZER_FILES,
    ModelChain,
    check_adapter_base,
    check_tokenizer_fits,
    check_adapter_dir,
    check_model_dir,
    model_fingerprint,
    tokenizer_dir_of,
    torch_dtype,
)
from zhllama.errors import ZhllamaError
from zhllama.merge.adapters import Adapter, fit_to_base, read_adapter
from zhllama.merge.checkpoint import (
    EMBEDDING,
    OUTPUT_EMBEDDING,
    Checkpoint,
    ShardWriter,
    TensorInfo,
    drop_from_page_cache,
    parse_size,
    plan_shards,
    read_config,
    tied_embeddings,
    write_config,
    write_index,
)
from zhllama.merge.gguf_export import OUTTYPES
from zhllama.args import OutputArgs
from zhllama.options import option
from zhllama.outdir import atomic_output_dir, check_output_target, copy_files
from zhllama.provenance import read_manifest, write_manifest



@dataclass(kw_only=True)
class MergeOptions(OutputArgs):
    """Options of ``zhllama merge``."""

    # merge reads the chain tensor by tensor instead of loading it (ChainArgs.load), so it
    # declares its own model/adapter fields; --dtype here is the output's, not a load dtype
    model: Path = option(help="base model directory the adapters were trained on (e.g. the output of zhllama extend)")
    adapter: list[Path] = option(help="adapter directory, in chain order (repeat: --adapter stage1 --adapter stage2 --adapter sft)")
    dtype: str | None = option(None, choices=DTYPES, help="dtype of the merged weights (default: the base model's)")
    max_shard_size: str = option("2GB", help="largest output shard, e.g. 2GB, 500MB, 1GiB")
    verify: bool = option(False, help="compare the merged model's logits with the base + adapter chain through peft's LoRA layers (layer by layer)")
    device: str = option("cpu", help="device of --verify's layer-by-layer passes (cuda: one layer on the GPU at a time)")
    gguf: Path | None = option(None, help="also write a GGUF file for llama.cpp here")
    gguf_outtype: str = option("auto", choices=tuple(OUTTYPES), help="type of the GGUF file's matrices (as export gguf --outtype)")
    overwrite: bool = option(False, help="replace --out (and --gguf) if they exist")
    allow_base_mismatch: bool = option(False, help="merge adapters recorded as trained on another base anyway")

    def problems(self) -> list[str]:
        problems = []
        if not self.adapter:
            problems.append("--adapter: give at least one adapter directory")
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            problems.append(f"--max-shard-size: {e}")
        if self.gguf_outtype not in OUTTYPES:
            problems.append(f"--gguf-outtype must be one of {', '.join(OUTTYPES)} (got {self.gguf_outtype!r})")
        if self.gguf is not None and self.gguf.suffix != ".gguf":
            problems.append(f"--gguf: '{self.gguf}' should end in .gguf")
        if self.gguf is not None and self.gguf.exists() and not self.overwrite:
            problems.append(f"--gguf: {self.gguf} exists; pass --overwrite to replace it")
        return problems


@dataclass
class MergeResult:
    out: Path
    shards: list[str]
    tensors: int
    max_logit_diff: float | None
    gguf: Path | None


def _base_dtype(config: dict) -> str:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float16").removeprefix("torch.")
    return name if name in DTYPES else "float16"


def _check_tokenizer(tokenizer_dir: Path, rows: int, model_dir: Path) -> None:
    model_file = tokenizer_dir / "tokenizer.model"
    if not model_file.is_file():
        return
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    check_tokenizer_fits(
        pieces, rows, tokenizer=model_file, model=model_dir, fix="the adapter was made for another extended model; pass the model it was trained on"
    )


def prepare(options: MergeOptions) -> tuple[Checkpoint, list[Adapter], bool, str]:
    """Every check merge makes before writing a byte; returns the base, the fitted adapters, tying and fingerprint."""
    model_dir = check_model_dir(options.model)
    adapter_dirs = [check_adapter_dir(a) for a in options.adapter]
    fingerprint = model_fingerprint(model_dir)
    for adapter_dir in adapter_dirs:
        check_adapter_base(adapter_dir, fingerprint, model_dir, options.allow_base_mismatch)
    base = Checkpoint(model_dir)
    base.check_shapes(read_config(model_dir))
    tied = tied_embeddings(base, read_config(model_dir))
    if EMBEDDING not in base.tensors:
        raise ZhllamaError(f"{model_dir}: no {EMBEDDING}; merge handles LLaMA-architecture checkpoints")
    shapes = {name: info.shape for name, info in base.tensors.items()}
    aliases = {OUTPUT_EMBEDDING: EMBEDDING} if tied else {}
    adapters = []
    for adapter_dir in adapter_dirs:
        adapter = read_adapter(adapter_dir)
        fit_to_base(adapter, shapes, aliases, model_dir)
        adapters.append(adapter)
    _check_tokenizer(tokenizer_dir_of(model_dir, adapter_dirs), shapes[EMBEDDING][0], model_dir)
    return base, adapters, tied, fingerprint


def _all_finite(tensor: torch.Tensor) -> bool:
    # min and max are NaN if any value is, and ±inf if any value is: one pass, no bool copy
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _merge_tensor(name: str, tensor: torch.Tensor, adapters: list[Adapter], dtype: torch.dtype, *, base_fp32: dict | None = None) -> torch.Tensor:
    """Apply every adapter's edits of ``name`` in chain order (in fp32), then cast to ``dtype``.

    ``base_fp32``: a dict that receives the unedited fp32 copy of the base tensor, when one is
    made (``--verify``'s chain runs on it instead of converting the base a second time)."""
    if not tensor.is_floating_point():
        return tensor
    chain = [(adapter, [e for e in adapter.edits if e.target == name]) for adapter in adapters]
    chain = [(adapter, edits) for adapter, edits in chain if edits]
    if not chain:
        return tensor.to(dtype)
    if tensor.dim() == 2 and all(e.kind == "lora" for _, edits in chain for e in edits):
        return _merge_lora_blocks(name, tensor, chain, dtype, base_fp32)
    weight = None
    for adapter, edits in chain:
        keep = weight is None and base_fp32 is not None
        if weight is None:
            weight = tensor.to(torch.float32, copy=True)
            if keep:
                base_fp32[name] = weight
        for edit in sorted(edits, key=lambda e: ("replace", "lora", "rows").index(e.kind)):
            weight = edit.apply(weight, in_place=not keep)
            keep = False
        if not _all_finite(weight):
            raise _non_finite(adapter, name)
    merged = weight.to(dtype)
    if dtype.itemsize < 4 and not _all_finite(merged):
        raise _overflow(name, dtype)
    return merged


# rows of a matrix merged at a time: the fp32 block stays in the CPU cache from the base's copy
# through every LoRA update and the check to the cast, instead of several passes over a whole
# fp32 matrix in memory
BLOCK_ROWS = 64


def _merge_lora_blocks(name: str, tensor: torch.Tensor, chain: list[tuple[Adapter, list]], dtype: torch.dtype, base_fp32: dict | None) -> torch.Tensor:
    """:func:`_merge_tensor` for a matrix that only LoRAs change: W + Σ s·B@A, a block of rows at a time."""
    rows, columns = tensor.shape
    factors = [(adapter, [edit.lora_factors() for edit in edits]) for adapter, edits in chain]
    merged = torch.empty(tensor.shape, dtype=dtype)
    block = torch.empty(min(BLOCK_ROWS, rows), columns, dtype=torch.float32)
    base = None
    if base_fp32 is not None:  # --verify's fp32 copy of the base, filled block by block on the way
        base = base_fp32[name] = torch.empty(tensor.shape, dtype=torch.float32)
    largest = torch.finfo(dtype).max
    for start in range(0, rows, BLOCK_ROWS):
        span = slice(start, start + BLOCK_ROWS)
        part = block[: min(BLOCK_ROWS, rows - start)]
        source = tensor[span]
        if base is not None:
            source = base[span].copy_(source)
        part.copy_(source)
        for _, loras in factors:
            _add_loras(part, loras, span)
        low, high = (v.item() for v in torch.aminmax(part))
        if not (math.isfinite(low) and math.isfinite(high)):  # which adapter did it: the block again, one by one
            part.copy_(source)
            for adapter, loras in factors:
                _add_loras(part, loras, span)
                if not bool(torch.isfinite(part).all()):
                    break
            raise _non_finite(adapter, name)
        if max(-low, high) > largest:
            raise _overflow(name, dtype)
        merged[span].copy_(part)
    return merged


def _add_loras(part: torch.Tensor, loras: list[tuple[torch.Tensor, torch.Tensor, float]], span: slice) -> None:
    for left, right, scaling in loras:
        part.addmm_(left[span], right, alpha=scaling)


def _non_finite(adapter: Adapter, name: str) -> ZhllamaError:
    return ZhllamaError(f"adapter {adapter.directory} makes {name} non-finite (NaN/inf); the adapter is broken")


def _overflow(name: str, dtype: torch.dtype) -> ZhllamaError:
    return ZhllamaError(f"{name}: merged values overflow {str(dtype).removeprefix('torch.')}; choose --dtype bfloat16 or float32")


@contextlib.contextmanager
def _core_left_for_the_writer() -> Iterator[None]:
    """torch on one thread fewer: merge (and verify) compute while the shard writer hashes and
    writes on another core, where torch's idle threads would otherwise spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_shards(base: Checkpoint, adapters: list[Adapter], tied: bool, dtype: torch.dtype, max_bytes: int, out: Path, verifier=None) -> dict[str, str]:
    """Merge and write every shard; each merged tensor also goes to ``verifier`` (``--verify``) once written."""
    from tqdm import tqdm

    def out_dtype(info: TensorInfo) -> torch.dtype:
        return dtype if info.dtype.is_floating_point else info.dtype

    wanted = [
        TensorInfo(info.name, info.shape, out_dtype(info))
        for info in base.tensors.values()
        if not (tied and info.name == OUTPUT_EMBEDDING)  # tied: lm_head is the embedding, stored once
    ]
    shards = plan_shards(wanted, max_bytes)
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    writers: dict[int, ShardWriter] = {}
    hashes: dict[str, str] = {}
    try:
        with _core_left_for_the_writer(), tqdm(total=len(wanted), desc="merging", unit="tensor", file=sys.stderr) as progress:
            # the disk reads ahead and a worker hashes and writes, while this thread merges (and verifies)
            for name, tensor in base.iter_tensors(stream=True):
                if name not in shard_of:
                    continue
                index = shard_of[name]
                if index not in writers:
                    writers[index] = ShardWriter(out / shards[index].filename, shards[index], background=True)
                writer = writers[index]
                base_fp32 = {} if verifier is not None and verifier.keeps(name) else None
                writer.write(name, _merge_tensor(name, tensor, adapters, out_dtype(base.tensors[name]), base_fp32=base_fp32))
                if verifier is not None:
                    info = base.tensors[name]
                    written = (writer.ranges[name], TensorInfo(name, info.shape, out_dtype(info)), lambda w=writer, n=name: w.wait(n))
                    verifier.add(name, (base_fp32 or {}).pop(name, tensor), *written)
                del tensor
                if not writer.expected:
                    hashes[shards[index].filename] = writers.pop(index).close()
                    # out of the page cache, each shard written that verify has read back, at every
                    # close: the pages flushed to the disk since the last call go too
                    for filename in hashes:
                        if verifier is None or verifier.done_with(out / filename):
                            drop_from_page_cache(out / filename)
                progress.update()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    write_index(out, shards)
    return hashes


def _sft_template(adapters: list[Adapter]) -> str | None:
    """The prompt template the last SFT adapter of the chain recorded (so ``zhllama chat`` can use it)."""
    template = None
    for adapter in adapters:
        manifest = read_manifest(adapter.directory) or {}
        template = manifest.get("template") or manifest.get("options", {}).get("template") or template
    return template


def _gguf_target(options: MergeOptions, out: Path) -> Path | None:
    if options.gguf is None:
        return None
    target = options.gguf.expanduser().resolve()
    if not target.is_relative_to(out.resolve()) and not (target.parent.is_dir() and os.access(target.parent, os.W_OK)):
        raise ZhllamaError(f"--gguf: directory {target.parent} does not exist or is not writable")
    return target


def _write_manifest(tmp: Path, options: MergeOptions, base: Checkpoint, adapters: list[Adapter], **facts) -> None:
    model_dir = base.model_dir
    fingerprint, tied = facts.pop("fingerprint"), facts["tied_embeddings"]
    base_figures = (read_manifest(model_dir) or {}).get("figures", {})
    chain = ModelChain(
        model=None, tokenizer=None, model_dir=model_dir, adapters=[a.directory for a in adapters],
        tokenizer_dir=facts.pop("tokenizer_dir"), fingerprint=fingerprint,
    )
    write_manifest(
        tmp,
        command="merge",
        options=options,
        inputs={"model": {"path": str(model_dir.resolve()), "fingerprint": fingerprint}, "adapters": [a.directory for a in adapters]},
        figures={
            "vocab_size": base.tensors[EMBEDDING].shape[0],
            "base_vocab_size": base_figures.get("base_vocab_size"),  # rows before `zhllama extend`, for eval
            "tensors": len(base.tensors) - int(tied and OUTPUT_EMBEDDING in base.tensors),
            "edits": [
                {"adapter": str(a.directory), "lora": sum(e.kind == "lora" for e in a.edits), "rows": len(a.changed_rows),
                 "replaced": sum(e.kind == "replace" for e in a.edits)}
                for a in adapters
            ],
            "max_logit_diff": facts.pop("max_logit_diff"),
            "logit_tolerance": facts.pop("tolerance"),
            "seconds": facts.pop("seconds"),
        },
        chain=chain.describe(),
        outputs={name: {"sha256": digest} for name, digest in facts.pop("hashes").items()},
        template=_sft_template(adapters),
        **facts,
    )


def merge_chain(options: MergeOptions) -> MergeResult:
    """Bake a base model and an ordered chain of peft adapters into one checkpoint, shard by shard.

    Writes safetensors shards (+ index), config.json with the right vocab size,
    generation_config.json, the chain's tokenizer and zhllama.json; with ``verify`` compares the
    logits with the peft chain; with ``gguf`` also writes a llama.cpp GGUF file (to a temporary
    name beside it, renamed with the output directory).
    """
    started = time.time()
    out = check_output_target(options.out, options.overwrite)
    gguf_target = _gguf_target(options, out)
    base, adapters, tied, fingerprint = prepare(options)
    model_dir = base.model_dir
    dtype_name = options.dtype or _base_dtype(read_config(model_dir))
    tokenizer_dir = tokenizer_dir_of(model_dir, [a.directory for a in adapters])
    max_logit_diff = tolerance = None
    gguf_tmp = None
    try:
        with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
            write_config(model_dir, tmp, dtype_name, base.tensors[EMBEDDING].shape[0])
            verifier = None
            if options.verify:  # runs as the shards are written (see merge/verify.py)
                from zhllama.merge.verify import Verifier

                verifier = Verifier(tmp, model_dir, adapters, dtype_name, tokenizer_dir, device=options.device)
            hashes = _write_shards(base, adapters, tied, torch_dtype(dtype_name), parse_size(options.max_shard_size), tmp, verifier)
            copy_files(TOKENIZER_FILES, tokenizer_dir, tmp)
            if verifier is not None:
                max_logit_diff, tolerance = verifier.finish()
            if gguf_target is not None:
                from zhllama.merge.gguf_export import export_gguf

                inside = gguf_target.is_relative_to(out.resolve())  # --gguf OUT/model.gguf goes with the directory
                gguf_tmp = tmp / gguf_target.relative_to(out.resolve()) if inside else gguf_target.with_name(f".{gguf_target.name}.tmp-{os.getpid()}")
                gguf_tmp.parent.mkdir(parents=True, exist_ok=True)
                export_gguf(tmp, gguf_tmp, name=out.name, outtype=options.gguf_outtype)
                gguf_tmp = None if inside else gguf_tmp
            _write_manifest(
                tmp, options, base, adapters, fingerprint=fingerprint, tokenizer_dir=tokenizer_dir, hashes=hashes,
                max_logit_diff=max_logit_diff, tolerance=tolerance, seconds=round(time.time() - started, 2),
                tied_embeddings=tied, dtype=dtype_name, gguf=str(gguf_target) if gguf_target else None,
            )
    except BaseException:
        if gguf_tmp is not None:
            gguf_tmp.unlink(missing_ok=True)
        raise
    if gguf_tmp is not None:
        gguf_tmp.replace(gguf_target)
    print(f"merged {len(adapters)} adapter(s) into {out} ({len(hashes)} shard(s), {dtype_name})", file=sys.stderr)
    return MergeResult(out, sorted(hashes), len(base.tensors), max_logit_diff, gguf_target)
