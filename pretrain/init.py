"""How ``zhllama extend`` starts the rows of new pieces in closed form, from the base model alone.

An input row is the mean of the rows of the base pieces the piece's text splits into
(``subword-mean``); on an untied model its LM-head row carries the base model's probability of
the piece's text (``--head-init logprob``, :func:`init_head_logprob`). Given a sample of the new
language, pretrain/stage0.py then trains these rows further.
"""

from __future__ import annotations

# How --head-init logprob turns the base model's log-probability c of a new piece's text (after
# its first base piece) into the piece's logit offset: max(SCALE * c, FLOOR) + LIFT.
# LIFT: the base byte pieces keep their rows and hence their share of the softmax, so without a
# lift the new pieces would split the probability of Chinese text with byte pieces the merged
# tokenizer no longer emits; exp(2) = 7.4 gives the new pieces ~88% of that share.
# SCALE and FLOOR shrink the offsets: exact offsets make rows ~3x the base rows' norm, which
# stage 1 then moves slowly. Chosen on the "fit" bases of bench/init.py (docs/pretrain.md).
HEAD_LOGPROB_SCALE = 0.75
HEAD_LOGPROB_FLOOR = -8.0
HEAD_LIFT = 2.0


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
    """Padding rows = the mean of the base rows: never the largest logit (see pretrain/extend.py)."""
    import torch

    with torch.no_grad():
        matrix[first_padding_row:] = matrix[:base_rows].float().mean(dim=0).to(matrix.dtype)


def base_model_pass(model, input_ids, attention_mask):
    """The base model's final hidden states (batch x length x hidden, float32) for a batch of
    base-vocabulary ids; no gradient.

    Every teacher computation of the initialisation goes through here and needs nothing else of
    the model but its LM-head rows, so this one function can be replaced by a pass that streams
    the decoder layers one at a time for models larger than memory."""
    import torch

    with torch.no_grad():
        return model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()


def padded(sequences: list[list[int]], device):
    """(ids, mask) tensors, right-padded with zeros."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def init_head_logprob(model, splits: list[list[int]], base_rows: int, *, bos_id: int, device: str):
    """LM-head rows for the new pieces that give each one the base model's probability of its text.

    The base model spells a new piece p as base pieces f, r1, r2, ...; its probability there is
    P(f | context) * P(r1 r2 ... | f). The first factor is the logit of f's head row; the second
    is measured once per piece with the base model (BOS + the spelling, a pass over every new
    piece) as the log-probability c_p. A bias-free LM head cannot add a per-piece constant, so it
    is carried by a direction u with h·u ≈ 1 for the base model's final hidden states h (ridge
    regression over the hidden states of that same pass). Row p = row(f) + offset(c_p)·u, with
    offset(c) = max(HEAD_LOGPROB_SCALE·c, HEAD_LOGPROB_FLOOR) + HEAD_LIFT (see those constants).

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
    prefix = [bos_id] if bos_id >= 0 else []
    # a batch's log-softmax is tokens x base vocabulary floats: 2048 x 32000 x 4 B = 256 MiB
    batches, batch, tokens_per_batch = [], [], 2048
    for i in order:
        if batch and (len(batch) + 1) * (len(splits[i]) + len(prefix)) > tokens_per_batch:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    was_training = model.training
    model.eval()
    start = len(prefix)
    for batch in tqdm(batches, desc="head rows: base model over the new pieces", unit="batch"):
        ids, mask = padded([prefix + splits[i] for i in batch], device)
        states = base_model_pass(model, ids, mask)
        logprobs = (states @ base_head.T).log_softmax(-1)
        for row, i in enumerate(batch):
            n = len(splits[i])
            if n > 1:
                # position t predicts piece t+1: the pieces after the first, from the first on
                targets = ids[row, start + 1 : start + n]
                at = torch.arange(start, start + n - 1, device=device)
                rest_logprob[i] = logprobs[row, at, targets].sum().cpu()
        # the BOS position is the same in every sequence: leave it out of the fit
        real = states[:, start:][mask[:, start:].bool()].double()
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
