"""Model surgery: resize a LLaMA checkpoint's embeddings to a merged tokenizer and initialise
the new rows.

The merged tokenizer keeps the base pieces at ids 0..N-1 (``zhllama vocab merge`` guarantees
it; :func:`check_extends` re-checks), so the base rows stay where they are, bit for bit, and
only rows N.. are new. How they start is pretrain/init.py's and pretrain/stage0.py's business: by default
(``subword-mean``) a new input row is the mean of the rows of the pieces the *base* tokenizer
splits its text into, and on an untied model its LM-head row carries the base model's
probability of the piece's text (``--head-init logprob``). Given a sample of the new language
(``--init-corpus``), a short stage 0 then trains only the new rows on the model's next-token
loss over that sample. The matrices are padded to a multiple of 64 rows
(faster matmuls, tensor-parallel friendly); padding rows are set to the mean of the base
LM-head rows, which lies inside the convex hull of the real rows, so a padding logit is an
average of real logits and can never be the largest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.args import CorpusArgs, OutputArgs
from zhllama.chain import TOKENIZER_FILES, check_model_dir, embeddings_tied, load_tokenizer, model_fingerprint
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_dir, check_output_target, copy_files
from zhllama.provenance import write_manifest
from zhllama.pretrain.init import fill_padding_rows, init_head_logprob, init_subword_mean, subword_ids
from zhllama.pretrain.stage0 import Stage0Settings, train_new_rows

INIT_METHODS = ("subword-mean", "mean", "random")
HEAD_INIT_METHODS = ("logprob", "mean")


@dataclass(kw_only=True)
class ExtendOptions(CorpusArgs, OutputArgs):
    model: Path = option(help="base model directory (Hugging Face LLaMA checkpoint with its tokenizer.model)")
    tokenizer: Path = option(help="merged tokenizer directory written by 'zhllama vocab merge'")
    init: str = option(
        "subword-mean",
        choices=INIT_METHODS,
        help="new rows: mean of the base pieces the text splits into; transformers' mean/covariance; or random",
    )
    head_init: str = option(
        "logprob",
        choices=HEAD_INIT_METHODS,
        help="with --init subword-mean and untied embeddings, LM-head rows of new pieces: 'logprob' makes "
        "each new piece's logit the base model's log-probability of its text; 'mean' averages the head rows like the input side",
    )
    init_corpus: list[str] = option(
        default_factory=list,
        help="text in the new language (file, directory or glob; repeat the flag): with --init subword-mean, "
        "a short stage 0 trains the new rows on the model's next-token loss over it (absent: no stage 0)",
    )
    init_steps: int = option(300, help="stage-0 steps over --init-corpus")
    init_batch_size: int = option(8, help="stage-0 blocks per step")
    init_block_size: int = option(128, help="stage-0 tokens of the merged tokenizer per block")
    init_blocks: int = option(2048, help="most blocks of --init-corpus stage 0 reads (a slice of them is held out to pick the step kept)")
    init_replay: int = option(
        64, help="stage 0 also reads this many texts the base model writes itself, so that what it already writes keeps its probability (0: none)"
    )
    device: str = option("auto", help="device for the base-model passes of the initialisation (auto: cuda when available)")
    pad_to_multiple_of: int = option(64, help="round the number of embedding rows up to a multiple of this (1: no padding)")
    seed: int = option(0, help="random seed for --init mean and random, and stage 0's order")
    max_shard_size: str | None = option(None, help="largest output shard, e.g. 2GB (default: the base model's sharding)")

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.init not in INIT_METHODS:
            found.append(f"--init must be one of {', '.join(INIT_METHODS)} (got {self.init!r})")
        if self.head_init not in HEAD_INIT_METHODS:
            found.append(f"--head-init must be one of {', '.join(HEAD_INIT_METHODS)} (got {self.head_init!r})")
        at_least(found, "--pad-to-multiple-of", self.pad_to_multiple_of, 1)
        at_least(found, "--init-steps", self.init_steps, 0)
        at_least(found, "--init-batch-size", self.init_batch_size, 1)
        at_least(found, "--init-block-size", self.init_block_size, 3)
        at_least(found, "--init-blocks", self.init_blocks, 1)
        at_least(found, "--init-replay", self.init_replay, 0)
        if self.init_corpus and self.init != "subword-mean":
            found.append(f"--init-corpus trains the rows --init subword-mean starts; drop it or use that init (got --init {self.init})")
        if self.max_shard_size is not None:
            from zhllama.merge.checkpoint import parse_size

            try:
                parse_size(self.max_shard_size)
            except ValueError as error:
                found.append(f"--max-shard-size: {error}")
        if self.device != "auto":
            import torch

            try:
                torch.empty(0, device=self.device)
            except (RuntimeError, AssertionError) as error:  # torch raises either for a bad or absent device
                found.append(f"--device {self.device}: not usable here ({str(error).splitlines()[0][:120]})")
        return found


@dataclass
class ExtendResult:
    """What ``extend`` wrote and the figures it recorded in zhllama.json."""

    out: Path
    figures: dict = field(default_factory=dict)

    def summary(self) -> str:
        f = self.figures
        line = (
            f"extended {f['base_model_rows']} to {f['embedding_rows']} rows ({f['new_rows']} new, "
            f"{f['padding_rows']} padding, init {f['init']}"
            + (f", head {f['head_init']}" if f.get("head_init") else "")
            + ")"
        )
        if f.get("stage0_steps"):
            line += (
                f"; stage 0: {f['stage0_steps']} steps on {f['stage0_tokens']:,} tokens of --init-corpus, "
                f"held-out loss {f['stage0_held_out_nll_start']:.3f} -> {f['stage0_held_out_nll_kept']:.3f}, "
                f"on the base's own text {f['stage0_replay_nll_start']:.3f} -> {f['stage0_replay_nll_kept']:.3f} "
                f"(step {f['stage0_kept_step']} kept)"
            )
        elif f.get("init") == "subword-mean":
            line += "; no --init-corpus: closed-form start, no stage 0"
        return f"{line} ({f['seconds']:.0f}s) -> {self.out}"


def check_extends(base_proto, merged_proto, *, model_dir: Path, tokenizer_dir: Path) -> None:
    """The merged tokenizer must hold the base pieces, unchanged, at ids 0..N-1."""
    base = [p.piece for p in base_proto.pieces]
    merged = [p.piece for p in merged_proto.pieces]
    if len(merged) < len(base):
        raise ZhllamaError(
            f"tokenizer {tokenizer_dir} has {len(merged)} pieces, fewer than the {len(base)} of model {model_dir}'s "
            "tokenizer; it does not extend it (make it with 'zhllama vocab merge --base MODEL_DIR')"
        )
    for i, (a, b) in enumerate(zip(base, merged)):
        if a != b:
            raise ZhllamaError(
                f"tokenizer {tokenizer_dir} does not extend model {model_dir}'s tokenizer: piece {i} is {b!r}, "
                f"the model's is {a!r}; merge into the model's own tokenizer with 'zhllama vocab merge --base {model_dir}'"
            )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device  # checked by ExtendOptions.problems


def read_init_corpus(options: ExtendOptions) -> list[str]:
    from zhllama.corpus import iter_documents

    return list(iter_documents(options.init_corpus, **options.corpus_kwargs()))


def extend_model(options: ExtendOptions) -> ExtendResult:
    """Resize a model's embeddings and LM head to a merged tokenizer and initialise the new rows
    (with stage 0 when ``--init-corpus`` is given); write the extended model, its
    tokenizer and zhllama.json to --out."""
    import torch

    from zhllama.pretrain.surgery import load_vocab_model, new_rows_of, write_extended
    from zhllama.vocab.spmodel import load_sp_proto, processor_from_proto

    started = time.perf_counter()
    model_dir = check_model_dir(options.model)
    check_output_target(options.out, options.overwrite)
    base_proto = load_sp_proto(model_dir, role="model")
    merged_proto = load_sp_proto(options.tokenizer, role="tokenizer")
    check_extends(base_proto, merged_proto, model_dir=model_dir, tokenizer_dir=options.tokenizer)
    tokenizer = load_tokenizer(options.tokenizer)
    if len(tokenizer) != len(merged_proto.pieces):
        raise ZhllamaError(
            f"{options.tokenizer}: tokenizer.json has {len(tokenizer)} tokens but tokenizer.model has "
            f"{len(merged_proto.pieces)}; rewrite the directory with 'zhllama vocab merge'"
        )
    sample = read_init_corpus(options) if options.init_corpus else []
    if options.init_corpus and not sample:
        raise ZhllamaError(f"--init-corpus {' '.join(options.init_corpus)}: no documents found; give a file of text in the new language")
    base_size, tokenizer_size = len(base_proto.pieces), len(merged_proto.pieces)

    try:
        model = load_vocab_model(model_dir)
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"{model_dir}: cannot load model: {' '.join(str(e).split())}") from e
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < base_size:
        raise ZhllamaError(f"{model_dir}: the model has {old_rows} embedding rows but its tokenizer has {base_size} pieces")
    tied = embeddings_tied(model)
    multiple = options.pad_to_multiple_of
    rows = max(old_rows, math.ceil(tokenizer_size / multiple) * multiple)
    device = resolve_device(options.device)

    head_init = options.head_init if options.init == "subword-mean" and not tied else None
    splits = subword_ids(base_proto, merged_proto) if options.init == "subword-mean" else []
    head_rows, head_figures = None, {}
    if head_init == "logprob":
        head_rows, head_figures = init_head_logprob(
            model, splits, base_size, bos_id=base_proto.trainer_spec.bos_id, device=device
        )

    torch.manual_seed(options.seed)
    model.resize_token_embeddings(rows, mean_resizing=options.init == "mean")
    matrices = [model.get_input_embeddings().weight]
    if not tied:
        matrices.append(model.get_output_embeddings().weight)
    unsplit = 0
    if options.init == "subword-mean":
        # the fitted head rows replace the head's mean rows: average only what keeps them
        for matrix in matrices if head_rows is None else matrices[:1]:
            unsplit = init_subword_mean(matrix, splits, base_size)
    if head_rows is not None:
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head[base_size:tokenizer_size] = head_rows.to(head.dtype)
    stage0_figures = {}
    if sample and options.init_steps:
        settings = Stage0Settings(
            steps=options.init_steps,
            batch_size=options.init_batch_size,
            block_size=options.init_block_size,
            max_blocks=options.init_blocks,
            replay_sequences=options.init_replay,
            seed=options.seed,
        )
        stage0_figures = train_new_rows(
            model, base_size, tokenizer_size, sample, processor_from_proto(merged_proto), settings, tied=tied, device=device
        )
    for matrix in matrices:
        fill_padding_rows(matrix, tokenizer_size, base_size)

    figures = {
        "base_vocab_size": base_size,
        "tokenizer_size": tokenizer_size,
        "new_rows": tokenizer_size - base_size,
        "padding_rows": rows - tokenizer_size,
        "embedding_rows": rows,
        "base_model_rows": old_rows,
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "tied_embeddings": tied,
        "init": options.init,
        "head_init": head_init,
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }
    if splits:
        figures["mean_base_pieces_per_new_row"] = round(sum(map(len, splits)) / len(splits), 3)
        figures["new_rows_without_split"] = unsplit
    figures.update(head_figures)
    figures.update(stage0_figures)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    inputs = {
        # hashing every byte of a large checkpoint would take minutes: record its fingerprint
        "model": {"path": str(model_dir.resolve()), "fingerprint": model_fingerprint(model_dir)},
        "tokenizer": options.tokenizer,
    }
    if options.init_corpus:
        from zhllama.corpus import find_corpus_files

        inputs["init_corpus"] = find_corpus_files(options.init_corpus)
    with atomic_output_dir(options.out, overwrite=options.overwrite) as out_dir:
        write_extended(model_dir, out_dir, new_rows_of(model, old_rows), max_shard_size=options.max_shard_size)
        copy_files(TOKENIZER_FILES, options.tokenizer, out_dir)
        write_manifest(out_dir, command="extend", options=options, inputs=inputs, figures=figures)
    return ExtendResult(out=options.out, figures=figures)
