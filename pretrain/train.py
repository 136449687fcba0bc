"""``zhllama pretrain``: continued pretraining of a model chain in two stages.

Stage 1 trains only the embedding and LM-head rows ``zhllama extend`` added (everything else
frozen), so the new Chinese pieces catch up with the model before anything else moves; the
adapter holds just those rows. Stage 2 adds LoRA on every attention and MLP projection and
keeps training the rows; given the stage-1 adapter as ``--adapter`` it starts from it (the
chain loader merges it into the weights first). ``--train-embeddings all`` trains the whole
matrices instead, as Chinese-LLaMA did.

The flow: load chain → build blocks → wrap with peft → Trainer → save adapter + manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zhllama.accel import AccelArgs, choose_acceleration, read_model_config
from zhllama.args import LoraArgs
from zhllama.chain import DTYPES, check_block_size, load_chain
from zhllama.corpus import DOC_SEPARATORS
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, check, option
from zhllama.outdir import check_output_target, write_manifest
from zhllama.pretrain.data import build_blocks, stream_blocks
from zhllama.pretrain.packing import PackingArgs, block_collator
from zhllama.training import (
    ALL_LINEAR,
    EMBEDDING_CHOICES,
    TRAINING_DEFAULTS,
    LoraSettings,
    build_peft_model,
    build_training_arguments,
    checkpoint_dir_for,
    train,
    training_output_dir,
)


@dataclass(kw_only=True)
class PretrainOptions(LoraArgs, AccelArgs, PackingArgs):
    stage: int = option(help="1: train the new embedding/LM-head rows only; 2: LoRA plus those rows", choices=(1, 2))
    model: Path = option(help="extended model directory (from 'zhllama extend')")
    data: list[str] = option(help="training corpora (files, directories or globs)")
    out: Path = option(help="output directory for the adapter")
    adapter: list[Path] = option(default_factory=list, help="adapters to apply first, in order (e.g. stage 1 for stage 2)")
    validation_data: list[str] = option(default_factory=list, help="held-out corpora for validation perplexity")
    validation_split: float = option(0.01, help="fraction of blocks held out for validation when --validation-data is not given (0: none)")
    block_size: int = option(512, help="tokens per training block (at most the model's context)")
    num_proc: int = option(1, help="processes for tokenising the corpus")
    cache_dir: Path | None = option(None, help="cache of tokenised blocks (default: $ZHLLAMA_CACHE/blocks or ~/.cache/zhllama/blocks)")
    streaming: bool = option(False, help="tokenise on the fly without caching (corpora larger than disk; needs --max-steps)")
    text_field: str = option("text", help="field holding the text in .jsonl/.json/.parquet corpora")
    doc_sep: str = option("line", choices=DOC_SEPARATORS, help="documents in .txt files: one per line, or blank-line separated")
    train_embeddings: str = option(
        "new", choices=EMBEDDING_CHOICES, help="embedding/LM-head rows that train: the new ones, all (full matrices) or none"
    )
    dtype: str = option("float32", choices=DTYPES, help="dtype the weights are loaded in (use --bf16/--fp16 for mixed precision)")
    allow_base_mismatch: bool = option(False, help="apply adapters even if they were trained on another base")
    overwrite: bool = option(False, help="replace an existing output directory")

    def __post_init__(self):
        self.model, self.out = Path(self.model), Path(self.out)
        self.adapter = [Path(a) for a in self.adapter]
        self.stage = int(self.stage)
        problems = []
        if self.stage not in (1, 2):
            problems.append(f"--stage must be 1 or 2 (got {self.stage})")
        if not self.data:
            problems.append("--data needs at least one corpus")
        at_least(problems, "--block-size", self.block_size, 2)
        at_least(problems, "--num-proc", self.num_proc, 1)
        if not 0 <= self.validation_split < 1:
            problems.append(f"--validation-split must be in [0, 1) (got {self.validation_split})")
        if self.streaming and self.validation_split and not self.validation_data:
            problems.append("--streaming cannot hold out a --validation-split; pass --validation-data or --validation-split 0")
        if self.train_embeddings not in EMBEDDING_CHOICES:
            problems.append(f"--train-embeddings must be one of {', '.join(EMBEDDING_CHOICES)}")
        if self.stage == 1 and self.train_embeddings == "none":
            problems.append("--stage 1 --train-embeddings none would train nothing; use new or all")
        check(problems)
        super().__post_init__()


def load_data(options: PretrainOptions, chain, training_args):
    """Training and validation blocks; the main process builds the cache, the others load it."""
    read = {"block_size": options.block_size, "text_field": options.text_field, "doc_sep": options.doc_sep}
    cached = {**read, "num_proc": options.num_proc, "cache_dir": options.cache_dir}
    info = {}
    with training_args.main_process_first(desc="building token blocks"):
        if options.streaming:
            train_blocks = stream_blocks(options.data, chain.tokenizer, **read)
            info["train"] = {"streaming": True}
        else:
            train_blocks, train_info = build_blocks(options.data, chain.tokenizer, chain.tokenizer_dir, **cached)
            info["train"] = train_info
        if options.validation_data:
            eval_blocks, eval_info = build_blocks(options.validation_data, chain.tokenizer, chain.tokenizer_dir, **cached)
            info["validation"] = eval_info
        elif options.validation_split and not options.streaming:
            held_out = max(1, round(len(train_blocks) * options.validation_split))
            if held_out >= len(train_blocks):
                raise ZhllamaError(
                    f"corpus has {len(train_blocks)} block(s) of {options.block_size} tokens, too few to hold out "
                    "--validation-split; add text, lower --block-size, or pass --validation-split 0"
                )
            # a random subset of blocks, as an in-memory index: the cache entry stays as written
            order = np.random.default_rng(training_args.seed).permutation(len(train_blocks))
            eval_blocks = train_blocks.select(np.sort(order[:held_out]), keep_in_memory=True)
            train_blocks = train_blocks.select(np.sort(order[held_out:]), keep_in_memory=True)
            info["validation"] = {"held_out_blocks": held_out}
        else:
            eval_blocks = None
    return train_blocks, eval_blocks, info


def pretrain_chain(options: PretrainOptions, training=None) -> Path:
    """Continue pretraining a model chain on corpora for one stage; write the adapter, its
    tokenizer, metrics.jsonl, loss.png and zhllama.json to --out.

    ``training``: the TrainingArguments values chosen (a dict, a ``TrainingArguments`` or None),
    on top of :data:`zhllama.training.TRAINING_DEFAULTS`. Returns the output directory."""
    check_output_target(options.out, options.overwrite)
    check_block_size(options.model, options.block_size)
    # precision, attention kernel, checkpointing, 4-bit (zhllama/accel.py)
    acceleration = choose_acceleration(
        read_model_config(options.model), training, attention=options.attention, load_in_4bit=options.load_in_4bit
    )
    training_args = build_training_arguments(options.out, training, acceleration.defaults(TRAINING_DEFAULTS))
    if options.streaming and training_args.max_steps <= 0:
        raise ZhllamaError("--streaming has no length to count epochs from; pass --max-steps N")
    chain = load_chain(
        options.model, options.adapter, dtype=acceleration.load_dtype(options.dtype), allow_base_mismatch=options.allow_base_mismatch
    )
    chain.model = acceleration.prepare(chain.model)
    if training_args.process_index == 0:
        print(acceleration.line, flush=True)

    train_blocks, eval_blocks, data_info = load_data(options, chain, training_args)
    model = build_peft_model(
        chain.model,
        new_token_ids=chain.new_token_ids,
        lora=options.lora() if options.stage == 2 else None,
        train_embeddings=options.train_embeddings,
        seed=training_args.seed,
    )
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=training_args) as out_dir:
        figures = train(
            model,
            chain.tokenizer,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=block_collator(
                chain.tokenizer, cross_document_attention=options.cross_document_attention, attention=acceleration.attention
            ),
            training_args=training_args,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
        )
        figures.update(stage=options.stage, new_rows=len(chain.new_token_ids), block_size=options.block_size)
        write_manifest(
            out_dir,
            command=f"pretrain --stage {options.stage}",
            options=options,
            inputs={"data": options.data, "validation_data": options.validation_data},
            figures=figures,
            chain=chain.describe(),
            data=data_info,
            acceleration=acceleration.describe(),
            training_arguments=training_args.to_dict(),
        )
    if training_args.process_index == 0:
        print(
            f"stage {options.stage}: loss {figures.get('first_loss', float('nan')):.4f} -> {figures.get('last_loss', float('nan')):.4f}"
            + (f", validation perplexity {figures['eval_perplexity']:.3f}" if "eval_perplexity" in figures else "")
            + f", {figures['trainable_params']:,} trainable parameters, adapter {figures['adapter_bytes']:,} bytes -> {options.out}"
        )
    return options.out
