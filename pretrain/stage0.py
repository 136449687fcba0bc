"""Stage 0 of ``zhllama extend`` (``--init-corpus``): train only the new rows before any adapter.

Starting from the closed-form rows (pretrain/init.py), only the new rows train, for a few
hundred small steps, on the model's own next-token loss over a sample of the new language read
in the merged tokenization; the base rows and the decoder stay frozen, so nothing the base model
computes with its own pieces changes. What can change is the probability the new rows draw to
themselves where the base's own language goes on, so every step also reads a little *replay*:
text the base model writes itself before stage 0 (sampled from BOS, its own pieces only), in
its own pieces. There the new rows can only take probability away from what the base wrote,
and the loss pushes them out of it. Held-out slices of the sample and of the replay choose
which step's rows to keep (the closed-form start included): the one that reads the sample best
while the base's own text stays where it was.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zhllama.pretrain.init import padded

# Adam's step is about lr per coordinate, so the rate is a fraction of the base rows'
# root-mean-square coordinate (a 7B's rows are ~0.02 per coordinate, a tiny model's ~0.3).
# Chosen on the "fit" bases of bench/init.py.
STAGE0_LR_PER_RMS = 0.05
# replay blocks in each step, per block of the sample; the replay's mean loss is added to the
# sample's at equal weight, however few its blocks
REPLAY_PER_SAMPLE_BLOCK = 0.25
# the rows kept may not raise the held-out replay's loss by more than this fraction: the base's
# own language is to stay where it was (the closed-form start meets it, so some step always does)
REPLAY_TOLERANCE = 0.005


@dataclass
class Stage0Settings:
    """Stage 0 of ``extend``: how much of the sample, how many steps, of what size."""

    steps: int
    batch_size: int
    block_size: int  # merged-vocabulary tokens per block (BOS included)
    max_blocks: int
    replay_sequences: int = 64  # sequences the base model writes for the replay (0: none)
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


def base_writes(model, merged_sp, base_rows: int, count: int, length: int, *, device: str) -> list[list[int]]:
    """``count`` sequences of up to ``length`` base pieces (BOS first) the base model samples
    (temperature 1; the new rows are masked), each cut before its first EOS."""
    import torch

    bos, eos = merged_sp.bos_id(), merged_sp.eos_id()
    ids = torch.full((count, 1), max(bos, 0), dtype=torch.long, device=device)
    past, written = None, []
    with torch.no_grad():
        for _ in range(length - 1):
            out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = out.logits[:, -1, :base_rows].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    for row in ids.tolist():
        row = row[: row.index(eos, 1)] if eos in row[1:] else row
        if len(row) >= 3:
            written.append(row)
    return written


def train_new_rows(model, base_rows: int, tokenizer_size: int, texts, merged_sp, settings: Stage0Settings, *, tied: bool, device: str) -> dict:
    """Stage 0: train only the new rows of the resized ``model`` (input embedding rows
    base_rows..tokenizer_size and, on an untied model, the same LM-head rows) on the sample, read
    in the merged tokenization, and on the base model's replay, in its own pieces; the base rows
    and the decoder stay frozen. Updates the rows in place; returns figures (sample and replay
    sizes, losses, the step kept, and the cost in model token passes)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    context = getattr(model.config, "max_position_embeddings", 2048)
    blocks = sample_blocks(texts, merged_sp, settings, context=context)
    if not blocks:
        return {"stage0_blocks": 0}
    rng = random.Random(settings.seed)
    rng.shuffle(blocks)  # the held-out slice and the training order come from the whole sample
    torch.manual_seed(settings.seed)
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
    length = min(settings.block_size, context)
    replay = base_writes(model, merged_sp, base_rows, settings.replay_sequences, length, device=device) if settings.replay_sequences else []

    base_in = model.get_input_embeddings().weight[:base_rows].detach()
    base_out = model.get_output_embeddings().weight[:base_rows].detach()
    base_head = base_out.float()  # once, not per batch: at 7B it is a 0.5 GB copy
    new_rows = slice(base_rows, tokenizer_size)
    trained_in = torch.nn.Parameter(model.get_input_embeddings().weight[new_rows].detach().float().clone())
    trained_out = trained_in if tied else torch.nn.Parameter(model.get_output_embeddings().weight[new_rows].detach().float().clone())
    groups = [{"params": [trained_in], "lr": STAGE0_LR_PER_RMS * rms(base_in)}]
    if not tied:
        groups.append({"params": [trained_out], "lr": STAGE0_LR_PER_RMS * rms(base_out)})
    optimizer = torch.optim.Adam(groups)

    def split(some: list) -> tuple[list, list]:
        held = max(1, min(32, len(some) // 10)) if len(some) >= 10 else 0
        return some[held:], some[:held]

    train, held_sample = split(blocks)
    train_replay, held_replay = split(replay)
    replay_per_step = max(1, round(REPLAY_PER_SAMPLE_BLOCK * settings.batch_size)) if train_replay else 0

    def loss_of(batch, reduction: str):
        ids, mask = padded(batch, device)
        states = student_states(model, ids, mask, base_in, trained_in)
        predicting = mask[:, 1:].bool()  # position t predicts token t+1
        hidden = states[:, :-1][predicting]
        logits = torch.cat([hidden @ base_head.T, hidden @ trained_out.T], dim=-1)
        return F.cross_entropy(logits, ids[:, 1:][predicting], reduction=reduction)

    def mean_nll(held: list) -> float:
        if not held:
            return 0.0
        with torch.no_grad():
            total = sum(float(loss_of(held[i : i + settings.batch_size], "sum")) for i in range(0, len(held), settings.batch_size))
        return total / sum(len(b) - 1 for b in held)

    def held_out() -> tuple[float, float]:
        return mean_nll(held_sample), mean_nll(held_replay)

    # the rows kept: the step that reads the held-out sample best among those that keep the
    # held-out replay within REPLAY_TOLERANCE of its start
    start_nll = held_out()

    def better(nll: tuple[float, float]) -> bool:
        return nll[0] < best[0][0] and nll[1] <= start_nll[1] * (1 + REPLAY_TOLERANCE)

    best = (start_nll, 0, trained_in.detach().clone(), trained_out.detach().clone())
    curve = [[0, round(start_nll[0], 4), round(start_nll[1], 4)]]
    every = max(1, settings.steps // 6)
    order: list[int] = []
    replay_order: list[int] = []
    losses = []
    for step in tqdm(range(1, settings.steps + 1), desc="stage 0: new rows on --init-corpus", unit="step"):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(train)), len(train))
        if len(replay_order) < replay_per_step:
            replay_order += rng.sample(range(len(train_replay)), len(train_replay))
        chosen, order = order[: settings.batch_size], order[settings.batch_size :]
        replayed, replay_order = replay_order[:replay_per_step], replay_order[replay_per_step:]
        loss = loss_of([train[i] for i in chosen], "mean")
        if replayed:
            loss = loss + loss_of([train_replay[i] for i in replayed], "mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if held_sample and (step % every == 0 or step == settings.steps):
            nll = held_out()
            curve.append([step, round(nll[0], 4), round(nll[1], 4)])
            if better(nll):
                best = (nll, step, trained_in.detach().clone(), trained_out.detach().clone())
    if held_sample:
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
    if train_replay:
        tokens_per_step += replay_per_step * sum(map(len, train_replay)) / len(train_replay)
    held_tokens = sum(map(len, held_sample + held_replay))
    return {
        "stage0_blocks": len(blocks),
        "stage0_tokens": sum(map(len, blocks)),
        "stage0_replay_blocks": len(replay),
        "stage0_replay_tokens": sum(map(len, replay)),
        "stage0_steps": settings.steps,
        "stage0_loss_first": round(sum(losses[:window]) / window, 4),
        "stage0_loss_last": round(sum(losses[-window:]) / window, 4),
        "stage0_held_out_blocks": [len(held_sample), len(held_replay)],
        "stage0_kept_step": best[1] if held_sample else settings.steps,
        "stage0_held_out_nll_start": round(start_nll[0], 4),
        "stage0_held_out_nll_kept": round(best[0][0], 4),
        "stage0_replay_nll_start": round(start_nll[1], 4),
        "stage0_replay_nll_kept": round(best[0][1], 4),
        # [step, held-out sample loss per token, held-out replay loss per token]
        "stage0_held_out_curve": curve,
        # writing the replay is one forward per token with a cache; each step is a forward and a
        # backward (about 3 forwards) over its tokens; each held-out check a forward over them
        "stage0_cost_token_forwards": int(settings.replay_sequences * length + 3 * settings.steps * tokens_per_step + len(curve) * held_tokens),
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
