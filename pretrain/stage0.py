"""Stage 0 of ``zhllama extend`` (``--init-corpus``): train only the new rows before any adapter.

Starting from the closed-form rows (pretrain/init.py), only the new rows train, for a few
hundred small steps, on the model's own next-token loss over a sample of the new language read
in the merged tokenization; the base rows and the decoder stay frozen, so nothing the base model
does with its own pieces changes. A slice of the sample held out from training chooses which
step's rows to keep (the closed-form start included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zhllama.pretrain.init import padded

# Adam's step is about lr per coordinate, so the rate is a fraction of the base rows'
# root-mean-square coordinate (a 7B's rows are ~0.02 per coordinate, a tiny model's ~0.3).
# Chosen on the "fit" bases of bench/init.py.
STAGE0_LR_PER_RMS = 0.05


@dataclass
class Stage0Settings:
    """Stage 0 of ``extend``: how much of the sample, how many steps, of what size."""

    steps: int
    batch_size: int
    block_size: int  # merged-vocabulary tokens per block (BOS included)
    max_blocks: int
    seed: int = 0


def sample_blocks(texts, merged_sp, settings: Stage0Settings, *, context: int) -> list[list[int]]:
    """The sample cut into blocks of merged ids (BOS first) of at most ``block_size`` tokens and
    the model's context; a document's last piece shorter than 2 tokens is dropped."""
    bos_id = merged_sp.bos_id()
    prefix = [bos_id] if bos_id >= 0 else []
    width = min(settings.block_size, context) - len(prefix)
    blocks = []
    for text in texts:
        ids = merged_sp.encode(text)
        for start in range(0, len(ids), width):
            if len(blocks) == settings.max_blocks:
                return blocks
            if len(ids) - start >= 2:
                blocks.append(prefix + ids[start : start + width])
    return blocks


def train_new_rows(model, base_rows: int, tokenizer_size: int, texts, merged_sp, settings: Stage0Settings, *, tied: bool, device: str) -> dict:
    """Stage 0: train only the new rows of the resized ``model`` (input embedding rows
    base_rows..tokenizer_size and, on an untied model, the same LM-head rows) to predict the
    sample read in the merged tokenization; the base rows and the decoder stay frozen.

    The closed-form start only approximates what the base model does with a piece's text, and on
    a well-trained base that approximation costs much of the base's loss. The model's own
    next-token loss on real text measures that cost exactly, and the only parameters it can
    move are the new rows, so the base's behaviour on its own pieces is untouched. A slice of the
    sample never trained on picks the rows kept: the start itself or a later step, whichever
    reads it best. Updates the rows in place; returns figures (sample size, losses, the step
    kept, and the cost in model token passes)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    context = getattr(model.config, "max_position_embeddings", 2048)
    blocks = sample_blocks(texts, merged_sp, settings, context=context)
    if not blocks:
        return {"stage0_blocks": 0}
    rng = random.Random(settings.seed)
    rng.shuffle(blocks)  # the held-out slice and the training order come from the whole sample
    model.to(device)
    streamed = model.model.layers
    if not isinstance(streamed, torch.nn.ModuleList):
        # extend streams the decoder from the shards (pretrain/surgery.py); every step here runs
        # it forward and backward, so read it once and hold it for the duration
        model.model.layers = torch.nn.ModuleList(streamed)
    was_training = model.training
    model.eval()
    frozen = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    base_in = model.get_input_embeddings().weight[:base_rows].detach()
    base_out = model.get_output_embeddings().weight[:base_rows].detach()
    new_rows = slice(base_rows, tokenizer_size)
    trained_in = torch.nn.Parameter(model.get_input_embeddings().weight[new_rows].detach().float().clone())
    trained_out = trained_in if tied else torch.nn.Parameter(model.get_output_embeddings().weight[new_rows].detach().float().clone())
    groups = [{"params": [trained_in], "lr": STAGE0_LR_PER_RMS * rms(base_in)}]
    if not tied:
        groups.append({"params": [trained_out], "lr": STAGE0_LR_PER_RMS * rms(base_out)})
    optimizer = torch.optim.Adam(groups)
    held = max(1, min(32, len(blocks) // 10)) if len(blocks) >= 10 else 0
    train, held_blocks = blocks[held:], blocks[:held]

    def loss_of(batch, reduction: str):
        ids, mask = padded(batch, device)
        states = student_states(model, ids, mask, base_in, trained_in)
        predicting = mask[:, 1:].bool()  # position t predicts token t+1
        hidden = states[:, :-1][predicting]
        logits = torch.cat([hidden @ base_out.float().T, hidden @ trained_out.T], dim=-1)
        return F.cross_entropy(logits, ids[:, 1:][predicting], reduction=reduction)

    def held_out_nll() -> float:
        with torch.no_grad():
            total = sum(float(loss_of(held_blocks[i : i + settings.batch_size], "sum")) for i in range(0, held, settings.batch_size))
        return total / held_tokens

    held_tokens = sum(len(b) - 1 for b in held_blocks)
    best = (held_out_nll() if held else 0.0, 0, trained_in.detach().clone(), trained_out.detach().clone())
    start_nll = best[0]
    curve = [[0, round(start_nll, 4)]]
    every = max(1, settings.steps // 6)
    order: list[int] = []
    losses = []
    for step in tqdm(range(1, settings.steps + 1), desc="stage 0: new rows on --init-corpus", unit="step"):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(train)), len(train))
        chosen, order = order[: settings.batch_size], order[settings.batch_size :]
        loss = loss_of([train[i] for i in chosen], "mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if held and (step % every == 0 or step == settings.steps):
            nll = held_out_nll()
            curve.append([step, round(nll, 4)])
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
    del model.model.layers  # a module cannot be replaced by the plain object it was made from
    model.model.layers = streamed
    model.to("cpu")
    window = max(1, min(20, len(losses) // 5))
    tokens_per_step = settings.batch_size * sum(map(len, train)) / len(train) if train else 0
    return {
        "stage0_blocks": len(blocks),
        "stage0_tokens": sum(map(len, blocks)),
        "stage0_steps": settings.steps,
        "stage0_loss_first": round(sum(losses[:window]) / window, 4),
        "stage0_loss_last": round(sum(losses[-window:]) / window, 4),
        "stage0_held_out_blocks": held,
        "stage0_kept_step": best[1] if held else settings.steps,
        "stage0_held_out_nll_start": round(start_nll, 4),
        "stage0_held_out_nll_kept": round(best[0], 4),
        "stage0_held_out_curve": curve,
        # each step is a forward and a backward (about 3 forwards) over its tokens, each held-out
        # check a forward over that slice
        "stage0_cost_token_forwards": int(3 * settings.steps * tokens_per_step + len(curve) * held_tokens),
    }


def rms(matrix) -> float:
    """Root-mean-square coordinate of a matrix."""
    return float(matrix.float().pow(2).mean().sqrt())


def student_states(model, ids, mask, base_in, trained_in):
    """Final hidden states of the model reading merged ids: base rows from the model, new rows
    from ``trained_in``."""
    import torch

    base_rows = base_in.shape[0]
    is_new = ids >= base_rows
    embeds = torch.where(is_new[..., None], trained_in[(ids - base_rows).clamp(min=0)], base_in[ids.clamp(max=base_rows - 1)].float())
    return model.model(inputs_embeds=embeds.to(base_in.dtype), attention_mask=mask).last_hidden_state.float()
