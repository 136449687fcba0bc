"""--no-cross-document-attention: packed blocks whose documents are scored as if alone."""

from __future__ import annotations

import random

import pytest
import torch

from zhllama.demo.tiny import tiny_llama_config
from zhllama.errors import ZhllamaError
from zhllama.pretrain.data import _pack
from zhllama.pretrain.packing import (
    STARTS_COLUMN,
    DocumentBlockCollator,
    block_collator,
    document_starts_from_framing,
    pack_documents,
    positions_from_starts,
)

BOS, EOS, VOCAB, BLOCK = 1, 2, 300, 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def framed_documents(count: int, seed: int = 0) -> list[list[int]]:
    """``<s> doc </s>`` token lists of varied lengths (some longer than a block)."""
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 3, 7, 12, 20, 45]))] + [EOS] for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()
    model.config.use_cache = False  # as in training (Acceleration.prepare): a KV cache hides the restarts
    return model


def segments(starts: list[int], length: int) -> list[tuple[int, int]]:
    bounds = [*starts, length]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def test_pack_documents_cuts_the_same_blocks_as_data_and_records_starts():
    docs = framed_documents(40)
    packed = pack_documents({"input_ids": docs}, BLOCK)
    assert packed["input_ids"] == _pack({"input_ids": docs}, BLOCK)["input_ids"]  # a drop-in for data.py's packer
    stream_starts, offset = [], 0
    for doc in docs:
        stream_starts.append(offset)
        offset += len(doc)
    for index, (block, starts) in enumerate(zip(packed["input_ids"], packed[STARTS_COLUMN])):
        begin = index * BLOCK
        expected = sorted({0, *(s - begin for s in stream_starts if begin < s < begin + BLOCK)})
        assert starts == expected
        assert starts == document_starts_from_framing(block, BOS, EOS)  # the framing fallback agrees


def test_positions_restart_and_document_first_tokens_are_not_targets():
    assert positions_from_starts(7, [0, 3, 4]) == [0, 1, 2, 0, 0, 1, 2]
    block = [5, 6, EOS, BOS, 7, 8, EOS, BOS]
    batch = DocumentBlockCollator(BOS, EOS)([{"input_ids": block}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, EOS, -100, 7, 8, EOS, -100]]
    assert "attention_mask" not in batch
    with_column = DocumentBlockCollator()([{"input_ids": block, STARTS_COLUMN: [3, 7]}])
    assert with_column["position_ids"].tolist() == batch["position_ids"].tolist()
    with pytest.raises(ZhllamaError, match="needs document boundaries"):
        DocumentBlockCollator()([{"input_ids": block}])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_block_logits_equal_each_document_scored_alone(model, attention, flatten):
    model.set_attn_implementation(attention)
    packed = pack_documents({"input_ids": framed_documents(30, seed=3)}, BLOCK)
    features = [{"input_ids": ids, STARTS_COLUMN: starts} for ids, starts in zip(packed["input_ids"], packed[STARTS_COLUMN])][:4]
    batch = DocumentBlockCollator(BOS, EOS, flatten=flatten)(features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        logits = logits.reshape(len(features), BLOCK, VOCAB)
        across = model(input_ids=batch["input_ids"].reshape(len(features), BLOCK)).logits  # plain blocks
    compared = later = 0
    for row, feature in enumerate(features):
        for a, b in segments(feature[STARTS_COLUMN], BLOCK):
            alone = model(input_ids=torch.tensor([feature["input_ids"][a:b]])).logits[0]
            torch.testing.assert_close(logits[row, a:b], alone, rtol=1e-4, atol=1e-5)
            compared += 1
            if a > 0:
                later += 1
                assert not torch.allclose(across[row, a:b], alone, atol=1e-3)  # plain blocks do attend across
    assert compared > len(features) and later > 0


def test_loss_of_a_block_is_the_mean_of_its_documents_own_token_losses(model):
    model.set_attn_implementation("sdpa")
    block = framed_documents(12, seed=5)
    packed = pack_documents({"input_ids": block}, BLOCK)
    feature = {"input_ids": packed["input_ids"][1], STARTS_COLUMN: packed[STARTS_COLUMN][1]}
    batch = DocumentBlockCollator(BOS, EOS)([feature])
    with torch.no_grad():
        loss = model(**batch).loss
        token_losses = []
        for a, b in segments(feature[STARTS_COLUMN], BLOCK):
            ids = torch.tensor([feature["input_ids"][a:b]])
            if b - a > 1:
                logits = model(input_ids=ids).logits[0, :-1]
                token_losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), rtol=1e-5, atol=1e-6)


def test_block_collator_picks_plain_stacking_or_documents():
    class Tok:
        bos_token_id, eos_token_id = BOS, EOS

    from zhllama.pretrain.data import collate_blocks

    assert block_collator(Tok, cross_document_attention=True) is collate_blocks
    assert block_collator(Tok, cross_document_attention=False, attention="flash_attention_2").flatten
    assert not block_collator(Tok, cross_document_attention=False, attention="sdpa").flatten


def test_pretrain_no_cross_document_attention_end_to_end(tmp_path, merged_tokenizer_dir, tiny_model_dir, chinese_corpus, monkeypatch, capsys):
    """The stage trains on document-restarting blocks, says what it chose, and refuses 4-bit on CPU."""
    from pretrain_fixtures import TRAIN_FLAGS, manifest, run

    extended = tmp_path / "extended"
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_tokenizer_dir, "--out", extended, "--head-init", "mean"])
    collated = []
    original = DocumentBlockCollator.__call__
    monkeypatch.setattr(DocumentBlockCollator, "__call__", lambda self, features: collated.append(len(features)) or original(self, features))
    argv = ["pretrain", "--stage", "1", "--model", extended, "--data", chinese_corpus, "--block-size", "32", "--validation-split", "0",
            "--cache-dir", tmp_path / "cache", "--max-steps", "3", "--learning-rate", "1e-2", *TRAIN_FLAGS]  # fmt: skip
    run([*argv, "--out", tmp_path / "s1", "--no-cross-document-attention"])
    written = manifest(tmp_path / "s1")
    assert written["options"]["cross_document_attention"] is False and written["figures"]["global_step"] == 3
    assert written["acceleration"]["attention"] == "sdpa" and written["acceleration"]["line"].startswith("acceleration: cpu")
    assert collated and set(collated) == {8}  # every training batch went through the document collator
    assert "acceleration: cpu" in capsys.readouterr().err  # a notice before training, beside the progress bars

    run([*argv, "--out", tmp_path / "s1_4bit", "--load-in-4bit"], expect=1)
    err = capsys.readouterr().err
    assert err.count("zhllama: error: --load-in-4bit needs a CUDA GPU") == 1 and "Traceback" not in err
    assert not (tmp_path / "s1_4bit").exists()
