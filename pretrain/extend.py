"""Model surgery: resize a LLaMA checkpoint's embeddings to a merged tokenizer and initialise
the new rows.

The merged tokenizer keeps the base pieces at ids 0..N-1 (``zhllama vocab merge`` guarantees
it; :func:`check_extends` re-checks), so the base rows stay where they are, bit for bit, and
only rows N.. are new. By default (``subword-mean``) a new row starts as the mean of the rows
of the pieces the *base* tokenizer splits its text into: the model then reads "中国" roughly
the way it read the byte or character pieces it used to see, and the loss at step 0 on Chinese
text stays near the base model's. The matrices are padded to a multiple of 64 rows (faster
matmuls, tensor-parallel friendly); padding rows are set to the mean of the base LM-head rows,
which lies inside the convex hull of the real rows, so a padding logit is an average of real
logits and can never be the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from zhllama.chain import TOKENIZER_FILES, check_model_dir, embeddings_tied, load_tokenizer, model_fingerprint
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, check, option
from zhllama.outdir import atomic_output_dir, check_output_target, copy_files, write_manifest

INIT_METHODS = ("subword-mean", "mean", "random")


@dataclass
class ExtendOptions:
    model: Path = option(help="base model directory (Hugging Face LLaMA checkpoint with its tokenizer.model)")
    tokenizer: Path = option(help="merged tokenizer directory written by 'zhllama vocab merge'")
    out: Path = option(help="output directory for the extended model")
    init: str = option(
        "subword-mean",
        choices=INIT_METHODS,
        help="new rows: mean of the base pieces the text splits into; transformers' mean/covariance; or random",
    )
    pad_to_multiple_of: int = option(64, help="round the number of embedding rows up to a multiple of this (1: no padding)")
    seed: int = option(0, help="random seed for --init mean and random")
    overwrite: bool = option(False, help="replace an existing output directory")

    def __post_init__(self):
        self.model, self.tokenizer, self.out = Path(self.model), Path(self.tokenizer), Path(self.out)
        problems = []
        if self.init not in INIT_METHODS:
            problems.append(f"--init must be one of {', '.join(INIT_METHODS)} (got {self.init!r})")
        at_least(problems, "--pad-to-multiple-of", self.pad_to_multiple_of, 1)
        check(problems)


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


def base_splitter(base_proto):
    """A SentencePiece processor that splits a piece's surface text with the base vocabulary.

    The dummy prefix and whitespace clean-up are switched off so "▁中国" is split as exactly
    those characters (a leading ▁ included) rather than as the start of a new sentence.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from zhllama.vocab.spmodel import processor_from_proto

    proto = model_pb2.ModelProto()
    proto.CopyFrom(base_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return processor_from_proto(proto)


def subword_ids(base_proto, merged_proto) -> list[list[int]]:
    """For each new piece, the base ids its text splits into (empty when it has no text)."""
    from zhllama.vocab.spmodel import piece_text

    splitter = base_splitter(base_proto)
    return [
        splitter.encode(piece_text(merged_proto.pieces[i].piece))
        for i in range(len(base_proto.pieces), len(merged_proto.pieces))
    ]


def init_subword_mean(matrix, splits: list[list[int]], base_rows: int) -> int:
    """Set rows base_rows.. of ``matrix`` to the mean of their split pieces' rows; returns how many
    pieces had no split and took the mean of all base rows instead."""
    import torch

    with torch.no_grad():
        base = matrix[:base_rows].float()
        fallback = base.mean(dim=0)
        unsplit = 0
        for offset, ids in enumerate(splits):
            if ids:
                row = base[torch.tensor(ids)].mean(dim=0)
            else:
                row, unsplit = fallback, unsplit + 1
            matrix[base_rows + offset] = row.to(matrix.dtype)
    return unsplit


def fill_padding_rows(matrix, first_padding_row: int, base_rows: int) -> None:
    """Padding rows = the mean of the base rows: never the largest logit (see the module doc)."""
    import torch

    with torch.no_grad():
        matrix[first_padding_row:] = matrix[:base_rows].float().mean(dim=0).to(matrix.dtype)


def extend_model(options: ExtendOptions) -> Path:
    """Resize a model's embeddings and LM head to a merged tokenizer and initialise the new rows;
    write the extended model, its tokenizer and zhllama.json to --out.

    Returns the output directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from zhllama.vocab.spmodel import load_sp_proto

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
    base_size, tokenizer_size = len(base_proto.pieces), len(merged_proto.pieces)

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"{model_dir}: cannot load model: {' '.join(str(e).split())}") from e
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < base_size:
        raise ZhllamaError(f"{model_dir}: the model has {old_rows} embedding rows but its tokenizer has {base_size} pieces")
    tied = embeddings_tied(model)
    multiple = options.pad_to_multiple_of
    rows = max(old_rows, math.ceil(tokenizer_size / multiple) * multiple)

    torch.manual_seed(options.seed)
    model.resize_token_embeddings(rows, mean_resizing=options.init == "mean")
    matrices = [model.get_input_embeddings().weight]
    if not tied:
        matrices.append(model.get_output_embeddings().weight)
    unsplit, split_lengths = 0, []
    if options.init == "subword-mean":
        splits = subword_ids(base_proto, merged_proto)
        split_lengths = [len(ids) for ids in splits]
        for matrix in matrices:
            unsplit = init_subword_mean(matrix, splits, base_size)
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
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
    }
    if split_lengths:
        figures["mean_base_pieces_per_new_row"] = round(sum(split_lengths) / len(split_lengths), 3)
        figures["new_rows_without_split"] = unsplit
    with atomic_output_dir(options.out, overwrite=options.overwrite) as out_dir:
        model.save_pretrained(str(out_dir))
        copy_files(TOKENIZER_FILES, options.tokenizer, out_dir)
        write_manifest(
            out_dir,
            command="extend",
            options=options,
            inputs={
                # hashing every byte of a large checkpoint would take minutes: record its fingerprint
                "model": {"path": str(model_dir.resolve()), "fingerprint": model_fingerprint(model_dir)},
                "tokenizer": options.tokenizer,
            },
            figures=figures,
        )
    print(
        f"extended {model_dir} from {old_rows} to {rows} rows ({figures['new_rows']} new, "
        f"{figures['padding_rows']} padding, init {options.init}) -> {options.out}"
    )
    return options.out
