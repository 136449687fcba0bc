"""``zhllama eval``: perplexity per token and bits per character of a model chain, per corpus.

Perplexity depends on the tokenizer (a token of the merged vocabulary carries more text than a
byte-fallback token), so it cannot compare a model before and after ``extend``. Bits per
character can: the total negative log-likelihood of a text in bits divided by its number of
characters is the same quantity whatever the tokenizer. Every document is scored on its own
(``<s>`` then its tokens, no ``</s>``), in windows of ``block_size`` tokens that overlap by one
token so each token of the text is predicted exactly once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from zhllama.chain import DTYPES, check_block_size, load_chain
from zhllama.corpus import find_corpus_files, iter_documents
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, check, option
from zhllama.outdir import atomic_output_file, describe_input, library_versions


@dataclass
class EvalOptions:
    model: Path = option(help="model directory (base or extended)")
    data: list[str] = option(help="corpora to evaluate, each reported on its own (file, directory or glob)")
    adapter: list[Path] = option(default_factory=list, help="adapters to apply in order (repeat the flag)")
    json: Path | None = option(None, help="also write the results to this JSON file")
    block_size: int = option(512, help="tokens per scoring window (at most the model's context)")
    batch_size: int = option(8, help="windows per forward pass")
    max_documents: int | None = option(None, help="score only the first N documents of each corpus")
    text_field: str = option("text", help="field holding the text in .jsonl/.json/.parquet corpora")
    doc_sep: str = option("line", choices=("line", "blank"), help="documents in .txt files: one per line, or blank-line separated")
    dtype: str = option("float32", choices=DTYPES, help="weight dtype for the forward passes")
    allow_base_mismatch: bool = option(False, help="apply adapters even if they were trained on another base")

    def __post_init__(self):
        self.model = Path(self.model)
        self.adapter = [Path(a) for a in self.adapter]
        problems = []
        if not self.data:
            problems.append("--data needs at least one corpus")
        at_least(problems, "--block-size", self.block_size, 2)
        at_least(problems, "--batch-size", self.batch_size, 1)
        at_least(problems, "--max-documents", self.max_documents, 1)
        check(problems)


def scoring_windows(ids: list[int], block_size: int) -> list[list[int]]:
    """Windows of at most ``block_size`` ids overlapping by one, so that every id after the
    first is a prediction target in exactly one window."""
    step = block_size - 1
    return [ids[start : start + block_size] for start in range(0, max(len(ids) - 1, 1), step)]


def score_texts(model, tokenizer, texts: list[str], *, block_size: int, batch_size: int = 8) -> dict:
    """Negative log-likelihood of ``texts`` under ``model``: tokens, characters, nats, perplexity
    per token and bits per character."""
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
    return {
        "documents": len(texts),
        "characters": characters,
        "tokens": tokens,
        "nll_nats": nll,
        "perplexity": math.exp(min(nll / max(tokens, 1), 700)),
        "bits_per_character": nll / math.log(2) / max(characters, 1),
        "tokens_per_character": tokens / max(characters, 1),
    }


def read_texts(spec: str, *, text_field: str, doc_sep: str, max_documents: int | None) -> list[str]:
    texts = []
    for doc in iter_documents([spec], text_field=text_field, doc_sep=doc_sep):
        texts.append(doc)
        if max_documents is not None and len(texts) >= max_documents:
            break
    return texts


def evaluate_chain(options: EvalOptions) -> dict:
    """Perplexity per token and bits per character of a model chain on each corpus; prints a
    table and optionally writes JSON.

    Returns ``{"chain": ..., "block_size": ..., "corpora": {spec: figures}}``."""
    check_block_size(options.model, options.block_size)
    chain = load_chain(options.model, options.adapter, dtype=options.dtype, allow_base_mismatch=options.allow_base_mismatch)
    results = {}
    for spec in options.data:
        texts = read_texts(spec, text_field=options.text_field, doc_sep=options.doc_sep, max_documents=options.max_documents)
        results[spec] = score_texts(chain.model, chain.tokenizer, texts, block_size=options.block_size, batch_size=options.batch_size)
    report = {"chain": chain.describe(), "block_size": options.block_size, "corpora": results}
    width = max(len(s) for s in results)
    print(f"{'corpus'.ljust(width)}  {'documents':>9}  {'tokens':>10}  {'perplexity':>10}  {'bits/char':>9}")
    for spec, figures in results.items():
        print(
            f"{spec.ljust(width)}  {figures['documents']:>9}  {figures['tokens']:>10}  "
            f"{figures['perplexity']:>10.3f}  {figures['bits_per_character']:>9.4f}"
        )
    if options.json is not None:
        # the scores mean nothing without the text they were measured on and the code that measured
        inputs = {spec: [describe_input(path) for path in find_corpus_files([spec])] for spec in options.data}
        record = {**report, "inputs": inputs, "versions": library_versions()}
        with atomic_output_file(options.json) as tmp:
            tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report
