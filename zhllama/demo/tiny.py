"""The built-in tiny default: a LLaMA-style base tokenizer and model, Chinese and English text,
and Chinese instruction data, all made offline in seconds.

Used by ``zhllama demo`` and by the tests, so both exercise the real code paths without a
download. The Chinese text is drawn from jieba's dictionary (word frequencies shipped with the
package); the English text and the instructions are generated here. None of it is meant to
read well, only to have the statistics the pipeline cares about: frequent multi-character
Chinese words, ASCII text with digits, and prompts whose answers a tiny model can learn.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from functools import lru_cache
from pathlib import Path

ENGLISH_WORDS = (
    "the a of and to in is was he she it they we you that this with for on at by from as be have had not "
    "but what all were when there can an your which their said if do will each about how up out them then "
    "many some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much go good new write our me man too any day same right "
    "look think also around another came come work three word must because does part even place well such "
    "here take why things help put years different away again off went old number great tell men say small "
    "every found still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always looked show large often "
    "together asked house world going want school important until form food keep children feet land side "
    "without boy once animals life enough took sometimes four head above kind began almost live page got "
    "earth need far hand high year mother light parts country father let night following picture being study "
    "second eyes soon times story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew try told young miles sun ways thing whole hear example heard "
    "several change answer room sea against top turned learn point city play toward five using himself usually"
).split()

# How LLaMA's tokenizer.model was trained, as far as encoding is concerned.
LLAMA_STYLE_TRAINER_SPEC = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


@lru_cache(maxsize=1)
def jieba_words() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Han-only words of jieba's dictionary and their frequencies (most frequent first)."""
    import jieba

    path = Path(jieba.__file__).parent / "dict.txt"
    words, freqs = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            word, freq, *_ = line.split()
            if all("\u4e00" <= ch <= "\u9fff" for ch in word) and int(freq) >= 50:
                words.append(word)
                freqs.append(int(freq))
    order = sorted(range(len(words)), key=lambda i: -freqs[i])
    return tuple(words[i] for i in order), tuple(freqs[i] for i in order)


def chinese_sentences(count: int, *, seed: int = 0, top_words: int = 6000) -> list[str]:
    """Sentences of frequent jieba words, joined without spaces as Chinese is written."""
    rng = random.Random(seed)
    words, freqs = jieba_words()
    words, freqs = words[:top_words], freqs[:top_words]
    sentences = []
    for _ in range(count):
        clauses = []
        for _ in range(rng.randint(1, 3)):
            clauses.append("".join(rng.choices(words, weights=freqs, k=rng.randint(3, 9))))
        sentences.append("，".join(clauses) + rng.choice("。。。！？"))
    return sentences


def english_sentences(count: int, *, seed: int = 0) -> list[str]:
    """Plain English-looking sentences with occasional numbers."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = rng.choices(ENGLISH_WORDS, k=rng.randint(5, 16))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2024)))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
    return sentences


def write_lines(path: str | Path, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_base_sp_model(*, vocab_size: int = 1000, seed: int = 0, han_share: float = 0.05) -> bytes:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, split digits, identity normaliser,
    dummy prefix, ids 0/1/2 = <unk>/<s>/</s>) trained mostly on English, as LLaMA's was.

    ``han_share`` of the training lines are Chinese, so the base knows a few hundred common
    characters and falls back to bytes for the rest, like LLaMA.
    """
    import sentencepiece as spm

    english = english_sentences(4000, seed=seed)
    chinese = chinese_sentences(int(len(english) * han_share), seed=seed + 1, top_words=800)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english + chinese),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
        **LLAMA_STYLE_TRAINER_SPEC,
    )
    return model.getvalue()


def write_base_tokenizer(out_dir: str | Path, *, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Write a LLaMA-style base tokenizer directory: tokenizer.model plus exact HF files."""
    from zhllama.vocab.hf import save_hf_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(train_base_sp_model(vocab_size=vocab_size, seed=seed))
    save_hf_tokenizer(out_dir / "tokenizer.model", out_dir)
    return out_dir


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8 or 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def write_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    tied: bool = False,
    seed: int = 0,
) -> Path:
    """A randomly initialised LLaMA-architecture model sized to the tokenizer in ``tokenizer_dir``,
    saved as safetensors with the tokenizer files beside it (a base model directory)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    from zhllama.chain import TOKENIZER_FILES
    from zhllama.outdir import copy_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(sp.get_piece_size(), hidden_size=hidden_size, layers=layers, tied=tied))
    model.save_pretrained(str(out_dir))
    copy_files(TOKENIZER_FILES, tokenizer_dir, out_dir)
    return out_dir


def chinese_number(n: int) -> str:
    """0..99 in Chinese numerals (十一, 二十, 九十九)."""
    numerals = "零一二三四五六七八九"
    if n <= 10:
        return (numerals + "十")[n]
    tens, ones = divmod(n, 10)
    return (numerals[tens] if tens > 1 else "") + "十" + (numerals[ones] if ones else "")


def instruction_records(count: int, *, seed: int = 0) -> list[dict]:
    """Alpaca-style Chinese instructions with answers a tiny model can learn to produce."""
    rng = random.Random(seed)
    words = jieba_words()[0][:2000]
    numerals = "零一二三四五六七八九十"
    records = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            text = "".join(rng.sample(words, 3))
            records.append({"instruction": "请重复下面这句话。", "input": text, "output": text})
        elif kind == 1:
            a, b = rng.randint(0, 5), rng.randint(0, 5)
            records.append(
                {"instruction": f"{numerals[a]}加{numerals[b]}等于几？", "input": "", "output": f"{numerals[a]}加{numerals[b]}等于{numerals[a + b]}。"}
            )
        elif kind == 2:
            word = rng.choice(words)
            records.append({"instruction": f"“{word}”有几个字？", "input": "", "output": f"“{word}”有{'两' if len(word) == 2 else chinese_number(len(word))}个字。"})
        else:
            topic = rng.choice(words)
            records.append({"instruction": f"用一句话介绍{topic}。", "input": "", "output": f"{topic}是一个常见的词语。"})
    return records


CHINESE_FACTS = (
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("日本的首都是哪里？", "日本的首都是东京。"),
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("英国的首都是哪里？", "英国的首都是伦敦。"),
    ("美国的首都是哪里？", "美国的首都是华盛顿。"),
    ("一年有几个季节？", "一年有四个季节：春、夏、秋、冬。"),
    ("一周有几天？", "一周有七天。"),
    ("一天有多少小时？", "一天有二十四小时。"),
    ("太阳从哪边升起？", "太阳从东边升起。"),
    ("水在多少度结冰？", "水在零摄氏度结冰。"),
    ("地球绕着什么转？", "地球绕着太阳转。"),
    ("月亮绕着什么转？", "月亮绕着地球转。"),
    ("熊猫吃什么？", "熊猫主要吃竹子。"),
    ("中国最长的河是哪条？", "中国最长的河是长江。"),
    ("世界上最高的山是哪座？", "世界上最高的山是珠穆朗玛峰。"),
    ("李白是谁？", "李白是唐代著名的诗人。"),
    ("《红楼梦》的作者是谁？", "《红楼梦》的作者是曹雪芹。"),
    ("中秋节吃什么？", "中秋节吃月饼。"),
    ("春节是哪一天？", "春节是农历正月初一。"),
    ("人有几只手？", "人有两只手。"),
)


def fact_records(count: int, *, seed: int = 0) -> list[dict]:
    """Alpaca-style records drawn (with repetition) from a fixed set of short Chinese questions
    with true answers: few enough that a tiny model memorises them in a couple of hundred SFT
    steps, so the demo's chat answer is a real sentence rather than noise."""
    rng = random.Random(seed)
    return [{"instruction": q, "input": "", "output": a} for q, a in rng.choices(CHINESE_FACTS, k=count)]


def write_json(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def cpu_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def pretrain_tiny_llama(
    model_dir: str | Path,
    texts: list[str],
    *,
    steps: int = 200,
    block_size: int = 64,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Give a random tiny LLaMA some knowledge: train all its weights on ``texts`` for ``steps``
    steps (transformers.Trainer, packed blocks, one epoch or more) and save it back in place.

    A random model makes the pipeline's story meaningless (every loss starts at ln(vocab));
    a few seconds of this gives a base whose Chinese loss (through byte fallback) the extended
    model's new rows should start close to. Tokenised with the SentencePiece model in
    ``model_dir`` so it does not depend on the HF tokenizer files. Returns the logged losses.
    """
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    model_dir = Path(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    ids: list[int] = []
    for line in sp.encode(texts):
        ids += [sp.bos_id(), *line, sp.eos_id()]
    blocks = torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)
    if len(blocks) == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one block of {block_size}")
    dataset = [{"input_ids": block, "labels": block} for block in blocks]
    model = LlamaForCausalLM.from_pretrained(str(model_dir))
    args = TrainingArguments(
        output_dir=str(model_dir / ".pretrain"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    model.save_pretrained(str(model_dir))
    shutil.rmtree(model_dir / ".pretrain", ignore_errors=True)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
