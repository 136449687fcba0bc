"""How ``zhllama extend`` starts the rows of new pieces: closed-form starts and a distillation stage 0.

Closed form (no data): an input row is the mean of the rows of the base pieces the piece's text
splits into (``subword-mean``); on an untied model its LM-head row carries the base model's
probability of the piece's text (``--head-init logprob``, :func:`init_head_logprob`).

Stage 0 (``--init-corpus``, :func:`distil_new_rows`): the base model reads a Chinese sample in its
own tokenization once (the teacher, :func:`base_model_pass`); then only the new rows train, for a
few hundred small steps, so that the extended model predicts what the base predicted: the
distribution of the next *base* piece (the first piece of the next text, whatever new piece
starts with it) and, within the pieces that start with that base piece, the base model's
probability that the text goes on as the new piece says. No data label enters the loss, only the
base model's predictions, so the extended model learns to read and write what the base knew, not
more; the sample's text only chooses, on a slice held out from training, which step's rows to
keep (the closed-form start included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
# Stage 0: Adam's step is about lr per coordinate, so the rate is a fraction of the base rows'
# root-mean-square coordinate (a 7B's rows are ~0.02 per coordinate, a tiny model's ~1); the
# number of teacher top pieces kept per position. Chosen on the "fit" bases of bench/init.py.
DISTIL_LR_PER_RMS = 0.05
DISTIL_TOP_K = 64


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


@dataclass
class DistilSettings:
    """Stage 0 of ``extend``: how much of the sample, how many steps, of what size."""

    steps: int
    batch_size: int
    block_size: int  # merged-vocabulary tokens per block (BOS included)
    max_blocks: int
    seed: int = 0


def spell(ids: list[int], splits: list[list[int]], base_rows: int, unk_id: int) -> tuple[list[int], list[int]]:
    """Merged ids written out in base pieces, and for each merged position the index of its last
    base piece there (a piece without text is written as <unk>)."""
    spelled, ends = [], []
    for token in ids:
        spelled += [token] if token < base_rows else (splits[token - base_rows] or [unk_id])
        ends.append(len(spelled) - 1)
    return spelled, ends


def sample_blocks(texts, merged_sp, splits, base_rows: int, settings: DistilSettings, *, bos_id: int, unk_id: int, context: int):
    """Blocks of the sample: merged ids (BOS first) whose spelling fits the base model's context."""
    blocks = []
    prefix = [bos_id] if bos_id >= 0 else []
    for text in texts:
        ids = merged_sp.encode(text)
        while ids and len(blocks) < settings.max_blocks:
            block = prefix[:]
            spelled_length = len(prefix)
            while ids and len(block) < settings.block_size:
                cost = 1 if ids[0] < base_rows else max(1, len(splits[ids[0] - base_rows]))
                if spelled_length + cost > context:
                    break
                block.append(ids.pop(0))
                spelled_length += cost
            if len(block) > len(prefix) + 1:
                blocks.append(block)
            else:
                break
        if len(blocks) >= settings.max_blocks:
            break
    return blocks


def teacher_targets(model, blocks, splits, base_rows: int, *, unk_id: int, device: str, batch_size: int):
    """What the base model predicts at every merged position but the last of every block, from one
    pass over their spellings: its top-k distribution of the next base piece and log P(rest of the
    next piece | its first base piece). Returns one dict of CPU tensors per block."""
    import torch

    head = model.get_output_embeddings().weight[:base_rows].detach().float().to(device)
    targets = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        written = [spell(block, splits, base_rows, unk_id) for block in batch]
        ids, mask = padded([w[0] for w in written], device)
        logprobs = (base_model_pass(model, ids, mask) @ head.T).log_softmax(-1)
        for row, (block, (spelled, ends)) in enumerate(zip(batch, written)):
            at = torch.tensor(ends[:-1], device=device)  # predicting merged positions 1..
            top = logprobs[row, at].topk(min(DISTIL_TOP_K, base_rows), dim=-1)
            rest = torch.zeros(len(block) - 1)
            for t in range(len(block) - 1):
                first, last = ends[t] + 1, ends[t + 1]
                if last > first:  # the next piece spells as more than one base piece
                    positions = torch.arange(first, last, device=device)
                    following = torch.tensor(spelled[first + 1 : last + 1], device=device)
                    rest[t] = logprobs[row, positions, following].sum().cpu()
            targets.append(
                {
                    "top_ids": top.indices.cpu(),
                    "top_probs": top.values.softmax(-1).cpu(),  # renormalised over the k kept
                    "rest_logprob": rest,
                }
            )
    return targets


def distil_new_rows(model, base_rows: int, tokenizer_size: int, texts, merged_sp, splits, settings: DistilSettings, *, tied: bool, device: str):
    """Stage 0: train only the new rows (input embedding rows base_rows..tokenizer_size and, on an
    untied model, the same LM-head rows) of the resized ``model`` so that, reading merged ids, it
    predicts what the base model predicted reading their spelling; the base rows and the decoder
    are the teacher. Updates the rows in place and returns figures: sample size, loss before and
    after, and the cost in base-model token passes."""
    import torch

    bos_id, unk_id = merged_sp.bos_id(), max(merged_sp.unk_id(), 0)
    context = getattr(model.config, "max_position_embeddings", 2048)
    blocks = sample_blocks(texts, merged_sp, splits, base_rows, settings, bos_id=bos_id, unk_id=unk_id, context=context)
    if not blocks:
        return {"distil_blocks": 0}
    model.to(device)
    was_training = model.training
    model.eval()
    frozen = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    targets = teacher_targets(model, blocks, splits, base_rows, unk_id=unk_id, device=device, batch_size=settings.batch_size)
    first_piece = torch.tensor([s[0] if s else unk_id for s in splits], device=device)
    base_in = model.get_input_embeddings().weight[:base_rows].detach()
    base_out = model.get_output_embeddings().weight[:base_rows].detach()
    new_rows = slice(base_rows, tokenizer_size)
    trained_in = torch.nn.Parameter(model.get_input_embeddings().weight[new_rows].detach().float().clone())
    trained_out = trained_in if tied else torch.nn.Parameter(model.get_output_embeddings().weight[new_rows].detach().float().clone())
    groups = [{"params": [trained_in], "lr": DISTIL_LR_PER_RMS * float(base_in.float().pow(2).mean().sqrt())}]
    if not tied:
        groups.append({"params": [trained_out], "lr": DISTIL_LR_PER_RMS * float(base_out.float().pow(2).mean().sqrt())})
    optimizer = torch.optim.Adam(groups)
    # a slice of the sample the distillation never trains on picks the rows to keep: the start
    # itself or a later step, whichever reads that slice best (a weak teacher can be beaten by
    # the closed-form start; then stage 0 keeps the start)
    held = max(1, min(32, len(blocks) // 10)) if len(blocks) >= 10 else 0
    train = list(range(len(blocks) - held))
    held_blocks = blocks[len(blocks) - held :]

    def held_out_nll() -> float:
        return sum(lm_nll(model, held_blocks[i : i + settings.batch_size], base_in, base_out, trained_in, trained_out, device)
                   for i in range(0, held, settings.batch_size))  # fmt: skip

    best = (held_out_nll() if held else 0.0, 0, trained_in.detach().clone(), trained_out.detach().clone())
    start_nll = best[0]
    curve = [[0, round(start_nll, 2)]]
    every = max(1, settings.steps // 6)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    for step in range(1, settings.steps + 1):
        if len(order) < settings.batch_size:
            order += rng.sample(train, len(train))
        chosen, order = order[: settings.batch_size], order[settings.batch_size :]
        loss = distil_loss(model, [blocks[i] for i in chosen], [targets[i] for i in chosen], base_in, base_out, trained_in, trained_out, first_piece, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if held and (step % every == 0 or step == settings.steps):
            nll = held_out_nll()
            curve.append([step, round(nll, 2)])
            if nll < best[0]:
                best = (nll, step, trained_in.detach().clone(), trained_out.detach().clone())
    if held:
        trained_in, trained_out = best[2], best[3]
    with torch.no_grad():
        model.get_input_embeddings().weight[new_rows] = trained_in.to(base_in.dtype)
        if not tied:
            model.get_output_embeddings().weight[new_rows] = trained_out.to(base_out.dtype)
    for parameter, wanted in frozen:
        parameter.requires_grad_(wanted)
    model.train(was_training)
    model.to("cpu")
    spelled_tokens = sum(len(spell(b, splits, base_rows, unk_id)[0]) for b in blocks)
    merged_tokens = sum(map(len, blocks))
    window = max(1, min(20, len(losses) // 5))
    return {
        "distil_blocks": len(blocks),
        "distil_merged_tokens": merged_tokens,
        "distil_spelled_tokens": spelled_tokens,
        "distil_steps": settings.steps,
        "distil_loss_first": round(sum(losses[:window]) / window, 4),
        "distil_loss_last": round(sum(losses[-window:]) / window, 4),
        "distil_held_out_blocks": held,
        "distil_kept_step": best[1] if held else settings.steps,
        "distil_held_out_nll_start": round(start_nll, 2),
        "distil_held_out_nll_kept": round(best[0], 2),
        "distil_held_out_curve": curve,
        # cost in base-model token passes: the teacher reads each spelled token once; each stage-0
        # step is a forward and a backward (~3 forwards) over its merged tokens
        "distil_cost_token_forwards": spelled_tokens + 3 * settings.steps * settings.batch_size * merged_tokens // len(blocks),
    }


def student_states(model, ids, mask, base_in, trained_in):
    """Final hidden states of the model reading merged ids: base rows from the model, new rows
    from ``trained_in``."""
    import torch

    base_rows = base_in.shape[0]
    is_new = ids >= base_rows
    embeds = torch.where(is_new[..., None], trained_in[(ids - base_rows).clamp(min=0)], base_in[ids.clamp(max=base_rows - 1)].float())
    return model.model(inputs_embeds=embeds.to(base_in.dtype), attention_mask=mask).last_hidden_state.float()


def lm_nll(model, blocks, base_in, base_out, trained_in, trained_out, device) -> float:
    """Total negative log-likelihood (nats) of ``blocks`` read by the model with the trained rows."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        ids, mask = padded(blocks, device)
        states = student_states(model, ids, mask, base_in, trained_in)
        predicting = mask[:, 1:].bool()
        hidden = states[:, :-1][predicting]
        logits = torch.cat([hidden @ base_out.float().T, hidden @ trained_out.T], dim=-1)
        return float(F.cross_entropy(logits, ids[:, 1:][predicting], reduction="sum"))


def distil_loss(model, blocks, targets, base_in, base_out, trained_in, trained_out, first_piece, device):
    """Cross-entropy of the model's next-base-piece distribution against the teacher's top-k, plus
    the binary cross-entropy of its share, among the pieces starting with the next base piece, of
    the actual next new piece against the teacher's probability of that piece's rest."""
    import torch

    base_rows = base_in.shape[0]
    ids, mask = padded(blocks, device)
    states = student_states(model, ids, mask, base_in, trained_in)
    predicting = mask[:, 1:].bool()  # position t predicts merged token t+1
    hidden = states[:, :-1][predicting]
    nxt = ids[:, 1:][predicting]
    top_ids = torch.cat([t["top_ids"] for t in targets]).to(device)
    top_probs = torch.cat([t["top_probs"] for t in targets]).to(device)
    rest = torch.cat([t["rest_logprob"] for t in targets]).to(device)
    logprobs = torch.cat([hidden @ base_out.float().T, hidden @ trained_out.T], dim=-1).log_softmax(-1)
    probs = logprobs.exp()
    # probability of each base piece as the first piece of the next text: itself plus every new
    # piece whose spelling starts with it
    first = probs[:, :base_rows].index_add(1, first_piece, probs[:, base_rows:])
    log_first = first.clamp_min(1e-30).log()
    loss = -(top_probs * log_first.gather(1, top_ids)).sum(-1).mean()
    new = nxt >= base_rows
    if new.any():
        share = logprobs[new, nxt[new]] - log_first[new].gather(1, first_piece[nxt[new] - base_rows, None]).squeeze(1)
        share = share.clamp(max=-1e-6)
        wanted = rest[new].exp()
        loss = loss - (wanted * share + (1 - wanted) * torch.log1p(-share.exp())).mean()
    return loss
