"""``zhllama sft``: instruction-tune a model chain with LoRA in one prompt format.

The flow reads top to bottom: check options → read and normalise the instruction records →
load the model chain → tokenise with the template (labels on responses only) → LoRA (plus the
new embedding rows, as in pretraining stage 2) → ``transformers.Trainer`` → save the adapter,
the tokenizer with the template as its ``chat_template``, ``zhllama.json`` (which records the
template, so ``chat`` and ``merge`` use it), ``metrics.jsonl`` and ``loss.png``.

Packing (``--packing``): short samples share rows of ``--max-seq-length`` tokens, with position
ids restarting at every sample and no attention mask. LLaMA's sdpa and eager attention in
transformers (flash attention too, untested here) read the restarts as sample boundaries (a
block-diagonal causal mask, see ``find_packed_sequence_indices``), but only when no KV cache is
built, so training runs with ``use_cache=False``; ``tests/test_sft.py`` checks packed logits
equal unpacked ones. Rows rather than transformers' ``DataCollatorWithFlattening`` (the whole
batch as one row): without a variable-length attention kernel one long row costs attention over
the batch's total length squared; on CPU that trained 2.5x slower than padding (ruozhiba,
batch 8, 256 tokens).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.accel import AccelArgs, choose_acceleration, read_model_config
from zhllama.args import LoraArgs
from zhllama.chain import DTYPES, load_chain
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, check, option
from zhllama.outdir import check_output_target, write_manifest
from zhllama.sft.data import DataReport, pack_samples, read_conversations, tokenize_conversations
from zhllama.sft.templates import TEMPLATES, Template, chat_template, get_template
from zhllama.training import (
    ALL_LINEAR,
    EMBEDDING_CHOICES,
    LoraSettings,
    build_peft_model,
    build_training_arguments,
    TRAINING_DEFAULTS,
    checkpoint_dir_for,
    train,
    training_output_dir,
)


@dataclass(kw_only=True)
class SFTOptions(LoraArgs, AccelArgs):
    model: Path = option(help="base model directory (the extended model)")
    data: list[Path] = option(help="instruction data: Alpaca, ShareGPT or OpenAI-style records, .json or .jsonl")
    template: str = option(help=f"prompt template: {', '.join(TEMPLATES)}")
    out: Path = option(help="output directory for the adapter")
    adapter: list[Path] = option(help="adapter to apply first, in order (e.g. the pretraining stages)", default_factory=list)
    max_seq_length: int = option(512, help="longest sample in tokens; longer ones lose later turns, then response tail")
    validation_split: float = option(0.0, help="fraction of the conversations held out for the eval loss")
    packing: bool = option(False, help="pack short samples into rows of --max-seq-length (no attention across samples)")
    train_embeddings: str = option(
        "new", help="embedding / LM-head rows that train: new (rows added by extend), all or none", choices=EMBEDDING_CHOICES
    )
    dtype: str = option("float32", help="dtype to load the model in", choices=DTYPES)
    allow_base_mismatch: bool = option(False, help="apply adapters recorded for a different base model")
    overwrite: bool = option(False, help="replace an existing output directory")

    def __post_init__(self) -> None:
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        at_least(problems, "--max-seq-length", self.max_seq_length, 8)
        if not 0 <= self.validation_split < 1:
            problems.append(f"--validation-split must be in [0, 1), got {self.validation_split}")
        problems += [f"--data {p}: no such file" for p in self.data if not Path(p).is_file()]
        check(problems)
        super().__post_init__()


@dataclass
class SFTData:
    """Tokenised training (and validation) samples and the report of how they were made."""

    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    report: DataReport = field(default_factory=DataReport)


def build_sft_data(
    paths, template: Template, tokenizer, *, max_seq_length: int, validation_split: float = 0.0, seed: int = 0
) -> SFTData:
    """Read, normalise, split (by conversation, seeded) and tokenise instruction data."""
    if not tokenizer.eos_token:
        raise ZhllamaError("the chain's tokenizer has no EOS token; every response must end with one")
    report = DataReport()
    conversations = read_conversations(paths, report)
    held_out = []
    if validation_split > 0:
        if len(conversations) < 2:
            raise ZhllamaError(f"--validation-split needs at least 2 conversations; the data has {len(conversations)}")
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        count = min(len(conversations) - 1, max(1, round(validation_split * len(conversations))))
        chosen = set(order[:count])
        held_out = [c for i, c in enumerate(conversations) if i in chosen]
        conversations = [c for i, c in enumerate(conversations) if i not in chosen]
    train_samples = tokenize_conversations(conversations, template, tokenizer, max_seq_length, report)
    validation = tokenize_conversations(held_out, template, tokenizer, max_seq_length, report) if held_out else []
    report.samples = len(train_samples) + len(validation)
    if not train_samples:
        raise ZhllamaError(
            f"no training sample fits --max-seq-length {max_seq_length} ({report.dropped_too_long} too long); raise it"
        )
    return SFTData(train_samples, validation, report)


@dataclass
class PackedRowCollator:
    """Batches packed rows (see :func:`zhllama.sft.data.pack_samples`) without an attention mask.

    Shorter rows are padded with one more "sample" whose positions restart at 0, so padding
    forms its own block of the mask; its labels are -100.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        return {key: torch.tensor(value) for key, value in batch.items()}


def data_collator(tokenizer, packing: bool):
    """Packed rows, or samples padded to the longest of the batch with labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return PackedRowCollator(tokenizer.eos_token_id)
    if tokenizer.pad_token is None:
        # padding positions are masked out of attention and loss, so any id will do; the
        # tokenizer files we save are copied from the chain, so this does not leak into them
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def add_chat_template(directory: Path, template: Template) -> None:
    """Write ``template`` as the chat template of the tokenizer saved in ``directory``: into
    ``tokenizer_config.json`` (read by transformers 4.x and vLLM) and ``chat_template.jinja``
    (what transformers 5 saves; it wins when both exist, so both must agree)."""
    jinja = chat_template(template)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = jinja
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(jinja, encoding="utf-8")


def sft_training_defaults(options: SFTOptions) -> dict:
    """TRAINING_DEFAULTS, but padded batches count only their real tokens in tokens/s."""
    return {**TRAINING_DEFAULTS, "include_num_input_tokens_seen": True if options.packing else "non_padding"}


def sft_chain(options: SFTOptions, training=None) -> dict:
    """Instruction-tune ``--model`` (+ ``--adapter`` chain) on ``--data`` in ``--template``'s format.

    Writes ``--out``: the LoRA adapter (plus trained embedding rows), the tokenizer with the
    template as its chat template, ``zhllama.json``, ``metrics.jsonl`` and ``loss.png``.
    ``training``: the TrainingArguments values chosen (a dict, a ``TrainingArguments`` or None),
    on top of :func:`sft_training_defaults`. Returns the figures recorded in ``zhllama.json``.
    """
    check_output_target(options.out, options.overwrite)
    # precision, attention kernel, checkpointing, 4-bit (zhllama/accel.py)
    acceleration = choose_acceleration(
        read_model_config(options.model),
        training,
        attention=options.attention,
        load_in_4bit=options.load_in_4bit,
        packed_rows=options.packing,
    )
    training_args = build_training_arguments(options.out, training, acceleration.defaults(sft_training_defaults(options)))
    template = get_template(options.template)
    chain = load_chain(
        options.model, options.adapter, dtype=acceleration.load_dtype(options.dtype), allow_base_mismatch=options.allow_base_mismatch
    )
    chain.model = acceleration.prepare(chain.model)
    if training_args.process_index == 0:
        print(acceleration.line, flush=True)
    data = build_sft_data(
        options.data,
        template,
        chain.tokenizer,
        max_seq_length=options.max_seq_length,
        validation_split=options.validation_split,
        seed=training_args.seed,
    )
    report = data.report
    print(
        f"sft data: {report.records} records, {report.conversations} conversations, {len(data.train)} training and "
        f"{len(data.validation)} validation samples, {report.label_tokens} of {report.tokens} tokens are response tokens"
    )
    if report.skipped:
        print(f"skipped records: {report.skipped_summary()}")
    if report.turns_dropped_to_fit or report.responses_cut_to_fit or report.dropped_too_long:
        print(
            f"--max-seq-length {options.max_seq_length}: {report.turns_dropped_to_fit} samples lost later turns, "
            f"{report.responses_cut_to_fit} had their response cut, {report.dropped_too_long} were dropped"
        )

    from datasets import Dataset

    train_rows, validation_rows = data.train, data.validation
    if options.packing:
        train_rows = pack_samples(data.train, options.max_seq_length)
        validation_rows = pack_samples(data.validation, options.max_seq_length)
        print(f"--packing: {len(data.train)} training samples in {len(train_rows)} rows of up to {options.max_seq_length} tokens")
    chain.model.config.use_cache = False  # a KV cache would hide packed-sample boundaries from attention
    model = build_peft_model(
        chain.model,
        new_token_ids=chain.new_token_ids,
        lora=options.lora(),
        train_embeddings=options.train_embeddings,
        seed=training_args.seed,
    )
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=training_args) as out_dir:
        figures = train(
            model,
            chain.tokenizer,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(validation_rows) if validation_rows else None,
            data_collator=data_collator(chain.tokenizer, options.packing),
            training_args=training_args,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
        )
        add_chat_template(out_dir, template)
        figures.update(data=report.as_dict(), train_samples=len(data.train), validation_samples=len(data.validation))
        write_manifest(
            out_dir,
            command="sft",
            options=options,
            inputs={"data": [str(p) for p in options.data]},
            figures=figures,
            template=template.name,
            chain=chain.describe(),
            acceleration=acceleration.describe(),
        )
    print(f"wrote {options.out} (template {template.name})")
    return figures
