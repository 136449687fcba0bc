"""Bits per character and per UTF-8 byte of a model chain on named corpora.

Perplexity depends on the tokenizer (a token of the merged vocabulary carries more text than a
byte-fallback token), so it cannot compare a model before and after ``extend``. Bits per
character can: the total negative log-likelihood of a text in bits divided by its number of
characters is the same quantity whatever the tokenizer. Bits per UTF-8 byte is the same total
over the text's bytes (lm-evaluation-harness's ``bits_per_byte``), the figure published
results across languages use. Every document is scored on its own (``<s>`` then its tokens,
no ``</s>``), in windows of ``block_size`` tokens that overlap by one token so each token of
the text is predicted exactly once.
"""

from __future__ import annotations

import math
from pathlib import Path

from zhllama.corpus import iter_documents, named_corpus
from zhllama.errors import ZhllamaError


def named_corpora(specs: list[str]) -> tuple[dict[str, str], list[str]]:
    """``{name: corpus}`` from ``--data`` arguments (:func:`zhllama.corpus.named_corpus`; a bare
    CORPUS is named as written), and the problems found (a bad or repeated name)."""
    named: dict[str, str] = {}
    problems = []
    for spec in specs:
        try:
            name, corpus = named_corpus(str(spec), "--data")
        except ZhllamaError as e:
            problems.append(str(e))
            continue
        name = name or str(spec)
        if name in named:
            problems.append(f"--data: the name {name!r} is given twice; give each corpus its own NAME=")
        else:
            named[name] = corpus
    return named, problems


def scoring_windows(ids: list[int], block_size: int) -> list[list[int]]:
    """Windows of at most ``block_size`` ids overlapping by one, so that every id after the
    first is a prediction target in exactly one window."""
    step = block_size - 1
    return [ids[start : start + block_size] for start in range(0, max(len(ids) - 1, 1), step)]


def score_texts(model, tokenizer, texts: list[str], *, block_size: int, batch_size: int = 8) -> dict:
    """Negative log-likelihood of ``texts`` under ``model``: documents, characters, UTF-8 bytes,
    tokens, nats, perplexity per token, bits per character and per byte, tokens per character."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        windows += [w for w in scoring_windows(bos + ids, block_size) if len(w) > 1]
    windows.sort(key=len)  # similar lengths together: less padding
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="scoring", disable=len(windows) <= batch_size):
            batch = windows[start : start + batch_size]
            width = max(len(w) for w in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, window in enumerate(batch):
                input_ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = input_ids[:, 1:].to(device).masked_fill(mask[:, 1:].to(device) == 0, -100)
            # flattened (rows, vocab) logits: cross_entropy over a transposed (batch, vocab, seq)
            # view is several times slower on CPU
            vocab = logits.shape[-1]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
    characters = sum(len(t) for t in texts)
    utf8_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bits = nll / math.log(2)
    return {
        "documents": len(texts),
        "characters": characters,
        "bytes": utf8_bytes,
        "tokens": tokens,
        "nll_nats": nll,
        "perplexity": math.exp(min(nll / max(tokens, 1), 700)),
        "bits_per_character": bits / max(characters, 1),
        "bits_per_byte": bits / max(utf8_bytes, 1),
        "tokens_per_character": tokens / max(characters, 1),
    }


def read_texts(spec: str, *, text_field: str, doc_sep: str, max_documents: int | None) -> list[str]:
    texts = []
    for doc in iter_documents([spec], text_field=text_field, doc_sep=doc_sep):
        texts.append(doc)
        if max_documents is not None and len(texts) >= max_documents:
            break
    return texts
