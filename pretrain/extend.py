"""Model surgery: resize a LLaMA checkpoint's embeddings to a merged tokenizer and initialise
the new rows.

The merged tokenizer keeps the base pieces at ids 0..N-1 (``zhllama vocab merge`` guarantees
it; :func:`check_extends` re-checks), so the base rows stay where they are, bit for bit, and
only rows N.. are new. By default (``subword-mean``) a new row starts as the mean of the rows
of the pieces the *base* tokenizer splits its text into: the model then reads "中国" roughly
the way it read the byte or character pieces it used to see. On an untied model the LM-head
row of a new piece is instead fitted so that its logit carries the base model's probability of
the piece's text (``--head-init logprob``, :func:`init_head_logprob`): averaging head rows
would give thousands of pieces the same logit. The loss at step 0 on Chinese text then stays
near the base model's. The matrices are padded to a multiple of 64 rows (faster
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
HEAD_INIT_METHODS = ("logprob", "mean")
# How --head-init logprob turns the base model's log-probability c of a new piece's text (after
# its first base piece) into the piece's logit offset: max(SCALE * c, FLOOR) + LIFT.
# LIFT: the base byte pieces keep their rows and hence their share of the softmax, so without a
# lift the new pieces would split the probability of Chinese text with byte pieces the merged
# tokenizer no longer emits; exp(2) = 7.4 gives the new pieces ~88% of that share.
# SCALE and FLOOR: the exact offsets (1.0, no floor) start best (bits per character at step 0
# +0.2% over the base model on bench/init.py) but make rows ~3x the base rows' norm, which
# stage 1 then moves slowly; shrinking them starts at +2.4% and trains level with the averaged head
# (docs/pretrain.md has the table).
HEAD_LOGPROB_SCALE = 0.75
HEAD_LOGPROB_FLOOR = -8.0
HEAD_LIFT = 2.0


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
    head_init: str = option(
        "logprob",
        choices=HEAD_INIT_METHODS,
        help="with --init subword-mean and untied embeddings, LM-head rows of new pieces: 'logprob' makes "
        "each new piece's logit the base model's log-probability of its text; 'mean' averages the head rows like the input side",
    )
    device: str = option("auto", help="device for the base-model pass of --head-init logprob (auto: cuda when available)")
    pad_to_multiple_of: int = option(64, help="round the number of embedding rows up to a multiple of this (1: no padding)")
    seed: int = option(0, help="random seed for --init mean and random")
    max_shard_size: str | None = option(None, help="largest output shard, e.g. 2GB (default: the base model's sharding)")
    overwrite: bool = option(False, help="replace an existing output directory")

    def __post_init__(self):
        self.model, self.tokenizer, self.out = Path(self.model), Path(self.tokenizer), Path(self.out)
        problems = []
        if self.init not in INIT_METHODS:
            problems.append(f"--init must be one of {', '.join(INIT_METHODS)} (got {self.init!r})")
        if self.head_init not in HEAD_INIT_METHODS:
            problems.append(f"--head-init must be one of {', '.join(HEAD_INIT_METHODS)} (got {self.head_init!r})")
        at_least(problems, "--pad-to-multiple-of", self.pad_to_multiple_of, 1)
        if self.max_shard_size is not None:
            from zhllama.merge.checkpoint import parse_size

            try:
                parse_size(self.max_shard_size)
            except ValueError as error:
                problems.append(f"--max-shard-size: {error}")
        if self.device != "auto":
            import torch

            try:
                torch.empty(0, device=self.device)
            except (RuntimeError, AssertionError) as error:  # torch raises either for a bad or absent device
                problems.append(f"--device {self.device}: not usable here ({str(error).splitlines()[0][:120]})")
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


def init_head_logprob(model, splits: list[list[int]], base_rows: int, *, bos_id: int, device: str):
    """LM-head rows for the new pieces that give each one the base model's probability of its text.

    The base model spells a new piece p as base pieces f, r1, r2, ...; its probability there is
    P(f | context) * P(r1 r2 ... | f). The first factor is the logit of f's head row; the second
    is measured once per piece with the base model (BOS + the spelling, a pass over every new
    piece) as the log-probability c_p. A bias-free LM head cannot add a per-piece constant, so it
    is carried by a direction u with h·u ≈ 1 for the base model's final hidden states h (ridge
    regression over the hidden states of that same pass). Row p = row(f) + offset(c_p)·u, with
    offset(c) = max(HEAD_LOGPROB_SCALE·c, HEAD_LOGPROB_FLOOR) + HEAD_LIFT (see those constants).
    Averaging head rows instead (``--head-init mean``) gives thousands of pieces that share a
    UTF-8 lead byte nearly the same, too high, logit: bits per character at step 0 ~20% above the
    base model's on bench/init.py, against ~3% with this.

    Call it before resizing: the pass scores the base vocabulary only. Returns the rows (new
    pieces x hidden, float32) and figures about the fit."""
    import torch
    from tqdm.auto import tqdm

    model.to(device)
    base_head = model.get_output_embeddings().weight[:base_rows].detach().float()
    hidden = base_head.shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
    moment = torch.zeros(hidden, dtype=torch.float64, device=device)
    rest_logprob = torch.zeros(len(splits))
    positions = 0
    order = sorted((i for i, ids in enumerate(splits) if ids), key=lambda i: len(splits[i]))
    # BOS gives every spelling the context a document start has; a base without BOS starts bare
    prefix = 1 if bos_id >= 0 else 0
    # a batch's log-softmax is tokens x base vocabulary floats: 2048 x 32000 x 4 B = 256 MiB
    batches, batch, tokens_per_batch = [], [], 2048
    for i in order:
        if batch and (len(batch) + 1) * (len(splits[i]) + prefix) > tokens_per_batch:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in tqdm(batches, desc="head rows: base model over the new pieces", unit="batch"):
            length = max(len(splits[i]) for i in batch) + prefix
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.long)
            for row, i in enumerate(batch):
                if prefix:
                    ids[row, 0] = bos_id
                ids[row, prefix : len(splits[i]) + prefix] = torch.tensor(splits[i])
                mask[row, : len(splits[i]) + prefix] = 1
            ids, mask = ids.to(device), mask.to(device)
            states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            logprobs = (states @ base_head.T).log_softmax(-1)
            for row, i in enumerate(batch):
                n = len(splits[i])
                if n > 1:
                    # position t predicts piece t+1: the pieces after the first, from the first on
                    targets = ids[row, prefix + 1 : prefix + n]
                    at = torch.arange(prefix, prefix + n - 1, device=device)
                    rest_logprob[i] = logprobs[row, at, targets].sum().cpu()
            # the BOS position is the same in every sequence: leave it out of the fit
            real = states[:, prefix:][mask[:, prefix:].bool()].double()
            gram += real.T @ real
            moment += real.sum(dim=0)
            positions += len(real)
    model.train(was_training)
    # ridge: (H^T H + lambda I) u = H^T 1, lambda = 1% of the mean squared hidden coordinate times
    # the number of positions, so that u stays short where h has little constant component
    ridge = 0.01 * gram.diagonal().mean()
    direction = torch.linalg.solve(gram + ridge * torch.eye(hidden, dtype=torch.float64, device=device), moment)
    fitted = float(direction @ moment / positions)
    direction = direction.float().cpu()
    base_head = base_head.cpu()
    rows = base_head.mean(dim=0).repeat(len(splits), 1)
    for i in order:
        offset = max(HEAD_LOGPROB_SCALE * float(rest_logprob[i]), HEAD_LOGPROB_FLOOR) + HEAD_LIFT
        rows[i] = base_head[splits[i][0]] + offset * direction
    model.to("cpu")
    return rows, {
        "head_fit_positions": positions,
        "head_direction_mean_dot": round(fitted, 4),
        "head_mean_rest_logprob": round(float(rest_logprob[order].mean()), 3) if order else 0.0,
        "head_row_norm_ratio": round(float(rows.norm(dim=1).mean() / base_head.norm(dim=1).mean()), 3),
    }


def fill_padding_rows(matrix, first_padding_row: int, base_rows: int) -> None:
    """Padding rows = the mean of the base rows: never the largest logit (see the module doc)."""
    import torch

    with torch.no_grad():
        matrix[first_padding_row:] = matrix[:base_rows].float().mean(dim=0).to(matrix.dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device  # checked by ExtendOptions.validate


def extend_model(options: ExtendOptions) -> Path:
    """Resize a model's embeddings and LM head to a merged tokenizer and initialise the new rows;
    write the extended model, its tokenizer and zhllama.json to --out.

    Returns the output directory."""
    import torch

    from zhllama.pretrain.surgery import load_vocab_model, new_rows_of, write_extended
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
        model = load_vocab_model(model_dir)
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"{model_dir}: cannot load model: {' '.join(str(e).split())}") from e
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < base_size:
        raise ZhllamaError(f"{model_dir}: the model has {old_rows} embedding rows but its tokenizer has {base_size} pieces")
    tied = embeddings_tied(model)
    multiple = options.pad_to_multiple_of
    rows = max(old_rows, math.ceil(tokenizer_size / multiple) * multiple)

    head_init = options.head_init if options.init == "subword-mean" and not tied else None
    splits = subword_ids(base_proto, merged_proto) if options.init == "subword-mean" else []
    head_rows, head_figures = None, {}
    if head_init == "logprob":
        head_rows, head_figures = init_head_logprob(
            model, splits, base_size, bos_id=base_proto.trainer_spec.bos_id, device=resolve_device(options.device)
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
    with atomic_output_dir(options.out, overwrite=options.overwrite) as out_dir:
        write_extended(model_dir, out_dir, new_rows_of(model, old_rows), max_shard_size=options.max_shard_size)
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
