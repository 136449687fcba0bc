"""Log-likelihoods of continuations, as lm-evaluation-harness's ``loglikelihood`` requests.

A request is a context and a continuation. Whitespace that ends the context moves to the start
of the continuation; the continuation's tokens are those ``encode(context + continuation)``
has after the first ``len(encode(context))`` (``<s>`` first, as LLaMA was trained); its
log-likelihood is the sum of the model's log-probabilities of those tokens. Requests whose
model inputs are the same (the four one-token answer letters after one prompt) share one
forward pass, and inputs longer than ``max_length`` keep their last ``max_length`` tokens.
"""

from __future__ import annotations

from collections import defaultdict

from zhllama.errors import ZhllamaError


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(``<s>`` + context tokens, continuation tokens) of one request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    # at least one token is scored even if the continuation merged into the context's last piece
    split = min(len(context_ids), len(whole) - 1)
    return bos + whole[:split], whole[split:]


def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, max_length: int, batch_size: int, desc: str = "scoring") -> list[float]:
    """Sum of log-probabilities of each request's continuation ids after its context ids."""
    import torch
    from tqdm.auto import tqdm

    by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for number, (context, continuation) in enumerate(requests):
        whole = (context + continuation)[-(max_length + 1) :]
        by_input[tuple(whole[:-1])].append(number)
    inputs = sorted(by_input, key=len, reverse=True)  # similar lengths together: less padding
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    scores = [0.0] * len(requests)
    model.eval()
    with torch.no_grad(), tqdm(total=len(requests), desc=desc, disable=len(inputs) <= batch_size) as bar:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            width = len(batch[0])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # the LM head only on the positions that predict a continuation token: the full
            # (batch, length, vocab) logits would dwarf everything else for a large vocabulary
            rows, positions, targets, owners = [], [], [], []
            for row, ids in enumerate(batch):
                for number in by_input[ids]:
                    continuation = requests[number][1]
                    for offset, token in enumerate(continuation):
                        rows.append(row)
                        positions.append(len(ids) - len(continuation) + offset)
                        targets.append(token)
                        owners.append(number)
            logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]).float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
            for number, value in zip(owners, picked.tolist()):
                scores[number] += value
            bar.update(sum(len(by_input[ids]) for ids in batch))
    return scores


def harness_loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, max_length: int, batch_size: int) -> list[float]:
    """The same log-likelihoods computed by lm-evaluation-harness's ``HFLM`` (``--harness``):
    its own encoding of each (context, continuation) pair, with ``<s>`` first, and its own
    batching and truncation."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ZhllamaError("--harness needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or zhllama[harness])") from e

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, add_bos_token=True)
    instances = [Instance("loglikelihood", {}, pair, number) for number, pair in enumerate(requests)]
    return [value for value, _ in lm.loglikelihood(instances)]
